"""guardalign: keep unsafe images out of vision-language models and their training data.

The library entry points mirror the commands, keyword for keyword: ``guardalign.scan(...)``,
``guardalign.mask(...)``, ``guardalign.answer(...)``, ``guardalign.calibrate(...)``,
``guardalign.report(...)`` and ``guardalign.probe(...)``; ``guardalign.evaluate(...)`` is ``guardalign eval``. Heavy dependencies (torch, open_clip, transformers) are imported lazily, so
``import guardalign`` and ``guardalign --help`` stay fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

from guardalign.errors import ConfigError, GuardalignError, InputError, ModelLoadError

# Entry point name → the module that defines it. No submodule of this package has any of these names, so
# importing one can never shadow an entry point (the wave-1 bug: ``guardalign.scan`` became the module).
_ENTRY_POINTS = {
    "scan": "guardalign.commands.scan",
    "mask": "guardalign.commands.mask",
    "answer": "guardalign.commands.answer",
    "calibrate": "guardalign.commands.calibrate",
    "report": "guardalign.commands.report",
    "evaluate": "guardalign.commands.eval",  # ``guardalign eval``; ``eval`` would shadow the builtin
    "probe": "guardalign.commands.probe",
}
__all__ = ["__version__", "GuardalignError", "ConfigError", "InputError", "ModelLoadError", *_ENTRY_POINTS]


def __getattr__(name: str):
    # Lazy library entry points: ``guardalign.scan(...)`` mirrors ``guardalign scan``.
    if name in _ENTRY_POINTS:
        import importlib

        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'guardalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ENTRY_POINTS))
