"""Exit codes (defined once, for every command) and the exceptions that carry them (DESIGN §3)."""
from __future__ import annotations

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
