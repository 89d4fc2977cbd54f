"""guardalign.io.images: every awkward image decodes to RGB or fails with a named cause."""
from __future__ import annotations

import io
import os
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from badinputs import EXPECTED, make_bad_inputs, make_good_images
from guardalign.io import images as imageio
from guardalign.io.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return make_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_bad_input_decodes_or_names_its_cause(bad, name):
    kind, expected = EXPECTED[name]
    if name == "unreadable" and IS_ROOT:
        pytest.skip("running as root: chmod 000 does not block reads (see the monkeypatched test)")
    if kind == "error":
        with pytest.raises(ImageDecodeError, match=expected):
            decode_image(path=bad[name])
    else:
        img, info = decode_image(path=bad[name])
        assert img.mode == "RGB"
        assert img.size == expected == (info.width, info.height)
        np.asarray(img)  # pixels are loaded and usable after the file is closed


def test_same_result_from_bytes_and_from_path(bad):
    for name in ("cmyk", "p_transparency", "exif_rotated", "animated_gif", "i16"):
        a, ia = decode_image(path=bad[name])
        b, ib = decode_image(data=bad[name].read_bytes())
        assert ia == ib
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_modes_convert_to_the_right_colours(bad):
    px = lambda name: np.asarray(decode_image(path=bad[name])[0]).astype(int)  # noqa: E731
    cmyk = px("cmyk")  # C=0 M=255 Y=255 K=0 is red
    assert cmyk[0, 0, 0] > 240 and cmyk[0, 0, 1:].max() < 15
    pal = px("p_transparency")  # index 0 (transparent, black underneath) on the left, red on the right
    assert pal[0, 0].tolist() == [0, 0, 0] and pal[0, -1].tolist() == [255, 0, 0]
    assert px("la")[5, 5].tolist() == [200, 200, 200]  # alpha dropped, grey kept
    one = px("one_bit")
    assert one[0, 0].tolist() == [255, 255, 255] and one[0, -1].tolist() == [0, 0, 0]
    g = px("i16")[..., 0]  # 16-bit ramp: scaled by 1/257, not clipped to white
    raw = np.asarray(Image.open(bad["i16"])).astype(float)
    assert np.array_equal(g, np.clip(np.rint(raw / 257), 0, 255).astype(int))
    assert g.max() < 255 and g[0, 0] == 0 and len(np.unique(g)) > 100
    assert px("tiny")[0, 0].tolist() == [10, 20, 30]


def test_decode_info_records_mode_format_frames_and_rotation(bad):
    _, info = decode_image(path=bad["i16"])
    assert (info.mode, info.format, info.frames, info.exif_rotated) == ("I;16", "PNG", 1, False)
    _, info = decode_image(path=bad["cmyk"])
    assert (info.mode, info.format) == ("CMYK", "JPEG")


def test_exif_orientation_is_applied(bad):
    img, info = decode_image(path=bad["exif_rotated"])
    assert info.exif_rotated and img.size == (16, 24)
    a = np.asarray(img).astype(int)
    # Stored: left half blue, right half red; orientation 6 turns it 90° clockwise → top half blue.
    assert a[2, 8, 2] > 200 and a[2, 8, 0] < 60
    assert a[-3, 8, 0] > 200 and a[-3, 8, 2] < 60
    stored = Image.open(bad["exif_rotated"])
    assert stored.size == (24, 16)


def test_animated_gif_gives_first_frame_and_frame_count(bad):
    img, info = decode_image(path=bad["animated_gif"])
    assert info.frames == 3
    assert np.asarray(img)[4, 4].tolist() == [255, 0, 0]  # first frame is red


def test_unreadable_file_simulated_for_root(bad, monkeypatch, tmp_path):
    def deny(path):
        raise PermissionError(13, "Permission denied", str(path))

    path = make_good_images(tmp_path, 1)[0]
    monkeypatch.setattr(imageio, "_read_open", deny)
    with pytest.raises(ImageDecodeError, match="permission denied"):
        decode_image(path=path)


@pytest.mark.skipif(IS_ROOT, reason="root reads chmod-000 files")
def test_unreadable_file_real_chmod(bad):
    with pytest.raises(ImageDecodeError, match="permission denied"):
        decode_image(path=bad["unreadable"])


def test_max_pixels_lowers_the_limit(tmp_path):
    path = make_good_images(tmp_path, 1, size=(20, 12))[0]
    with pytest.raises(ImageDecodeError, match=r"decompression bomb: 240 pixels > limit 100"):
        decode_image(path=path, max_pixels=100)
    assert decode_image(path=path, max_pixels=240)[1].width == 20


def test_bomb_guard_keeps_global_state(bad):
    limit = Image.MAX_IMAGE_PIXELS
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning must not escape as a warning either
        with pytest.raises(ImageDecodeError, match="decompression bomb"):
            decode_image(path=bad["bomb_warning"])
    assert Image.MAX_IMAGE_PIXELS == limit is not None
    assert warnings.filters == filters


def test_bombs_rejected_from_many_threads_at_once(bad):
    results: list[str] = []

    def run(name):
        try:
            decode_image(path=bad[name])
            results.append("decoded")
        except ImageDecodeError as e:
            results.append(str(e))

    threads = [threading.Thread(target=run, args=(n,)) for n in ("bomb_warning", "bomb_error", "huge") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12 and all("decompression bomb" in r for r in results)


def test_missing_directory_and_empty_bytes(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(path=tmp_path / "nope.png")
    with pytest.raises(ImageDecodeError, match="is a directory"):
        decode_image(path=tmp_path)
    with pytest.raises(ImageDecodeError, match="zero-byte image data"):
        decode_image(data=b"")
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(data=b"GIF but not really")


def test_exactly_one_source_required(tmp_path):
    with pytest.raises(ValueError):
        decode_image()
    with pytest.raises(ValueError):
        decode_image(data=b"x", path=tmp_path / "a.png")


def test_rgb_passthrough_is_a_copy_with_identical_pixels():
    arr = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    img, info = decode_image(data=buf.getvalue())
    assert np.array_equal(np.asarray(img), arr)
    assert (info.width, info.height, info.mode, info.frames) == (5, 7, "RGB", 1)


def test_extensions_cover_common_formats():
    assert {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


def test_sha256_is_of_the_stored_bytes_from_path_and_from_data(bad):
    import hashlib

    path = bad["exif_rotated"]
    raw = path.read_bytes()
    want = hashlib.sha256(raw).hexdigest()
    assert decode_image(path=path)[1].sha256 == want == decode_image(data=raw)[1].sha256


def test_decode_stream_keeps_the_decoded_bytes_on_the_item(tmp_path):
    from guardalign.io.images import decode_stream
    from guardalign.io.sources import Item

    (path,) = make_good_images(tmp_path, 1)
    (d,) = decode_stream([Item(id="x", source=str(path), path=path)], workers=1)
    assert d.error is None and d.item.path == path and d.item.data == path.read_bytes()


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "MAX_FILE_BYTES", 1000)
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1000
    with pytest.raises(ImageDecodeError, match="file too large"):
        decode_image(path=big)


def _tga(rgb=(200, 30, 60), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="TGA")  # uncompressed true colour: starts 00 00 02 00, as CUR does
    return buf.getvalue()


def test_a_tga_is_told_by_its_name_and_only_a_tga(tmp_path):
    data = _tga()
    assert data[:4] == b"\x00\x00\x02\x00"
    with pytest.raises(ImageDecodeError, match="CUR images are not supported"):  # bytes alone: no name, no TGA
        decode_image(data=data)
    img, info = decode_image(data=data, name="shard.tar#dir/0001.TGA")
    assert (info.format, img.size, img.getpixel((0, 0))) == ("TGA", (6, 4), (200, 30, 60))
    (tmp_path / "a.tga").write_bytes(data)
    assert decode_image(path=tmp_path / "a.tga")[1] == info  # a file's path is its name
    # the name settles only what the bytes cannot: a PNG named .tga is a PNG, an EPS named .tga is refused
    png = io.BytesIO()
    Image.new("RGB", (3, 3)).save(png, format="PNG")
    assert decode_image(data=png.getvalue(), name="x.tga")[1].format == "PNG"
    with pytest.raises(ImageDecodeError, match="EPS is not a raster image"):
        decode_image(data=b"%!PS-Adobe-3.0 EPSF-3.0\n", name="x.tga")
    with pytest.raises(ImageDecodeError, match="not an image"):  # only the TGA plugin is tried, and it refuses
        decode_image(data=b"\x00\x00\x02\x00" + b"\xff" * 40, name="x.tga")
