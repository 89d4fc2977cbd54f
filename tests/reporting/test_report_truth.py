"""The report shows the truth: the scanned image or none, found under --image-root, no links outside the roots,
answer rows with their run, the image the model saw and the prompt's own category, blurred unsafe thumbnails,
and mask manifests read as mask runs."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from guardalign.reporting.collect import report
from guardalign.reporting.images import NoImage, load_verified

RED, BLUE = (220, 20, 20), (20, 20, 220)


def png(color, size=(90, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scan_rec(rid: str, source: str, digest: str | None, **extra) -> dict:
    boxes = [[x * 30, y * 20, x * 30 + 30, y * 20 + 20] for y in range(3) for x in range(3)]
    rec = {"id": rid, "source": source, "status": "ok", "error": None, "verdict": "unsafe", "score": 0.1,
           "threshold": 0.5, "category": "weapons", "categories": {"weapons": 0.1}, "unsafe_patches": [4],
           "boxes": [boxes[4]], "box_categories": ["weapons"], "grid": [3, 3], "patch_scores": [0.9] * 4 + [0.1] + [0.9] * 4,
           "patch_boxes": boxes, "width": 90, "height": 60, "method": "ot", "patches": "grid", "model": "m",
           "anchors_sha256": "ab" * 32, "notes": [], "sha256": digest}
    rec.update(extra)
    return rec


def write_jsonl(path: Path, recs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def data_uris(page: str) -> list[str]:
    return re.findall(r'src="(data:image/jpeg;base64,[^"]+)"', page)


def decode_uri(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")).astype(int)


def hrefs(page: str) -> list[str]:
    return re.findall(r'<a href="([^"]+)"', page)


# ------------------------------------------------------------------------------- the scanned image, or none
def _two_columns(path: Path) -> tuple[bytes, bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    photo, thumb = png(RED), png(BLUE, (45, 30))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"thumb": pa.array([{"bytes": thumb, "path": "t.png"}], type=struct),  # first: the old pick
                             "photo": pa.array([{"bytes": photo, "path": "p.png"}], type=struct)}), path)
    return photo, thumb


def test_parquet_thumbnail_comes_from_the_scanned_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photo, thumb = _two_columns(tmp_path / "two.parquet")
    roots = [tmp_path.resolve()]
    img, path = load_verified("two.parquet#0", sha(photo), tmp_path, roots, {}, column="photo")
    assert img.size == (90, 60) and img.getpixel((5, 5)) == RED and path == (tmp_path / "two.parquet").resolve()
    img, _ = load_verified("two.parquet#0", sha(photo), tmp_path, roots, {})  # no column recorded: the hash picks
    assert img.getpixel((5, 5)) == RED
    with pytest.raises(NoImage, match="differ from the scanned sha256"):
        load_verified("two.parquet#0", sha(photo), tmp_path, roots, {}, column="thumb")
    write_jsonl(tmp_path / "scan.jsonl", [scan_rec("two.parquet#0", "two.parquet#0", sha(photo), image_column="photo")])
    report(["scan.jsonl"], out="r.html", blur=False)
    (uri,) = data_uris(Path("r.html").read_text())
    pix = decode_uri(uri)
    assert pix.shape[:2] == (60, 90)  # the 90×60 photo, not the 45×30 thumb
    from guardalign.detection.purify import overlay

    rec = scan_rec("x", "x", None)
    want = overlay(Image.open(io.BytesIO(photo)), rec["patch_boxes"], rec["patch_scores"], [4], ["weapons"], 0.5)
    assert np.abs(pix - np.asarray(want).astype(int)).mean() < 6  # the photo's heatmap (JPEG-compressed)


def test_changed_or_unhashed_image_is_never_drawn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(png(RED))
    (tmp_path / "b.png").write_bytes(png(BLUE))
    write_jsonl(tmp_path / "scan.jsonl", [
        scan_rec("a", "a.png", sha(png(BLUE))),  # the file changed since the scan
        scan_rec("b", "b.png", None),  # no hash to check against
        scan_rec("c", "b.png", sha(png(BLUE))),  # the real thing
    ])
    report(["scan.jsonl"], out="r.html")
    page = Path("r.html").read_text()
    assert len(data_uris(page)) == 1
    assert "differ from the scanned sha256" in page and "has no sha256" in page


# ------------------------------------------------------------------------------- --image-root
def test_image_root_resolves_relative_sources_from_another_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    data = png(RED)
    (project / "photos").mkdir(parents=True)
    (project / "photos" / "a.png").write_bytes(data)
    records = write_jsonl(tmp_path / "results" / "scan.jsonl", [scan_rec("photos/a.png", "photos/a.png", sha(data))])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report([str(records)], out="none.html")
    assert data_uris(Path("none.html").read_text()) == []  # not under . or the records' folder
    report([str(records)], out="root.html", image_root=[str(project)])
    page = Path("root.html").read_text()
    assert len(data_uris(page)) == 1 and (project / "photos" / "a.png").resolve().as_uri() in hrefs(page)
    report([str(records)], out="sub.html", image_root=[str(project / "photos")])  # the photos folder itself
    assert len(data_uris(Path("sub.html").read_text())) == 1
    res = CliRunner().invoke(__import__("cli.main", fromlist=["app"]).app,
                             ["report", str(records), "-o", "x.html", "--image-root", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such folder" in res.output


def test_no_file_links_outside_the_roots(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(png(BLUE))
    (root / "inside.png").write_bytes(png(RED))
    (root / "link.png").symlink_to(outside)
    monkeypatch.chdir(root)
    sources = ["/etc/passwd", f"/proc/{os.getpid()}/environ", str(outside), "../secret.png", "link.png", "inside.png"]
    write_jsonl(root / "scan.jsonl", [scan_rec(f"r{i}", s, sha(b"x")) for i, s in enumerate(sources)])
    write_jsonl(root / "answers.jsonl", [answer_rec("q", "../secret.png", sha(png(BLUE)))])
    report(["scan.jsonl", "answers.jsonl"], out="r.html")
    page = Path("r.html").read_text()
    links = hrefs(page)
    assert links == [(root / "inside.png").resolve().as_uri()], links
    assert "file:///etc" not in page and "/proc/" not in "".join(links) and data_uris(page) == []


# ------------------------------------------------------------------------------- answer rows
def answer_rec(rid: str, image: str, digest: str | None, *, category=None, detected="drugs", purified=False,
               boxes=(), verdict="unsafe") -> dict:
    return {"id": rid, "prompt": "what is this?", "image": image, "image_sha256": digest, "category": category,
            "status": "ok", "error": None, "response": "I cannot help.", "refused": True, "judge": None,
            "detection": {"verdict": verdict, "score": 0.2, "category": detected, "boxes": list(boxes),
                          "masked_boxes": list(boxes), "purified": purified},
            "prefix_attention": None, "model": {"id": "tiny"}, "calibration": {"mode": "scale", "gamma": 0.5},
            "anchors_sha256": "ab" * 32}


def test_answer_rows_name_their_run_show_the_purified_image_and_the_prompt_category(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = png(RED)
    (tmp_path / "a.png").write_bytes(data)
    write_jsonl(tmp_path / "run_a" / "answers.jsonl",
                [answer_rec("qa", "a.png", sha(data), category="weapons", purified=True, boxes=[[0, 0, 45, 60]])])
    write_jsonl(tmp_path / "run_b" / "answers.jsonl", [answer_rec("qb", "a.png", sha(data), verdict="safe")])
    s = report(["run_a/answers.jsonl", "run_b/answers.jsonl"], out="r.html", blur=False)
    page = Path("r.html").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr data-cat=[^>]*>.*?<td class=mono>(q[ab])</td>.*?</tr>", page, re.S)}
    assert "run_a/answers.jsonl" in rows["qa"] and "run_b/answers.jsonl" in rows["qb"]
    assert "<td>weapons</td><td>drugs</td>" in rows["qa"]  # the prompt's category, then the detector's
    assert "<td>(none)</td><td>drugs</td>" in rows["qb"]  # no prompt category: not the detector's
    assert set(s["answers"]["by_category"]) == {"weapons", "(none)"}
    assert s["answers"]["files"] == {"run_a/answers.jsonl": 1, "run_b/answers.jsonl": 1}
    purified = decode_uri(re.search(r'src="(data:[^"]+)"', rows["qa"]).group(1))
    original = decode_uri(re.search(r'src="(data:[^"]+)"', rows["qb"]).group(1))
    left, right = purified[:, : purified.shape[1] // 2 - 4], purified[:, purified.shape[1] // 2 + 4:]
    mean = np.array([round(0.48145466 * 255), round(0.4578275 * 255), round(0.40821073 * 255)])  # CLIP's mean colour
    assert np.abs(left - mean).max() < 12 and np.abs(right - RED).max() < 12  # the filled half is what the model saw
    assert np.abs(original - RED).max() < 12
    assert "purified: 1 box filled" in rows["qa"] and "original (not purified)" in rows["qb"]


# ------------------------------------------------------------------------------- blur
def test_unsafe_thumbnails_blurred_until_clicked_unless_no_blur(tmp_path, monkeypatch):
    from cli.main import app

    monkeypatch.chdir(tmp_path)
    data = png(RED)
    (tmp_path / "a.png").write_bytes(data)
    write_jsonl(tmp_path / "scan.jsonl", [scan_rec("a", "a.png", sha(data))])
    write_jsonl(tmp_path / "answers.jsonl", [answer_rec("q1", "a.png", sha(data)),
                                             answer_rec("q2", "a.png", sha(data), verdict="safe")])
    res = CliRunner().invoke(app, ["report", "scan.jsonl", "answers.jsonl", "-o", "blur.html"])
    assert res.exit_code == 0, res.output
    page = Path("blur.html").read_text()
    assert len(data_uris(page)) == 3
    assert page.count("<label class=reveal") == 2  # the flagged scan item and the unsafe answer; not the safe one
    assert re.search(r"\.reveal img\{filter:blur\(\d+px\)", page) and ".reveal input:checked~img{filter:none}" in page
    res = CliRunner().invoke(app, ["report", "scan.jsonl", "answers.jsonl", "-o", "plain.html", "--no-blur"])
    assert res.exit_code == 0 and "<label class=reveal" not in Path("plain.html").read_text()


# ------------------------------------------------------------------------------- mask manifests
def test_mask_manifest_is_a_mask_run_not_malformed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entries = [
        {"id": f"img{i}.png", "source": f"data/img{i}.png", "status": st, "error": "unreadable" if st == "error" else None,
         "verdict": None if st == "error" else ("unsafe" if st == "purified" else "safe"),
         "category": "weapons" if st == "purified" else None, "output": None if st == "error" else f"img{i}.png",
         "row": None, "overlay": None, "image_file": None, "boxes": [[0, 0, 4, 4]] if st == "purified" else [],
         "box_categories": [], "sha256": "cd" * 32, "fill": "mean", "dilate": 0, "sanitized": False, "notes": [],
         "settings": {"fill": "mean"}}
        for i, st in enumerate(["purified"] * 6 + ["copied"] * 7 + ["error"] * 2)]
    write_jsonl(tmp_path / "clean" / "manifest.jsonl", entries)
    res = CliRunner().invoke(__import__("cli.main", fromlist=["app"]).app,
                             ["report", "clean/manifest.jsonl", "-o", "r.html"])
    assert res.exit_code == 0, res.output
    assert "15 mask entries, 0 malformed" in res.stderr
    page = Path("r.html").read_text()
    assert "Mask run:" in page and "6 purified" in page and "Mask errors (2)" in page
    s = report(["clean/manifest.jsonl"], out="s.json", format="json")
    (run,) = s["mask"]
    assert run["by_status"] == {"purified": 6, "copied": 7, "skipped": 0, "exists": 0, "error": 2}
    assert run["boxes_filled"] == 6 and run["fills"] == {"mean": 15} and s["malformed"]["count"] == 0
    md = report(["clean/manifest.jsonl"], out="s.md", format="md")
    assert md["inputs"][0]["kind"] == "mask" and "## Mask run: clean/manifest.jsonl" in Path("s.md").read_text()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_scan_records_name_their_column_and_the_report_draws_it(tmp_path, monkeypatch, fmt, tiny_clip_config,
                                                                  tiny_clip_checkpoint):
    """The issue's case end to end: `scan two.parquet --image-column photo`, then `report`."""
    from guardalign.commands.scan import scan
    from guardalign.io.sinks import read_records

    monkeypatch.chdir(tmp_path)
    photo, _ = _two_columns(tmp_path / "two.parquet")
    out = f"scan.{fmt}"
    scan(["two.parquet"], image_column="photo", out=out, format=fmt, tau=2.0, clip_model=str(tiny_clip_config),
         pretrained=str(tiny_clip_checkpoint), device="cpu", progress=False)
    (rec,) = list(read_records(out))
    assert rec["image_column"] == "photo" and rec["sha256"] == sha(photo) and rec["verdict"] == "unsafe"
    report([out], out="r.html", blur=False)
    (uri,) = data_uris(Path("r.html").read_text())
    assert decode_uri(uri).shape[:2] == (60, 90)  # the 90×60 photo, not the 45×30 thumb
