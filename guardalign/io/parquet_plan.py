"""Parquet inputs: read a file's footer and resolve its image and id columns, before any row is read.

Split out of :mod:`guardalign.io.sources` (which turns the planned files into Items). Image cells may be HF
datasets ``struct<bytes: binary, path: string>``, raw ``binary``, a ``string`` path, or any of these
dictionary-encoded (``dictionary<values=binary, ...>``).
"""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from guardalign.errors import InputError

# String columns taken as image paths when no other image column exists, in order of preference.
PATH_COLUMN_NAMES = ("image", "image_path", "img", "file_name", "filename", "file", "path")


@dataclass(frozen=True)
class ParquetPlan:
    path: Path  # the Parquet file
    column: str | None = None  # image column
    cell_kind: str | None = None  # "struct" | "binary" | "path"
    id_column: str | None = None  # column whose value is the record id, or None
    num_rows: int = 0  # rows per the footer
    error: str | None = None  # the file cannot be used at all (one error record, the run goes on)
    why: str = ""  # why this image column was chosen (said on stderr)
    others: tuple = ()  # other columns that hold images too (not scanned: mask refuses such a file)


def type_kind(t) -> str | None:
    """Arrow type of a column → the image cell kind it can hold, or None (dictionary types by their values)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return type_kind(t.value_type)
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
    except (ValueError, KeyError, TypeError, RecursionError):
        return []


def describe_columns(schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema) or "(none)"


def detect_column(path: Path, schema) -> tuple[str, str]:
    """Pick the image column and say why: HF Image features, then struct<bytes,path>, binary, named string
    columns."""
    kinds = {name: type_kind(schema.field(name).type) for name in schema.names}
    tiers = [
        ([c for c in _hf_image_columns(schema) if kinds.get(c) in ("struct", "binary", "path")],
         "the Hugging Face Image feature"),
        ([c for c, k in kinds.items() if k == "struct"], "a struct<bytes, path> column"),
        ([c for c, k in kinds.items() if k == "binary"], "a binary column"),
        ([c for c in PATH_COLUMN_NAMES if kinds.get(c) == "path"], "a string column named like an image path"),
    ]
    for n, (tier, what) in enumerate(tiers):
        if len(tier) == 1 or (len(tier) > 1 and n == len(tiers) - 1):  # path names: first by preference
            return tier[0], f"{what}{' (first by name)' if len(tier) > 1 else ''}"
        if "image" in tier:
            return "image", f"{what} named 'image'"
        if tier:
            raise InputError(f"{path}: several possible image columns {tier}; pass --image-column COL")
    raise InputError(f"{path}: no image column found; columns: {describe_columns(schema)}; "
                     "pass --image-column COL")


def other_image_columns(pf, schema, column: str) -> tuple[str, ...]:
    """Columns besides ``column`` that hold image bytes: struct<bytes, path>, HF Image features, or binary
    columns whose first non-null cells are images (by their magic bytes)."""
    from guardalign.io.formats import sniff

    hf = set(_hf_image_columns(schema))
    found = []
    for name in schema.names:
        kind = type_kind(schema.field(name).type)
        if name == column or kind not in ("struct", "binary"):
            continue
        if kind == "struct" or name in hf:
            found.append(name)
            continue
        try:
            batch = next(pf.iter_batches(batch_size=16, columns=[name]), None)
        except Exception:  # noqa: BLE001 - a column we cannot read is not taken for images
            continue
        cells = [c for c in (batch.column(0).to_pylist() if batch is not None else []) if c]
        if any(sniff(bytes(c[:64])) for c in cells[:16]):
            found.append(name)
    return tuple(found)


def regular_file_error(path: Path) -> str | None:
    """Why ``path`` must not be opened (a FIFO would block, a device never end), or None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"cannot read file ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({file_kind(mode)})"


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


@contextmanager
def open_parquet(path: str | os.PathLike, **kwargs):
    """``pq.ParquetFile`` over ``path`` opened by its bytes (a non-UTF-8 file name works); closed on exit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = pa.OSFile(os.fsencode(path))
    try:
        yield pq.ParquetFile(f, **kwargs)
    finally:
        f.close()


def parquet_plan(path: Path, image_column: str | None, id_column: str | None) -> ParquetPlan:
    """Read the footer and resolve the columns.

    An unreadable file (or a FIFO, never opened) gives a plan with ``error`` set; schema problems (no or an
    ambiguous image column, a wrong type, a missing id column) raise InputError naming file, column and type.
    """
    import pyarrow as pa

    why = regular_file_error(path)
    if why is not None:
        return ParquetPlan(path, error=why)
    try:
        with open_parquet(path) as pf:
            schema, num_rows = pf.schema_arrow, pf.metadata.num_rows
            column, why = (image_column, "--image-column") if image_column else detect_column(path, schema)
            others = other_image_columns(pf, schema, column) if column in schema.names else ()
    except (OSError, pa.ArrowException) as e:
        return ParquetPlan(path, error=f"cannot read Parquet file ({e})")
    if column not in schema.names:
        raise InputError(f"{path}: image column {column!r} not found; columns: {describe_columns(schema)}")
    kind = type_kind(schema.field(column).type)
    if kind is None:
        raise InputError(f"{path}: image column {column!r} has type {schema.field(column).type}; expected "
                         "struct<bytes: binary, path: string>, binary, or string (a path)")
    if id_column is not None and id_column not in schema.names:
        raise InputError(f"{path}: id column {id_column!r} not found; columns: {describe_columns(schema)}")
    return ParquetPlan(path, column, kind, id_column, num_rows, why=why, others=others)
