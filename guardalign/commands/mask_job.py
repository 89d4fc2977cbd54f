"""Run state of ``guardalign mask``: resume and filtering, output claims and atomic writes, the manifest, the
Parquet writer, path helpers and the run summary (split out of :mod:`guardalign.commands.mask`, which handles each item).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from guardalign.errors import EXIT_OK, EXIT_UNREADABLE
from guardalign.io.durable import TMP_SUFFIX, atomic_write, finish_temp, remove_stale_temps, temp_path  # noqa: F401

MANIFEST = "manifest.jsonl"
DONE = ("purified", "copied", "skipped")  # manifest statuses of a finished item


@dataclass
class MaskSummary:
    """Counts of one ``mask`` run (items found complete from an earlier run count as ``resumed``)."""

    total: int = 0  # items seen
    purified: int = 0  # unsafe items masked and written
    copied: int = 0  # safe items copied byte-for-byte (or Parquet rows kept unchanged)
    skipped: int = 0  # safe items left out (only_unsafe)
    resumed: int = 0  # items already complete in out_dir
    errors: int = 0  # unreadable, not in the scan, or not writable
    conflicts: int = 0  # outputs that exist with other content (pass overwrite)
    sanitized: int = 0  # items whose path had to be sanitised to stay inside out_dir
    overlays: int = 0  # reviewer images written
    excluded: int = 0  # files inside out_dir that were not treated as inputs, and repeated ids
    by_category: Counter = field(default_factory=Counter)  # purified items per winning category
    error_list: list[tuple[str, str]] = field(default_factory=list)  # (id, error) of errors and conflicts
    seconds: float = 0.0  # wall time

    @property
    def exit_code(self) -> int:
        """0 done; 3 finished but some items have no output (unreadable, missing from the scan, conflicts)."""
        return EXIT_UNREADABLE if self.errors or self.conflicts else EXIT_OK


# ----------------------------------------------------------------------------- paths


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


def _inside(path: str, root: Path) -> bool:
    real = os.path.realpath(path)
    return real == str(root) or real.startswith(str(root).rstrip(os.sep) + os.sep)


def _parquet_base(parquet: str, inputs: Sequence[str]) -> str:
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


def _cell_rel(item, parquet_dir: Path) -> str:
    """The path cell's image path relative to its Parquet file (absolute cells keep their full path)."""
    try:
        return item.path.relative_to(parquet_dir).as_posix()
    except ValueError:
        return item.path.as_posix()


def _remove_stale_tmp(root: Path) -> None:
    remove_stale_temps(root)


# ----------------------------------------------------------------------------- run state


class _RunState:
    """Per-run state: options, manifest, output claims, the open Parquet output, counts."""

    def __init__(self, root: Path, inputs: Sequence[str], *, fill: str, dilate: int, overlay: bool,
                 only_unsafe: bool, overwrite: bool, mean: tuple[float, float, float]):
        from guardalign.io.sinks import open_sink, read_records

        self.root, self.inputs, self.mean = root, list(inputs), mean
        self.fill, self.dilate, self.overlay = fill, dilate, overlay
        self.only_unsafe, self.overwrite = only_unsafe, overwrite
        self.summary = MaskSummary()
        self.advance = lambda n=1: None
        manifest = root / MANIFEST
        root.mkdir(parents=True, exist_ok=True)
        self.manifest = open_sink(str(manifest), "jsonl", resume=True)
        self.manifest.claim()  # one run per out_dir: locked before anything is read, written or cleaned up
        self.previous = {str(e.get("id")): e for e in read_records(manifest)}
        _remove_stale_tmp(root)  # safe now: no other run can own a temp file here
        self.claims: dict[str, tuple[str, str]] = {MANIFEST: ("", "manifest")}  # rel output → (source key, id)
        self.originals = {os.path.realpath(g) for g in self.inputs if g != "-" and Path(g).is_file()}
        # With --force, out_dir may lie inside an input folder: files there are outputs, not inputs.
        self.exclude = any(g != "-" and Path(g).is_dir() and _inside(str(root), Path(g).resolve()) for g in self.inputs)
        self.seen: set[str] = set()
        self.pending: list[dict] = []  # manifest lines not yet appended
        self.parquet: _ParquetOut | None = None  # output being written (items of one file arrive together)
        self.parquet_existing: tuple[str, bool] | None = None  # (parquet, output exists and kept) for skipping

    # -- filtering before any decoding or detection
    def todo(self, items: Iterator) -> Iterator:
        for item in items:
            repeated = "cell_kind" not in item.meta and item.id in self.seen  # Parquet rows are never dropped
            if repeated or (self.exclude and self._in_out_dir(item)):
                self.summary.excluded += 1
                self.advance(1)
                continue
            self.seen.add(item.id)
            if self._finished_before(item):
                continue
            yield item

    def _in_out_dir(self, item) -> bool:
        src = item.meta.get("parquet") or (str(item.path) if item.path is not None else None)
        return src is not None and _inside(src, self.root)

    def _finished_before(self, item) -> bool:
        """Rows of a kept Parquet output, and files the manifest records as complete, are not redone."""
        prev = self.previous.get(item.id)
        if "parquet" in item.meta:
            pq_path = item.meta["parquet"]
            if self.parquet_existing is None or self.parquet_existing[0] != pq_path:
                target = self.root / safe_relpath(_parquet_base(pq_path, self.inputs))[0]
                self.parquet_existing = (pq_path, target.exists() and not self.overwrite)
            if not self.parquet_existing[1]:
                return False
            if not self._matches(prev):
                self._record(item, _entry(item, "exists", error="the output Parquet file exists (from another run or "
                                                           "other options); pass --overwrite to replace it"))
                return True
        elif not (self._matches(prev) and all((self.root / p).is_file() for p in
                                               (prev.get("output"), prev.get("overlay")) if p)):
            return False
        self.summary.total += 1
        self.summary.resumed += 1
        self.advance(1)
        return True

    def _matches(self, prev: dict | None) -> bool:
        if not prev or prev.get("status") not in DONE:
            return False
        if (prev.get("fill"), prev.get("dilate")) != (self.fill, self.dilate):
            return False
        if prev["status"] == "skipped" and not self.only_unsafe:
            return False
        return not (self.overlay and prev.get("verdict") == "unsafe" and not prev.get("overlay"))

    def _finish_parquet(self) -> None:
        try:
            if not self.parquet.failed:
                self.parquet.finish()
        except (OSError, ValueError, _arrow_error()) as exc:  # e.g. a truncated file: its rows were reported
            self._fail_parquet(f"{type(exc).__name__}: {exc}")
        self.parquet = None

    def _fail_parquet(self, reason: str) -> None:
        """Abandon the current Parquet output (temp file removed); later rows of the file are errors."""
        if not self.parquet.failed:
            self.parquet.abort()
            self.parquet.failed = reason
            self.summary.errors += 1
            self.summary.error_list.append((self.parquet.rel, f"Parquet output not written: {reason}"))
            for e in self.parquet.done:  # rows recorded as written into it: the last manifest line per id wins
                s = self.summary
                setattr(s, e["status"], getattr(s, e["status"]) - 1)
                if e["status"] == "purified":
                    s.by_category[e.get("category") or "?"] -= 1
                s.errors += 1
                self.pending.append({**e, "status": "error", "output": None,
                                     "error": f"the output Parquet file is not written ({reason})"})
            self.parquet.done = []

    # -- writing
    def _put(self, rel: str, data: bytes, item, entry: dict, status: str, key: str = "output") -> bool:
        """Write one output file under root; False (entry updated) when it must not or cannot be."""
        target = self.root / rel
        source = os.path.realpath(item.path) if item.path is not None else item.source
        if not _inside(str(target.parent), self.root):
            entry.update(status="error", error=f"output {rel} would leave --out-dir (a symlinked folder); not written")
            return False
        if os.path.realpath(target) in self.originals or (item.path is not None and
                                                         os.path.realpath(target) == os.path.realpath(item.path)):
            entry.update(status="error", error=f"output {rel} is an input file; originals are never overwritten")
            return False
        claim = self.claims.get(rel)
        if claim is not None and claim[0] != source:
            entry.update(status="error", error=f"output {rel} is already taken by {claim[1]!r} (paths collide)")
            return False
        self.claims[rel] = (source, item.id)
        if os.path.lexists(target):
            if target.is_file() and not target.is_symlink() and target.read_bytes() == data:
                entry[key], entry["status"] = rel, status
                return True
            if not self.overwrite or target.is_dir():
                entry.update(status="exists", error=f"output {rel} already exists; pass --overwrite to replace it")
                return False
        atomic_write(target, data, inside=self.root)
        entry[key], entry["status"] = rel, status
        return True

    def _record(self, item, entry: dict) -> None:
        s = self.summary
        s.total += 1
        status = entry["status"]
        if status in ("purified", "copied", "skipped"):
            setattr(s, status, getattr(s, status) + 1)
        if status == "purified":
            s.by_category[entry.get("category") or "?"] += 1
        elif status in ("error", "exists"):
            s.errors += status == "error"
            s.conflicts += status == "exists"
            s.error_list.append((item.id, str(entry.get("error"))))
        s.sanitized += bool(entry.get("sanitized"))
        self.pending.append(entry)
        if len(self.pending) >= 64:  # one append + fsync per 64 items; a crash loses at most these lines
            self._flush_manifest()

    def _flush_manifest(self) -> None:
        self.manifest.write(self.pending)
        self.pending = []

    def close(self) -> None:
        try:
            if self.parquet is not None:
                self._finish_parquet()
        finally:
            self._flush_manifest()
            self.manifest.close()
        _compact_manifest(self.root / MANIFEST)

    def abort(self) -> None:
        if self.parquet is not None:
            self.parquet.abort()
        self._flush_manifest()  # what was written is recorded; a rerun finds it complete
        self.manifest.close()



def _arrow_error() -> type:
    from pyarrow import ArrowException

    return ArrowException


def _entry(item, status: str, *, rec: dict | None = None, error: str | None = None, fill=None, dilate=None) -> dict:
    """One manifest line. ``output``/``overlay``/``image_file`` are paths relative to out_dir; ``row`` for Parquet."""
    rec = rec or {}
    return {"id": item.id, "source": item.source, "status": status,
            "error": error if error is not None else rec.get("error"), "verdict": rec.get("verdict"),
            "category": rec.get("category") if rec.get("verdict") == "unsafe" else None,
            "output": None, "overlay": None, "boxes": [], "box_categories": list(rec.get("box_categories") or []),
            "sha256": rec.get("sha256"), "fill": fill, "dilate": dilate, "sanitized": False, "notes": []}


def _compact_manifest(path: Path) -> None:
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


class _ParquetOut:
    """Writes one Parquet output row group by row group as its rows are processed (same schema and order)."""

    def __init__(self, src: str, rel: str, column: str, kind: str, job: _RunState):
        import pyarrow.parquet as pq

        self.src, self.rel, self.column, self.kind, self.job = src, rel, column, kind, job
        self.target = job.root / rel
        if not _inside(str(self.target.parent), job.root):
            raise ValueError(f"Parquet output {rel} would leave --out-dir")
        self.pf = pq.ParquetFile(src)
        md = self.pf.metadata
        self.ends = [sum(md.row_group(i).num_rows for i in range(k + 1)) for k in range(md.num_row_groups)]
        self.next_group = 0
        self.failed: str | None = None  # why the output was abandoned
        self.done: list[dict] = []  # manifest entries of rows recorded as written into this output
        self.cells: dict[int, Any] = {}  # processed row → new cell (None: unchanged, WITHHELD: null); absent: not processed
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


def print_summary(summary: MaskSummary, root: Path) -> None:
    """A rich table on stderr: what was purified, copied, skipped, resumed, and what failed."""
    from rich.table import Table

    from guardalign.pipeline.progress import print_errors, stderr_console

    console = stderr_console()
    table = Table(title=f"guardalign mask → {root}", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows = [("items", summary.total), ("purified (unsafe)", summary.purified), ("copied (safe)", summary.copied),
            ("skipped (--only-unsafe)", summary.skipped), ("already done (earlier run)", summary.resumed),
            ("overlays", summary.overlays), ("paths sanitised", summary.sanitized),
            ("errors", summary.errors), ("not overwritten (exists)", summary.conflicts),
            ("excluded (inside --out-dir or repeated)", summary.excluded)]
    for i, (what, n) in enumerate(rows):
        if n or i < 3 or what == "errors":
            table.add_row(what, str(n))
        if i == 1:
            for cat, k in (+summary.by_category).most_common():  # a corrected row leaves a 0
                table.add_row(f"  purified · {cat}", str(k))
    table.add_row("time", f"{summary.seconds:.1f} s")
    console.print(table)
    print_errors(console, summary.error_list, see=root / MANIFEST)
