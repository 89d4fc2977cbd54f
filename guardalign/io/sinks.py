"""Record writers (JSONL, Parquet) that survive a crash at any instant, and resume.

- JSONL (default): each batch is encoded first, then appended with one ``write`` + ``fsync``, so a
  crash leaves a valid prefix plus at most one torn last line. ``resume`` cuts the torn line and
  appends. Lines are strict JSON (NaN/inf become null). ``"-"`` writes to stdout.
- Parquet cannot be appended to and a killed ``ParquetWriter`` leaves no footer, so records go to a
  journal ``<out>.partial.jsonl`` (same guarantees as JSONL); ``close`` merges any earlier finished
  rows and the journal into ``<out>`` atomically (temp file in the same directory + ``os.replace``)
  and deletes the journal. The columns are the fixed :data:`SCAN_FIELDS`; other keys travel in a JSON
  ``extra`` column and come back from :func:`read_records`. (The Parquet sink and schema live in
  :mod:`guardalign.io.parquet`; they are importable from here.)
- An existing non-empty output (or journal) is never overwritten: without ``resume`` it is a
  ConfigError. One writer per output: a JSONL file is locked when it is first written (or ``claim``ed),
  a Parquet output's journal as soon as the sink opens, so a second run to the same ``--out`` stops at
  once. A run that stops before any record leaves nothing behind (an empty file or journal it created,
  and the folders made for it, are removed again).
- Outputs go through :mod:`guardalign.io.durable`: never through a symlink to a regular file; a device
  (``/dev/null``) is written without ``fsync``; any ``OSError`` becomes OutputError (exit 5) after the
  file is cut back to its last whole line, so ``--resume`` continues it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Iterator, Protocol

from guardalign.errors import ConfigError, InputError
from guardalign.io import durable
from guardalign.pathnames import json_safe
from guardalign.io.jsonl_out import (  # noqa: F401 (names re-exported from here)
    JsonlSink, Sink, StdoutSink, _Closing, _check_target, _encode, _jsonable, _scan_jsonl, _size, dumps,
)
from guardalign.io.parquet import (  # noqa: F401 (names re-exported from here)
    EXTRA_FIELD, SCAN_FIELDS, ParquetSink, _journal, _parquet_ids, _read_parquet, scan_schema,
)


# ----------------------------------------------------------------------------- registry & readers

WRITERS: dict[str, type] = {"jsonl": JsonlSink, "parquet": ParquetSink}


def open_sink(out: str, format: str = "jsonl", resume: bool = False) -> Sink:
    """Open a writer for ``out`` ("-" = stdout, JSONL only). Creates nothing until the first write.

    Raises
    ------
    ConfigError
        Unknown format; stdout with Parquet or ``resume``; ``out`` exists (or an interrupted Parquet
        journal does) and ``resume`` is off; ``out`` is a directory; a resumed file is corrupt mid-way.
    """
    if format not in WRITERS:
        raise ConfigError(f"unknown --format {format!r}; choose one of {sorted(WRITERS)}")
    if str(out) == "-":
        if format != "jsonl":
            raise ConfigError("--out - (stdout) supports only --format jsonl")
        if resume:
            raise ConfigError("--resume needs an output file, not stdout")
        return StdoutSink()
    return WRITERS[format](Path(out), resume=resume)


def existing_ids(out: str, format: str) -> set[str]:
    """Ids already written to ``out`` (plus its Parquet journal); empty if nothing exists. Read-only."""
    if str(out) == "-":
        return set()
    path = Path(out)
    ids: set[str] = set()
    if format == "parquet":
        if path.exists():
            ids |= _parquet_ids(path)
        path = _journal(path)
    if path.exists():
        ids |= _scan_jsonl(path)[0]
    return ids


def read_records(path: str | Path) -> Iterator[dict]:
    """Records of a scan output, JSONL or Parquet (by extension or magic); a torn last JSONL line is skipped.

    A Parquet output also yields the records still in its journal (an interrupted or running scan),
    shaped like Parquet rows (every SCAN_FIELDS key present).

    Raises
    ------
    InputError
        Missing file, or an invalid line (naming the line).
    """
    path = Path(path)
    journal = _journal(path)
    if not path.exists() and not journal.exists():
        raise InputError(f"records file not found: {path}")
    magic = b""
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
    if magic == b"PAR1" or path.suffix.lower() == ".parquet" or not path.exists():
        return _read_parquet_output(path, journal)
    return _read_jsonl(path)


def _read_parquet_output(path: Path, journal: Path) -> Iterator[dict]:
    seen: set[str] = set()
    if path.exists():
        for row in _read_parquet(path):
            if journal.exists():
                seen.add(str(row.get("id")))
            yield row
    if journal.exists():
        names = [n for n, _ in SCAN_FIELDS]
        for rec in _read_jsonl(journal):
            if str(rec.get("id")) not in seen:
                yield {n: rec.get(n) for n in names} | {k: v for k, v in rec.items() if k not in names}


def _read_jsonl(path: Path) -> Iterator[dict]:
    from guardalign.io.jsonl import read_objects

    for _, rec in read_objects(path):
        yield rec
