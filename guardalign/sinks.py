"""Record writers (JSONL, Parquet) that survive a crash at any instant, and resume.

- JSONL (default): each batch is encoded first, then appended with one ``write`` + ``fsync``, so a
  crash leaves a valid prefix plus at most one torn last line. ``resume`` cuts the torn line and
  appends. Lines are strict JSON (NaN/inf become null). ``"-"`` writes to stdout.
- Parquet cannot be appended to and a killed ``ParquetWriter`` leaves no footer, so records go to a
  journal ``<out>.partial.jsonl`` (same guarantees as JSONL); ``close`` merges any earlier finished
  rows and the journal into ``<out>`` atomically (temp file in the same directory + ``os.replace``)
  and deletes the journal. The columns are the fixed :data:`SCAN_FIELDS`; other keys travel in a JSON
  ``extra`` column and come back from :func:`read_records`.
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

# Scan record fields stored as Parquet columns (DESIGN §3), with their arrow types (built lazily).
SCAN_FIELDS: tuple[tuple[str, str], ...] = (
    ("id", "string"), ("source", "string"), ("status", "string"), ("error", "string"),
    ("verdict", "string"), ("score", "double"), ("category", "string"),
    ("categories", "map<string,double>"), ("unsafe_patches", "list<int32>"), ("grid", "list<int32>"),
    ("boxes", "list<list<int32>>"), ("patch_scores", "list<double>"), ("patch_boxes", "list<list<int32>>"),
    ("width", "int32"), ("height", "int32"), ("method", "string"), ("patches", "string"),
    ("model", "string"), ("anchors_sha256", "string"), ("threshold", "double"),
    ("box_categories", "list<string>"), ("notes", "list<string>"), ("elapsed_s", "double"),
)
EXTRA_FIELD = "extra"  # JSON object string holding every record key not in SCAN_FIELDS
_JOURNAL_SUFFIX = ".partial.jsonl"
_MERGE_ROWS = 10_000  # journal records converted per Parquet write at close


class Sink(Protocol):
    def write(self, records: list[dict]) -> None: ...

    def close(self) -> None: ...


class _Closing:
    """``with`` support: close on success; on an exception abort (create nothing new, keep journals)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


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


# ----------------------------------------------------------------------------- Parquet


def scan_schema():
    """The arrow schema of scan records in Parquet (SCAN_FIELDS + ``extra``)."""
    import pyarrow as pa

    i32 = pa.int32()
    types = {
        "string": pa.string(), "double": pa.float64(), "int32": i32,
        "map<string,double>": pa.map_(pa.string(), pa.float64()), "list<int32>": pa.list_(i32),
        "list<list<int32>>": pa.list_(pa.list_(i32)), "list<double>": pa.list_(pa.float64()),
        "list<string>": pa.list_(pa.string()),
    }
    return pa.schema([(n, types[t]) for n, t in SCAN_FIELDS] + [(EXTRA_FIELD, pa.string())])


def _to_row(record: dict) -> dict:
    """Record → a row of the scan schema (missing keys → null, unknown keys → ``extra`` JSON)."""
    rec = _jsonable(record)
    names = {n for n, _ in SCAN_FIELDS}
    row = {n: rec.get(n) for n, _ in SCAN_FIELDS}
    extra = {k: v for k, v in rec.items() if k not in names}
    row[EXTRA_FIELD] = json.dumps(extra, ensure_ascii=False, allow_nan=False, sort_keys=True) if extra else None
    return row


def _rows_table(records: list[dict], schema):
    import pyarrow as pa

    rows = [_to_row(r) for r in records]
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        for r in rows:  # name the record that does not fit
            try:
                pa.Table.from_pylist([r], schema=schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e1:
                raise ValueError(f"record {r.get('id')!r} does not fit the scan schema: {e1}") from None
        raise ValueError(f"records do not fit the scan schema: {e}") from None


def _journal(path: Path) -> Path:
    return path.with_name(path.name + _JOURNAL_SUFFIX)


def _parquet_ids(path: Path) -> set[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            if "id" not in pf.schema_arrow.names:
                raise ConfigError(f"{path} has no 'id' column; is this a guardalign output?")
            return {str(x) for b in pf.iter_batches(columns=["id"]) for x in b.column(0).to_pylist()}
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"cannot resume: {path} is not a readable Parquet file ({e})") from None


class ParquetSink(_Closing):
    """Parquet output through a crash-safe JSONL journal; see the module docstring."""

    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        self.resume = resume
        _check_target(self.path)
        self._journal_path = _journal(self.path)
        if not resume:
            if self._journal_path.exists() and self._journal_path.stat().st_size > 0:
                raise ConfigError(f"{self._journal_path} exists: an earlier run was interrupted; "
                                  "pass --resume to continue it")
            if self.path.exists() and self.path.stat().st_size > 0:
                raise ConfigError(f"{self.path} exists; pass --resume to continue it or choose another --out")
        self._done_ids = _parquet_ids(self.path) if resume and self.path.exists() else set()
        self._journal = JsonlSink(self._journal_path, resume=True)
        self.existing: set[str] = self._done_ids | self._journal.existing  # ids already written (resume)
        self._schema = scan_schema()
        self._closed = False

    def write(self, records: list[dict]) -> None:
        """Journal ``records`` (durable on return); they reach ``<out>`` at close."""
        if records:
            _rows_table(records, self._schema)  # a record that does not fit fails now, not at close
            self._journal.write(records)

    def close(self) -> None:
        """Merge earlier rows + journal into ``<out>`` atomically, then delete the journal."""
        if self._closed:
            return
        self._journal.abort()
        self._finalize()
        self._closed = True

    def abort(self) -> None:
        """Stop, leaving the journal for ``--resume``; nothing new is created."""
        self._journal.abort()
        self._closed = True

    def _finalize(self) -> None:
        import pyarrow.parquet as pq

        if self._done_ids and not self._journal_path.exists():
            return  # resumed a finished file and added nothing: leave it as it is
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with pq.ParquetWriter(tmp, self._schema) as writer:
                if self._done_ids:  # resuming a finished file: keep its rows
                    with pq.ParquetFile(self.path) as pf:
                        for batch in pf.iter_batches():
                            writer.write_table(_conform(batch, self._schema))
                if self._journal_path.exists():
                    chunk: list[dict] = []
                    for rec in read_records(self._journal_path):
                        if str(rec.get("id")) not in self._done_ids:  # crash between replace and unlink
                            chunk.append(rec)
                        if len(chunk) >= _MERGE_ROWS:
                            writer.write_table(_rows_table(chunk, self._schema))
                            chunk = []
                    if chunk:
                        writer.write_table(_rows_table(chunk, self._schema))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._journal_path.unlink(missing_ok=True)


def _conform(batch, schema):
    """An earlier output's batch → a table with exactly ``schema`` (missing columns null)."""
    import pyarrow as pa

    cols = [batch.column(batch.schema.get_field_index(f.name)).cast(f.type)
            if f.name in batch.schema.names else pa.nulls(batch.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


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


def _read_parquet(path: Path) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read Parquet records {path} ({e})") from None
    with pf:
        maps = [f.name for f in pf.schema_arrow if pa.types.is_map(f.type)]
        ours = set(pf.schema_arrow.names) >= {n for n, _ in SCAN_FIELDS} | {EXTRA_FIELD}
        for batch in pf.iter_batches():
            for row in batch.to_pylist():
                for name in maps:
                    if row[name] is not None:
                        row[name] = dict(row[name])
                if ours:
                    extra = row.pop(EXTRA_FIELD)
                    row.update(json.loads(extra) if extra else {})
                yield row
