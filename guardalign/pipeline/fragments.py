"""Inputs → fragments, the unit of distributed work, resume and output shards; a fragment → its items.

A fragment is a run of Parquet row groups (about ``fragment_rows`` rows), one webdataset tar shard, or a run of
image files (at most ``fragment_rows``) in folder-walk order. Planning gives the same ids, in the same order, as
:func:`guardalign.io.sources.iter_items` (its planning and readers are reused for local paths), so both engines
write the same records. Inputs may be local paths, globs (``data/*.parquet``, quoted so the engine expands them)
or any URI a pyarrow filesystem understands (``s3://``, ``gs://``, ``hdfs://``, ``file://``); a URI's items carry
their bytes (read through the filesystem) and its records name the URI as their source.
"""
from __future__ import annotations

import glob as globmod
import hashlib
import os
import posixpath
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterator, Sequence

from guardalign.errors import ConfigError, InputError
from guardalign.io import parquet_plan as pp
from guardalign.io import sources as src
from guardalign.io.images import IMAGE_EXTENSIONS, MAX_FILE_BYTES
from guardalign.io.webdataset import is_tar, tar_items
from guardalign.records import Item

FRAGMENT_ROWS = 10_000  # default rows (Parquet) or files (folders) per fragment
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Fragment:
    key: str  # stable, unique name: the input file (or folder chunk) and its row range
    kind: str  # "parquet" | "tar" | "files"
    path: str = ""  # the Parquet or tar file: a local path or a URI
    base: str = ""  # id base of a Parquet/tar file, as sources names it (its name, or path on a clash)
    groups: tuple[int, ...] = ()  # Parquet row groups of this fragment
    first_row: int = 0  # Parquet: row index of the fragment's first row within its file
    files: tuple[tuple[str, str, str | None], ...] = ()  # "files": (id, path or URI, error) per image
    size: int | None = None  # items it gives, when known before reading (not for a tar)
    stamp: str = ""  # digest of the inputs' sizes and mtimes: a resume redoes a fragment whose input changed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fragment":
        return cls(**{**d, "groups": tuple(d["groups"]), "files": tuple(tuple(f) for f in d["files"])})


@dataclass
class _Planner:
    image_column: str | None
    id_column: str | None
    rows: int  # fragment_rows
    split_parquet: bool = True  # False: one fragment per Parquet file (mask rebuilds each file whole)
    out: list[Fragment] = field(default_factory=list)
    chunk: list[tuple[str, str, str | None]] = field(default_factory=list)  # files waiting for a fragment
    chunk_stat: list[str] = field(default_factory=list)
    chunk_where: str = ""

    def add_file(self, item_id: str, where: str, error: str | None, stat: str, group: str) -> None:
        if self.chunk and (self.chunk_where != group or len(self.chunk) >= self.rows):
            self.flush()
        self.chunk_where = group
        self.chunk.append((item_id, where, error))
        self.chunk_stat.append(stat)

    def flush(self) -> None:
        if self.chunk:
            first, last = self.chunk[0][0], self.chunk[-1][0]
            self.out.append(Fragment(f"{self.chunk_where}:{first}..{last}", "files", files=tuple(self.chunk),
                                     size=len(self.chunk), stamp=_digest(self.chunk_stat)))
        self.chunk, self.chunk_stat = [], []

    def add(self, frag: Fragment) -> None:
        self.flush()
        self.out.append(frag)


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def is_uri(given: str) -> bool:
    return "://" in given


def expand(inputs: Sequence[str]) -> list[str]:
    """Inputs with globs expanded (sorted); a glob that matches nothing is an InputError."""
    out = []
    for g in dict.fromkeys(str(x) for x in inputs):
        if g == "-":
            raise ConfigError("--engine ray reads files, folders, globs or URIs, not a list on stdin ('-')")
        body = g.split("://", 1)[1] if is_uri(g) else g
        if not any(c in body for c in GLOB_CHARS) or (not is_uri(g) and os.path.lexists(g)):
            out.append(g)
            continue
        found = _glob_uri(g) if is_uri(g) else sorted(globmod.glob(g))
        if not found:
            raise InputError(f"input not found: {g} matches nothing")
        out.extend(found)
    return list(dict.fromkeys(out))


def _glob_uri(pattern: str) -> list[str]:
    """URIs of the files matching ``pattern`` (each path part matched on its own, so ``*`` stays in its folder)."""
    from pyarrow import fs as pafs

    filesystem, path = _fs(pattern)
    parts = path.split("/")
    fixed = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))
    root = "/".join(parts[:fixed]) or "/"
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    scheme = pattern.split("://", 1)[0]
    prefix = pattern[: len(pattern) - len(path)] if pattern.endswith(path) else f"{scheme}://"
    hits = [i.path for i in infos if len(i.path.split("/")) == len(parts)
            and all(fnmatchcase(a, b) for a, b in zip(i.path.split("/"), parts))]
    return [prefix + p for p in sorted(hits)]


def _fs(uri: str):
    from pyarrow import ArrowException
    from pyarrow import fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (ArrowException, ValueError, OSError) as exc:
        raise InputError(f"cannot open {uri} ({exc})") from None


def plan(inputs: Sequence[str], *, image_column: str | None = None, id_column: str | None = None,
         fragment_rows: int = FRAGMENT_ROWS, split_parquet: bool = True) -> list[Fragment]:
    """Fragments of ``inputs`` in input order. InputError (exit 2) for a missing input or unusable Parquet schema.
    ``split_parquet=False`` keeps each Parquet file in one fragment."""
    if fragment_rows < 1:
        raise ConfigError(f"fragment rows must be ≥ 1, got {fragment_rows}")
    given = expand(inputs)
    pl = _Planner(image_column, id_column, fragment_rows, split_parquet)
    local = [g for g in given if not is_uri(g)]
    opts = src._Options(image_column, id_column, None, False, 1024)
    tasks = {t.given: t for t in src._plan(local, opts)} if local else {}
    multi = len(given) > 1
    names = [Path(g).name for g in given if _is_file_of(g, ("parquet", "tar"))]
    for g in given:
        if not is_uri(g):
            _plan_local(tasks[g], opts, pl)
        else:
            _plan_uri(g, multi, names, pl)
    pl.flush()
    return pl.out


def _is_file_of(g: str, kinds) -> bool:
    name = g.rstrip("/").rsplit("/", 1)[-1].lower()
    return ("parquet" in kinds and Path(name).suffix in src.PARQUET_EXTENSIONS) or ("tar" in kinds and is_tar(name))


def _stat(path: str | Path) -> str:
    try:
        st = os.stat(path)
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"
    except OSError as exc:
        return f"{path}:{exc.errno}"


def _plan_local(task, opts, pl: _Planner) -> None:
    if task.kind == "folder":
        root = Path(task.given)
        for rel, entry, err in src._walk(root):
            ext = Path(rel).suffix.lower()
            if err is not None:
                pl.add_file(f"{task.prefix}{rel or '.'}/", str(root / rel), err, rel, task.given)
            elif ext in IMAGE_EXTENSIONS:
                item = src._file_item(task.prefix + rel, root / rel)
                pl.add_file(item.id, str(root / rel), item.error, _stat(root / rel), task.given)
            elif ext in src.PARQUET_EXTENSIONS:
                _plan_parquet(str(root / rel), task.prefix + rel, pl, opts.plans.get(root / rel))
            elif is_tar(rel):
                pl.add(Fragment(f"{task.prefix}{rel}", "tar", str(root / rel), task.prefix + rel,
                                stamp=_digest([_stat(root / rel)])))
    elif task.kind == "parquet":
        _plan_parquet(task.given, task.prefix, pl, opts.plans[Path(task.given)])
    elif task.kind == "tar":
        pl.add(Fragment(task.prefix, "tar", task.given, task.prefix, stamp=_digest([_stat(task.given)])))
    else:
        item = src._file_item(task.given, Path(task.given))
        pl.add_file(item.id, task.given, item.error, _stat(task.given), "")


def _plan_parquet(path: str, base: str, pl: _Planner, plan_, meta=None) -> None:
    """Split one Parquet file into fragments of whole row groups, about ``pl.rows`` rows each."""
    import pyarrow.parquet as pq

    stamp = _digest([_stat(path)]) if meta is None else meta[1]
    if plan_ is not None and plan_.error:
        pl.add(Fragment(base, "parquet", path, base, size=1, stamp=stamp))
        return
    md = meta[0] if meta is not None else pq.ParquetFile(path).metadata
    start, groups, rows = 0, [], 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if groups and pl.split_parquet and rows + n > pl.rows:
            pl.add(_pq_fragment(path, base, groups, start, rows, stamp))
            start, groups, rows = start + rows, [], 0
        groups.append(g)
        rows += n
    if groups or not md.num_row_groups:
        pl.add(_pq_fragment(path, base, groups, start, rows, stamp))


def _pq_fragment(path: str, base: str, groups: list[int], start: int, rows: int, stamp: str) -> Fragment:
    return Fragment(f"{base}@{start}-{start + rows}", "parquet", path, base, tuple(groups), start, size=rows,
                    stamp=stamp)


def _plan_uri(uri: str, multi: bool, names: list[str], pl: _Planner) -> None:
    from pyarrow import fs as pafs

    filesystem, path = _fs(uri)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {uri}")
    if info.type == pafs.FileType.Directory:
        norm = uri.rstrip("/")
        prefix = f"{norm}/" if multi else ""
        selector = pafs.FileSelector(path, recursive=True)
        files = [i for i in filesystem.get_file_info(selector) if i.type == pafs.FileType.File]
        rels = sorted((posixpath.relpath(i.path, path), i) for i in files)
        for rel, i in sorted(rels, key=lambda r: _walk_order(r[0])):
            _plan_uri_file(f"{norm}/{rel}", prefix + rel, i, pl, group=norm)
        return
    name = path.rsplit("/", 1)[-1]
    base = uri if names.count(name) > 1 else name
    _plan_uri_file(uri, base, info, pl, group="", image_id=uri)


def _walk_order(rel: str) -> tuple:
    """The order of sources' folder walk: a folder's files (by name) before its sub-folders."""
    parts = rel.split("/")
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


def _plan_uri_file(uri: str, base: str, info, pl: _Planner, group: str, image_id: str | None = None) -> None:
    import pyarrow.parquet as pq

    stamp = f"{uri}:{info.size}:{info.mtime_ns}"
    ext = Path(info.path).suffix.lower()
    if ext in src.PARQUET_EXTENSIONS:
        filesystem, path = _fs(uri)
        try:
            with filesystem.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                _check_columns(uri, pf.schema_arrow, pl)
                _plan_parquet(uri, base, pl, None, meta=(pf.metadata, _digest([stamp])))
        except (OSError, _arrow_error()) as exc:
            pl.add(Fragment(base, "parquet", uri, base, size=1, stamp=_digest([stamp, str(exc)])))
    elif is_tar(info.path):
        pl.add(Fragment(base, "tar", uri, base, stamp=_digest([stamp])))
    elif ext in IMAGE_EXTENSIONS or image_id is not None:
        pl.add_file(image_id or base, uri, None, stamp, group)


def _arrow_error():
    from pyarrow import ArrowException

    return ArrowException


def _check_columns(uri: str, schema, pl: _Planner) -> tuple[str, str]:
    """(image column, cell kind) of a Parquet schema, as sources checks them; InputError otherwise."""
    column = pl.image_column or pp.detect_column(uri, schema)[0]
    if column not in schema.names:
        raise InputError(f"{uri}: image column {column!r} not found; columns: {pp.describe_columns(schema)}")
    kind = pp.type_kind(schema.field(column).type)
    if kind is None:
        raise InputError(f"{uri}: image column {column!r} has type {schema.field(column).type}; expected "
                         "struct<bytes: binary, path: string>, binary, or string (a path)")
    if pl.id_column is not None and pl.id_column not in schema.names:
        raise InputError(f"{uri}: id column {pl.id_column!r} not found; columns: {pp.describe_columns(schema)}")
    return column, kind


# ----------------------------------------------------------------------------- reading a fragment


def items(frag: Fragment, *, image_column: str | None = None, id_column: str | None = None) -> Iterator[Item]:
    """The fragment's items, as :func:`guardalign.io.sources.iter_items` gives them (same ids and errors)."""
    if frag.kind == "tar":
        opener = None
        if is_uri(frag.path):
            filesystem, path = _fs(frag.path)
            opener = lambda: filesystem.open_input_file(path)  # noqa: E731
        yield from tar_items(frag.path, frag.base, opener=opener)
    elif frag.kind == "parquet":
        yield from _parquet_items(frag, image_column, id_column)
    else:
        for item_id, where, error in frag.files:
            if is_uri(where):
                yield _uri_item(item_id, where) if error is None else Item(item_id, where, error=error)
            elif error is not None and item_id.endswith("/"):
                yield Item(item_id, where, error=error)
            else:
                yield src._file_item(item_id, Path(where))


def _uri_item(item_id: str, uri: str, meta: dict | None = None, source: str | None = None) -> Item:
    """An item whose bytes are read now through the URI's filesystem (so a worker never needs the path)."""
    try:
        filesystem, path = _fs(uri)
        with filesystem.open_input_file(path) as f:
            if f.size() > MAX_FILE_BYTES:
                raise OSError(f"file too large for an image (over {MAX_FILE_BYTES >> 20} MiB)")
            data = f.read()
    except (OSError, InputError, _arrow_error()) as exc:
        return Item(item_id, source or uri, error=f"cannot read {uri} ({exc})", meta=meta or {})
    if not data:
        return Item(item_id, source or uri, error="zero-byte file", meta=meta or {})
    return Item(item_id, source or uri, data=data, meta={**(meta or {}), "name": uri})  # the name tells a TGA


def _parquet_items(frag: Fragment, image_column: str | None, id_column: str | None) -> Iterator[Item]:
    """The rows of a Parquet fragment, batch by batch (sources' row → item rule; URIs read through pyarrow)."""
    import contextlib

    import pyarrow.parquet as pq

    opts = src._Options(image_column, id_column, None, False, 1024)
    uri = is_uri(frag.path)
    where = frag.path if uri else str(Path(frag.path))
    row = frag.first_row
    try:
        with contextlib.ExitStack() as stack:
            if uri:
                filesystem, path = _fs(frag.path)
                pf = stack.enter_context(pq.ParquetFile(stack.enter_context(filesystem.open_input_file(path))))
                column, kind = _check_columns(frag.path, pf.schema_arrow, _Planner(image_column, id_column, 1))
                plan_ = pp.ParquetPlan(Path(path), column, kind, id_column, pf.metadata.num_rows)
            else:
                plan_ = pp.parquet_plan(Path(frag.path), opts.image_column, opts.id_column)
                if plan_.error:
                    yield Item(frag.base, where, error=plan_.error, meta={"parquet": where, "base": frag.base})
                    return
                pf = stack.enter_context(pq.ParquetFile(frag.path, pre_buffer=False, buffer_size=1 << 20))
            columns = [plan_.column] + ([id_column] if id_column not in (None, plan_.column) else [])
            size = src._rows_per_batch(pf, plan_, opts.batch_rows)
            for batch in pf.iter_batches(batch_size=size, row_groups=list(frag.groups), columns=columns):
                cells = batch.column(0).to_pylist()
                keys = batch.column(columns.index(id_column)).to_pylist() if id_column else None
                for i, cell in enumerate(cells):
                    key = None if keys is None or keys[i] is None else str(keys[i])
                    item = src._row_item(plan_, frag.base, row + i, cell, key, opts)
                    yield _uri_row(item, frag.path, row + i) if uri else item
                row += len(cells)
    except (OSError, InputError, _arrow_error()) as exc:
        yield Item(frag.base, where, error=f"cannot read Parquet file at row {row} ({exc})",
                   meta={"parquet": where, "row": row, "base": frag.base})


def _uri_row(item: Item, uri: str, row: int) -> Item:
    """A row of a Parquet URI: its source names the URI; a path cell is read through the filesystem."""
    meta = {**item.meta, "parquet": uri}
    source = f"{uri}#{row}"
    if item.path is None:
        return Item(item.id, source, data=item.data, error=item.error, meta=meta)
    scheme = uri.split("://", 1)[0]
    return _uri_item(item.id, f"{scheme}://{posixpath.normpath(item.path.as_posix())}", meta=meta, source=source)
