"""Exit codes (defined once, for every command), the exceptions that carry them (DESIGN §3), and one-line
user warnings."""
from __future__ import annotations

import sys

EXIT_OK = 0  # done, and any gate passed
EXIT_GATE = 1  # a gate failed (--fail-on-unsafe, --max-unsafe-rate)
EXIT_USAGE = 2  # usage, config or model-loading error: nothing was written
EXIT_UNREADABLE = 3  # the run finished, but some inputs could not be read (their records say why)
EXIT_EMPTY = 4  # a gate was set but no image was scanned (nothing to vouch for)


class GuardalignError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = EXIT_USAGE


class ConfigError(GuardalignError):
    """Bad flags, a bad config file or a bad anchors YAML (exit 2, nothing written)."""


class ModelLoadError(GuardalignError):
    """A model or its weights could not be loaded (exit 2, nothing written)."""


class InputError(GuardalignError):
    """An input that cannot be used at all, e.g. a missing Parquet image column (exit 2)."""


def warn(message: str) -> None:
    """Tell the user something on stderr as ONE line, ``warning: …``.

    Used instead of :func:`warnings.warn` for things a user of the command line must see (random weights,
    anchors fitted for other settings): Python's warning display adds the source file, the line number,
    the category and the offending source line, and changing how it displays would be process-wide state.
    """
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=sys.stderr, flush=True)
