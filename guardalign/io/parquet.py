"""The Parquet scan-record sink and its schema (split out of :mod:`guardalign.io.sinks`, whose docstring gives the
crash and resume guarantees): records are journalled as JSONL and merged into ``<out>`` atomically at close.

This module does not import :mod:`guardalign.io.sinks` at import time (that module imports this one); the JSONL
pieces it builds on are imported where they are used.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from guardalign.errors import ConfigError, InputError
from guardalign.io.jsonl_out import _Closing
from guardalign.records import SCAN_RECORD, arrow_type

# Scan record fields stored as Parquet columns (guardalign.records; `json` fields travel in ``extra``).
SCAN_FIELDS: tuple[tuple[str, str], ...] = tuple((f.name, f.type) for f in SCAN_RECORD if f.type != "json")
EXTRA_FIELD = "extra"  # JSON object string holding every record key not in SCAN_FIELDS
_JOURNAL_SUFFIX = ".partial.jsonl"
_MERGE_ROWS = 10_000  # journal records converted per Parquet write at close


def scan_schema():
    """The arrow schema of scan records in Parquet (SCAN_FIELDS + ``extra``)."""
    import pyarrow as pa

    return pa.schema([(n, arrow_type(t)) for n, t in SCAN_FIELDS] + [(EXTRA_FIELD, pa.string())])


def _to_row(record: dict) -> dict:
    """Record → a row of the scan schema (missing keys → null, unknown keys → ``extra`` JSON)."""
    from guardalign.io.jsonl_out import _jsonable

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
    """Parquet output through a crash-safe JSONL journal; see the module docstring.

    The journal is created and locked when the sink opens, so a second run writing the same ``--out`` stops at
    once (ConfigError) instead of merging over the first run's file at its end; the lock is held until the
    merged file is in place and the journal deleted.
    """

    def __init__(self, path: str | Path, resume: bool = False):
        from guardalign.io import durable
        from guardalign.io.jsonl_out import JsonlSink, _check_target, _size

        self.path = Path(path)
        self.resume = resume
        _check_target(self.path)
        if durable.special_target(self.path):
            raise ConfigError(f"--out {self.path}: Parquet needs a regular file (it cannot be streamed to a device "
                              "or a pipe); use --format jsonl")
        durable.refuse_symlink(self.path)
        self._journal_path = _journal(self.path)
        self._journal = JsonlSink(self._journal_path, resume=True, claim=True)  # locked from the start
        try:
            if not resume:
                if self._journal.existing or _size(self._journal_path) > 0:
                    raise ConfigError(f"{self._journal_path} exists: an earlier run was interrupted; "
                                      "pass --resume to continue it")
                if _size(self.path) > 0:
                    raise ConfigError(f"{self.path} exists; pass --resume to continue it or choose another --out")
            self._done_ids = _parquet_ids(self.path) if resume and self.path.exists() else set()
        except BaseException:
            self._journal.abort()
            raise
        self.existing: set[str] = self._done_ids | self._journal.existing  # ids already written (resume)
        self._schema = scan_schema()
        self._closed = False

    def write(self, records: list[dict]) -> None:
        """Journal ``records`` (durable on return); they reach ``<out>`` at close."""
        if records:
            _rows_table(records, self._schema)  # a record that does not fit fails now, not at close
            self._journal.write(records)

    def close(self) -> None:
        """Merge earlier rows + journal into ``<out>`` atomically, then delete the journal (still locked)."""
        if self._closed:
            return
        try:
            self._finalize()
        except BaseException:
            self.abort()
            raise
        self._journal.release()
        self._closed = True

    def abort(self) -> None:
        """Stop, leaving the journal for ``--resume``; nothing new is created."""
        self._journal.abort()
        self._closed = True

    def _finalize(self) -> None:
        import pyarrow.parquet as pq

        from guardalign.io import durable
        from guardalign.io.jsonl import read_objects
        from guardalign.io.jsonl_out import _size

        journalled = _size(self._journal_path) > 0
        if not journalled and (self._done_ids or (self.resume and _size(self.path) > 0)):
            self._journal_path.unlink(missing_ok=True)  # resumed a finished file and added nothing: leave it
            return
        tmp = durable.temp_path(self.path)
        try:
            with pq.ParquetWriter(tmp, self._schema) as writer:
                if self._done_ids:  # resuming a finished file: keep its rows
                    with pq.ParquetFile(self.path) as pf:
                        for batch in pf.iter_batches():
                            writer.write_table(_conform(batch, self._schema))
                if journalled:
                    chunk: list[dict] = []
                    for _, rec in read_objects(self._journal_path):
                        if str(rec.get("id")) not in self._done_ids:  # crash between replace and unlink
                            chunk.append(rec)
                        if len(chunk) >= _MERGE_ROWS:
                            writer.write_table(_rows_table(chunk, self._schema))
                            chunk = []
                    if chunk:
                        writer.write_table(_rows_table(chunk, self._schema))
            # Not resuming: <out> must still not exist (checked at the rename), so nothing is ever replaced.
            durable.finish_temp(tmp, self.path, overwrite=self.resume)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise durable._oserror(self.path, e) from None
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
