"""The Parquet scan-record sink and its schema (split out of :mod:`guardalign.io.sinks`, whose docstring gives the
crash and resume guarantees): records are journalled as JSONL and merged into ``<out>`` atomically at close.

This module does not import :mod:`guardalign.io.sinks` at import time (that module imports this one); the JSONL
pieces it builds on are imported where they are used.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from guardalign.errors import ConfigError, InputError

# Scan record fields stored as Parquet columns (DESIGN §3), with their arrow types (built lazily).
SCAN_FIELDS: tuple[tuple[str, str], ...] = (
    ("id", "string"), ("source", "string"), ("status", "string"), ("error", "string"),
    ("verdict", "string"), ("score", "double"), ("category", "string"),
    ("categories", "map<string,double>"), ("unsafe_patches", "list<int32>"), ("grid", "list<int32>"),
    ("boxes", "list<list<int32>>"), ("patch_scores", "list<double>"), ("patch_boxes", "list<list<int32>>"),
    ("width", "int32"), ("height", "int32"), ("method", "string"), ("patches", "string"),
    ("model", "string"), ("anchors_sha256", "string"), ("threshold", "double"),
    ("box_categories", "list<string>"), ("notes", "list<string>"), ("elapsed_s", "double"), ("sha256", "string"),
    ("encodes", "int32"),
)
EXTRA_FIELD = "extra"  # JSON object string holding every record key not in SCAN_FIELDS
_JOURNAL_SUFFIX = ".partial.jsonl"
_MERGE_ROWS = 10_000  # journal records converted per Parquet write at close


# The base of every sink (the JSONL ones in guardalign.io.sinks too); it lives here so this module needs no
# import of guardalign.io.sinks at import time.
class _Closing:
    """``with`` support: close on success; on an exception abort (create nothing new, keep journals)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


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
    from guardalign.io.sinks import _jsonable

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
        from guardalign.io.sinks import JsonlSink, _check_target

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

        from guardalign.io.sinks import _fsync_dir, read_records

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
