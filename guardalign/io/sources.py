"""Scan inputs → a lazy stream of :class:`Item` (decode them with ``decode_stream``, re-exported here).

Input kinds (``READERS``), told apart up front by :func:`iter_items`:

- ``folder``: walked recursively in sorted order (a directory's files, then its sub-directories,
  depth-first; symlinked directories are not followed). Files with an image extension
  (``IMAGE_EXTENSIONS``, any case) are images; ``*.parquet`` files are read as Parquet.
- ``image``: a single file; ``parquet``: a file named ``*.parquet`` or starting with ``PAR1``.
- ``list``: ``-``, newline-separated image paths on stdin (blank lines skipped).

Record ids are stable across runs of the same command:

- folder images: the path relative to the folder (posix); Parquet found in a folder: relative path too;
- single image files and stdin lines: the path as given;
- Parquet rows: ``<file name>#<row>`` (row index within the file; the path as given instead of the
  name when two Parquet inputs share a name), or the value of ``id_column``.
- With more than one input, folder ids are prefixed by the folder as given (``train/a.jpg`` and
  ``test/a.jpg`` stay distinct).

Parquet image cells may be HF datasets ``struct<bytes: binary, path: string>`` (bytes first, else the
path), raw ``binary``, or a ``string`` path; paths are relative to the Parquet file's directory.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

from guardalign.errors import InputError
from guardalign.records import Item  # noqa: F401 (re-exported: sources yield Items)
from guardalign.io.images import IMAGE_EXTENSIONS, Decoded, decode_stream  # noqa: F401 (decode_stream re-exported)

PARQUET_EXTENSIONS = frozenset({".parquet", ".pq"})
# Target bytes of image column data per Parquet batch (rows per batch shrink for big images).
BATCH_BYTES = 64 << 20
# String columns taken as image paths when no other image column exists, in order of preference.
PATH_COLUMN_NAMES = ("image", "image_path", "img", "file_name", "filename", "file", "path")


@dataclass(frozen=True)
class _Task:
    kind: str  # key of READERS
    given: str  # the input exactly as the user gave it
    prefix: str  # folder: prepended to relative ids ("" for a lone input); parquet: the id base


@dataclass(frozen=True)
class _ParquetPlan:
    path: Path  # the Parquet file
    column: str | None = None  # image column
    cell_kind: str | None = None  # "struct" | "binary" | "path"
    id_column: str | None = None  # column whose value is the record id, or None
    num_rows: int = 0  # rows per the footer
    error: str | None = None  # the file cannot be read at all (one error record, the run goes on)


@dataclass
class _Options:
    image_column: str | None  # user-given image column, or None to detect
    id_column: str | None  # user-given id column, or None
    stdin: TextIO | None  # where "-" reads paths from
    null: bool  # "-" lists are NUL-separated (find -print0) instead of one path per line
    batch_rows: int  # max rows per Parquet batch
    plans: dict = field(default_factory=dict)  # Parquet path -> _ParquetPlan validated up front


# ----------------------------------------------------------------------------- planning


def _is_parquet_file(path: Path) -> bool:
    if path.suffix.lower() in PARQUET_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


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
        if not os.path.lexists(p):
            raise InputError(f"input not found: {g}")
        if p.is_dir():
            norm = os.path.normpath(g).replace(os.sep, "/")
            tasks.append(_Task("folder", g, f"{norm}/" if multi and norm != "." else ""))
            for rel, entry, err in _walk(p):
                if err is None and Path(rel).suffix.lower() in PARQUET_EXTENSIONS:
                    opts.plans[p / rel] = _parquet_plan(p / rel, opts)
        elif p.is_file() and _is_parquet_file(p):
            tasks.append(_Task("parquet", g, p.name))
            opts.plans[p] = _parquet_plan(p, opts)
        else:  # images, broken symlinks, unreadable files: per-item errors later
            tasks.append(_Task("image", g, ""))
    names = [t.prefix for t in tasks if t.kind == "parquet"]
    clash = {n for n in names if names.count(n) > 1}  # same file name in two folders: use the paths
    return [_Task(t.kind, t.given, Path(t.given).as_posix()) if t.kind == "parquet" and t.prefix in clash else t
            for t in tasks]


def _type_kind(t) -> str | None:
    """Arrow type of a column → the image cell kind it can hold, or None."""
    import pyarrow as pa

    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary,
              getattr(pa.types, "is_binary_view", lambda _: False))
    string = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", lambda _: False))
    if pa.types.is_struct(t):
        fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
        if "bytes" in fields and any(f(fields["bytes"]) for f in binary):
            if "path" not in fields or any(f(fields["path"]) for f in string):
                return "struct"
        return None
    if any(f(t) for f in binary):
        return "binary"
    if any(f(t) for f in string):
        return "path"
    return None


def _hf_image_columns(schema) -> list[str]:
    import json

    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        feats = json.loads(raw)["info"]["features"] if raw else {}
        return [k for k, v in feats.items() if isinstance(v, dict) and v.get("_type") == "Image"]
    except (ValueError, KeyError, TypeError):
        return []


def _detect_column(path: Path, schema) -> str:
    """Pick the image column: HF Image features, then struct<bytes,path>, binary, named string columns."""
    kinds = {name: _type_kind(schema.field(name).type) for name in schema.names}
    tiers = [
        [c for c in _hf_image_columns(schema) if kinds.get(c) in ("struct", "binary", "path")],
        [c for c, k in kinds.items() if k == "struct"],
        [c for c, k in kinds.items() if k == "binary"],
        [c for c in PATH_COLUMN_NAMES if kinds.get(c) == "path"],
    ]
    for n, tier in enumerate(tiers):
        if len(tier) == 1 or (len(tier) > 1 and n == len(tiers) - 1):  # path names: first by preference
            return tier[0]
        if "image" in tier:
            return "image"
        if tier:
            raise InputError(f"{path}: several possible image columns {tier}; pass --image-column COL")
    raise InputError(f"{path}: no image column found; columns: {_describe_columns(schema)}; "
                     "pass --image-column COL")


def _describe_columns(schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema) or "(none)"


def _parquet_plan(path: Path, opts: _Options) -> _ParquetPlan:
    """Read the footer and resolve the columns; InputError for schema problems (exit 2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            schema, num_rows = pf.schema_arrow, pf.metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        return _ParquetPlan(path, error=f"cannot read Parquet file ({e})")
    column = opts.image_column
    if column is None:
        column = _detect_column(path, schema)
    elif column not in schema.names:
        raise InputError(f"{path}: image column {column!r} not found; columns: {_describe_columns(schema)}")
    kind = _type_kind(schema.field(column).type)
    if kind is None:
        raise InputError(f"{path}: image column {column!r} has type {schema.field(column).type}; expected "
                         "struct<bytes: binary, path: string>, binary, or string (a path)")
    if opts.id_column is not None and opts.id_column not in schema.names:
        raise InputError(f"{path}: id column {opts.id_column!r} not found; columns: {_describe_columns(schema)}")
    return _ParquetPlan(path, column, kind, opts.id_column, num_rows)


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


def _file_item(item_id: str, path: Path, meta: dict | None = None) -> Item:
    error = None
    if os.path.islink(path) and not os.path.exists(path):
        error = f"broken symlink (points to {os.readlink(path)!r})"
    return Item(id=item_id, source=str(path), path=path, error=error, meta=meta or {})


def _read_folder(task: _Task, opts: _Options) -> Iterator[Item]:
    root = Path(task.given)
    for rel, entry, err in _walk(root):
        if err is not None:
            yield Item(id=f"{task.prefix}{rel or '.'}/", source=str(root / rel), error=err)
            continue
        ext = Path(rel).suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            yield _file_item(task.prefix + rel, root / rel, {"root": task.given, "rel": rel})
        elif ext in PARQUET_EXTENSIONS:
            yield from _parquet_items(root / rel, task.prefix + rel, opts)


def _read_image(task: _Task, opts: _Options) -> Iterator[Item]:
    yield _file_item(task.given, Path(task.given))


def _read_list(task: _Task, opts: _Options) -> Iterator[Item]:
    stream = opts.stdin if opts.stdin is not None else sys.stdin
    for line in (_null_separated(stream) if opts.null else stream):
        line = line.rstrip("\r\n") if not opts.null else line
        if line.strip():
            yield _file_item(line, Path(line))


def _null_separated(stream: TextIO) -> Iterator[str]:
    """Paths separated by NUL bytes (``find -print0``); read in chunks, so a long list stays streamed."""
    raw = getattr(stream, "buffer", None)
    rest = b"" if raw is not None else ""
    while True:
        chunk = raw.read(1 << 16) if raw is not None else stream.read(1 << 16)
        if not chunk:
            break
        parts = (rest + chunk).split(b"\0" if raw is not None else "\0")
        rest = parts.pop()
        for p in parts:
            yield os.fsdecode(p) if raw is not None else p
    if rest:
        yield os.fsdecode(rest) if raw is not None else rest


def _read_parquet(task: _Task, opts: _Options) -> Iterator[Item]:
    yield from _parquet_items(Path(task.given), task.prefix, opts)


def _parquet_items(path: Path, base: str, opts: _Options) -> Iterator[Item]:
    """One Item per row, reading only the needed columns, batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    plan = opts.plans.get(path)
    if plan is None:  # appeared after planning: schema problems become an error record
        try:
            plan = _parquet_plan(path, opts)
        except InputError as e:
            plan = _ParquetPlan(path, error=str(e))
    if plan.error:
        yield Item(id=base, source=str(path), error=plan.error, meta={"parquet": str(path), "base": base})
        return
    columns = [plan.column] + ([plan.id_column] if plan.id_column not in (None, plan.column) else [])
    row = 0
    try:
        # Buffered stream reads instead of pre-buffering whole row groups: memory follows the batch.
        with pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20) as pf:
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
                    yield _row_item(plan, base, row + i, cell, key)
                row += len(cells)
    except (OSError, pa.ArrowException) as e:
        yield Item(id=base, source=str(path), error=f"cannot read Parquet file at row {row} ({e})",
                   meta={"parquet": str(path), "row": row, "base": base})


def _rows_per_batch(pf, plan: _ParquetPlan, batch_rows: int) -> int:
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


def _row_item(plan: _ParquetPlan, base: str, row: int, cell, key: str | None) -> Item:
    """Turn one image cell into an Item (inline bytes, a path next to the Parquet file, or an error)."""
    meta = {"parquet": str(plan.path), "row": row, "column": plan.column, "cell_kind": plan.cell_kind, "base": base}
    item_id = key if key is not None else f"{base}#{row}"
    source = f"{plan.path}#{row}"
    data = rel = None
    if plan.cell_kind == "struct" and cell is not None:
        data, rel = cell.get("bytes"), cell.get("path")
    elif plan.cell_kind == "binary":
        data = cell
    elif plan.cell_kind == "path":
        rel = cell
    if data is not None:
        return Item(item_id, source, data=bytes(data), meta=meta)
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
}


def iter_items(
    inputs: Sequence[str],
    *,
    image_column: str | None = None,
    id_column: str | None = None,
    stdin: TextIO | None = None,
    batch_rows: int = 1024,
    null: bool = False,
) -> Iterator[Item]:
    """Validate all inputs now (InputError, nothing read yet), then return a lazy Item stream.

    Raises
    ------
    InputError
        A missing input path; a Parquet file without the image / id column, with an ambiguous one,
        or whose image column has an unusable type (message names file, column and type).
    """
    if batch_rows < 1:
        raise InputError(f"batch_rows must be ≥ 1, got {batch_rows}")
    opts = _Options(image_column, id_column, stdin, null, batch_rows)
    tasks = _plan(inputs, opts)
    return _generate(tasks, opts)


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
    import pyarrow.parquet as pq

    if any(str(x) == "-" for x in inputs):
        return None

    def rows(path: Path) -> int:
        try:
            with pq.ParquetFile(path) as pf:
                return max(1, pf.metadata.num_rows)
        except Exception:
            return 1  # one error record

    total = 0
    for g in dict.fromkeys(str(x) for x in inputs):
        p = Path(g)
        if p.is_dir():
            for rel, _, err in _walk(p):
                ext = Path(rel).suffix.lower()
                if err is not None or ext in IMAGE_EXTENSIONS:
                    total += 1
                elif ext in PARQUET_EXTENSIONS:
                    total += rows(p / rel)
        elif p.is_file() and _is_parquet_file(p):
            total += rows(p)
        else:
            total += 1
    return total
