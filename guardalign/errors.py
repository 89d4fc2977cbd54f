"""Exceptions that carry the exit code the CLI should return (DESIGN §3)."""
from __future__ import annotations


class GuardalignError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = 2


class ConfigError(GuardalignError):
    """Bad flags, a bad config file or a bad anchors YAML (exit 2, nothing written)."""


class ModelLoadError(GuardalignError):
    """A model or its weights could not be loaded (exit 2, nothing written)."""


class InputError(GuardalignError):
    """An input that cannot be used at all, e.g. a missing Parquet image column (exit 2)."""
