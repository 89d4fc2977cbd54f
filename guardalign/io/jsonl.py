"""The one JSON-lines reader: every JSONL input and output is parsed here, with one error convention.

A bad line is never an exception: :func:`parse_line` returns ``(value, None)`` or ``(None, reason)`` and
:func:`iter_lines` yields a :class:`Line` for every non-blank line, so each caller decides per line (an
error record, a skipped label, a refusal to resume). Only a file that cannot be opened raises (InputError).

- A UTF-8 byte-order mark at the start of the file is dropped; that line stays line 1.
- Lines end at ``\\n`` (JSON ignores a ``\\r`` before it); line numbers count every line, blank ones too.
- A line that is not UTF-8, not JSON, or nested too deeply for the parser (``RecursionError``) gets a reason
  naming the cause; the last line without a newline is marked ``torn`` (what a crash mid-write leaves).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from guardalign.errors import InputError

BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Line:
    n: int  # 1-based line number in the file
    value: Any  # the parsed JSON value (None when error is set)
    error: str | None  # why the line is unusable, e.g. "invalid JSON (Expecting value: column 1)"
    raw: bytes  # the line's bytes, newline included
    end: int  # byte offset just after this line
    torn: bool = False  # no trailing newline: the last line, maybe cut by a crash mid-write


def parse_line(raw: bytes | str) -> tuple[Any, str | None]:
    """``(value, None)`` for one JSON text, or ``(None, reason)``; never raises."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {e.start}: {e.reason})"
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "invalid JSON (nested too deeply)"
    except ValueError as e:
        return None, f"invalid JSON ({e})"


def iter_raw(f: BinaryIO) -> Iterator[tuple[int, bytes, int]]:
    """``(line number, raw bytes, end offset)`` of every line of a binary file, BOM dropped from line 1."""
    end = 0
    for n, raw in enumerate(f, 1):
        end += len(raw)
        if n == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        yield n, raw, end


def iter_lines(source: str | os.PathLike | bytes | BinaryIO, *, name: str | None = None) -> Iterator[Line]:
    """A :class:`Line` for every non-blank line of a file path, an open binary file, or bytes.

    Raises InputError (naming the file) only when a path cannot be opened.
    """
    if isinstance(source, (bytes, bytearray)):
        import io

        yield from _lines(io.BytesIO(source))
        return
    if hasattr(source, "read"):
        yield from _lines(source)
        return
    path = Path(source)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read {name or path}: {e.strerror or e}") from None
    with f:
        yield from _lines(f)


def _lines(f: BinaryIO) -> Iterator[Line]:
    for n, raw, end in iter_raw(f):
        if not raw.strip():
            continue
        value, error = parse_line(raw)
        yield Line(n, value, error, raw, end, torn=not raw.endswith(b"\n"))


def read_objects(path: str | os.PathLike, *, what: str = "records") -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of a JSONL file whose every line must be a JSON object (guardalign outputs).

    A torn last line (a crash mid-write) ends the stream quietly. Any other bad line raises InputError
    naming ``path:line`` and the cause.
    """
    for line in iter_lines(path):
        if line.error is not None:
            if line.torn:
                return
            raise InputError(f"{path}:{line.n}: {line.error}")
        if not isinstance(line.value, dict):
            raise InputError(f"{path}:{line.n}: expected a JSON object in the {what}, got "
                             f"{type(line.value).__name__}")
        yield line.n, line.value
