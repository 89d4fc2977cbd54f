"""Where ``mask`` writes: output paths that cannot leave --out-dir, atomic files, manifest entries and the
Parquet writer that rebuilds an input Parquet row group by row group (same schema, rows and order).
"""
from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any, Sequence

from guardalign.io.durable import (  # noqa: F401 (TMP_SUFFIX, atomic_write re-exported for mask)
    TMP_SUFFIX, atomic_write, finish_temp, remove_stale_temps as remove_stale_tmp, temp_path,
)

MANIFEST = "manifest.jsonl"
DONE = ("purified", "copied", "skipped")  # manifest statuses of a finished item


def safe_relpath(name: str) -> tuple[str, bool]:
    """A relative posix path that cannot leave its folder, and whether ``name`` had to change.

    Backslashes count as separators; the root, drive letters, ``..`` and ``.`` parts and control
    characters are dropped. ``"../../x"`` → ``("x", True)``; ``"/etc/passwd"`` → ``("etc/passwd", True)``.
    """
    text = str(name).replace("\\", "/")
    changed = text.startswith("/") or bool(re.match(r"^[A-Za-z]:", text))
    parts = []
    for i, part in enumerate(text.split("/")):
        clean = re.sub(r"[\x00-\x1f\x7f]", "", part)
        changed |= clean != part
        if i == 0 and re.fullmatch(r"[A-Za-z]:", clean):
            continue
        if clean == "..":
            changed = True
        if clean not in ("", ".", ".."):
            parts.append(clean)
    if not parts:
        return "_", True
    return "/".join(parts), changed


def inside(path: str, root: Path) -> bool:
    real = os.path.realpath(path)
    return real == str(root) or real.startswith(str(root).rstrip(os.sep) + os.sep)


def parquet_base(parquet: str, inputs: Sequence[str]) -> str:
    """Output path of a Parquet file: as ``sources`` names it inside its input folder, else its base name."""
    given = list(dict.fromkeys(str(x) for x in inputs))
    for g in given:
        if g != "-" and Path(g).is_dir():
            try:
                rel = Path(parquet).relative_to(Path(g)).as_posix()
            except ValueError:
                continue
            norm = os.path.normpath(g).replace(os.sep, "/")
            return (f"{norm}/" if len(given) > 1 and norm != "." else "") + rel
    return Path(parquet).name


def cell_rel(item, parquet_dir: Path) -> str:
    """The path cell's image path relative to its Parquet file (absolute cells keep their full path)."""
    try:
        return item.path.relative_to(parquet_dir).as_posix()
    except ValueError:
        return item.path.as_posix()


def arrow_error() -> type:
    from pyarrow import ArrowException

    return ArrowException


def entry(item, status: str, *, rec: dict | None = None, error: str | None = None, fill=None, dilate=None) -> dict:
    """One manifest line. ``output``/``overlay``/``image_file`` are paths relative to out_dir; ``row`` for Parquet."""
    rec = rec or {}
    return {"id": item.id, "source": item.source, "status": status,
            "error": error if error is not None else rec.get("error"), "verdict": rec.get("verdict"),
            "category": rec.get("category") if rec.get("verdict") == "unsafe" else None,
            "output": None, "overlay": None, "boxes": [], "box_categories": list(rec.get("box_categories") or []),
            "sha256": rec.get("sha256"), "fill": fill, "dilate": dilate, "sanitized": False, "notes": []}


def compact_manifest(path: Path) -> None:
    """Keep the last line per id (a rerun's result replaces the crashed run's), in first-seen order."""
    from guardalign.io.sinks import dumps, read_records

    if not path.is_file():
        return
    entries: dict[str, dict] = {}
    n = 0
    for n, e in enumerate(read_records(path), 1):
        entries[str(e.get("id"))] = e
    if len(entries) != n:
        atomic_write(path, "".join(dumps(e) + "\n" for e in entries.values()).encode("utf-8"))


WITHHELD = object()  # a Parquet output cell set to null: the row's bytes were not verified (unreadable, changed)


class ParquetOut:
    """Writes one Parquet output row group by row group as its rows are processed (same schema and order)."""

    def __init__(self, src: str, rel: str, column: str, kind: str, job: Any):
        import pyarrow.parquet as pq

        self.src, self.rel, self.column, self.kind, self.job = src, rel, column, kind, job
        self.target = job.root / rel
        if not inside(str(self.target.parent), job.root):
            raise ValueError(f"Parquet output {rel} would leave --out-dir")
        import pyarrow as pa

        self.pf = pq.ParquetFile(pa.OSFile(os.fsencode(src)))  # by its bytes: a non-UTF-8 name works
        md = self.pf.metadata
        # cumulative row counts: O(row groups), not quadratic (40k one-row groups in well under a second)
        self.ends = list(itertools.accumulate(md.row_group(i).num_rows for i in range(md.num_row_groups)))
        self.next_group = 0
        self.failed: str | None = None  # why the output was abandoned
        self.done: list[dict] = []  # manifest entries of rows recorded as written into this output
        self.cells: dict[int, Any] = {}  # processed row → new cell (None: unchanged, WITHHELD: null); absent: not processed
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.target)
        codec = md.row_group(0).column(0).compression.lower() if md.num_row_groups and md.num_columns else "snappy"
        codec = {"uncompressed": "none"}.get(codec, codec)  # keep the input's codec where pyarrow writes it
        codec = codec if codec in ("snappy", "gzip", "zstd", "lz4", "brotli", "none") else "snappy"
        self.writer = pq.ParquetWriter(self.tmp, self.pf.schema_arrow, compression=codec)

    def keep(self, row: int, cell) -> None:
        self.cells[row] = cell

    def flush_until(self, row: int) -> None:
        """Write every row group that ends at or before ``row`` (all of their rows have been processed)."""
        while self.next_group < len(self.ends) and self.ends[self.next_group] <= row:
            self._write_group(self.next_group)
            self.next_group += 1

    def _write_group(self, g: int) -> None:
        import pyarrow as pa

        start = self.ends[g - 1] if g else 0
        missing = [r for r in range(start, self.ends[g]) if r not in self.cells]
        if missing and not self.job.only_unsafe:  # e.g. an unsafe row whose purification failed: never pass it on
            raise ValueError(f"row {missing[0]} was not processed, so the output would not be purified")
        table = self.pf.read_row_group(g)
        idx = table.schema.get_field_index(self.column)
        values = table.column(idx).to_pylist()
        for r in range(start, self.ends[g]):
            cell = self.cells.get(r)
            if cell is WITHHELD:
                if not table.schema.field(idx).nullable:
                    raise ValueError(f"row {r} could not be verified and column {self.column!r} is not nullable, "
                                     "so it cannot be withheld")
                values[r - start] = None
            elif cell is not None:
                values[r - start] = {**(values[r - start] or {}), **cell} if self.kind == "struct" else cell
        table = table.set_column(idx, table.schema.field(idx), pa.array(values, type=table.schema.field(idx).type))
        if self.job.only_unsafe:
            table = table.take(pa.array([r - start for r in range(start, self.ends[g]) if r in self.cells], pa.int64()))
        if table.num_rows or not self.job.only_unsafe:
            self.writer.write_table(table, row_group_size=max(1, table.num_rows))
        for r in range(start, self.ends[g]):
            self.cells.pop(r, None)

    def finish(self) -> None:
        self.flush_until(self.ends[-1] if self.ends else 0)
        self.writer.close()
        self.pf.close()
        if os.path.lexists(self.target) and not self.job.overwrite:
            raise FileExistsError(f"{self.rel} appeared during the run; not overwritten")
        finish_temp(self.tmp, self.target)

    def abort(self) -> None:
        for close in (self.writer.close, self.pf.close):
            try:
                close()
            except Exception:
                pass
        self.tmp.unlink(missing_ok=True)
