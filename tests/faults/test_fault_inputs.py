"""Fault suite, inputs (issue 11): one item per input, nothing skipped silently, no hang, no code from data.

Sources and decoding only (no model): every case asserts which items come out, with which ids and errors.
"""
from __future__ import annotations

import os
import shutil
import struct
import threading
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from badinputs import make_good_images, png_1bit
from guardalign.io.images import ImageDecodeError, decode_image
from guardalign.io.sources import count_items, decode_stream, iter_items
from guardalign.pathnames import escape_name, unescape_name


def finishes(fn, seconds: float = 30.0):
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) if it blocks."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked for {seconds} s (opened a FIFO?)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def ids(items) -> list[str]:
    return [i.id for i in items]


# ----------------------------------------------------------------------------- hangs


def test_fifo_named_parquet_in_a_folder_does_not_hang(tmp_path):
    d = tmp_path / "d"
    make_good_images(d, 1)
    os.mkfifo(d / "x.parquet")
    os.mkfifo(d / "pipe")  # no extension: skipped, with the reason
    stream = finishes(lambda: iter_items([str(d)]))
    items = finishes(lambda: list(stream))
    assert ids(items) == ["img0.png", "x.parquet"]
    assert items[1].error == "not a regular file (FIFO)"
    assert dict(stream.skipped.by_reason) == {"not a regular file (FIFO)": 1}
    assert finishes(lambda: count_items([str(d)])) == 2


def test_fifo_given_directly_is_an_error_record(tmp_path):
    os.mkfifo(tmp_path / "x.parquet")
    os.mkfifo(tmp_path / "noext")
    items = finishes(lambda: list(iter_items([str(tmp_path / "x.parquet"), str(tmp_path / "noext")])))
    assert [i.error for i in items] == ["not a regular file (FIFO)"] * 2
    decoded = finishes(lambda: list(decode_stream(items)))
    assert all(d.image is None for d in decoded)


# ----------------------------------------------------------------------------- nothing skipped silently


def test_images_are_recognised_by_content_and_others_skipped_with_reasons(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    good = make_good_images(tmp_path / "g", 4, ext=".png")
    for src, name in zip(good, ["photo.heic", "pic.jxl", "holiday.JPG.txt", "IMG_0001"]):
        shutil.copy(src, d / name)
    (d / "README.txt").write_text("notes")
    (d / "paper.pdf").write_bytes(b"%PDF-1.4\n...")
    (d / "empty").write_bytes(b"")
    (d / "real.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    stream = iter_items([str(d)])
    items = list(stream)
    assert ids(items) == ["IMG_0001", "holiday.JPG.txt", "photo.heic", "pic.jxl", "real.heic"]
    errors = {d.item.id: d.error for d in decode_stream(items)}
    assert errors["real.heic"].startswith("HEIC images are not supported")  # a record says why, never silent
    assert [errors[i] for i in ids(items) if i != "real.heic"] == [None] * 4
    assert dict(stream.skipped.by_reason) == {"not an image (unrecognised content)": 1,
                                               "not a raster image (PDF)": 1, "empty file": 1}
    assert stream.skipped.count == 3 and ("README.txt", "not an image (unrecognised content)") in stream.skipped.examples
    assert count_items([str(d)]) == 5


# ----------------------------------------------------------------------------- no code from data


def test_eps_bytes_in_a_png_never_reach_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n"
    (tmp_path / "x.png").write_bytes(eps)
    (tmp_path / "y.png").write_bytes(b"\xc5\xd0\xd3\xc6" + b"\x00" * 40)  # DOS EPS binary header
    for p in ("x.png", "y.png"):
        with pytest.raises(ImageDecodeError, match="EPS is not a raster image format"):
            decode_image(path=tmp_path / p)
    assert calls == []


def test_every_image_open_in_the_package_uses_the_allow_list():
    """scan, mask, answer, report and calibrate all decode through guardalign.io.images; no other Image.open
    may try every plugin."""
    import re

    root = Path(__file__).resolve().parents[2] / "guardalign"
    bare = []
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"Image\.open\(", line) and "formats=" not in line and not line.lstrip().startswith("#"):
                bare.append(f"{path.relative_to(root)}:{n}")
    assert bare == [], f"Image.open without an allow-list: {bare}"


def _ico_with_png(png: bytes) -> bytes:
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def test_bomb_inside_a_container_is_refused_before_any_decoding(monkeypatch):
    from PIL import ImageFile

    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    big = png_1bit(12000, 12000)  # 144 megapixels, a few kB on disk
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data=_ico_with_png(big))
    icns = b"icns" + struct.pack(">I", 16 + len(big)) + b"ic10" + struct.pack(">I", 8 + len(big)) + big
    with pytest.raises(ImageDecodeError, match="ICNS images are not supported"):
        decode_image(data=icns)


def test_small_png_in_an_ico_entry_is_sized_from_its_own_header():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (100, 100), (1, 2, 3)).save(buf, "PNG")
    ico = _ico_with_png(buf.getvalue())  # the directory says 256 × 256 (0), the PNG is 100 × 100
    with pytest.raises(ImageDecodeError, match="10000 pixels > limit 5000"):
        decode_image(data=ico, max_pixels=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow notes the size mismatch
        image, info = decode_image(data=ico)
    assert image.size == (100, 100) and info.format == "ICO"


def test_multi_frame_tiff_checks_every_frame_before_decoding(tmp_path):
    from PIL import Image

    path = tmp_path / "multi.tif"
    Image.new("RGB", (10, 10)).save(path, save_all=True, append_images=[Image.new("RGB", (200, 200))])
    with pytest.raises(ImageDecodeError, match="40000 pixels > limit 1000"):
        decode_image(path=path, max_pixels=1000)
    assert decode_image(path=path)[1].frames == 2


# ----------------------------------------------------------------------------- names and ids


def test_non_utf8_file_names_are_scanned_with_lossless_ids(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    src = make_good_images(tmp_path / "g", 2)
    raw = [b"caf\xe9.png", b"back\\slash.png"]
    for s, name in zip(src, raw):
        os.rename(s, os.path.join(os.fsencode(d), name))
    items = list(iter_items([str(d)]))
    assert ids(items) == ["back\\\\slash.png", "caf\\xe9.png"]
    assert [unescape_name(i) for i in ids(items)] == sorted(raw)
    for i in items:
        i.id.encode("utf-8")  # JSON-safe
        i.source.encode("utf-8")
    assert [d.error for d in decode_stream(items)] == [None, None]  # the real name opens


def test_non_utf8_name_on_stdin_is_kept(tmp_path):
    import io

    src = make_good_images(tmp_path, 1)[0]
    name = os.path.join(os.fsencode(tmp_path), b"\xff\xfe.png")
    os.rename(src, name)
    stdin = io.TextIOWrapper(io.BytesIO(name + b"\n"), encoding="utf-8")  # strict decoding would fail
    (item,) = iter_items(["-"], stdin=stdin)
    assert unescape_name(item.id) == name and next(decode_stream([item])).error is None


@pytest.mark.parametrize("raw", [b"plain.png", b"\xe9", b"a\\xe9", b"\\", b"\xff\\\xfe/\xc3\xa9"])
def test_escape_round_trips_and_is_injective(raw):
    text = escape_name(os.fsdecode(raw))
    assert unescape_name(text) == raw
    text.encode("utf-8")


def test_nul_byte_paths_are_per_item_errors(tmp_path):
    import io

    good = make_good_images(tmp_path, 1)[0]
    items = list(iter_items(["-"], stdin=io.StringIO(f"bad\x00name.png\n{good}\n")))
    assert len(items) == 2 and items[0].error == "path contains a NUL byte" and items[1].error is None


# ----------------------------------------------------------------------------- Parquet schema edges


def _png_cells(tmp_path: Path, n: int) -> list[bytes]:
    return [p.read_bytes() for p in make_good_images(tmp_path / f"cells{n}", n)]


def test_dictionary_encoded_image_column_is_read(tmp_path):
    cells = _png_cells(tmp_path, 2)
    col = pa.array(cells + cells[:1], pa.binary()).dictionary_encode()
    pq.write_table(pa.table({"img": col}), tmp_path / "dict.parquet")
    items = list(iter_items([str(tmp_path / "dict.parquet")]))
    assert [i.data for i in items] == cells + cells[:1] and items[0].meta["cell_kind"] == "binary"
    assert [d.error for d in decode_stream(items)] == [None] * 3


def test_a_bad_parquet_in_a_folder_costs_only_its_own_record(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    pq.write_table(pa.table({"image": pa.array(_png_cells(tmp_path, 2), pa.binary())}), d / "a_good.parquet")
    pq.write_table(pa.table({"image": pa.array([[b"x"], [b"y"]], pa.list_(pa.binary()))}), d / "b_list.parquet")
    items = list(iter_items([str(d)]))
    assert ids(items) == ["a_good.parquet#0", "a_good.parquet#1", "b_list.parquet"]
    assert items[0].error is None
    assert items[2].error.endswith("b_list.parquet: no image column found; columns: image (list<element: binary>); "
                                   "pass --image-column COL")
    assert count_items([str(d)]) == 3


def test_zero_row_parquet_gives_zero_items(tmp_path):
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), tmp_path / "empty.parquet")
    assert list(iter_items([str(tmp_path / "empty.parquet")])) == []
    assert count_items([str(tmp_path / "empty.parquet")]) == 0


def test_repeated_id_column_values_give_every_row_a_unique_id(tmp_path):
    cells = _png_cells(tmp_path, 1) * 6
    keys = ["a", "b", "a", "a#2", "a", None]
    pq.write_table(pa.table({"key": keys, "image": pa.array(cells, pa.binary())}), tmp_path / "k.parquet")
    items = list(iter_items([str(tmp_path / "k.parquet")], id_column="key"))
    assert ids(items) == ["a", "b", "a#2", "a#2#2", "a#3", "k.parquet#5"]  # deterministic, one item per row
    assert [i.meta.get("duplicate_of") for i in items] == [None, None, "a", "a#2", "a", None]
    assert [i.meta["row"] for i in items] == list(range(6))
    again = list(iter_items([str(tmp_path / "k.parquet")], id_column="key"))
    assert ids(again) == ids(items)  # stable across runs, so --resume matches


def test_non_utf8_parquet_name_in_a_folder_is_read(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    path = os.path.join(os.fsencode(d), b"sh\xe4rd.parquet")
    pq.write_table(pa.table({"image": pa.array(_png_cells(tmp_path, 1), pa.binary())}), tmp_path / "x.parquet")
    os.rename(tmp_path / "x.parquet", path)
    (item,) = iter_items([str(d)])
    assert item.id == "sh\\xe4rd.parquet#0" and item.error is None and item.data[:4] == b"\x89PNG"
