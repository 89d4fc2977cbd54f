"""Shared pieces of the benchmark readers: option parsing, item builders, layout lookup, CSV and Parquet rows.

Every reader turns one row of a published benchmark layout into one :class:`guardalign.io.sources.Item`:

- ``id``: ``<label>/<native id>``, stable across runs and unique within the benchmark;
- ``source``: ``<annotation file>#<row or key>``, where a reviewer finds the row;
- ``path`` (an image file) or ``data`` (image bytes from a Parquet cell);
- ``error``: set when the row cannot be used (names the file and the row), never an exception;
- ``meta``: ``{"benchmark": label, "prompt": str, "category": str, "reference": {...}}``, where
  ``reference`` holds the benchmark's own fields for the row (original question, key phrase, subset, ...).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from guardalign.errors import ConfigError, InputError
from guardalign.io.sources import Item

CSV_FIELD_LIMIT = 1 << 24  # longest CSV field accepted (JailBreakV queries run to tens of kB)
PARQUET_BATCH_ROWS = 64  # rows per Parquet batch: image cells stay a few MB in memory at a time


@dataclass(frozen=True)
class Option:
    default: str  # value when the spec does not give the option
    choices: tuple[str, ...] | None  # allowed values, or None for free text checked by ``check``
    help: str  # one line for --help and the error message
    check: Callable[[str], bool] | None = None  # validator for free-text values


def resolve_options(name: str, given: dict[str, str], declared: dict[str, Option]) -> dict[str, str]:
    """Fill defaults and validate ``given`` against ``declared``; ConfigError names the option and the choices."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(f"{k} ({o.help})" for k, o in declared.items()) or "none"
        raise ConfigError(f"benchmark {name!r}: unknown option {unknown[0]!r}; options: {known}")
    out = {}
    for key, opt in declared.items():
        value = given.get(key, opt.default)
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(f"benchmark {name!r}: invalid {key}={value!r}; expected one of {', '.join(opt.choices)}")
        if opt.check is not None and not opt.check(value):
            raise ConfigError(f"benchmark {name!r}: invalid {key}={value!r}; expected {opt.help}")
        out[key] = value
    return out


def item(label: str, native_id: str, source: str, *, prompt: str, category: str | None,
         reference: dict[str, Any], path: Path | None = None, data: bytes | None = None) -> Item:
    """A usable benchmark item."""
    meta = {"benchmark": label, "prompt": prompt, "category": category, "reference": reference}
    return Item(id=f"{label}/{native_id}", source=source, path=path, data=data, meta=meta)


def bad_item(label: str, native_id: str, source: str, error: str, *, category: str | None = None,
             reference: dict[str, Any] | None = None) -> Item:
    """An item whose row cannot be used; ``error`` must name the file and the row."""
    meta = {"benchmark": label, "prompt": None, "category": category, "reference": reference or {}}
    return Item(id=f"{label}/{native_id}", source=source, error=error, meta=meta)


def image_file(path: Path, where: str) -> str | None:
    """None when ``path`` is a readable regular file, else why not (prefixed with ``where``)."""
    if not path.exists():
        return f"{where}: image not found: {path}"
    if not path.is_file():
        return f"{where}: image is not a file: {path}"
    return None


def first_existing(root: Path, candidates: Sequence[str], what: str, *, kind: str = "file") -> Path:
    """The first of ``root/candidate`` that exists as ``kind`` ("file" | "dir"); InputError listing the tries."""
    for c in candidates:
        p = root / c if c else root
        if (p.is_file() if kind == "file" else p.is_dir()):
            return p
    tried = ", ".join(str(root / c) if c else str(root) for c in candidates)
    raise InputError(f"{what} not found under {root} (looked for {tried})")


def require_dir(root: Path, name: str) -> Path:
    """``root`` as given to ``NAME:DIR``; InputError when it does not exist."""
    if not os.path.lexists(root):
        raise InputError(f"{name}: {root} does not exist")
    return root


def safe_join(base: Path, rel: str, where: str) -> tuple[Path | None, str | None]:
    """``base/rel`` for a relative path taken from the data; refuses absolute paths and ``..`` escapes."""
    if not rel or not isinstance(rel, str):
        return None, f"{where}: empty image path"
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        return None, f"{where}: image path {rel!r} must be relative and stay inside {base}"
    return base / p, None


# ----------------------------------------------------------------------------- CSV


def csv_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str] | None, str | None]]:
    """Yield (line number, row, error) for each data row of a CSV file, lazily.

    Raises InputError before the first row when the file cannot be opened or lacks a ``required`` column.
    A row with a missing cell or an undecodable byte yields an error naming the file and its line.
    """
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}") from None
    try:
        reader = csv.reader(f)
        header = next(reader)
    except (csv.Error, UnicodeDecodeError, StopIteration) as e:
        f.close()
        raise InputError(f"{path}: no readable CSV header ({e or 'empty file'})") from None
    missing = [c for c in required if c not in header]
    if missing:
        f.close()
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; columns: {', '.join(header)}")
    return _csv_body(f, reader, header, path)


def _csv_body(f, reader, header: list[str], path: Path):
    with f:
        while True:
            line = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                yield line, None, f"{path}:{line}: unreadable CSV row ({e})"
                if isinstance(e, UnicodeDecodeError):
                    return  # the decoder cannot resynchronise inside a text stream
                continue
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                yield line, None, f"{path}:{line}: expected {len(header)} cells, got {len(cells)}"
                continue
            yield line, dict(zip(header, cells)), None


# ----------------------------------------------------------------------------- Parquet


def image_cell(cell: Any, base: Path, where: str) -> tuple[bytes | None, Path | None, str | None]:
    """(data, path, error) for an image cell: HF ``struct<bytes, path>``, raw binary, or a relative path."""
    if cell is None:
        return None, None, f"{where}: null image cell"
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"]), None, None
        if cell.get("path"):
            path, err = safe_join(base, cell["path"], where)
            return None, path, err
        return None, None, f"{where}: empty image cell (no bytes and no path)"
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return (bytes(cell), None, None) if len(cell) else (None, None, f"{where}: empty image bytes")
    if isinstance(cell, str):
        path, err = safe_join(base, cell, where)
        return None, path, err
    return None, None, f"{where}: image cell of unexpected type {type(cell).__name__}"


def find_parquet(root: Path, pattern: str, what: str) -> list[Path]:
    """``root`` itself when it is a file, else the sorted ``pattern`` matches below it; InputError if none."""
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob(pattern) if p.is_file())
    if not files:
        raise InputError(f"{what}: no {pattern} files under {root}")
    return files


def parquet_columns(path: Path, required: Sequence[str]) -> list[str]:
    """The column names of a Parquet file; InputError if unreadable or a ``required`` column is missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            names = list(pf.schema_arrow.names)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read Parquet file {path}: {e}") from None
    missing = [c for c in required if c not in names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; columns: {', '.join(names)}")
    return names


def parquet_rows(path: Path, columns: Sequence[str], keep: Callable[[dict], bool] | None = None,
                 batch_rows: int = PARQUET_BATCH_ROWS) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield (row index, row dict, error) batch by batch; only ``columns`` are read.

    ``keep(row)`` drops rows (e.g. other HADES steps) before they are yielded; the row index still
    counts every row of the file. A read failure mid-file yields one error naming the file and row.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        with pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20) as pf:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
                for i, rec in enumerate(batch.to_pylist()):
                    if keep is None or keep(rec):
                        yield row + i, rec, None
                row += batch.num_rows
    except (OSError, pa.ArrowException) as e:
        yield row, None, f"{path}#{row}: cannot read Parquet file from this row on ({e})"


def text(value: Any) -> str | None:
    """A non-empty stripped string, or None."""
    if isinstance(value, str) and value.strip():
        return value
    return None
