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
  ConfigError. Files are created lazily, on the first ``write`` or on ``close``, so a run that stops
  with exit 2 before any record leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterator, Protocol

from guardalign.errors import ConfigError, InputError
from guardalign.io.parquet import (  # noqa: F401 (names re-exported from here)
    EXTRA_FIELD, SCAN_FIELDS, ParquetSink, _Closing, _journal, _parquet_ids, _read_parquet, scan_schema,
)


class Sink(Protocol):
    def write(self, records: list[dict]) -> None: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- JSON encoding


def _jsonable(obj):
    """Strict-JSON-safe copy: non-finite floats → None, numpy → Python, tuples → lists, paths → str."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return _jsonable(obj.tolist())
    raise TypeError(f"cannot write a {type(obj).__name__} value to a record")


def dumps(record: dict) -> str:
    """One strict JSON line (no trailing newline)."""
    return json.dumps(_jsonable(record), ensure_ascii=False, allow_nan=False)


def _encode(records: list[dict]) -> bytes:
    """Complete JSON lines for ``records``; TypeError names the record that cannot be encoded."""
    lines = []
    for r in records:
        try:
            lines.append(dumps(r) + "\n")
        except TypeError as e:
            raise TypeError(f"record {r.get('id')!r}: {e}") from None
    return "".join(lines).encode("utf-8")


# ----------------------------------------------------------------------------- JSONL


def _scan_jsonl(path: Path) -> tuple[set[str], int]:
    """Ids of a JSONL output and the byte length of its valid prefix.

    Only what a crash can leave is dropped from the prefix: a last line without its newline that
    starts a record (``{``) or is zero-filled. Any other bad line is a ConfigError naming it, so a
    file that is not a guardalign output is never truncated.
    """
    ids: set[str] = set()
    good_end = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                if raw.lstrip().startswith(b"{") or not raw.strip(b"\x00"):
                    break  # torn by a crash inside a write
                raise ConfigError(f"{path}:{lineno}: not a JSON record; is this a guardalign output?")
            if raw.strip():
                rec = _loads(raw)
                if not isinstance(rec, dict):
                    raise ConfigError(f"{path}:{lineno}: not a valid JSON record; cannot resume safely")
                if "id" not in rec:
                    raise ConfigError(f"{path}:{lineno}: record has no 'id'; is this a guardalign output?")
                ids.add(str(rec["id"]))
            good_end += len(raw)
    return ids, good_end


def _loads(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: Path) -> None:
    """Make a new or replaced directory entry durable (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"--out {path} is a directory; give a file name")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out {path}: {parent} is not a directory")


class JsonlSink(_Closing):
    """Append-only JSONL file; see the module docstring for the crash and resume guarantees."""

    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        self.resume = resume
        self.existing: set[str] = set()  # ids already in the file (resume)
        self._keep: int | None = None  # resume: bytes of the valid prefix to keep
        self._fd: int | None = None
        self._closed = False
        _check_target(self.path)
        if self.path.exists() and self.path.stat().st_size > 0:
            if not resume:
                raise ConfigError(f"{self.path} exists; pass --resume to continue it or choose another --out")
            self.existing, self._keep = _scan_jsonl(self.path)

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                _lock(fd, self.path)
                size = os.fstat(fd).st_size
                if self._keep is not None and size > self._keep:
                    os.ftruncate(fd, self._keep)  # drop the torn tail of a crashed run
                elif self._keep is None and size > 0:
                    raise ConfigError(f"{self.path} appeared while starting; not overwriting it")
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            if created:
                _fsync_dir(self.path.parent)
        return self._fd

    def claim(self) -> None:
        """Open and lock the file now (creating it if needed), before the first write: ConfigError when another
        running guardalign holds it."""
        self._open()

    def write(self, records: list[dict]) -> None:
        """Append ``records`` as complete lines, durable on return."""
        if self._closed:
            raise ValueError(f"write to closed sink {self.path}")
        if not records:
            return
        data = _encode(records)  # fails before touching the file
        fd = self._open()
        _write_all(fd, data)
        os.fsync(fd)

    def close(self) -> None:
        """Finish (creating an empty file if nothing was written). Idempotent."""
        if self._closed:
            return
        self._open()
        os.close(self._fd)
        self._fd, self._closed = None, True

    def abort(self) -> None:
        """Stop without creating anything that does not exist yet; written lines stay."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._closed = None, True


def _lock(fd: int, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"{path} is being written by another running guardalign") from None


class StdoutSink(_Closing):
    """JSON lines to stdout (flushed per batch); nothing to resume."""

    def __init__(self):
        self.existing: set[str] = set()  # nothing to resume on stdout

    def write(self, records: list[dict]) -> None:
        if records:
            out = sys.stdout
            out.write(_encode(records).decode("utf-8"))
            out.flush()

    def close(self) -> None:
        sys.stdout.flush()

    def abort(self) -> None:
        self.close()


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
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError as e:
                if not raw.endswith(b"\n"):
                    return  # torn last line of an interrupted run
                raise InputError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield rec


