"""Tests of guardalign.reporting.collect (+ report_stats, report_html, report_images) and cli/report.py.

Synthetic scan and answer records follow RECORDS.md; expected numbers are recomputed here from the
Python objects that were written, independently of the report code.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from guardalign.errors import ConfigError, InputError
from guardalign.reporting.collect import md_cell, report
from guardalign.reporting.html import svg_histogram
from guardalign.reporting.answers import check_answer
from guardalign.reporting.stats import Bad, check_scan

CATS = ["violence", "nudity", "drugs"]
TAU = 0.42
XSS = '<img src="http://evil.example/x.png" onerror="alert(1)">'
CHROMIUM = Path("/usr/bin/chromium")


# --------------------------------------------------------------------------- synthetic records


def _grid(w: int, h: int, n: int = 3) -> list[list[int]]:
    return [[x * w // n, y * h // n, (x + 1) * w // n, (y + 1) * h // n] for y in range(n) for x in range(n)]


def scan_record(i: int, rng: random.Random, *, image: str, size=(90, 60), method="ot") -> dict:
    cats = {c: round(rng.uniform(0.30, 0.70), 4) for c in CATS}
    cat = min(cats, key=cats.get) if method == "ot" else max(cats, key=cats.get)
    score = cats[cat]
    boxes = _grid(*size)
    unsafe = score <= TAU if method == "ot" else score >= TAU
    scores = [round(rng.uniform(score, 0.9), 4) for _ in boxes]
    scores[i % 9] = score
    return {
        "id": f"img{i:05d}.png", "source": image, "status": "ok", "error": None,
        "verdict": "unsafe" if unsafe else "safe", "score": score, "threshold": TAU, "category": cat,
        "categories": cats, "unsafe_patches": [i % 9] if unsafe else [], "boxes": [boxes[i % 9]] if unsafe else [],
        "box_categories": [cat] if unsafe else [], "grid": [3, 3], "patch_scores": scores, "patch_boxes": boxes,
        "width": size[0], "height": size[1], "method": method, "patches": "grid", "model": "ViT-B-32/openai",
        "anchors_sha256": "ab" * 32, "notes": [],
    }


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def answer_record(i: int, rng: random.Random) -> dict:
    layers = 12
    van = [round(0.3 * 0.8 ** k + rng.uniform(0, 0.01), 5) for k in range(layers)]
    cal = [round(v * (1.6 if 3 <= k < 9 else 1.0), 5) for k, v in enumerate(van)]
    refused = rng.random() < 0.5
    judge = None if i % 7 == 0 else {"model": "judge-tiny", "unsafe": (not refused) and rng.random() < 0.6, "raw": "x"}
    return {
        "id": f"q{i}", "prompt": f"question {i} <b>bold</b>?", "image": "img.png", "category": CATS[i % 3],
        "status": "ok", "error": None, "response": "I cannot help with that." if refused else f"Sure, step {i}…",
        "refused": refused, "judge": judge,
        "detection": {"verdict": "unsafe", "score": 0.3, "category": CATS[i % 3], "boxes": [], "purified": i % 2 == 0},
        "prefix_attention": {"vanilla": van, "calibrated": cal},
        "model": {"id": "tiny-llava", "revision": None, "dtype": "float32", "family": "llava"},
        "generation": {"max_new_tokens": 16, "do_sample": False},
        "calibration": {"mode": "scale", "gamma": 0.6, "layers": [3, 9], "prefix_at": "user"},
        "anchors_sha256": "ab" * 32,
    }


MALFORMED_SCAN = [
    "this is not json",
    json.dumps({"id": 5, "status": "ok"}),  # id not a string
    json.dumps({"id": "m1", "source": "x.png", "status": "ok", "verdict": "unsafe", "threshold": 0.4}),  # no score
    json.dumps({"id": "m2", "source": "x.png", "status": "ok", "verdict": "maybe", "score": 0.1, "threshold": 0.4}),
    json.dumps(["a", "list"]),
    '{"id": "m3", "source": "x.png", "status": "ok", "verdict": "safe", "score": NaN, "threshold": 0.4}',
    json.dumps({"id": "m4", "source": "x.png", "status": "ok", "verdict": "safe", "score": 0.5, "threshold": 0.4,
                "categories": {"violence": "high"}}),
]


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A folder with two images, scan.jsonl (ok, error, hostile and malformed lines) and answers.jsonl."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    Image.new("RGB", (90, 60), (30, 160, 90)).save(tmp_path / "green.png")
    arr = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "noise.png")
    scans = [scan_record(i, rng, image="green.png" if i % 2 else "noise.png") for i in range(60)]
    for r in scans:  # the hash of the stored bytes, as scan writes it: the report draws only matching bytes
        r["sha256"] = sha256_of(tmp_path / r["source"])
    scans[3]["id"] = XSS
    scans[3]["category"] = "<script>alert('c')</script>"
    scans[3]["categories"] = {**scans[3]["categories"], scans[3]["category"]: 0.2}
    scans[3].update(verdict="unsafe", score=0.2)
    errors = [{"id": f"bad{i}.png", "source": f"bad{i}.png", "status": "error",
               "error": f"corrupt image data <i>{i}</i>", "verdict": None} for i in range(2)]
    lines = [json.dumps(r) for r in scans[:30]] + MALFORMED_SCAN + [json.dumps(r) for r in scans[30:] + errors]
    (tmp_path / "scan.jsonl").write_text("\n".join(lines) + "\n")
    answers = [answer_record(i, rng) for i in range(40)]
    answers.append({"id": "qerr", "prompt": "p", "image": "gone.png", "status": "error", "error": "image not found",
                    "response": None, "refused": None})
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return {"dir": tmp_path, "scans": scans, "errors": errors, "answers": answers}


def _json_summary(paths, **kw) -> dict:
    out = Path("summary.json")
    summary = report([str(p) for p in paths], out=out, format="json", **kw)
    assert json.loads(out.read_text()) == summary
    return summary


# --------------------------------------------------------------------------- numbers


def test_scan_numbers_equal_records(run_dir):
    s = _json_summary([run_dir["dir"] / "scan.jsonl"])
    scans, errors = run_dir["scans"], run_dir["errors"]
    run = s["scan"][0]
    unsafe = [r for r in scans if r["verdict"] == "unsafe"]
    assert (run["records"], run["ok"], run["errors"]) == (len(scans) + len(errors), len(scans), len(errors))
    assert (run["unsafe"], run["safe"]) == (len(unsafe), len(scans) - len(unsafe))
    assert run["unsafe_rate"] == pytest.approx(len(unsafe) / len(scans))
    assert (run["method"], run["patches"], run["threshold"], run["anchors_sha256"]) == ("ot", "grid", TAU, "ab" * 32)
    for cat in CATS:
        c = run["categories"][cat]
        vals = [r["categories"][cat] for r in scans]
        assert c["flagged"] == sum(r["category"] == cat for r in unsafe)
        assert c["mean"] == pytest.approx(sum(vals) / len(vals), abs=1e-6)
        assert (c["min"], c["max"]) == (min(vals), max(vals))
        assert c["histogram"] == np.histogram(vals, bins=30, range=(run["score_histogram"]["lo"],
                                                                    run["score_histogram"]["hi"]))[0].tolist()
    h = run["score_histogram"]
    assert sum(h["unsafe"]) == len(unsafe) and sum(h["safe"]) == len(scans) - len(unsafe)
    assert h["lo"] == min(min(r["score"] for r in scans), min(min(r["categories"].values()) for r in scans))
    assert [e["id"] for e in run["error_items"]["items"]] == ["bad0.png", "bad1.png"]
    assert s["inputs"][0] == {"path": str(run_dir["dir"] / "scan.jsonl"), "kind": "scan",
                              "read": len(scans) + len(errors) + len(MALFORMED_SCAN), "malformed": len(MALFORMED_SCAN)}


def test_answer_numbers_equal_records(run_dir):
    s = _json_summary([run_dir["dir"] / "scan.jsonl", run_dir["dir"] / "answers.jsonl"])
    ok = [a for a in run_dir["answers"] if a["status"] == "ok"]
    a = s["answers"]
    judged = [r for r in ok if r["judge"] is not None]
    assert (a["records"], a["ok"], a["errors"]) == (len(ok) + 1, len(ok), 1)
    assert a["refused"] == sum(r["refused"] for r in ok)
    assert a["refusal_rate"] == pytest.approx(a["refused"] / len(ok), abs=1e-6)
    assert a["judged"] == len(judged) and a["judge_unsafe"] == sum(r["judge"]["unsafe"] for r in judged)
    for cat in CATS:
        for key, flag in (("purified", True), ("not_purified", False)):
            grp = [r for r in ok if r["category"] == cat and r["detection"]["purified"] is flag]
            g = a["by_category"][cat][key]
            gj = [r for r in grp if r["judge"] is not None]
            assert g["n"] == len(grp) and g["refused"] == sum(r["refused"] for r in grp)
            assert g["refusal_rate"] == pytest.approx(sum(r["refused"] for r in grp) / len(grp), abs=1e-6)
            assert g["judge_unsafe_rate"] == pytest.approx(sum(r["judge"]["unsafe"] for r in gj) / len(gj), abs=1e-6)
    pa = a["prefix_attention"]
    assert pa["layers"] == 12 and pa["records"] == len(ok) and pa["calibrated_layers"] == [3, 9]
    np.testing.assert_allclose(pa["vanilla"], np.mean([r["prefix_attention"]["vanilla"] for r in ok], 0), atol=1e-6)
    np.testing.assert_allclose(pa["calibrated"], np.mean([r["prefix_attention"]["calibrated"] for r in ok], 0), atol=1e-6)
    assert a["models"] == {"tiny-llava": len(ok)}  # the error record has no model field


def test_malformed_records_are_listed_not_fatal(run_dir):
    s = _json_summary([run_dir["dir"] / "scan.jsonl"])
    items = s["malformed"]["items"]
    assert s["malformed"]["count"] == len(MALFORMED_SCAN) == len(items)
    assert [m["where"] for m in items] == [f"line {31 + k}" for k in range(len(MALFORMED_SCAN))]
    reasons = [m["error"] for m in items]
    expected = ["invalid JSON", "field 'id' must be a string", "missing field 'score'", "field 'verdict'",
                "record must be a JSON object", "field 'score' must be a finite number", "entry 'violence'"]
    for reason, want in zip(reasons, expected):
        assert want in reason


@pytest.mark.parametrize("rec, msg", [
    ({"id": "a", "status": "done"}, "field 'status'"),
    ({"id": "a", "status": "ok", "verdict": "safe", "score": True, "threshold": 0.4}, "field 'score'"),
    ({"id": "a", "status": "ok", "verdict": "safe", "score": 0.5}, "missing field 'threshold'"),
    ({"id": "a", "status": "ok", "verdict": "safe", "score": 0.5, "threshold": 0.4, "method": 3}, "field 'method'"),
])
def test_check_scan_names_the_field(rec, msg):
    with pytest.raises(Bad, match=re.escape(msg)):
        check_scan(rec)


@pytest.mark.parametrize("patch, msg", [
    ({"refused": "yes"}, "field 'refused'"),
    ({"response": None}, "field 'response'"),
    ({"judge": {"unsafe": "no"}}, "field 'unsafe'"),
    ({"prefix_attention": {"vanilla": [0.1, "x"], "calibrated": []}}, "prefix_attention.vanilla"),
    ({"detection": {"purified": 1}}, "field 'purified'"),
])
def test_check_answer_names_the_field(patch, msg):
    rec = {**answer_record(1, random.Random(1)), **patch}
    with pytest.raises(Bad, match=re.escape(msg)):
        check_answer(rec)


def test_unknown_file_and_empty_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weird.jsonl").write_text('{"foo": 1}\n{"bar": 2}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    s = _json_summary([tmp_path / "weird.jsonl", tmp_path / "empty.jsonl"])
    assert [i["kind"] for i in s["inputs"]] == ["unknown", "empty"]
    assert s["malformed"]["count"] == 1 and "cannot tell scan records" in s["malformed"]["items"][0]["error"]
    assert s["scan"] == [] and s["answers"] is None


def test_global_method_severity_and_throughput(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(3)
    recs = [scan_record(i, rng, image="none.png", method="global") for i in range(30)]
    for r in recs:
        r["elapsed_s"] = 0.25
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = _json_summary([tmp_path / "g.jsonl"])
    run = s["scan"][0]
    assert run["unsafe_when"] == "score >= threshold"
    assert run["unsafe"] == sum(r["score"] >= TAU for r in recs)
    assert run["throughput"] == {"records_timed": 30, "seconds": 7.5, "per_second": 4.0}
    from guardalign.reporting.collect import collect

    rows = collect([tmp_path / "g.jsonl"]).scans[0].rows()
    assert [r["score"] for r in rows] == sorted((r["score"] for r in recs if r["score"] >= TAU), reverse=True)


def test_parquet_scan_output_gives_the_same_numbers(run_dir):
    from guardalign.io.sinks import open_sink

    recs = run_dir["scans"][:20] + run_dir["errors"]
    (run_dir["dir"] / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    sink = open_sink("s.parquet", "parquet")
    sink.write(recs)
    sink.close()
    a, b = (_json_summary([name])["scan"][0] for name in ("s.jsonl", "s.parquet"))
    assert a.pop("path") == "s.jsonl" and b.pop("path") == "s.parquet"
    assert a == b and a["ok"] == 20 and a["errors"] == 2


def test_category_count_is_capped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(2)
    recs = []
    for i in range(100):
        r = scan_record(i, rng, image="x.png")
        r.update(category=f"c{i:03d}", categories={f"c{i:03d}": 0.1}, verdict="unsafe", score=0.1)
        recs.append(r)
    Path("many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = _json_summary(["many.jsonl"])["scan"][0]
    assert len(run["categories"]) == 64 and run["categories_omitted"] == 36
    assert list(run["categories"]) == [f"c{i:03d}" for i in range(64)]  # ties: by name


# --------------------------------------------------------------------------- formats


def test_markdown_and_json_numbers_match(run_dir):
    paths = [run_dir["dir"] / "scan.jsonl", run_dir["dir"] / "answers.jsonl"]
    s = _json_summary(paths)
    report([str(p) for p in paths], out="r.md", format="md")
    md = Path("r.md").read_text()
    run, a = s["scan"][0], s["answers"]
    assert f"| unsafe | {run['unsafe']:,} ({100 * run['unsafe_rate']:.1f}% of ok) |" in md
    assert f"| errors | {run['errors']:,} |" in md
    assert f"| τ | {run['threshold']:.4f} |" in md
    for cat, c in run["categories"].items():
        assert f"| {md_cell(cat)} | {c['flagged']:,} | {100 * c['flagged_rate']:.1f}% |" in md
    assert f"| refused | {a['refused']:,} ({100 * a['refusal_rate']:.1f}% of ok) |" in md
    assert f"| judge-unsafe | {a['judge_unsafe']:,} ({100 * a['judge_unsafe_rate']:.1f}% of judged) |" in md
    for cat, groups in a["by_category"].items():
        g = groups["purified"]
        assert (f"| {cat} | yes | {g['n']:,} | {g['refused']:,} | {100 * g['refusal_rate']:.1f}% | {g['judged']:,} | "
                f"{100 * g['judge_unsafe_rate']:.1f}% |") in md
    for k in (0, 5, 11):
        pa = a["prefix_attention"]
        assert f"| {k} | {pa['vanilla'][k]:.4f} | {pa['calibrated'][k]:.4f} |" in md
    assert f"## Malformed records ({s['malformed']['count']})" in md
    assert re.search(r"(?<!\\)<", md) is None and "\\<img src=" in md  # hostile markup is escaped, still readable


def test_md_cell_escapes_markup():
    assert md_cell("a|b <x> [l](u) `c`\nd") == "a\\|b \\<x\\> \\[l\\](u) \\`c\\` d"


def test_histogram_svg_marks_tau_at_its_value():
    svg = svg_histogram([("s", [1, 2, 3, 4], "#00f")], 0.0, 1.0, 0.25, unsafe_le=True, w=148, h=100)
    # plot area: x from 48 to 148-14=134 (86 px); τ = 0.25 → x = 48 + 21.5
    assert re.search(r'<line x1="69\.5" y1="\d+" x2="69\.5"[^>]*stroke="#b00"', svg)
    assert "τ = 0.2500" in svg and svg.count("<rect") == 1 + 4  # shaded unsafe side + 4 bars


def test_bad_arguments_write_nothing(run_dir):
    scan = run_dir["dir"] / "scan.jsonl"
    with pytest.raises(ConfigError, match="format"):
        report([scan], out="r.html", format="pdf")
    with pytest.raises(InputError, match="no such file"):
        report([scan, run_dir["dir"] / "missing.jsonl"], out="r.html")
    with pytest.raises(ConfigError, match="one of the inputs"):
        report([scan], out=scan, format="md")
    assert not Path("r.html").exists()
    assert scan.read_text().count("\n") == 60 + 2 + len(MALFORMED_SCAN)


# --------------------------------------------------------------------------- HTML


class _Refs(HTMLParser):
    """Collects every URL-bearing attribute and every tag name of a page."""

    URL_ATTRS = {"src", "href", "action", "formaction", "poster", "data", "srcset", "xlink:href", "background",
                 "ping", "manifest", "cite"}

    def __init__(self):
        super().__init__()
        self.urls, self.tags, self.handlers = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in self.URL_ATTRS:
                self.urls.append((tag, k, v or ""))
            if k.startswith("on"):
                self.handlers.append((tag, k))


def assert_offline_page(page: str) -> _Refs:
    refs = _Refs()
    refs.feed(page)
    for tag, attr, url in refs.urls:
        assert url.startswith(("data:", "#", "file:")), f"<{tag} {attr}={url[:80]!r}> could reach the network"
    assert not refs.handlers, f"inline event handlers: {refs.handlers}"
    assert refs.tags.count("script") == 1 and {"link", "iframe", "object", "embed", "base"}.isdisjoint(refs.tags)
    style = "".join(re.findall(r"<style>(.*?)</style>", page, re.S))
    assert "url(" not in style and "@import" not in style
    assert "default-src 'none'" in page  # the CSP forbids fetches even if something slipped through
    return refs


def test_html_is_self_contained_and_escapes_records(run_dir):
    paths = [run_dir["dir"] / "scan.jsonl", run_dir["dir"] / "answers.jsonl"]
    s = report([str(p) for p in paths], out="r.html")
    page = Path("r.html").read_text()
    refs = assert_offline_page(page)
    assert "<script>alert" not in page and 'onerror="alert' not in page
    assert "&lt;img src=&quot;http://evil.example/x.png&quot;" in page  # shown as text
    thumbs = [u for t, a, u in refs.urls if t == "img"]
    assert len(thumbs) == s["scan"][0]["unsafe"] and all(u.startswith("data:image/jpeg;base64,") for u in thumbs)
    links = [u for t, a, u in refs.urls if t == "a"]
    assert (run_dir["dir"] / "noise.png").resolve().as_uri() in links
    assert f"{s['scan'][0]['unsafe']:,} ({100 * s['scan'][0]['unsafe_rate']:.1f}% of ok)" in page
    assert "corrupt image data &lt;i&gt;0&lt;/i&gt;" in page and "line 31" in page


def test_thumbnails_only_from_allowed_roots_and_parquet(run_dir, tmp_path_factory):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    d = run_dir["dir"]
    outside = tmp_path_factory.mktemp("elsewhere") / "private.png"
    Image.new("RGB", (90, 60), (200, 10, 10)).save(outside)
    buf = io.BytesIO()
    Image.new("RGB", (90, 60), (10, 10, 200)).save(buf, "PNG")
    pq.write_table(pa.table({"image": [{"bytes": b"", "path": "a"}, {"bytes": buf.getvalue(), "path": "b"}]}),
                   d / "imgs.parquet")
    rng = random.Random(5)
    recs = [scan_record(i, rng, image=src) for i, src in enumerate([str(outside), "imgs.parquet#1", "imgs.parquet#0"])]
    for r, digest in zip(recs, [sha256_of(outside), hashlib.sha256(buf.getvalue()).hexdigest(), hashlib.sha256(b"").hexdigest()]):
        r.update(verdict="unsafe", score=0.1, unsafe_patches=[0], box_categories=["violence"], sha256=digest)
    (d / "s2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    report(["s2.jsonl"], out="r2.html")
    page = Path("r2.html").read_text()
    assert page.count('src="data:image/jpeg') == 1  # only the Parquet row with bytes
    assert "outside the allowed folders" in page and "no image bytes in that Parquet row" in page
    report(["s2.jsonl"], out="r3.html", image_root=[str(d), str(outside.parent)])
    assert Path("r3.html").read_text().count('src="data:image/jpeg') == 2


def test_ten_thousand_records_stay_bounded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (90, 60), (120, 60, 30)).save("img.png")
    rng = random.Random(7)
    base = {**scan_record(0, rng, image="img.png"), "sha256": sha256_of("img.png")}
    with open("big.jsonl", "w") as f:
        for i in range(10_000):
            s = round(rng.uniform(0.3, 0.6), 4)
            f.write(json.dumps({**base, "id": f"i{i}", "score": s, "verdict": "unsafe" if s <= TAU else "safe",
                                "categories": {c: s for c in CATS}}) + "\n")
    s = report(["big.jsonl"], out="big.html", max_thumbnails=50, max_rows=300)
    size = Path("big.html").stat().st_size
    page = Path("big.html").read_text()
    assert s["scan"][0]["records"] == 10_000 and s["scan"][0]["unsafe"] > 300
    assert size < 600_000, size
    assert f"Showing the 300 of {s['scan'][0]['unsafe']:,} flagged items" in page
    assert page.count('src="data:image/jpeg') == 50


# --------------------------------------------------------------------------- CLI


def _app():
    from cli.report import report_command

    app = typer.Typer()
    app.command("report")(report_command)
    app.command("noop")(lambda: None)  # two commands: keep "report" as a subcommand like cli/main.py
    return app


def test_cli_exit_codes_and_help(run_dir):
    runner = CliRunner()
    app = _app()
    res = runner.invoke(app, ["report", "--help"])
    assert res.exit_code == 0 and "guardalign report scan.jsonl" in res.output
    res = runner.invoke(app, ["report", "scan.jsonl", "answers.jsonl", "-o", "r.html"])
    assert res.exit_code == 3 and Path("r.html").is_file()  # written, but malformed records were found
    res = runner.invoke(app, ["report", "answers.jsonl", "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["answers"]["ok"] == 40
    res = runner.invoke(app, ["report", "nope.jsonl", "-o", "x.html"])
    assert res.exit_code == 2 and "no such file" in res.output and not Path("x.html").exists()


# --------------------------------------------------------------------------- headless Chromium


def _chromium(page: Path, work: Path) -> tuple[str, Path, dict]:
    """Render ``page``: (dumped DOM, screenshot path, net log) from one headless Chromium run."""
    shot, netlog = work / "shot.png", work / "net.json"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
           "--disable-features=NetworkTimeServiceQuerying", f"--user-data-dir={work / 'profile'}",
           f"--screenshot={shot}", "--window-size=1280,2000", f"--log-net-log={netlog}", "--dump-dom",
           page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout, shot, json.loads(netlog.read_text())


def page_requests(netlog: dict) -> list[str]:
    """URLs the page itself asked for. Browser-internal requests (initiator 'not an origin') are not the page's."""
    types = {v: k for k, v in netlog["constants"]["logEventTypes"].items()}
    urls = []
    for e in netlog["events"]:
        p = e.get("params") or {}
        if types.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in p and p.get("initiator") != "not an origin":
            urls.append(p["url"])
    return [u for u in urls if not u.startswith(("file:", "data:"))]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium not installed (apt-get install chromium)")
def test_rendered_in_headless_chromium(run_dir, tmp_path_factory):
    paths = [run_dir["dir"] / "scan.jsonl", run_dir["dir"] / "answers.jsonl"]
    s = report([str(p) for p in paths], out="r.html")
    work = tmp_path_factory.mktemp("chromium")
    dom, shot, netlog = _chromium(Path("r.html"), work)

    text = re.sub(r"<[^>]+>", " ", dom)
    run, a = s["scan"][0], s["answers"]
    for needle in [f"{run['unsafe']:,} ({100 * run['unsafe_rate']:.1f}% of ok)", f"{run['threshold']:.4f}",
                   f"{a['refused']:,} ({100 * a['refusal_rate']:.1f}% of ok)", f"Malformed records ({len(MALFORMED_SCAN)})",
                   f"{run['unsafe']} of {run['unsafe']} rows shown",  # written by the page's JS: it ran
                   f"{a['ok']} of {a['ok']} rows shown"]:
        assert needle in text, needle
    assert "<script>alert" not in dom

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1280)
    non_white = (img.min(axis=2) < 235).mean()
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert non_white > 0.08 and colours > 200, (non_white, colours)
    assert page_requests(netlog) == []

    # Control: the same check does see a request when a page makes one.
    bad = work / "bad.html"
    bad.write_text('<html><body><h1>x</h1><img src="http://example.invalid/pixel.png"></body></html>')
    _, _, netlog = _chromium(bad, tmp_path_factory.mktemp("chromium-control"))
    assert "http://example.invalid/pixel.png" in page_requests(netlog)
