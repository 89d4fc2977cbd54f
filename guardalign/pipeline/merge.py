"""``--merge FILE``: a distributed run's shards, in input order, combined into one file (Parquet or JSONL)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from guardalign.errors import ConfigError
from guardalign.pipeline.shards import OutDir


def merge(outdir: OutDir, entries: Iterable[dict], target: str, *, overwrite: bool) -> int:
    """Concatenate the shards of ``entries`` (in order) into one ``target`` file (``.parquet`` or JSONL), written
    to a temp file beside it and renamed. Shards of the target's format are copied as they are (bytes, or Parquet
    row groups); others are converted record by record."""
    fmt = "parquet" if target.lower().endswith((".parquet", ".pq")) else "jsonl"
    path = Path(target)
    if os.path.lexists(path) and not overwrite:
        raise ConfigError(f"--merge {target} exists; pass --overwrite to replace it")
    if path.is_dir() or path.is_symlink():
        raise ConfigError(f"--merge {target} is a folder or a symlink; not writing over it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        n = (_merge_parquet if fmt == "parquet" else _merge_jsonl)(outdir, list(entries), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _merge_jsonl(outdir: OutDir, entries: list[dict], tmp: Path) -> int:
    from guardalign.io.sinks import _encode, read_records

    n = 0
    with open(tmp, "wb") as out:
        for e in entries:
            local = outdir.fetch(e["shard"])
            if e.get("format") == "jsonl":
                with open(local, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
            else:
                for chunk in _chunks(read_records(local)):
                    out.write(_encode(chunk))
            n += e["records"]
            outdir.drop_fetched(local)
    return n


def _merge_parquet(outdir: OutDir, entries: list[dict], tmp: Path) -> int:
    import pyarrow.parquet as pq

    from guardalign.io.parquet import _rows_table, scan_schema
    from guardalign.io.sinks import read_records

    n = 0
    with pq.ParquetWriter(tmp, scan_schema()) as writer:
        for e in entries:
            local = outdir.fetch(e["shard"])
            if e.get("format") == "parquet":
                with pq.ParquetFile(local) as pf:
                    for g in range(pf.num_row_groups):
                        writer.write_table(pf.read_row_group(g))
            else:
                for chunk in _chunks(read_records(local)):
                    writer.write_table(_rows_table(chunk, scan_schema()))
            n += e["records"]
            outdir.drop_fetched(local)
    return n


def _chunks(records, size: int = 4096):
    batch = []
    for rec in records:
        batch.append(rec)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
