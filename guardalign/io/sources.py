"""Scan inputs → a lazy stream of :class:`Item` (decode them with ``decode_stream``, re-exported here).

Input kinds (``READERS``), told apart up front by :func:`iter_items`:

- ``folder``: walked recursively in sorted order, depth-first, symlinked directories not followed. Files are
  classified by :func:`guardalign.io.filetypes.classify` (extension, else first bytes); non-regular files are
  never opened; files neither images nor Parquet are counted, with the reason, in ``skipped``.
- ``image``: a single file; ``parquet``: ``*.parquet`` or starting with ``PAR1``; ``tar``: a webdataset shard ``*.tar`` (also in folders): one item per sample, id ``<shard>#<key>``.
- ``list``: ``-``, newline-separated image paths on stdin (blank lines skipped; read as bytes).

Record ids are stable across runs of the same command:

- folder images: the path relative to the folder (posix); Parquet found in a folder: relative path too;
- single image files and stdin lines: the path as given;
- Parquet rows: ``<file name>#<row>`` (row index within the file; the path as given instead of the
  name when two Parquet inputs share a name), or the value of ``id_column``. Every row gets an item: the
  k-th repeat (k ≥ 2) of an id-column value ``v`` gets the id ``v#k`` (the first such id not taken yet, in
  input order) and ``meta["duplicate_of"] = v``.
- With more than one input, folder ids are prefixed by the folder as given (``train/a.jpg`` and
  ``test/a.jpg`` stay distinct).
- File names that are not UTF-8 (or hold a backslash) are escaped losslessly in ids and sources
  (:func:`guardalign.pathnames.escape_name`: ``\\xNN`` per undecodable byte); ``Item.path`` and
  ``meta["rel"]`` keep the real name for opening and mirroring.

Parquet image cells may be HF datasets ``struct<bytes: binary, path: string>`` (bytes first, else the
path), raw ``binary``, or a ``string`` path (dictionary-encoded too); paths are relative to the Parquet
file's directory. A Parquet file found in a folder whose schema cannot be used becomes one error record (the
run goes on); one given directly is an InputError before anything is read.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

from guardalign.errors import InputError
from guardalign.io.filetypes import PARQUET_EXTENSIONS, SkipLog, _head, classify
from guardalign.records import Item  # noqa: F401 (re-exported: sources yield Items)
from guardalign.io.images import IMAGE_EXTENSIONS, Decoded, decode_stream  # noqa: F401 (decode_stream re-exported)
from guardalign.io.parquet_plan import (  # noqa: F401 (PATH_COLUMN_NAMES re-exported)
    PATH_COLUMN_NAMES, ParquetPlan, open_parquet, parquet_plan, regular_file_error,
)
from guardalign.io.webdataset import count_samples, is_tar, tar_items
from guardalign.pathnames import escape_name, null_separated

# Target bytes of image column data per Parquet batch (rows per batch shrink for big images).
BATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class _Task:
    kind: str  # key of READERS
    given: str  # the input exactly as the user gave it
    prefix: str  # folder: prepended to relative ids ("" for a lone input); parquet: the id base


@dataclass
class _Options:
    image_column: str | None  # user-given image column, or None to detect
    id_column: str | None  # user-given id column, or None
    stdin: TextIO | None  # where "-" reads paths from
    null: bool  # "-" lists are NUL-separated (find -print0) instead of one path per line
    batch_rows: int  # max rows per Parquet batch
    plans: dict = field(default_factory=dict)  # Parquet path -> ParquetPlan validated up front
    skipped: SkipLog = field(default_factory=SkipLog)  # folder files that are not inputs, by reason
    taken: set = field(default_factory=set)  # id-column mode: ids given out so far (to make repeats unique)
    next_k: dict = field(default_factory=dict)  # id-column mode: value -> next suffix to try for a repeat

    def unique(self, key: str) -> tuple[str, str | None]:
        """(id, the repeated value or None): the first unused of ``key``, ``key#2``, ``key#3``, ..."""
        if key not in self.taken:
            self.taken.add(key)
            return key, None
        k = self.next_k.get(key, 2)
        while f"{key}#{k}" in self.taken:
            k += 1
        self.next_k[key] = k + 1
        self.taken.add(f"{key}#{k}")
        return f"{key}#{k}", key


class ItemStream(Iterator[Item]):
    """The lazy Item stream of :func:`iter_items`; ``skipped`` fills in as folders are walked.

    ``skipped`` (:class:`~guardalign.io.filetypes.SkipLog`): files found in input folders that are not inputs
    (no record): ``count``, ``by_reason`` (Counter), ``examples`` (first few ``(path, reason)``). Complete once
    the stream is exhausted. ``plans``: the Parquet files found, with their image column and row count.
    """

    def __init__(self, tasks: list[_Task], opts: _Options):
        self.skipped = opts.skipped
        self.plans = opts.plans  # Parquet path -> ParquetPlan (column, cell kind, rows), validated up front
        self._gen = _generate(tasks, opts)

    def __iter__(self) -> "ItemStream":
        return self

    def __next__(self) -> Item:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


# ----------------------------------------------------------------------------- planning


def _is_parquet_file(path: Path) -> bool:
    """Named ``*.parquet``/``*.pq``, or a regular file that starts with ``PAR1`` (a FIFO is never opened)."""
    if path.suffix.lower() in PARQUET_EXTENSIONS:
        return True
    return regular_file_error(path) is None and (_head(path) or b"")[:4] == b"PAR1"


def _plan(inputs: Sequence[str], opts: _Options) -> list[_Task]:
    """Classify inputs and validate every Parquet schema; raise InputError before anything is read."""
    if not inputs:
        raise InputError("no inputs given")
    given = list(dict.fromkeys(str(x) for x in inputs))  # drop repeats, keep order
    multi = len(given) > 1
    tasks = []
    for g in given:
        if g == "-":
            tasks.append(_Task("list", g, ""))
            continue
        p = Path(g)
        if "\x00" in g:
            raise InputError(f"input path contains a NUL byte: {escape_name(g)!r}")
        if not os.path.lexists(p):
            raise InputError(f"input not found: {escape_name(g)}")
        if p.is_dir():
            norm = os.path.normpath(g).replace(os.sep, "/")
            tasks.append(_Task("folder", g, f"{norm}/" if multi and norm != "." else ""))
            for rel, entry, err in _walk(p):
                if err is None and classify(p / rel, entry.name) == ("parquet", None):
                    opts.plans[p / rel] = _folder_plan(p / rel, opts)
        elif _is_parquet_file(p):
            tasks.append(_Task("parquet", g, p.name))
            opts.plans[p] = parquet_plan(p, opts.image_column, opts.id_column)
        elif p.is_file() and is_tar(p):
            tasks.append(_Task("tar", g, p.name))
        else:  # images, broken symlinks, FIFOs, unreadable files: per-item errors later
            tasks.append(_Task("image", g, ""))
    names = [t.prefix for t in tasks if t.kind in ("parquet", "tar")]
    clash = {n for n in names if names.count(n) > 1}  # same file name in two folders: use the paths
    return [_Task(t.kind, t.given, Path(t.given).as_posix()) if t.kind in ("parquet", "tar") and t.prefix in clash else t
            for t in tasks]


def _folder_plan(path: Path, opts: _Options) -> ParquetPlan:
    """A Parquet file found in a folder: a schema problem is that file's error record, not the run's end."""
    try:
        return parquet_plan(path, opts.image_column, opts.id_column)
    except InputError as e:
        return ParquetPlan(path, error=str(e))


# ----------------------------------------------------------------------------- readers


def _walk(root: Path) -> Iterator[tuple[str, os.DirEntry | None, str | None]]:
    """Yield (posix path relative to root, entry, error) for non-directories, sorted, lazily.

    An unlistable directory yields (its relative path, None, error) and the walk goes on.
    """
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(root / rel_dir if rel_dir else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield rel_dir, None, f"cannot list directory ({e.strerror or e})"
            continue
        subdirs = []
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if e.is_dir(follow_symlinks=False):
                subdirs.append(rel)
            else:
                yield rel, e, None
        stack.extend(reversed(subdirs))


def _file_item(item_id: str, path: Path, meta: dict | None = None, error: str | None = None) -> Item:
    """An image-file Item; ids and sources are escaped (:func:`escape_name`), ``path`` keeps the real name."""
    if error is None and "\x00" in str(path):
        error = "path contains a NUL byte"
    elif error is None and os.path.islink(path) and not os.path.exists(path):
        error = f"broken symlink (points to {escape_name(os.readlink(path))!r})"
    elif error is None and os.path.lexists(path) and not os.path.isdir(path):
        why = regular_file_error(path)  # a FIFO or device is never opened
        error = why if why and why.startswith("not a regular") else None
    return Item(id=escape_name(item_id), source=escape_name(str(path)), path=path if "\x00" not in str(path) else None,
                error=error, meta=meta or {})


def _read_folder(task: _Task, opts: _Options) -> Iterator[Item]:
    root = Path(task.given)
    for rel, entry, err in _walk(root):
        rid = task.prefix + rel
        if err is not None:
            yield Item(id=escape_name(f"{task.prefix}{rel or '.'}/"), source=escape_name(str(root / rel)), error=err)
            continue
        if entry is not None and entry.is_file(follow_symlinks=False) and is_tar(rel):
            yield from tar_items(root / rel, rid)
            continue
        kind, detail = classify(root / rel, entry.name)
        if kind == "skip":
            opts.skipped.add(escape_name(rid), detail)
        elif kind == "image":
            yield _file_item(rid, root / rel, {"root": task.given, "rel": rel}, error=detail)
        elif detail is not None:  # a Parquet name on a FIFO, a broken symlink ...
            yield Item(id=escape_name(rid), source=escape_name(str(root / rel)), error=detail,
                       meta={"parquet": str(root / rel), "base": rid})
        else:
            yield from _parquet_items(root / rel, rid, opts)


def _read_image(task: _Task, opts: _Options) -> Iterator[Item]:
    yield _file_item(task.given, Path(task.given))


def _read_list(task: _Task, opts: _Options) -> Iterator[Item]:
    """Paths on stdin, one a line; read as bytes where possible, so a non-UTF-8 name is kept exactly."""
    stream = opts.stdin if opts.stdin is not None else sys.stdin
    raw = getattr(stream, "buffer", None)
    if opts.null:
        lines = null_separated(stream)
    else:
        lines = (os.fsdecode(b).rstrip("\r\n") for b in raw) if raw is not None else (s.rstrip("\r\n") for s in stream)
    for line in lines:
        if line.strip():
            yield _file_item(line, Path(line))


def _read_parquet(task: _Task, opts: _Options) -> Iterator[Item]:
    yield from _parquet_items(Path(task.given), task.prefix, opts)


def _parquet_items(path: Path, base: str, opts: _Options) -> Iterator[Item]:
    """One Item per row, reading only the needed columns, batch by batch."""
    import pyarrow as pa

    plan = opts.plans.get(path)
    if plan is None:  # appeared after planning: schema problems become an error record
        plan = _folder_plan(path, opts)
    meta = {"parquet": str(path), "base": base}
    if plan.error:
        yield Item(id=escape_name(base), source=escape_name(str(path)), error=plan.error, meta=meta)
        return
    columns = [plan.column] + ([plan.id_column] if plan.id_column not in (None, plan.column) else [])
    row = 0
    try:
        # Buffered stream reads instead of pre-buffering whole row groups: memory follows the batch.
        with open_parquet(path, pre_buffer=False, buffer_size=1 << 20) as pf:
            batches = pf.iter_batches(batch_size=_rows_per_batch(pf, plan, opts.batch_rows), columns=columns)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                cells = batch.column(0).to_pylist()
                ids = batch.column(columns.index(plan.id_column)).to_pylist() if plan.id_column else None
                for i, cell in enumerate(cells):
                    key = None if ids is None or ids[i] is None else str(ids[i])
                    yield _row_item(plan, base, row + i, cell, key, opts)
                row += len(cells)
    except (OSError, pa.ArrowException) as e:
        yield Item(id=escape_name(base), source=escape_name(str(path)),
                   error=f"cannot read Parquet file at row {row} ({e})", meta={**meta, "row": row})


def _rows_per_batch(pf, plan: ParquetPlan, batch_rows: int) -> int:
    """Rows per batch so one batch holds about BATCH_BYTES of image data (never more than batch_rows)."""
    md = pf.metadata
    if md.num_rows == 0 or md.num_row_groups == 0:
        return max(1, batch_rows)
    size = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.path_in_schema.split(".")[0] == plan.column:
                size += col.total_uncompressed_size
    per_row = max(1, size // md.num_rows)
    return max(1, min(batch_rows, BATCH_BYTES // per_row))


def _row_item(plan: ParquetPlan, base: str, row: int, cell, key: str | None, opts: _Options) -> Item:
    """Turn one image cell into an Item (inline bytes, a path next to the Parquet file, or an error)."""
    meta = {"parquet": str(plan.path), "row": row, "column": plan.column, "cell_kind": plan.cell_kind, "base": base}
    item_id = escape_name(key if key is not None else f"{base}#{row}")
    if plan.id_column is not None:  # every row keeps a record: repeated values get a "#k" suffix
        item_id, repeated = opts.unique(item_id)
        if repeated is not None:
            meta["duplicate_of"] = repeated
    source = escape_name(f"{plan.path}#{row}")
    data = rel = None
    if plan.cell_kind == "struct" and cell is not None:
        data, rel = cell.get("bytes"), cell.get("path")
    elif plan.cell_kind == "binary":
        data = cell
    elif plan.cell_kind == "path":
        rel = cell
    if data is not None:
        return Item(item_id, source, data=bytes(data), meta=meta)
    if rel and "\x00" in rel:
        return Item(item_id, source, error=f"image path contains a NUL byte (column {plan.column!r}, row {row})",
                    meta=meta)
    if rel:
        p = Path(rel)
        return Item(item_id, source, path=p if p.is_absolute() else plan.path.parent / p, meta=meta)
    what = "null image cell" if cell is None else "empty image cell (no bytes and no path)"
    return Item(item_id, source, error=f"{what} (column {plan.column!r}, row {row})", meta=meta)


READERS: dict[str, Callable[[_Task, _Options], Iterator[Item]]] = {
    "folder": _read_folder,
    "image": _read_image,
    "parquet": _read_parquet,
    "list": _read_list,
    "tar": lambda task, opts: tar_items(task.given, task.prefix),
}


def iter_items(
    inputs: Sequence[str],
    *,
    image_column: str | None = None,
    id_column: str | None = None,
    stdin: TextIO | None = None,
    batch_rows: int = 1024,
    null: bool = False,
) -> ItemStream:
    """Validate all inputs now (InputError, nothing read yet), then return a lazy :class:`ItemStream`.

    The stream's ``skipped`` log lists the folder files that are not inputs, with reasons. With ``null``, a
    ``-`` list on stdin is NUL-separated (``find -print0``).

    Raises
    ------
    InputError
        A missing input path; a Parquet file given directly without the image / id column, with an ambiguous
        one, or whose image column has an unusable type (message names file, column and type).
    """
    if batch_rows < 1:
        raise InputError(f"batch_rows must be ≥ 1, got {batch_rows}")
    opts = _Options(image_column, id_column, stdin, null, batch_rows)
    tasks = _plan(inputs, opts)
    return ItemStream(tasks, opts)


def _generate(tasks: list[_Task], opts: _Options) -> Iterator[Item]:
    for task in tasks:
        yield from READERS[task.kind](task, opts)


def count_items(
    inputs: Sequence[str],
    *,
    image_column: str | None = None,
    id_column: str | None = None,
    stdin: TextIO | None = None,
) -> int | None:
    """Cheap total for a progress bar (Parquet footers, a folder walk); None when unknown (stdin)."""
    if any(str(x) == "-" for x in inputs):
        return None

    def rows(path: Path) -> int:
        try:
            plan = parquet_plan(path, image_column, id_column)
        except InputError:
            return 1  # one error record
        return 1 if plan.error else plan.num_rows  # a zero-row file gives no record

    total = 0
    for g in dict.fromkeys(str(x) for x in inputs):
        p = Path(g)
        if p.is_dir():
            for rel, entry, err in _walk(p):
                if err is not None:
                    total += 1
                    continue
                kind, detail = classify(p / rel, entry.name)
                if kind == "image" or (kind == "parquet" and detail is not None):
                    total += 1
                elif kind == "parquet":
                    total += rows(p / rel)
                elif is_tar(rel):
                    total += count_samples(p / rel)
        elif p.is_file() and _is_parquet_file(p):
            total += rows(p)
        elif p.is_file() and is_tar(p):
            total += count_samples(p)
        else:
            total += 1
    return total
