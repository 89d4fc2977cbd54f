"""Reviewer thumbnails for ``guardalign report``: find an item's image, prove it is the one scanned, draw it.

Records are untrusted, so an image is only read from inside the allowed roots (``--image-root``;
default the current folder and the records' folders): a crafted ``source`` cannot pull an arbitrary
file into a report that gets mailed around, and no link to a file outside the roots is written.

A thumbnail is only drawn from bytes whose SHA-256 equals the record's (``sha256`` of a scan record,
``image_sha256`` of an answer record): an image that changed since the scan, another file at the same
path, or another column of the same Parquet row is never shown in its place. A relative source is looked
up under each root (then under the current folder and the records' folder); a source whose leading
folders differ on this machine is also tried by its trailing path components, which is safe because the
hash decides. Parquet rows are read from the column the record names (``image_column``), else from the
image-bytes column whose bytes match the hash. Decoding goes through :mod:`guardalign.io.images`
(Pillow's bomb guard, raster allow-list, EXIF orientation as at scan time). Every failure becomes a short
note on the page, never an exception.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any, Iterator

THUMB_PX = 160  # long side of a thumbnail in pixels
MAX_TAIL = 8  # trailing path components tried under each root
_PARQUET_SOURCE = re.compile(r"^(?P<path>.+\.(?:parquet|pq))#(?P<row>\d+)$", re.IGNORECASE)


class NoImage(Exception):
    """Why no thumbnail could be made (shown on the page)."""


def inside(path: Path, roots: list[Path]) -> bool:
    """``path`` (resolved) lies in one of ``roots`` (resolved)."""
    return any(path == r or path.is_relative_to(r) for r in roots)


def _candidates(src: str, base_dir: Path, roots: list[Path]) -> Iterator[Path]:
    p = Path(src)
    if p.is_absolute():
        yield p
    else:
        for r in roots:
            yield r / p
        yield Path.cwd() / p
        yield base_dir / p
    parts = p.parts[1:] if p.is_absolute() else p.parts
    for k in range(1, min(len(parts), MAX_TAIL + 1)):  # the same file under another top folder
        for r in roots:
            yield r / Path(*parts[k:])


def find_files(src: Any, base_dir: Path, roots: list[Path]) -> Iterator[Path]:
    """Existing regular files (resolved, inside ``roots``) that a record's source may name, best first.

    A ``file.parquet#row`` source names its Parquet file."""
    if not isinstance(src, str) or not src or "\0" in src:
        return
    m = _PARQUET_SOURCE.match(src)
    seen: set[Path] = set()
    for c in _candidates(m.group("path") if m else src, base_dir, roots):
        try:
            path = c.resolve()
            if path in seen or not path.is_file():
                continue
        except (OSError, ValueError, RuntimeError):  # ValueError: NUL byte; RuntimeError: symlink loop
            continue
        seen.add(path)
        if inside(path, roots):
            yield path


def link_target(src: Any, base_dir: Path, roots: list[Path]) -> Path | None:
    """The file a source's link may point at: the first match inside the roots, else None (no link)."""
    return next(find_files(src, base_dir, roots), None)


def load_verified(src: Any, sha256: Any, base_dir: Path, roots: list[Path], cache: dict,
                  column: Any = None) -> tuple[Any, Path]:
    """Decode the image a record names whose stored bytes hash to ``sha256``; (PIL image, file it came from).

    Raises NoImage naming why not (no hash to check, not found, outside the roots, changed, undecodable)."""
    from guardalign.io.images import ImageDecodeError, decode_image, read_image_bytes

    if not isinstance(src, str) or not src:
        raise NoImage("no source path in the record")
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise NoImage("not shown: the record has no sha256 to prove the image is the one scanned")
    m = _PARQUET_SOURCE.match(src)
    found = changed = False
    why = ""
    for path in find_files(src, base_dir, roots):
        found = True
        try:
            if m:
                data = _parquet_bytes(path, int(m.group("row")), sha256, column, cache, roots)
            else:
                data = read_image_bytes(path)
        except (NoImage, ImageDecodeError) as exc:
            why = str(exc)
            continue
        if data is None or hashlib.sha256(data).hexdigest() != sha256:
            changed = True
            continue
        try:
            return decode_image(data=data, name=str(path))[0], path
        except ImageDecodeError as exc:
            raise NoImage(f"cannot decode image: {exc}") from None
    if changed:
        raise NoImage("not shown: the image's bytes differ from the scanned sha256 (changed since the scan)")
    if why:
        raise NoImage(why)
    if not found and any(True for _ in find_files(src, base_dir, [Path(os.sep)])):
        raise NoImage("image is outside the allowed folders (--image-root)")
    raise NoImage("image not found (give its folder with --image-root)")


def _image_columns(schema) -> list[str]:
    import pyarrow as pa

    return [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
            or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)
            or pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def _parquet_bytes(path: Path, row: int, sha256: str, column: Any, cache: dict, roots: list[Path]) -> bytes | None:
    """Stored image bytes of one Parquet row: from ``column`` when the record names it, else from the first
    image-like column (bytes, struct bytes, or a path cell) whose bytes hash to ``sha256``."""
    import pyarrow.parquet as pq

    try:
        pf = cache.get(path) or pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure is a note on the page
        raise NoImage(f"cannot open Parquet: {exc}") from None
    cache[path] = pf
    names = _image_columns(pf.schema_arrow)
    if isinstance(column, str) and column:
        if column not in pf.schema_arrow.names:
            raise NoImage(f"the scanned column {column!r} is not in {path.name} any more")
        names = [column]
    if not names:
        raise NoImage("no image column in the Parquet file")
    if not 0 <= row < pf.metadata.num_rows:
        raise NoImage(f"row {row} is past the end of the Parquet file ({pf.metadata.num_rows} rows)")
    last = None
    for name in names:
        data = _cell_bytes(path, pf, row, name, cache, roots)
        if data is not None and hashlib.sha256(data).hexdigest() == sha256:
            return data
        last = data if data is not None else last
    if last is None:
        raise NoImage("no image bytes in that Parquet row")
    return last  # the caller reports the mismatch


def _cell_bytes(path: Path, pf: Any, row: int, column: str, cache: dict, roots: list[Path]) -> bytes | None:
    start = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < start + n:
            key = (path, g, column)
            if cache.get("_rg_key") != key:  # keep one row group of one column in memory
                cache["_rg"], cache["_rg_key"] = pf.read_row_group(g, columns=[column]).column(0), key
            value = cache["_rg"][row - start].as_py()
            break
        start += n
    else:
        return None
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):  # a path cell: the image file beside the Parquet file, inside the roots
        from guardalign.io.images import ImageDecodeError, read_image_bytes

        try:
            p = Path(value)
            target = (p if p.is_absolute() else path.parent / p).resolve()
            return read_image_bytes(target) if inside(target, roots) else None
        except (ImageDecodeError, OSError, ValueError, RuntimeError):
            return None
    return bytes(value) if isinstance(value, (bytes, bytearray)) and value else None


def _heatmap(img: Any, rec: dict[str, Any]) -> tuple[Any, str]:
    """The heatmap overlay thumbnail, or a plain thumbnail and the reason."""
    if (rec.get("width"), rec.get("height")) != img.size:
        note = f"image is {img.width}×{img.height} but the record says {rec.get('width')}×{rec.get('height')}; no heatmap"
        return _plain(img), note
    from guardalign.detection.purify import overlay

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
    """seq → ((data URI, width, height) or None, note) for each flagged scan record that gets a thumbnail."""
    out: dict[int, tuple[Any, str]] = {}
    cache: dict = {}
    for seq, rec in sorted(records.items(), key=lambda kv: str(kv[1].get("source"))):  # Parquet rows in order
        try:
            img, _ = load_verified(rec.get("source"), rec.get("sha256"), base_dir, roots, cache,
                                   column=rec.get("image_column"))
        except NoImage as exc:
            out[seq] = (None, str(exc))
            continue
        thumb, note = _heatmap(img, rec)
        out[seq] = (thumb_img(thumb), note)
    return out


def answer_thumbnail(row: dict[str, Any], base_dir: Path, roots: list[Path], cache: dict) -> tuple[Any, str]:
    """((data URI, w, h) or None, note) of the image an answer's model saw: the prompt's image, verified
    against ``image_sha256``, with the purified boxes filled as ``answer`` fills them (``mean``)."""
    from guardalign.detection.purify import apply_fill
    try:
        img, _ = load_verified(row.get("image"), row.get("image_sha256"), base_dir, roots, cache)
    except NoImage as exc:
        return None, str(exc)
    boxes = row.get("masked_boxes") or []
    note = "original (not purified)"
    if row.get("purified"):
        try:
            img = apply_fill(img, boxes, fill="mean")
            note = f"purified: {len(boxes)} box{'es' if len(boxes) != 1 else ''} filled, as the model saw it"
        except Exception as exc:  # noqa: BLE001 - malformed boxes in an untrusted record
            return None, f"not shown: cannot redo the purification ({type(exc).__name__}); the original is not shown instead"
    return thumb_img(_plain(img)), note


def thumb_img(image: Any) -> tuple[str, int, int]:
    """(JPEG data URI, width, height) of a PIL image."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=72, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), image.width, image.height
