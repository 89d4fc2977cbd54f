"""A distributed run's output folder: one shard per fragment, a manifest entry per finished shard, resume, merge.

Layout under ``--out DIR`` (a local folder or any pyarrow filesystem URI such as ``s3://bucket/scan/``)::

    shards/<name>.parquet|.jsonl     the records of one fragment, in input order
    _fragments/<name>.json           written after its shard is in place: fragment, input, shard, counts, settings
    manifest.json                    written at the end: settings, provenance, every fragment's entry, totals

A shard is written to a staging file (local: ``DIR/.staging``; a URI: a local temp folder) through the same
sinks as a local run, and moved (or uploaded) into ``shards/`` when its fragment is complete; only then is its
entry written. So an entry always names a complete shard, a killed run leaves at most staging files (removed on
the next start), and ``--resume`` skips exactly the fragments that have an entry with this run's settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from guardalign.errors import ConfigError
from guardalign.pipeline.runner import RunSummary, check_settings

SHARDS, ENTRIES, MANIFEST, STAGING, LOCK = "shards", "_fragments", "manifest.json", ".staging", ".lock"
FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl"}


def shard_name(key: str) -> str:
    """A file name for a fragment: a readable tail of its key and a hash that keeps it unique."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[-60:]
    return f"{tail}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class OutDir:
    """A local folder or a pyarrow filesystem URI, with the few operations a run needs (all relative paths)."""

    def __init__(self, out: str):
        self.out = out
        self.remote = "://" in out
        if self.remote:
            from guardalign.pipeline.fragments import _fs

            self.fs, base = _fs(out)
            self.base = base.rstrip("/")
            self.staging = Path(tempfile.mkdtemp(prefix="guardalign-staging-"))
        else:
            self.root = Path(out)
            if self.root.exists() and not self.root.is_dir():
                raise ConfigError(f"--out {out} exists and is not a folder; --engine ray writes a folder of shards")
            self.staging = self.root / STAGING
        self._lock = None

    def _remote(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def exists(self, rel: str) -> bool:
        if self.remote:
            from pyarrow import fs as pafs

            return self.fs.get_file_info(self._remote(rel)).type == pafs.FileType.File
        return (self.root / rel).is_file() and not (self.root / rel).is_symlink()

    def list(self, rel_dir: str) -> list[str]:
        """Relative paths of the files directly in ``rel_dir`` (sorted); empty when it does not exist."""
        if self.remote:
            from pyarrow import fs as pafs

            sel = pafs.FileSelector(self._remote(rel_dir), allow_not_found=True)
            return sorted(f"{rel_dir}/{i.base_name}" for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)
        folder = self.root / rel_dir
        return sorted(f"{rel_dir}/{p.name}" for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def read_bytes(self, rel: str) -> bytes:
        if self.remote:
            with self.fs.open_input_stream(self._remote(rel)) as f:
                return f.read()
        return (self.root / rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomically: a temp file and a rename (local), or one object written at close (URI)."""
        local = self.staging / f".{Path(rel).name}.{os.getpid()}.tmp"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        self.place(local, rel)

    def place(self, local: Path, rel: str) -> None:
        """Move a finished local file into the output (an upload for a URI)."""
        if self.remote:
            self.fs.create_dir(self._remote(rel).rsplit("/", 1)[0], recursive=True)
            with open(local, "rb") as src, self.fs.open_output_stream(self._remote(rel)) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            local.unlink()
            return
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_dir():
            raise ConfigError(f"{target} is a symlink or a folder; not writing over it")
        with open(local, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(local, target)

    def fetch(self, rel: str) -> Path:
        """A local path holding the file (a download into staging for a URI)."""
        if not self.remote:
            return self.root / rel
        local = self.staging / "fetched" / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_stream(self._remote(rel)) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return local

    def drop_fetched(self, local: Path) -> None:
        """Delete a downloaded copy (a local output's own files are left alone)."""
        if self.remote:
            local.unlink(missing_ok=True)

    def remove(self, rel: str) -> None:
        if self.remote:
            if self.exists(rel):
                self.fs.delete_file(self._remote(rel))
        elif (self.root / rel).is_file() or (self.root / rel).is_symlink():
            (self.root / rel).unlink()

    def claim(self) -> None:
        """Lock a local output folder for this run (another run on it is refused) and clear stale staging files."""
        if not self.remote:
            from guardalign.io.sinks import JsonlSink

            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = JsonlSink(self.root / LOCK, resume=True)
            self._lock.claim()
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)

    def release(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._lock is not None:
            self._lock.abort()
            (self.root / LOCK).unlink(missing_ok=True)
            self._lock = None


def entry_rel(name: str) -> str:
    return f"{ENTRIES}/{name}.json"


def load_entries(outdir: OutDir) -> dict[str, dict]:
    """Finished fragments of earlier runs: fragment key → entry."""
    out = {}
    for rel in outdir.list(ENTRIES):
        if rel.endswith(".json"):
            try:
                e = json.loads(outdir.read_bytes(rel))
            except ValueError as exc:
                raise ConfigError(f"{outdir.out}/{rel} is not a valid manifest entry ({exc}); "
                                  "is this a guardalign output folder?") from None
            out[str(e.get("fragment"))] = e
    return out


def prepare(outdir: OutDir, frags: list, settings: dict, *, resume: bool, overwrite: bool) -> tuple[list, list[dict]]:
    """(fragments to run, entries of fragments already done). ConfigError: an earlier run's output without
    ``--resume``/``--overwrite``, or an entry made with other settings (each differing setting named)."""
    entries = load_entries(outdir)
    if (entries or outdir.list(SHARDS) or outdir.exists(MANIFEST)) and not (resume or overwrite):
        raise ConfigError(f"--out {outdir.out} already holds a run's output; pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --out")
    if overwrite:
        for rel in outdir.list(ENTRIES) + outdir.list(SHARDS) + [MANIFEST]:
            outdir.remove(rel)
        return list(frags), []
    for key, e in entries.items():
        check_settings({"id": f"fragment {key}", "settings": e.get("settings")}, settings, f"--out {outdir.out}")
    todo, done = [], []
    for f in frags:
        e = entries.get(f.key)
        if e is not None and e.get("stamp") == f.stamp and outdir.exists(e.get("shard", "")):
            done.append(e)
        else:
            todo.append(f)
    return todo, done


def counts(summary: RunSummary) -> dict[str, Any]:
    return {"records": summary.total, "ok": summary.ok, "errors": summary.errors, "unsafe": summary.unsafe,
            "by_category": dict(summary.by_category), "tally": dict(summary.tally)}


def add_counts(summary: RunSummary, entry: dict) -> None:
    """Count an earlier run's finished fragment into ``summary`` as resumed."""
    summary.total += entry["records"]
    summary.ok += entry["ok"]
    summary.errors += entry["errors"]
    summary.unsafe += entry["unsafe"]
    summary.by_category.update(entry.get("by_category") or {})
    summary.resumed += entry["records"]


SUMMARY_FIELDS = ("id", "source", "status", "error", "verdict", "category")  # what the driver counts, per record


def encode(record: dict, settings: dict, fmt: str) -> str:
    """A record as a shard stores it, ``settings`` added as the runner adds them: its JSONL line, or the JSON of
    its Parquet row (:func:`guardalign.io.parquet._to_row`). The model actors encode, so the driver never has to."""
    from guardalign.io.sinks import dumps

    rec = {**record, "settings": settings}
    if fmt == "jsonl":
        return dumps(rec)
    from guardalign.io.parquet import _to_row

    row = _to_row(rec)
    for name in _map_columns():  # JSON readers have no map type: key/value pairs, rebuilt by _parquet_rows
        if isinstance(row.get(name), dict):
            row[name] = [{"key": k, "value": v} for k, v in row[name].items()]
    return json.dumps(row, ensure_ascii=False, allow_nan=False)


def _map_columns() -> list[str]:
    from guardalign.io.parquet import SCAN_FIELDS

    return [n for n, t in SCAN_FIELDS if t.startswith("map<")]


def _parquet_rows(rows: list[str]):
    """Encoded Parquet rows → a table of the scan schema, parsed by Arrow's JSON reader (no per-row Python)."""
    import io

    import pyarrow as pa
    import pyarrow.json as pj

    from guardalign.io.parquet import scan_schema

    schema = scan_schema()
    maps = _map_columns()
    wire = pa.schema([pa.field(f.name, pa.list_(pa.struct([("key", f.type.key_type), ("value", f.type.item_type)])))
                      if f.name in maps else f for f in schema])
    data = "\n".join(rows).encode("utf-8")
    table = pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=max(1 << 20, 4 * max(map(len, rows)))),
                         parse_options=pj.ParseOptions(explicit_schema=wire, unexpected_field_behavior="error"))
    for name in maps:
        col = table.column(name).combine_chunks()
        pairs = col.values
        as_map = pa.MapArray.from_arrays(col.offsets, pairs.field("key"), pairs.field("value"),
                                         type=schema.field(name).type, mask=col.is_null())
        table = table.set_column(table.schema.get_field_index(name), schema.field(name), as_map)
    return table.select(schema.names).cast(schema)


class ShardWriter:
    """One fragment's encoded records into its staged shard, in input order whatever order they arrive in, each once.

    Plain buffered writes (a JSONL file, or a ParquetWriter with row groups of ``group`` rows) synced when the
    fragment is complete: a fragment that is not complete is redone from the start, so no journal is needed.
    """

    def __init__(self, outdir: OutDir, frag, fmt: str, settings: dict, transform=None, group: int = 4096):
        self.outdir, self.frag, self.fmt, self.settings, self.group = outdir, frag, fmt, settings, group
        self.name = shard_name(frag.key)
        self.rel = f"{SHARDS}/{self.name}{FORMATS[fmt]}"
        self.staged = outdir.staging / f"{self.name}{FORMATS[fmt]}"
        self.staged.unlink(missing_ok=True)
        self.file = open(self.staged, "wb") if fmt == "jsonl" else None
        self.writer = None  # the ParquetWriter, opened on the first row group
        self.rows: list[str] = []  # Parquet rows (JSON) waiting for their row group
        self.next, self.end = 0, None  # next position to write; the item count, from the read task's sentinel
        self.transform = transform  # applied to each record once its turn comes (e.g. a run-wide id check)
        self.pending: dict[int, tuple[dict, str]] = {}
        self.summary = RunSummary()

    def add(self, pos: int, fields: dict, payload: str) -> list[dict]:
        """Take record ``pos`` (``fields``: its SUMMARY_FIELDS; ``payload``: :func:`encode`); a repeat from a re-run
        block is dropped. Returns the fields of the records now written, in order."""
        if pos < self.next or pos in self.pending:
            return []
        self.pending[pos] = (fields, payload)
        out = []
        while self.next in self.pending:
            fields, payload = self.pending.pop(self.next)
            if self.transform is not None:
                new = self.transform(fields)
                if new is not fields:
                    fields, payload = new, encode(new, self.settings, self.fmt)
            self._write(payload)
            self.summary.add(fields)
            out.append(fields)
            self.next += 1
        return out

    def _write(self, payload: str) -> None:
        if self.file is not None:
            self.file.write(payload.encode("utf-8") + b"\n")
            return
        self.rows.append(payload)
        if len(self.rows) >= self.group:
            self._flush()

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        from guardalign.io.parquet import scan_schema

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.staged, scan_schema())
        if self.rows:
            self.writer.write_table(_parquet_rows(self.rows))
            self.rows = []

    def set_end(self, n: int) -> None:
        self.end = n

    @property
    def complete(self) -> bool:
        return self.end is not None and self.next >= self.end

    def close_staged(self) -> Path:
        """Close the shard (synced to disk) and leave it in staging; its path."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        else:
            self._flush()
            self.writer.close()
        return self.staged

    def finish(self, extra: dict | None = None) -> dict:
        """Close the shard, put it in place, then write its entry; returns the entry."""
        self.outdir.place(self.close_staged(), self.rel)
        entry = {"fragment": self.frag.key, "kind": self.frag.kind, "input": self.frag.path or None,
                 "stamp": self.frag.stamp, "shard": self.rel, "format": self.fmt, **counts(self.summary),
                 "settings": self.settings, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {})}
        self.outdir.write_bytes(entry_rel(self.name), json.dumps(entry, ensure_ascii=False).encode())
        return entry

    def abort(self) -> None:
        for f in (self.file, self.writer):
            if f is not None:
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - the staged file is discarded anyway
                    pass
        self.staged.unlink(missing_ok=True)


def write_manifest(outdir: OutDir, entries: list[dict], settings: dict, provenance: dict,
                   summary: RunSummary) -> None:
    """``manifest.json``: every fragment of this plan (input → shard, counts), settings and provenance."""
    from guardalign import __version__

    doc = {"guardalign": __version__, **provenance, "settings": settings, "totals": counts(summary),
           "fragments": entries}
    outdir.write_bytes(MANIFEST, json.dumps(doc, ensure_ascii=False, indent=1).encode())
