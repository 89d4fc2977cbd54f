"""Builders of every awkward input a scan must survive, written into a tmp dir on demand.

Import from any test file as ``from badinputs import make_bad_inputs, EXPECTED`` (pytest puts
``tests/`` on ``sys.path``; there is deliberately no ``tests/__init__.py``).

- :func:`make_bad_inputs` — image files: broken ones (per-item errors) and odd-but-valid ones.
- :data:`EXPECTED` — for each name: ``("error", substring of the error)`` or ``("ok", expected (W, H))``.
- :func:`make_parquet_variants` — Parquet layouts (HF struct, binary, relative paths, ids, nulls, bad schemas).
- :func:`make_good_images` — a few small distinct RGB images.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> ("error", substring of the per-item error) | ("ok", (width, height) after decoding)
EXPECTED: dict[str, tuple[str, object]] = {
    "zero_byte": ("error", "zero-byte"),
    "truncated_jpeg": ("error", "truncated image data"),
    "truncated_png": ("error", "truncated image data"),
    "text_as_jpg": ("error", "not an image"),
    "bomb_warning": ("error", "decompression bomb"),  # between 1× and 2× MAX_IMAGE_PIXELS: Pillow only warns
    "bomb_error": ("error", "decompression bomb"),  # above 2×: Pillow raises
    "huge": ("error", "decompression bomb"),  # 100000 × 100000 header, no pixel data
    "broken_symlink": ("error", "broken symlink"),
    "unreadable": ("error", "permission denied"),  # chmod 000; readable anyway as root
    "cmyk": ("ok", (24, 16)),
    "p_transparency": ("ok", (24, 16)),
    "la": ("ok", (24, 16)),
    "i16": ("ok", (24, 16)),
    "one_bit": ("ok", (24, 16)),
    "exif_rotated": ("ok", (16, 24)),  # stored 24 × 16, orientation 6 → upright 16 × 24
    "animated_gif": ("ok", (24, 16)),
    "tiny": ("ok", (1, 1)),
}


def _noise_bytes(fmt: str, size=(96, 64), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def png_1bit(width: int, height: int, with_data: bool = True) -> bytes:
    """A black 1-bit PNG built by hand (tiny on disk, ``width*height`` pixels when decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
    if with_data:
        row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
        comp = zlib.compressobj(9)
        body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
        out += _png_chunk(b"IDAT", body)
    return out + _png_chunk(b"IEND", b"")


def make_bad_inputs(directory: str | Path) -> dict[str, Path]:
    """Write one file per :data:`EXPECTED` name into ``directory``; return name -> path.

    Each file is named ``<name><ext>`` (so ``Path(record_id).stem`` is the name).

    Bomb sizes follow the running Pillow's ``Image.MAX_IMAGE_PIXELS`` (read at call time).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def put(name: str, filename: str, data: bytes) -> None:
        (d / filename).write_bytes(data)
        out[name] = d / filename

    put("zero_byte", "zero_byte.jpg", b"")
    jpg, png = _noise_bytes("JPEG"), _noise_bytes("PNG")
    put("truncated_jpeg", "truncated_jpeg.jpg", jpg[: len(jpg) // 2])
    put("truncated_png", "truncated_png.png", png[: len(png) // 2])
    put("text_as_jpg", "text_as_jpg.jpg", b"this is a text file, not a JPEG\n")
    limit = Image.MAX_IMAGE_PIXELS
    side_warn = int((1.5 * limit) ** 0.5)  # 1.5 × limit: inside Pillow's warning-only band
    put("bomb_warning", "bomb_warning.png", png_1bit(side_warn, side_warn))
    side_err = int((2.5 * limit) ** 0.5)
    put("bomb_error", "bomb_error.png", png_1bit(side_err, side_err, with_data=False))
    put("huge", "huge.png", png_1bit(100_000, 100_000, with_data=False))
    os.symlink("does_not_exist.jpg", d / "broken_symlink.jpg")
    out["broken_symlink"] = d / "broken_symlink.jpg"
    put("unreadable", "unreadable.png", _noise_bytes("PNG", (8, 8)))
    os.chmod(out["unreadable"], 0)

    size = (24, 16)
    _save(d / "cmyk.jpg", Image.new("CMYK", size, (0, 255, 255, 0)), out, "cmyk")
    pal = Image.new("P", size, 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 255] * 254)
    pal.paste(0, (0, 0, 12, 16))
    pal.info["transparency"] = 0
    _save(d / "p_transparency.png", pal, out, "p_transparency", transparency=0)
    _save(d / "la.png", Image.new("LA", size, (200, 128)), out, "la")
    ramp = (np.arange(size[0] * size[1], dtype=np.uint32).reshape(size[1], size[0]) * 170).astype(np.uint16)
    _save(d / "i16.png", Image.fromarray(ramp), out, "i16")
    one = Image.new("1", size, 0)
    one.paste(1, (0, 0, 12, 16))
    _save(d / "one_bit.png", one, out, "one_bit")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    rot = Image.new("RGB", size, (255, 0, 0))
    rot.paste((0, 0, 255), (0, 0, 12, 16))  # left half blue → top half blue once upright
    _save(d / "exif_rotated.jpg", rot, out, "exif_rotated", exif=exif, quality=95)
    frames = [Image.new("RGB", size, c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(d / "animated_gif.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["animated_gif"] = d / "animated_gif.gif"
    _save(d / "tiny.png", Image.new("RGB", (1, 1), (10, 20, 30)), out, "tiny")
    return out


def _save(path: Path, im: Image.Image, out: dict, name: str, **kw) -> None:
    im.save(path, **kw)
    out[name] = path


def make_good_images(directory: str | Path, n: int = 3, size=(20, 12), ext: str = ".png") -> list[Path]:
    """``n`` distinct solid-colour images ``img{i}{ext}`` in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = d / f"img{i}{ext}"
        Image.new("RGB", size, ((40 * i) % 256, 100, 200)).save(p)
        paths.append(p)
    return paths


def _png(color, size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_parquet_variants(directory: str | Path) -> dict[str, Path]:
    """Write Parquet files covering every layout; return name -> path.

    - ``hf_struct``: HF datasets ``image: struct<bytes, path>`` + ``label``, 3 rows, HF metadata.
    - ``binary``: ``img: binary``, 3 rows.
    - ``paths``: ``file: string`` paths relative to the Parquet file (``pq_paths/imgs/…``), 2 rows.
    - ``struct_path_only``: struct cells with null bytes and a relative path, 2 rows.
    - ``ids``: ``key: string`` + ``image`` struct, 3 rows, for ``id_column="key"``.
    - ``row_groups``: 5 binary rows in row groups of 2.
    - ``null_cell``: struct column, rows: ok, null cell, {bytes: null, path: null}, b"" bytes.
    - ``bad_bytes``: binary column, rows: ok, truncated JPEG, text.
    - ``int_image``: ``image: int64`` (wrong type when given as the image column).
    - ``no_image``: ``a: int64, b: double`` only (no image column).
    - ``truncated``: a valid file cut in half (footer lost).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    struct_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf_meta = {b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"dtype": "int64", "_type": "Value"}}}}).encode()}

    def write(name: str, table: pa.Table, **kw) -> None:
        out[name] = d / f"{name}.parquet"
        pq.write_table(table, out[name], **kw)

    cells = [{"bytes": _png((i * 60, 0, 0)), "path": f"orig{i}.png"} for i in range(3)]
    t = pa.table({"image": pa.array(cells, struct_t), "label": [0, 1, 0]})
    write("hf_struct", t.replace_schema_metadata(hf_meta))
    write("binary", pa.table({"img": pa.array([_png((0, i * 60, 0)) for i in range(3)], pa.binary())}))

    sub = d / "pq_paths"
    (sub / "imgs").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        (sub / "imgs" / f"p{i}.png").write_bytes(_png((0, 0, 100 + i)))
    out["paths"] = sub / "paths.parquet"
    pq.write_table(pa.table({"file": ["imgs/p0.png", "imgs/p1.png"], "n": [1, 2]}), out["paths"])
    sp = pa.array([{"bytes": None, "path": "imgs/p0.png"}, {"bytes": None, "path": "imgs/p1.png"}], struct_t)
    out["struct_path_only"] = sub / "struct_path_only.parquet"
    pq.write_table(pa.table({"image": sp}), out["struct_path_only"])

    write("ids", pa.table({"key": ["a", "b", "c"], "image": pa.array(cells, struct_t)}))
    write("row_groups", pa.table({"img": pa.array([_png((i, i, i)) for i in range(5)], pa.binary())}),
          row_group_size=2)
    nulls = pa.array([cells[0], None, {"bytes": None, "path": None}, {"bytes": b"", "path": None}], struct_t)
    write("null_cell", pa.table({"image": nulls}))
    jpg = _noise_bytes("JPEG")
    write("bad_bytes", pa.table({"img": pa.array([_png((1, 2, 3)), jpg[: len(jpg) // 2], b"hello"], pa.binary())}))
    write("int_image", pa.table({"image": [1, 2, 3], "label": [0, 0, 1]}))
    write("no_image", pa.table({"a": [1, 2], "b": [0.5, 1.5]}))

    full = d / "_full.parquet"
    pq.write_table(pa.table({"img": pa.array([_png((9, 9, 9)) for _ in range(4)], pa.binary())}), full)
    raw = full.read_bytes()
    full.unlink()
    out["truncated"] = d / "truncated.parquet"
    out["truncated"].write_bytes(raw[: len(raw) // 2])
    return out
