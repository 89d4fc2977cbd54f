"""Reviewer thumbnails for ``guardalign report``: read a flagged item's image, draw the patch heatmap.

Records are untrusted, so an image is only read from inside the allowed roots (``--image-root``;
default the current folder and the records' folders): a crafted ``source`` cannot pull an arbitrary
file into a report that gets mailed around. Decoding goes through :mod:`guardalign.io.images`
(Pillow's decompression-bomb guard on, EXIF orientation applied, as at scan time). Every failure
becomes a short note on the page, never an exception.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

THUMB_PX = 160  # long side of a thumbnail in pixels
_PARQUET_SOURCE = re.compile(r"^(?P<path>.+\.(?:parquet|pq))#(?P<row>\d+)$", re.IGNORECASE)


class NoImage(Exception):
    """Why no thumbnail could be made (shown on the page)."""


def _candidates(src: str, base_dir: Path) -> list[Path]:
    p = Path(src)
    return [p] if p.is_absolute() else [Path.cwd() / p, base_dir / p]


def locate(src: str, base_dir: Path) -> Path | None:
    """The existing file a source names (a Parquet source names its file), else None."""
    if not src:
        return None
    m = _PARQUET_SOURCE.match(src)
    for c in _candidates(m.group("path") if m else src, base_dir):
        try:
            if c.is_file():
                return c.resolve()
        except (OSError, ValueError):  # ValueError: embedded NUL byte
            continue
    return None


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _load(src: Any, base_dir: Path, roots: list[Path], cache: dict) -> Any:
    """Decode the image a scan record's ``source`` names, or raise NoImage."""
    from guardalign.io.images import ImageDecodeError, decode_image

    if not isinstance(src, str) or not src:
        raise NoImage("no source path in the record")
    path = locate(src, base_dir)
    if path is None:
        raise NoImage("image not found")
    if not _inside(path, roots):
        raise NoImage("image is outside the allowed folders (--image-root)")
    m = _PARQUET_SOURCE.match(src)
    try:
        if m:
            return decode_image(data=_parquet_bytes(path, int(m.group("row")), cache))[0]
        return decode_image(path=path)[0]
    except ImageDecodeError as exc:
        raise NoImage(f"cannot decode image: {exc}") from None


def _parquet_bytes(path: Path, row: int, cache: dict) -> bytes:
    """Image bytes of one Parquet row: the first binary column, or a struct column with a ``bytes`` field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = cache.get(path) or pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure is a note on the page
        raise NoImage(f"cannot open Parquet: {exc}") from None
    cache[path] = pf
    schema = pf.schema_arrow
    cols = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
            or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)]
    if not cols:
        raise NoImage("no image-bytes column in the Parquet file")
    col = "image" if "image" in cols else cols[0]
    start = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < start + n:
            key = (path, g, col)
            if cache.get("_rg_key") != key:  # keep one row group in memory
                cache["_rg"], cache["_rg_key"] = pf.read_row_group(g, columns=[col]).column(0), key
            value = cache["_rg"][row - start].as_py()
            if isinstance(value, dict):
                value = value.get("bytes")
            if not isinstance(value, (bytes, bytearray)) or not value:
                raise NoImage("no image bytes in that Parquet row")
            return bytes(value)
        start += n
    raise NoImage(f"row {row} is past the end of the Parquet file ({start} rows)")


def _heatmap(img: Any, rec: dict[str, Any]) -> tuple[Any, str]:
    """The heatmap overlay thumbnail, or a plain thumbnail and the reason."""
    if (rec.get("width"), rec.get("height")) != img.size:
        note = f"image is {img.width}×{img.height} but the record says {rec.get('width')}×{rec.get('height')}; no heatmap"
        return _plain(img), note
    try:
        from guardalign.detection.purify import overlay
    except ImportError:
        return _plain(img), "heatmap overlay unavailable"
    tau = rec.get("threshold") if rec.get("method") != "global" else None
    try:
        return overlay(img, rec.get("patch_boxes") or [], rec.get("patch_scores") or [], rec.get("unsafe_patches") or [],
                       rec.get("box_categories") or [], tau, max_size=THUMB_PX), ""
    except Exception as exc:  # noqa: BLE001 - malformed patch fields in an untrusted record
        return _plain(img), f"no heatmap: {type(exc).__name__}: {str(exc)[:120]}"


def _plain(img: Any) -> Any:
    out = img.convert("RGB")
    out.thumbnail((THUMB_PX, THUMB_PX))
    return out


def thumbnails(records: dict[int, dict[str, Any]], base_dir: Path, roots: list[Path]) -> dict[int, tuple[Any, str]]:
    """seq → ((data URI, width, height) or None, note) for each flagged record that gets a thumbnail."""
    from guardalign.reporting.html import thumb_img

    out: dict[int, tuple[Any, str]] = {}
    cache: dict = {}
    for seq, rec in sorted(records.items(), key=lambda kv: str(kv[1].get("source"))):  # Parquet rows in order
        try:
            img = _load(rec.get("source"), base_dir, roots, cache)
        except NoImage as exc:
            out[seq] = (None, str(exc))
            continue
        thumb, note = _heatmap(img, rec)
        out[seq] = (thumb_img(thumb), note)
    return out
