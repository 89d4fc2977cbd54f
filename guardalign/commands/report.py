"""``guardalign report`` as a library function (the work is in :mod:`guardalign.reporting`)."""
from __future__ import annotations

from guardalign.reporting.collect import report

__all__ = ["report"]
