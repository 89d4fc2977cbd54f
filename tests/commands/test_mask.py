"""`guardalign mask` end to end on a tiny random CLIP: fills, layout, Parquet, overlays, filesystem safety, resume.

``--tau 2.0`` flags every patch (a cost 1 − cos is ≤ 2), ``--tau 0.0001`` none; a τ between two patch scores
flags a known subset of patches. Most tests call the library with a pre-built detector (fast); the CLI tests
go through the real flags and model loading.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.mask import mask_command
from guardalign.errors import ConfigError
from guardalign.commands.mask import mask
from guardalign.pipeline.mask_out import MANIFEST, TMP_SUFFIX, safe_relpath
from guardalign.detection.purify import FILLS, mean_fill_value, thumbnail_size


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # keep `mask` a sub-command, as in cli.main
    app.command("mask")(mask_command)
    return app


@pytest.fixture()
def model_args(tiny_clip_config, tiny_clip_checkpoint):
    return ["--clip-model", str(tiny_clip_config), "--pretrained", str(tiny_clip_checkpoint), "--device", "cpu",
            "--batch-size", "4", "--workers", "2", "--quiet"]


@pytest.fixture(scope="module")
def detector(tiny_encoder):
    from guardalign.detection.anchors import load_anchors
    from guardalign.config import DetectConfig
    from guardalign.detection.detector import Detector

    return Detector(tiny_encoder, load_anchors(None), DetectConfig(tau=2.0, batch_size=8))


def run(args, input=None):
    return CliRunner().invoke(_app(), ["mask", *args], input=input, catch_exceptions=False)


def manifest(out: Path) -> dict[str, dict]:
    lines = (out / MANIFEST).read_text().splitlines()
    entries = [json.loads(x) for x in lines]
    assert len({e["id"] for e in entries}) == len(entries)  # one line per item
    return {e["id"]: e for e in entries}


def noise(path: Path, size=(90, 60), seed=0, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, **save)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def union(size, boxes) -> np.ndarray:
    m = np.zeros((size[1], size[0]), bool)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def files_under(p: Path) -> set[str]:
    return {x.relative_to(p).as_posix() for x in p.rglob("*") if x.is_file()}


# ----------------------------------------------------------------------------- fills


def partial_tau(detector, image_path) -> tuple[float, list]:
    """A τ between the 4th and 5th lowest patch scores of the image, and the boxes it flags."""
    rec = detector.detect([Image.open(image_path).convert("RGB")])[0].to_record()
    scores = sorted(rec["patch_scores"])
    tau = (scores[3] + scores[4]) / 2
    boxes = [b for b, s in zip(rec["patch_boxes"], rec["patch_scores"]) if s <= tau]
    assert 0 < len(boxes) < len(rec["patch_boxes"])
    return tau, boxes


@pytest.mark.parametrize("fill", FILLS)
def test_each_fill_changes_exactly_the_flagged_boxes(tmp_path, detector, fill):
    src = noise(tmp_path / "in" / "a.png")
    tau, boxes = partial_tau(detector, src)
    out = tmp_path / "out"
    summary = mask([str(tmp_path / "in")], out_dir=str(out), fill=fill, detector=detector.with_config(tau=tau),
                   progress=False)
    assert summary.exit_code == 0 and summary.purified == 1
    entry = manifest(out)["a.png"]
    assert entry["status"] == "purified" and entry["fill"] == fill and entry["output"] == "a.png"
    assert sorted(entry["boxes"]) == sorted(boxes)
    changed = (pixels(src) != pixels(out / "a.png")).any(axis=2)
    flagged = union((90, 60), boxes)
    assert not changed[~flagged].any()  # nothing outside the flagged boxes
    assert changed[flagged].mean() > 0.95  # (almost) everything inside (noise input)
    if fill == "mean":
        assert (pixels(out / "a.png")[flagged] == mean_fill_value(detector.encoder.mean)).all()


def test_dilate_grows_boxes_and_clips_at_the_border(tmp_path, detector):
    src = noise(tmp_path / "in" / "a.png")
    tau, boxes = partial_tau(detector, src)
    out = tmp_path / "out"
    mask([str(tmp_path / "in")], out_dir=str(out), fill="black", dilate=4, detector=detector.with_config(tau=tau),
         progress=False)
    grown = [[max(0, x0 - 4), max(0, y0 - 4), min(90, x1 + 4), min(60, y1 + 4)] for x0, y0, x1, y1 in boxes]
    assert sorted(manifest(out)["a.png"]["boxes"]) == sorted(grown)
    assert np.array_equal((pixels(out / "a.png") == 0).all(axis=2), union((90, 60), grown))


def test_cli_tau_two_masks_everything_and_keeps_format_without_metadata(tmp_path, model_args):
    src = tmp_path / "in"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    exif[0x8825] = {2: (1.0, 2.0, 3.0)}  # GPS latitude
    noise(src / "photo.jpg", size=(80, 40), exif=exif.tobytes())
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    text.add_text("location", "52.1N 4.3E")
    noise(src / "sub" / "b.png", seed=1, pnginfo=text)
    out = tmp_path / "out"
    res = run([str(src), "--out-dir", str(out), "--tau", "2.0", "--fill", "black", *model_args])
    assert res.exit_code == 0, res.output
    assert files_under(out) == {"photo.jpg", "sub/b.png", MANIFEST}  # folder mirrored
    assert (pixels(out / "sub" / "b.png") == 0).all()
    assert Image.open(src / "sub" / "b.png").text and not Image.open(out / "sub" / "b.png").text  # text chunks dropped
    with Image.open(out / "photo.jpg") as im:
        assert im.format == "JPEG" and im.size == (40, 80)  # orientation baked into the pixels
        assert not im.getexif() and "exif" not in im.info  # EXIF (with GPS) dropped
    assert np.abs(pixels(out / "photo.jpg")).max() < 8  # black up to JPEG noise
    m = manifest(out)
    assert m["photo.jpg"]["verdict"] == "unsafe" and m["photo.jpg"]["boxes"]


# ----------------------------------------------------------------------------- safe images, layout, manifest


def test_safe_images_are_byte_identical_or_skipped(tmp_path, model_args):
    src = tmp_path / "in"
    noise(src / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    noise(src / "deep" / "b.jpg", exif=exif.tobytes())
    out = tmp_path / "out"
    res = run([str(src), "--out-dir", str(out), "--tau", "0.0001", *model_args])
    assert res.exit_code == 0, res.output
    for rel in ("a.png", "deep/b.jpg"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    m = manifest(out)
    assert {e["status"] for e in m.values()} == {"copied"} and {e["verdict"] for e in m.values()} == {"safe"}
    assert set(m["a.png"]) >= {"id", "source", "output", "verdict", "boxes", "fill", "status", "error"}

    out2 = tmp_path / "out2"
    res = run([str(src), "--out-dir", str(out2), "--tau", "0.0001", "--only-unsafe", *model_args])
    assert res.exit_code == 0
    assert files_under(out2) == {MANIFEST}
    assert {e["status"] for e in manifest(out2).values()} == {"skipped"}


def test_unreadable_inputs_are_recorded_and_exit_3(tmp_path, detector):
    src = tmp_path / "in"
    noise(src / "good.png")
    (src / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    summary = mask([str(src)], out_dir=str(out), detector=detector, progress=False)
    assert summary.exit_code == 3 and summary.errors == 1 and summary.purified == 1
    m = manifest(out)
    assert m["bad.png"]["status"] == "error" and "not an image" in m["bad.png"]["error"]
    assert m["bad.png"]["output"] is None and not (out / "bad.png").exists()


def test_non_writable_format_becomes_png(tmp_path, detector):
    src = tmp_path / "in"
    noise(src / "icon.ico", size=(32, 32))
    out = tmp_path / "out"
    mask([str(src)], out_dir=str(out), detector=detector, progress=False)
    e = manifest(out)["icon.ico"]
    assert e["output"] == "icon.ico.png" and Image.open(out / "icon.ico.png").format == "PNG"
    assert any("PNG" in n for n in e["notes"])


# ----------------------------------------------------------------------------- Parquet


def _png_bytes(seed, size=(40, 30)):
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def make_parquets(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    struct_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    meta = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}
    hf = pa.table({"image": pa.array([{"bytes": _png_bytes(i), "path": f"o{i}.png"} for i in range(5)], struct_t),
                   "label": [3, 1, 4, 1, 5]}).replace_schema_metadata(meta)
    pq.write_table(hf, d / "hf.parquet", row_group_size=2)
    pq.write_table(pa.table({"img": pa.array([_png_bytes(10 + i) for i in range(3)], pa.binary()),
                             "n": [7, 8, 9]}), d / "bin.parquet")
    (d / "imgs").mkdir(exist_ok=True)
    for i in range(2):
        (d / "imgs" / f"p{i}.png").write_bytes(_png_bytes(20 + i))
    pq.write_table(pa.table({"file": ["imgs/p0.png", "imgs/p1.png"], "n": [1, 2]}), d / "paths.parquet")
    return {"hf": d / "hf.parquet", "bin": d / "bin.parquet", "paths": d / "paths.parquet"}


def test_parquet_same_schema_rows_and_order(tmp_path, model_args):
    files = make_parquets(tmp_path / "data")
    out = tmp_path / "out"
    res = run([str(tmp_path / "data"), "--out-dir", str(out), "--tau", "2.0", "--overlay", *model_args])
    assert res.exit_code == 0, res.output
    for name, src in files.items():
        dst = out / src.name
        assert pq.read_schema(dst).equals(pq.read_schema(src), check_metadata=True), name
        a, b = pq.read_table(src), pq.read_table(dst)
        assert a.num_rows == b.num_rows
        assert pq.ParquetFile(dst).metadata.num_row_groups == pq.ParquetFile(src).metadata.num_row_groups
        for col in a.column_names:  # every other column identical, in the same order
            if col not in ("image", "img", "file"):
                assert a.column(col).to_pylist() == b.column(col).to_pylist()
    hf_in = pq.read_table(files["hf"]).column("image").to_pylist()
    hf_out = pq.read_table(out / "hf.parquet").column("image").to_pylist()
    for i, (x, y) in enumerate(zip(hf_in, hf_out)):
        assert y["path"] == x["path"] and y["bytes"] != x["bytes"]  # replaced, in place
        assert Image.open(io.BytesIO(y["bytes"])).size == (40, 30)
    overlays = out.with_name(out.name + ".overlays")  # beside the purified tree, never inside it
    assert (overlays / "hf.parquet.overlays" / "0.overlay.png").is_file()
    assert not any(p.name.endswith(".overlay.png") for p in out.rglob("*"))
    # path cells keep their text; the purified images sit beside the output at that path
    assert pq.read_table(out / "paths.parquet").column("file").to_pylist() == ["imgs/p0.png", "imgs/p1.png"]
    assert (out / "imgs" / "p0.png").read_bytes() != (tmp_path / "data" / "imgs" / "p0.png").read_bytes()
    m = manifest(out)
    assert m["hf.parquet#3"]["output"] == "hf.parquet" and m["hf.parquet#3"]["row"] == 3
    assert m["hf.parquet#3"]["status"] == "purified"


def test_parquet_safe_rows_unchanged_and_only_unsafe(tmp_path, detector):
    files = make_parquets(tmp_path / "data")
    out = tmp_path / "out"
    mask([str(files["hf"])], out_dir=str(out), detector=detector.with_config(tau=0.0001), progress=False)
    assert pq.read_table(out / "hf.parquet").equals(pq.read_table(files["hf"]))
    out2 = tmp_path / "out2"
    s = mask([str(files["hf"])], out_dir=str(out2), only_unsafe=True, detector=detector.with_config(tau=0.0001),
             progress=False)
    assert s.skipped == 5 and pq.read_table(out2 / "hf.parquet").num_rows == 0
    assert pq.read_schema(out2 / "hf.parquet").equals(pq.read_schema(files["hf"]), check_metadata=True)


def test_parquet_rows_that_cannot_be_verified_are_withheld_not_passed_on(tmp_path, detector):
    good, bad = _png_bytes(1), _png_bytes(2)[:60]  # a truncated PNG: another decoder might still show part of it
    src = tmp_path / "data" / "bin.parquet"
    src.parent.mkdir()
    pq.write_table(pa.table({"img": pa.array([good, bad, good], pa.binary()), "n": [1, 2, 3]}), src)
    out = tmp_path / "out"
    s = mask([str(src)], out_dir=str(out), detector=detector.with_config(tau=0.0001), progress=False)  # all safe
    assert s.exit_code == 3
    got = pq.read_table(out / "bin.parquet")
    assert got.schema.equals(pq.read_schema(src)) and got.column("n").to_pylist() == [1, 2, 3]
    assert got.column("img").to_pylist() == [good, None, good]
    e = manifest(out)["bin.parquet#1"]
    assert e["status"] == "error" and "truncated" in e["error"] and "image cell null" in " ".join(e["notes"])


def test_parquet_row_changed_since_the_scan_is_withheld(tmp_path, detector):
    from guardalign.commands.scan import scan

    src = tmp_path / "data" / "bin.parquet"
    src.parent.mkdir()
    cells = [_png_bytes(i) for i in range(3)]
    pq.write_table(pa.table({"img": pa.array(cells, pa.binary())}), src)
    records = tmp_path / "scan.jsonl"
    scan([str(src)], out=str(records), detector=detector.with_config(tau=0.0001), progress=False)
    cells[2] = _png_bytes(9)  # same size, other content
    pq.write_table(pa.table({"img": pa.array(cells, pa.binary())}), src)
    out = tmp_path / "out"
    s = mask([str(src)], out_dir=str(out), from_scan=str(records), detector=detector, progress=False)
    assert s.exit_code == 3 and s.copied == 2
    assert pq.read_table(out / "bin.parquet").column("img").to_pylist() == [cells[0], cells[1], None]
    assert "differs from the scanned" in manifest(out)["bin.parquet#2"]["error"]


def test_a_non_nullable_image_column_abandons_the_output_rather_than_pass_a_row_on(tmp_path, detector):
    schema = pa.schema([pa.field("img", pa.binary(), nullable=False)])
    src = tmp_path / "data" / "strict.parquet"
    src.parent.mkdir()
    pq.write_table(pa.table({"img": [_png_bytes(1), b"not an image"]}, schema=schema), src)
    out = tmp_path / "out"
    s = mask([str(src)], out_dir=str(out), detector=detector.with_config(tau=0.0001), progress=False)
    assert s.exit_code == 3 and not (out / "strict.parquet").exists()
    m = manifest(out)  # the good row is not reported as written into a file that does not exist
    assert m["strict.parquet#0"]["status"] == "error" and m["strict.parquet#0"]["output"] is None
    assert "not nullable" in m["strict.parquet#0"]["error"] and s.copied == 0
    again = mask([str(src)], out_dir=str(out), detector=detector.with_config(tau=0.0001), progress=False)
    assert again.resumed == 0 and not (out / "strict.parquet").exists()  # a rerun redoes it, and fails the same way


# ----------------------------------------------------------------------------- filesystem safety


def test_safe_relpath_contains_traversal():
    assert safe_relpath("../../x.png") == ("x.png", True)
    assert safe_relpath("/etc/passwd") == ("etc/passwd", True)
    assert safe_relpath("C:\\Users\\a\\..\\b.png") == ("Users/a/b.png", True)
    assert safe_relpath("a/./b\x00.png") == ("a/b.png", True)
    assert safe_relpath("sub/ok.png") == ("sub/ok.png", False)
    assert safe_relpath("..") == ("_", True)


def test_traversal_attempts_are_contained(tmp_path, detector):
    data = tmp_path / "data"
    data.mkdir()
    victim = tmp_path / "victim.png"
    noise(victim, seed=5)
    absolute = noise(tmp_path / "elsewhere" / "abs.png", seed=6)
    pq.write_table(pa.table({"file": ["../victim.png", str(absolute)]}), data / "evil.parquet")
    out = tmp_path / "out"
    before = victim.read_bytes()
    s = mask([str(data / "evil.parquet")], out_dir=str(out), detector=detector, progress=False)
    assert s.exit_code == 0 and s.sanitized == 2
    assert victim.read_bytes() == before
    written = {p.resolve() for p in out.rglob("*") if p.is_file()}
    assert all(str(p).startswith(str(out.resolve()) + os.sep) for p in written)
    cells = pq.read_table(out / "evil.parquet").column("file").to_pylist()  # a file given directly: base name
    assert cells[0] == "victim.png" and not os.path.isabs(cells[1])  # rewritten, recorded
    m = manifest(out)
    assert all(e["sanitized"] for e in m.values())
    assert (out / cells[0]).is_file() and (out / cells[1]).is_file()


def test_stdin_absolute_paths_and_symlink_escape(tmp_path, detector):
    a = noise(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    (out).mkdir()
    first = safe_relpath(str(a))[0].split("/")[0]
    os.symlink(outside, out / first)  # out/<first part of the sanitised path> → a folder outside out
    s = mask(["-"], out_dir=str(out), detector=detector, stdin=io.StringIO(f"{a}\n"), progress=False)
    assert s.exit_code == 3 and not any(outside.iterdir())
    e = manifest(out)[str(a)]
    assert e["status"] == "error" and "leave --out-dir" in e["error"] and e["sanitized"]


def test_refuses_out_dir_inside_input_unless_force(tmp_path, detector, model_args):
    src = tmp_path / "in"
    noise(src / "a.png")
    for out in (src, src / "clean"):
        res = run([str(src), "--out-dir", str(out), "--tau", "2.0", *model_args])
        assert res.exit_code == 2 and "input folder" in res.stderr
    assert files_under(src) == {"a.png"}  # nothing written
    s = mask([str(src)], out_dir=str(src / "clean"), force=True, detector=detector, progress=False)
    assert s.purified == 1 and files_under(src) == {"a.png", "clean/a.png", f"clean/{MANIFEST}"}
    s = mask([str(src)], out_dir=str(src / "clean"), force=True, detector=detector, progress=False)
    assert s.excluded == 1 and s.resumed == 1  # its own output clean/a.png is not read back as an input


def test_original_is_never_overwritten(tmp_path, detector, monkeypatch):
    monkeypatch.chdir(tmp_path)
    noise(tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    with pytest.raises(ConfigError, match="contains the input file a.png"):  # refused before anything is written
        mask(["a.png"], out_dir=".", overwrite=True, detector=detector, progress=False)
    assert (tmp_path / "a.png").read_bytes() == before and not (tmp_path / MANIFEST).exists()


def test_no_overwrite_without_flag_and_idempotent_rerun(tmp_path, detector):
    src = tmp_path / "in"
    noise(src / "a.png")
    noise(src / "b.png", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"user file")
    s = mask([str(src)], out_dir=str(out), detector=detector, progress=False)
    assert s.exit_code == 3 and s.conflicts == 1 and s.purified == 1
    assert (out / "a.png").read_bytes() == b"user file"
    assert manifest(out)["a.png"]["status"] == "exists" and "--overwrite" in manifest(out)["a.png"]["error"]
    mtime = (out / "b.png").stat().st_mtime_ns
    s = mask([str(src)], out_dir=str(out), overwrite=True, detector=detector, progress=False)
    assert s.exit_code == 0 and s.purified == 1 and s.resumed == 1  # b.png done before: not redone
    assert (out / "a.png").read_bytes() != b"user file" and (out / "b.png").stat().st_mtime_ns == mtime
    assert manifest(out)["a.png"]["status"] == "purified"


def test_rerun_after_crash_completes_the_job(tmp_path, detector):
    src = tmp_path / "in"
    for i in range(3):
        noise(src / f"{i}.png", seed=i)
    out = tmp_path / "out"
    mask([str(src)], out_dir=str(out), detector=detector, progress=False)
    reference = {rel: (out / rel).read_bytes() for rel in ("0.png", "1.png", "2.png")}
    # Simulate a crash: last image never renamed into place, a temp file left, a torn manifest line.
    (out / "2.png").unlink()
    (out / f".2.png.123{TMP_SUFFIX}").write_bytes(b"partial")
    lines = (out / MANIFEST).read_text().splitlines(keepends=True)
    (out / MANIFEST).write_text("".join(lines[:2]) + lines[2][:10])
    s = mask([str(src)], out_dir=str(out), detector=detector, progress=False)
    assert s.exit_code == 0 and s.resumed == 2 and s.purified == 1
    assert {rel: (out / rel).read_bytes() for rel in reference} == reference
    assert files_under(out) == {"0.png", "1.png", "2.png", MANIFEST}  # temp file cleaned up
    assert len(manifest(out)) == 3


def test_a_second_run_into_a_busy_out_dir_stops_before_touching_it(tmp_path, detector):
    import fcntl

    src = tmp_path / "in"
    noise(src / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / f".a.png.999{TMP_SUFFIX}"  # the running job's half-written output
    theirs.write_bytes(b"in progress")
    fd = os.open(out / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the running job holds
        with pytest.raises(ConfigError, match="being written by another running guardalign"):
            mask([str(src)], out_dir=str(out), detector=detector, progress=False)
    finally:
        os.close(fd)
    assert theirs.read_bytes() == b"in progress" and not (out / "a.png").exists()
    s = mask([str(src)], out_dir=str(out), detector=detector, progress=False)  # once free, it runs
    assert s.exit_code == 0 and (out / "a.png").is_file() and not theirs.exists()


# ----------------------------------------------------------------------------- --from-scan


@pytest.fixture()
def scanned(tmp_path, detector):
    from guardalign.commands.scan import scan

    src = tmp_path / "in"
    noise(src / "a.png")
    noise(src / "b.png", seed=1)
    records = tmp_path / "scan.jsonl"
    scan([str(src)], out=str(records), detector=detector, progress=False)
    return src, records


def test_from_scan_reuses_boxes(tmp_path, scanned, model_args):
    src, records = scanned
    recs = [json.loads(x) for x in records.read_text().splitlines()]
    for r in recs:  # edit the scan: a.png has one unsafe patch, b.png is safe
        keep = r["id"] == "a.png"
        r.update(verdict="unsafe" if keep else "safe", unsafe_patches=[4] if keep else [],
                 boxes=[r["patch_boxes"][4]] if keep else [], box_categories=["weapons"] if keep else [])
    records.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    res = run([str(src), "--out-dir", str(out), "--from-scan", str(records), "--overlay", *model_args])
    assert res.exit_code == 0, res.output
    box = recs[0]["patch_boxes"][4]
    changed = (pixels(src / "a.png") != pixels(out / "a.png")).any(axis=2)
    assert np.array_equal(changed, union((90, 60), [box]))
    assert (out / "b.png").read_bytes() == (src / "b.png").read_bytes()
    overlays = out.with_name(out.name + ".overlays")
    assert (overlays / "a.png.overlay.png").is_file() and not (overlays / "b.png.overlay.png").exists()
    assert not (out / "a.png.overlay.png").exists()


def test_from_scan_with_other_anchors_is_a_clear_error(tmp_path, scanned, model_args):
    src, records = scanned
    anchors = Path(__file__).resolve().parents[2] / "anchors" / "default.yaml"
    other = tmp_path / "other.yaml"  # the shipped anchors with another global τ: another sha256
    text = anchors.read_text()
    other.write_text(re.sub(r"^tau:\s*([0-9.]+)", lambda m: f"tau: {float(m.group(1)) / 2}", text, count=1, flags=re.M))
    assert other.read_text() != text
    out = tmp_path / "out"
    res = run([str(src), "--out-dir", str(out), "--from-scan", str(records), "--anchors", str(other), *model_args])
    assert res.exit_code == 2
    assert "anchors sha256" in res.stderr and "--from-scan" in res.stderr
    assert not out.exists()  # nothing written
    res = run([str(src), "--out-dir", str(out), "--from-scan", str(records), "--tau", "0.5", *model_args])
    assert res.exit_code == 2 and "--tau" in res.stderr


def test_from_scan_takes_its_provenance_from_the_scan_and_loads_no_model(tmp_path, scanned, detector):
    src, records = scanned
    out = tmp_path / "out"
    # a CLIP that cannot be loaded: mask must not need it, the scan records carry model, anchors and mean colour
    s = mask([str(src)], out_dir=str(out), from_scan=str(records), clip_model=str(tmp_path / "no.json"),
             pretrained="none", progress=False)
    assert s.exit_code == 0 and s.total == 2
    recs = [json.loads(x) for x in records.read_text().splitlines()]
    recs[1]["settings"] = {**recs[1]["settings"], "tau": 0.123}
    records.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ConfigError, match="other settings"):
        mask([str(src)], out_dir=str(tmp_path / "o2"), from_scan=str(records), progress=False)


def test_from_scan_missing_id_is_an_item_error(tmp_path, scanned, detector):
    src, records = scanned
    noise(src / "new.png", seed=9)
    out = tmp_path / "out"
    s = mask([str(src)], out_dir=str(out), from_scan=str(records), detector=detector, progress=False)
    assert s.exit_code == 3
    assert "not found in the --from-scan" in manifest(out)["new.png"]["error"]


def _mark(records: Path, verdicts: dict[str, str], drop: tuple[str, ...] = ()) -> None:
    """Rewrite scan records: set verdicts by id (unsafe gets the first patch as its box), drop fields."""
    recs = [json.loads(x) for x in records.read_text().splitlines()]
    for r in recs:
        unsafe = verdicts[r["id"]] == "unsafe"
        r.update(verdict=verdicts[r["id"]], unsafe_patches=[0] if unsafe else [],
                 boxes=[r["patch_boxes"][0]] if unsafe else [], box_categories=["weapons"] if unsafe else [])
        for k in drop:
            r.pop(k, None)
    records.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_from_scan_refuses_an_image_whose_bytes_changed(tmp_path, scanned, detector):
    src, records = scanned
    _mark(records, {"a.png": "unsafe", "b.png": "safe"})
    noise(src / "b.png", seed=7)  # same size, other pixels: the scan's "safe" no longer holds
    noise(src / "a.png", seed=8)  # same size: the size check alone would let this through
    out = tmp_path / "out"
    s = mask([str(src)], out_dir=str(out), from_scan=str(records), detector=detector, progress=False)
    assert s.exit_code == 3
    m = manifest(out)
    for name in ("a.png", "b.png"):
        assert m[name]["status"] == "error" and m[name]["output"] is None
        assert "differs from the scanned" in m[name]["error"] and "rescan" in m[name]["error"]
        assert not (out / name).exists()


def test_from_scan_unchanged_images_pass_and_the_manifest_names_their_hash(tmp_path, scanned, detector):
    src, records = scanned
    _mark(records, {"a.png": "unsafe", "b.png": "safe"})
    out = tmp_path / "out"
    s = mask([str(src)], out_dir=str(out), from_scan=str(records), detector=detector, progress=False)
    assert s.exit_code == 0 and s.purified == 1 and s.copied == 1
    m = manifest(out)
    for name in ("a.png", "b.png"):
        assert m[name]["sha256"] == hashlib.sha256((src / name).read_bytes()).hexdigest()
    assert (out / "b.png").read_bytes() == (src / "b.png").read_bytes()


def test_from_scan_records_without_a_hash_fall_back_to_the_size_check(tmp_path, scanned, detector):
    src, records = scanned
    _mark(records, {"a.png": "unsafe", "b.png": "unsafe"}, drop=("sha256",))
    noise(src / "b.png", size=(60, 90), seed=7)  # rotated size: caught without a hash
    out = tmp_path / "out"
    s = mask([str(src)], out_dir=str(out), from_scan=str(records), detector=detector, progress=False)
    m = manifest(out)
    assert m["a.png"]["status"] == "purified"
    assert m["b.png"]["status"] == "error" and "60×90 but was scanned as 90×60" in m["b.png"]["error"]
    assert s.exit_code == 3


# ----------------------------------------------------------------------------- overlays


def test_overlays_never_land_in_the_purified_tree_and_rescans_see_only_outputs(tmp_path, detector):
    from guardalign.commands.scan import scan

    src = tmp_path / "in"
    for i in range(3):
        noise(src / f"{i}.png", seed=i)
    out = tmp_path / "clean"
    s = mask([str(src)], out_dir=str(out), overlay=True, detector=detector.with_config(tau=2.0), progress=False)
    assert s.overlays == 3 and s.purified == 3
    rescan = scan([str(out)], out=str(tmp_path / "r.jsonl"), detector=detector, progress=False)
    assert rescan.total == 3  # one record per purified image: no overlay picked up (was 2 per item)
    with pytest.raises(ConfigError, match="overlaps --out-dir"):
        mask([str(src)], out_dir=str(out), overlay_dir=str(out / "ov"), detector=detector, progress=False)


def test_rerun_with_another_fill_is_refused_by_name_and_overwrite_redoes_it(tmp_path, detector):
    src = tmp_path / "in"
    noise(src / "a.png")
    out = tmp_path / "out"
    det = detector.with_config(tau=2.0)
    mask([str(src)], out_dir=str(out), fill="mean", detector=det, progress=False)
    first = (out / "a.png").read_bytes()
    with pytest.raises(ConfigError, match='fill: "mean" → "black"'):
        mask([str(src)], out_dir=str(out), fill="black", detector=det, progress=False)
    assert (out / "a.png").read_bytes() == first and manifest(out)["a.png"]["fill"] == "mean"
    s = mask([str(src)], out_dir=str(out), fill="black", overwrite=True, detector=det, progress=False)
    assert s.exit_code == 0 and s.purified == 1 and (out / "a.png").read_bytes() != first
    assert manifest(out)["a.png"]["fill"] == "black"  # the manifest agrees with the folder


def test_overlays_exist_with_the_stated_size(tmp_path, detector):
    src = tmp_path / "in"
    noise(src / "wide.png", size=(700, 300))
    noise(src / "small.png", size=(90, 60), seed=2)
    out = tmp_path / "out"
    s = mask([str(src)], out_dir=str(out), overlay=True, detector=detector, progress=False)
    assert s.overlays == 2
    for name, size in (("wide.png", (700, 300)), ("small.png", (90, 60))):
        e = manifest(out)[name]
        assert e["overlay"] == f"{name}.overlay.png"
        with Image.open(out.with_name(out.name + ".overlays") / e["overlay"]) as im:
            assert im.size == thumbnail_size(*size) and max(im.size) <= 512
    assert thumbnail_size(700, 300) == (512, 219)


class _Interrupting:
    """A detector that is killed (KeyboardInterrupt) on its ``after``-th batch."""

    def __init__(self, inner, after: int):
        self.inner, self.after, self.calls = inner, after, 0
        self.encoder, self.provenance, self.settings = inner.encoder, inner.provenance, inner.settings

    def detect(self, images):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.inner.detect(images)


def test_interrupted_parquet_is_not_left_half_written_and_rerun_completes(tmp_path, detector):
    files = make_parquets(tmp_path / "data")
    ref = tmp_path / "ref"
    mask([str(files["hf"])], out_dir=str(ref), detector=detector, batch_size=2, progress=False)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        mask([str(files["hf"])], out_dir=str(out), detector=_Interrupting(detector, 3), batch_size=2, progress=False)
    assert files_under(out) <= {MANIFEST}  # no output Parquet, no temp file
    s = mask([str(files["hf"])], out_dir=str(out), detector=detector, batch_size=2, progress=False)
    assert s.exit_code == 0 and s.purified == 5
    assert pq.read_table(out / "hf.parquet").equals(pq.read_table(ref / "hf.parquet"))
    assert len(manifest(out)) == 5


def test_unsafe_row_that_cannot_be_purified_is_never_passed_on(tmp_path, detector, monkeypatch):
    import guardalign.detection.purify as purify

    files = make_parquets(tmp_path / "data")
    real, calls = purify.encode_image, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk trouble")
        return real(*a, **k)

    monkeypatch.setattr(purify, "encode_image", flaky)
    s = mask([str(files["hf"])], out_dir=str(tmp_path / "out"), detector=detector, progress=False)
    assert s.exit_code == 3 and not (tmp_path / "out" / "hf.parquet").exists()
    assert manifest(tmp_path / "out")["hf.parquet#1"]["status"] == "error"
    assert any("hf.parquet" == rid and "not written" in err for rid, err in s.error_list)


def test_global_method_masks_the_whole_image(tmp_path, detector):
    src = noise(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    s = mask([str(tmp_path / "in")], out_dir=str(out), fill="black", overlay=True, progress=False,
             detector=detector.with_config(method="global", theta=-1.0))  # every cosine ≥ −1: unsafe
    assert s.purified == 1 and (pixels(out / "a.png") == 0).all()
    e = manifest(out)["a.png"]
    assert e["boxes"] == [[0, 0, 90, 60]] and any("whole image" in n for n in e["notes"])
    assert Image.open(out.with_name(out.name + ".overlays") / "a.png.overlay.png").size == (90, 60)
    assert pixels(src).shape == (60, 90, 3)


def test_parquet_path_cell_conflict_abandons_that_parquet(tmp_path, detector):
    files = make_parquets(tmp_path / "data")
    out = tmp_path / "out"
    (out / "imgs").mkdir(parents=True)
    (out / "imgs" / "p0.png").write_bytes(b"someone else's file")
    s = mask([str(files["paths"])], out_dir=str(out), detector=detector, progress=False)
    assert s.exit_code == 3 and s.conflicts == 1
    assert not (out / "paths.parquet").exists()  # never a Parquet pointing at a file that is not the purified one
    assert (out / "imgs" / "p0.png").read_bytes() == b"someone else's file"
    assert any(rid == "paths.parquet" and "not written" in err for rid, err in s.error_list)
    s = mask([str(files["paths"])], out_dir=str(out), overwrite=True, detector=detector, progress=False)
    assert s.exit_code == 0 and (out / "paths.parquet").is_file()


def test_a_second_image_column_is_refused_by_name_and_the_choice_is_explained(tmp_path, detector, capsys):
    cells = [_png_bytes(i) for i in range(2)]
    src = tmp_path / "two.parquet"
    pq.write_table(pa.table({"photo": pa.array(cells, pa.binary()), "raw": pa.array(cells, pa.binary()),
                             "n": [1, 2]}), src)
    with pytest.raises(ConfigError, match=r"other image columns \(raw\)"):
        mask([str(src)], out_dir=str(tmp_path / "out"), image_column="photo", detector=detector, progress=False)
    assert not (tmp_path / "out").exists()
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary()), "blob": pa.array([b"\x00\x01", None])}), one)
    s = mask([str(one)], out_dir=str(tmp_path / "o1"), detector=detector, progress=True)
    assert s.exit_code == 0
    assert "image column 'image' (a binary column" in capsys.readouterr().err  # says which, and why
