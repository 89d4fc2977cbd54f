"""Exit codes (defined here once) and the exceptions that carry them (DESIGN §3).

Every module and the CLI take exit codes from this table; the README's table lists the same codes.
"""
from __future__ import annotations

import sys

EXIT_OK = 0  # done, and every gate passed
EXIT_GATE = 1  # a gate failed (--fail-on-unsafe, --max-unsafe-rate)
EXIT_USAGE = 2  # usage, config, input-schema or model-loading error; nothing written
EXIT_UNREADABLE = 3  # the run finished, but some inputs could not be read (error records name them)
EXIT_NOTHING = 4  # a gate was asked for, but nothing was scanned (0 images), so it cannot pass
EXIT_EMPTY = EXIT_NOTHING  # the runner's name for it
EXIT_OUTPUT = 5  # an output could not be written (read-only, disk full, name too long, ...); what was written stays resumable
EXIT_INTERNAL = 70  # an unexpected internal error (a bug; rerun with --debug for the traceback)
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C); written records stay resumable

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "done, and any gate passed",
    EXIT_GATE: "a gate failed (unsafe above the limit)",
    EXIT_USAGE: "usage, config, input-schema or model error; nothing written",
    EXIT_UNREADABLE: "finished, but some inputs could not be read (listed in the records)",
    EXIT_NOTHING: "a gate was requested but no image was scanned",
    EXIT_OUTPUT: "an output could not be written (read-only, disk full, name too long ...)",
    EXIT_INTERNAL: "internal error (a bug): one line on stderr, the traceback with --debug",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class GuardalignError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = EXIT_USAGE


class ConfigError(GuardalignError):
    """Bad flags, a bad config file or a bad anchors YAML (exit 2, nothing written)."""


class ModelLoadError(GuardalignError):
    """A model or its weights could not be loaded (exit 2, nothing written)."""


class InputError(GuardalignError):
    """An input that cannot be used at all, e.g. a missing Parquet image column (exit 2)."""


class NothingScannedError(GuardalignError):
    """A gate was requested but no image was scanned (exit 4): a gate over nothing must not pass."""

    exit_code = EXIT_NOTHING


class OutputError(GuardalignError, OSError):
    """An output could not be written: an ``OSError`` on an output file or folder (exit 5).

    The message names the path and the cause; whatever was written before stays consistent and resumable. It is
    an ``OSError`` too (with the cause's ``errno``), so a handler that skips one unwritable item still catches it.
    """

    exit_code = EXIT_OUTPUT

    def __init__(self, message: str, code: int | None = None, filename=None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.errno = code
        if filename is not None:
            self.filename = filename

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] ..." form
        return self.message


def output_error(path, exc: OSError, what: str = "cannot write") -> OutputError:
    """An :class:`OutputError` naming ``path`` and the cause of ``exc`` in one line."""
    import errno

    hints = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
             errno.ENAMETOOLONG: "file name too long", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted", errno.ELOOP: "is a symlink (not followed for outputs)"}
    cause = hints.get(exc.errno) or exc.strerror or str(exc)
    return OutputError(f"{what} {_show(path)}: {cause}", exc.errno, path)


def _show(path) -> str:
    """A path for a one-line message (undecodable bytes and control characters escaped, long names shortened)."""
    from guardalign.pathnames import printable

    text = printable(path) if path is not None else "output"
    return text if len(text) <= 160 else text[:70] + "…" + text[-70:]


def warn(message: str) -> None:
    """Tell the user something on stderr as ONE line, ``warning: …``.

    Used instead of :func:`warnings.warn` for things a user of the command line must see (random weights,
    anchors fitted for other settings): Python's warning display adds the source file, the line number,
    the category and the offending source line, and changing how it displays would be process-wide state.
    """
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=sys.stderr, flush=True)
