"""Exceptions that carry the exit code the CLI should return (DESIGN §3), and one-line user warnings."""
from __future__ import annotations

import sys


class GuardalignError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = 2


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
