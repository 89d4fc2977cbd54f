"""guardalign: keep unsafe images out of vision-language models and their training data.

Heavy dependencies (torch, open_clip, transformers) are imported lazily by the
modules that need them, so ``import guardalign`` and ``guardalign --help`` stay fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

from guardalign.errors import ConfigError, GuardalignError, InputError, ModelLoadError

__all__ = ["__version__", "GuardalignError", "ConfigError", "InputError", "ModelLoadError",
           "scan", "mask", "answer", "report"]
_ENTRY_POINTS = {"scan": "guardalign.commands.scan", "mask": "guardalign.commands.mask", "answer": "guardalign.commands.answer",
                 "report": "guardalign.reporting.collect"}


def __getattr__(name: str):
    # Lazy library entry points: ``guardalign.scan(...)`` mirrors ``guardalign scan``.
    if name in _ENTRY_POINTS:
        import importlib

        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'guardalign' has no attribute {name!r}")
