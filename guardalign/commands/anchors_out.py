"""Write a tuned anchors YAML (``guardalign calibrate -o``): atomically, never over an input."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from guardalign.errors import ConfigError


def write_tuned_anchors(src: str | Path, out: str | Path, tau: float | None, per_category: dict[str, float],
                        *, overwrite: bool = False, reset_overrides: bool = True,
                        inputs: Iterable[str | Path | None] = (), fitted_for: dict | None = None) -> Path:
    """Write the tuned copy of ``src`` to ``out`` atomically, after checking that only τ (and ``fitted_for``) changed.

    ``out`` may never be ``src`` or any of ``inputs`` (the labelled file, a scan): ConfigError, nothing written.
    An existing ``out`` is replaced only with ``overwrite``. OutputError (exit 5) when it cannot be written.
    """
    from guardalign.detection.anchors import load_anchors
    from guardalign.detection.anchors_edit import tuned_anchors_text
    from guardalign.io.durable import atomic_write, check_not_input

    src, out = Path(src), Path(out)
    check_not_input(out, [src, *(p for p in inputs if p is not None)], what="-o")
    text = tuned_anchors_text(src, tau, per_category, reset_overrides=reset_overrides, fitted_for=fitted_for)
    if out.exists() and not overwrite:
        raise ConfigError(f"-o {out} already exists; pass --overwrite to replace it (the input is never replaced)")
    atomic_write(out, text)
    load_anchors(out)
    return out
