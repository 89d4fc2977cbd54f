"""mask on webdataset shards: the same members in the same order, images purified or copied, bad samples left out."""
from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

import guardalign
from shards import image_bytes, write_tar


@pytest.fixture()
def clip_flags(tiny_clip_config, tiny_clip_checkpoint):
    return {"clip_model": str(tiny_clip_config), "pretrained": str(tiny_clip_checkpoint), "device": "cpu",
            "progress": False}


def members(path):
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isreg()]


def shard(tmp_path):
    return write_tar(tmp_path / "in" / "s.tar", [
        ("a.png", image_bytes(1, size=(64, 48))), ("a.json", b'{"caption": "x"}'), ("a.cls", b"3"),
        ("b.jpg", image_bytes(2, "JPEG", size=(64, 48))), ("b.txt", b"two"),
        ("c.tga", image_bytes(3, "TGA", size=(64, 48))),
        ("d.png", tarfile.SYMTYPE, "/etc/passwd"),  # an error sample: left out
    ])


def test_unsafe_samples_are_purified_in_place_and_the_rest_copied(tmp_path, clip_flags):
    src = shard(tmp_path)
    s = guardalign.mask([str(src)], out_dir=str(tmp_path / "clean"), tau=2.0, fill="black", **clip_flags)
    assert (s.purified, s.errors, s.exit_code) == (3, 1, 3)
    out = members(tmp_path / "clean" / "s.tar")
    names = [n for n, _ in out]
    assert names == ["a.png", "a.json", "a.cls", "b.jpg", "b.txt", "c.png"]  # TGA cannot be written back: PNG, renamed
    got = dict(out)
    assert got["a.json"] == b'{"caption": "x"}' and got["a.cls"] == b"3" and got["b.txt"] == b"two"
    for name in ("a.png", "b.jpg", "c.png"):
        im = Image.open(io.BytesIO(got[name]))
        assert im.size == (64, 48)
        assert im.convert("RGB").getextrema() != Image.open(io.BytesIO(image_bytes(1, size=(64, 48)))).getextrema()
    assert Image.open(io.BytesIO(got["b.jpg"])).format == "JPEG"
    manifest = [json.loads(x) for x in (tmp_path / "clean" / "manifest.jsonl").read_text().splitlines()]
    rows = {e["id"]: e for e in manifest}
    assert [rows[f"s.tar#{k}"]["row"] for k in "abc"] == [0, 1, 2]
    assert rows["s.tar#d"]["status"] == "error" and rows["s.tar#d"]["output"] is None
    assert src.read_bytes() == (tmp_path / "in" / "s.tar").read_bytes()  # the original is untouched


def test_safe_samples_are_copied_byte_for_byte_and_a_rerun_is_done(tmp_path, clip_flags):
    src = shard(tmp_path)
    s = guardalign.mask([str(src)], out_dir=str(tmp_path / "clean"), tau=1e-6, **clip_flags)
    assert (s.copied, s.purified) == (3, 0)
    assert members(tmp_path / "clean" / "s.tar") == members(src)
    again = guardalign.mask([str(src)], out_dir=str(tmp_path / "clean"), tau=1e-6, **clip_flags)
    assert (again.resumed, again.copied) == (3, 0)
    only = guardalign.mask([str(src)], out_dir=str(tmp_path / "only"), tau=1e-6, only_unsafe=True, **clip_flags)
    assert only.skipped == 3 and members(tmp_path / "only" / "s.tar") == []
