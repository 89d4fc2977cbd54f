"""What a file found in an input folder is: an image, a Parquet file, or something skipped (with the reason).

:func:`classify` decides without ever opening a non-regular file (a FIFO would block the walk):

- a name with an image extension (:data:`IMAGE_EXTENSIONS`, or :data:`OTHER_IMAGE_EXTENSIONS` such as
  ``.heic``/``.jxl``, which decoding then reports as unsupported) is an image; ``*.parquet``/``*.pq`` is Parquet;
  such a name on a FIFO, socket or device is still an input, with the error ``not a regular file (FIFO)``;
- any other regular file is recognised by its first bytes: ``PAR1`` is Parquet, a raster image signature
  (PNG, JPEG, HEIC, ...) is an image (so ``photo.JPG.txt`` or ``IMG_0001`` are scanned);
- everything else is skipped with a reason: empty file, not a regular file, a symlinked folder (not
  followed), a vector/document format (PDF, EPS, SVG), unrecognised content.

Skipped files get no record; :class:`SkipLog` counts them by reason for the run summary.
"""
from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from guardalign.io.formats import MAGIC_BYTES, sniff
from guardalign.io.images import IMAGE_EXTENSIONS
from guardalign.io.parquet_plan import file_kind

PARQUET_EXTENSIONS = frozenset({".parquet", ".pq"})
# Image names Pillow cannot decode here: taken as inputs so that the record says why (never skipped silently).
OTHER_IMAGE_EXTENSIONS = frozenset({".heic", ".heif", ".jxl", ".jp2", ".j2k", ".jpx", ".icns", ".psd", ".qoi"})
MAX_EXAMPLES = 20  # skipped files remembered by name (all are counted)


@dataclass
class SkipLog:
    """Files in input folders that are not inputs (no record), with the reason; filled as the walk goes."""

    by_reason: Counter = field(default_factory=Counter)  # reason -> number of files
    examples: list[tuple[str, str]] = field(default_factory=list)  # first MAX_EXAMPLES (id-style path, reason)

    def add(self, name: str, reason: str) -> None:
        self.by_reason[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((name, reason))

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

    def __bool__(self) -> bool:
        return bool(self.by_reason)


def _head(path: Path) -> bytes | None:
    """First bytes of a regular file, opened without blocking (O_NONBLOCK: a file swapped for a FIFO
    between the stat and the open cannot hang the walk); None when unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, MAGIC_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)


def classify(path: Path, name: str | None = None) -> tuple[str, str | None]:
    """``(kind, detail)`` for a file found in a folder.

    kind is ``"image"`` or ``"parquet"`` (detail: an error to record, or None), or ``"skip"`` (detail: the reason).
    """
    name = name if name is not None else path.name
    ext = os.path.splitext(name)[1].lower()
    named = ("image" if ext in IMAGE_EXTENSIONS or ext in OTHER_IMAGE_EXTENSIONS
             else "parquet" if ext in PARQUET_EXTENSIONS else None)
    try:
        lmode = os.lstat(path).st_mode
    except OSError as e:
        return (named, f"cannot access file ({e.strerror or e})") if named else ("skip", "cannot access file")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        if stat.S_ISLNK(lmode):
            target = os.readlink(path)
            return (named or "image", f"broken symlink (points to {target!r})") if named else \
                ("skip", "broken symlink")
        return (named, "cannot access file") if named else ("skip", "cannot access file")
    if stat.S_ISDIR(mode):
        return "skip", "symlinked folder (not followed)"
    if not stat.S_ISREG(mode):
        why = f"not a regular file ({file_kind(mode)})"
        return (named, why) if named else ("skip", why)
    if named:
        return named, None
    head = _head(path)
    if head is None:
        return "skip", "cannot read file"
    if not head:
        return "skip", "empty file"
    if head[:4] == b"PAR1":
        return "parquet", None
    sniffed = sniff(head)
    if sniffed is None:
        return "skip", "not an image (unrecognised content)"
    if not sniffed.raster:
        return "skip", f"not a raster image ({sniffed.format})"
    return "image", None
