"""`guardalign scan` end to end through the CLI, on a tiny random CLIP loaded from config + checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from badinputs import EXPECTED, make_bad_inputs, make_good_images, make_parquet_variants
from cli.main import app

RECORD_FIELDS = {
    "id", "source", "status", "error", "verdict", "score", "threshold", "category", "categories",
    "unsafe_patches", "boxes", "box_categories", "grid", "patch_scores", "patch_boxes", "width", "height",
    "method", "patches", "model", "anchors_sha256", "sha256", "notes", "elapsed_s", "encodes",
}


@pytest.fixture()
def model_args(tiny_clip_config, tiny_clip_checkpoint):
    return ["--clip-model", str(tiny_clip_config), "--pretrained", str(tiny_clip_checkpoint), "--device", "cpu",
            "--batch-size", "4", "--workers", "2"]


def run(args, input=None):
    return CliRunner().invoke(app, ["scan", *args], input=input, catch_exceptions=False)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_folder_to_jsonl_records(tmp_path, model_args):
    imgs = tmp_path / "imgs"
    make_good_images(imgs / "sub", n=2)
    make_good_images(imgs, n=3, ext=".jpg")
    out = tmp_path / "scan.jsonl"
    res = run([str(imgs), "--out", str(out), *model_args])
    assert res.exit_code == 0, res.output
    recs = lines(out)
    assert [r["id"] for r in recs] == sorted(r["id"] for r in recs)  # sorted traversal
    assert {r["id"] for r in recs} == {"img0.jpg", "img1.jpg", "img2.jpg", "sub/img0.png", "sub/img1.png"}
    for r in recs:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert r["status"] == "ok" and r["verdict"] in ("safe", "unsafe") and r["method"] == "ot"
        assert r["sha256"] == hashlib.sha256((imgs / r["id"]).read_bytes()).hexdigest()
    assert res.stdout == ""  # data went to the file; stdout stays empty


@pytest.mark.parametrize("flags,encodes,n_patches", [
    (["--patches", "grid", "--grid", "3", "--scales", "2"], 14, 13),
    (["--patches", "grid", "--grid", "2", "--stride", "0.5"], 10, 9),
    (["--patches", "search", "--grid", "3", "--budget", "19"], 19, 18),
    ([], 30, 29),  # the default: grid 5×5 + 2×2
    (["--grid", "3"], 10, 9),  # a grid given alone means that grid only (no default extra scale)
    (["--patches", "search"], 28, 27),  # search's own defaults: grid 3, budget 28 (2 windows re-cut into 9)
    (["--patches", "search", "--grid", "2", "--stride", "0.5", "--budget", "30"], 28, 27),
    (["--patches", "dense", "--dense-path", "sclip"], 1, 16),
])
def test_layout_flags_reach_the_records(tmp_path, model_args, flags, encodes, n_patches):
    make_good_images(tmp_path / "imgs", n=2)
    out = tmp_path / "scan.jsonl"
    res = run([str(tmp_path / "imgs"), "--out", str(out), *model_args, *flags])
    assert res.exit_code == 0, res.output
    for r in lines(out):
        mode = flags[flags.index("--patches") + 1] if "--patches" in flags else "grid"
        assert r["patches"] == mode and r["encodes"] == encodes
        assert len(r["patch_boxes"]) == n_patches


@pytest.mark.parametrize("flags,needle", [(["--scales", "2,x"], "--scales"), (["--patches", "search", "--budget", "5"], "budget"),
                                          (["--dense-path", "nope"], "dense_path")])
def test_bad_layout_flags_exit_2_with_nothing_written(tmp_path, model_args, flags, needle):
    make_good_images(tmp_path / "imgs", n=1)
    out = tmp_path / "scan.jsonl"
    res = CliRunner().invoke(app, ["scan", str(tmp_path / "imgs"), "--out", str(out), *model_args, *flags])
    assert res.exit_code == 2 and needle in res.output and not out.exists()


def test_stdout_carries_only_records_and_stdin_lists(tmp_path, model_args):
    paths = make_good_images(tmp_path, n=3)
    res = run(["-", "--out", "-", *model_args], input="\n".join(map(str, paths)) + "\n")
    assert res.exit_code == 0
    recs = [json.loads(line) for line in res.stdout.splitlines()]  # every stdout line is a record
    assert [r["id"] for r in recs] == [str(p) for p in paths]


@pytest.mark.parametrize(
    "tau, gate, code, verdict",
    [("2.0", ["--fail-on-unsafe"], 1, "unsafe"), ("0.0001", ["--fail-on-unsafe"], 0, "safe"),
     ("2.0", ["--max-unsafe-rate", "0.5"], 1, "unsafe"), ("2.0", [], 0, "unsafe"),
     ("0.0001", ["--max-unsafe-rate", "0"], 0, "safe")],
)
def test_exit_codes_and_gates(tmp_path, model_args, tau, gate, code, verdict):
    make_good_images(tmp_path / "in", n=3)
    out = tmp_path / "o.jsonl"
    res = run([str(tmp_path / "in"), "--out", str(out), "--tau", tau, *gate, *model_args])
    assert res.exit_code == code, res.output
    assert {r["verdict"] for r in lines(out)} == {verdict}
    if code == 1:
        assert "GATE FAILED" in res.stderr


def test_every_bad_input_is_a_record_and_the_run_goes_on(tmp_path, model_args):
    made = make_bad_inputs(tmp_path / "bad")
    out = tmp_path / "o.jsonl"
    res = run([str(tmp_path / "bad"), "--out", str(out), *model_args])
    assert res.exit_code == 3, res.output  # finished, some inputs unreadable
    by_name = {Path(r["id"]).stem: r for r in lines(out)}
    for name, (kind, expect) in EXPECTED.items():
        if name not in made:
            continue
        if name == "unreadable" and os.geteuid() == 0:
            continue  # root reads mode-000 files
        rec = by_name[name]
        if kind == "error":
            assert rec["status"] == "error" and expect in rec["error"], (name, rec)
        else:
            assert rec["status"] == "ok", (name, rec)
            assert (rec["width"], rec["height"]) == expect, name
    assert any("frames" in n for n in by_name["animated_gif"]["notes"])


def test_parquet_inputs_every_layout(tmp_path, model_args):
    pq = make_parquet_variants(tmp_path / "pq")
    out = tmp_path / "o.jsonl"
    res = run([str(pq["hf_struct"]), str(pq["binary"]), str(pq["paths"]), "--out", str(out), *model_args])
    assert res.exit_code == 0, res.output
    recs = lines(out)
    assert [r["id"] for r in recs] == ["hf_struct.parquet#0", "hf_struct.parquet#1", "hf_struct.parquet#2",
                                      "binary.parquet#0", "binary.parquet#1", "binary.parquet#2",
                                      "paths.parquet#0", "paths.parquet#1"]
    assert all(r["status"] == "ok" for r in recs)
    res = run([str(pq["ids"]), "--id-column", "key", "--out", str(tmp_path / "ids.jsonl"), *model_args])
    assert [r["id"] for r in lines(tmp_path / "ids.jsonl")] == ["a", "b", "c"]


def test_parquet_bad_cells_and_truncated_file(tmp_path, model_args):
    pq = make_parquet_variants(tmp_path / "pq")
    out = tmp_path / "o.jsonl"
    res = run([str(pq["null_cell"]), str(pq["bad_bytes"]), str(pq["truncated"]), "--out", str(out), *model_args])
    assert res.exit_code == 3, res.output
    recs = lines(out)
    status = [(r["id"], r["status"]) for r in recs]
    assert status[0] == ("null_cell.parquet#0", "ok") and status[1] == ("null_cell.parquet#1", "error")
    assert ("bad_bytes.parquet#0", "ok") in status and ("bad_bytes.parquet#1", "error") in status
    trunc = [r for r in recs if r["source"].startswith(str(pq["truncated"]))]
    assert trunc and all(r["status"] == "error" for r in trunc)


@pytest.mark.parametrize("variant, column, needle", [("no_image", None, "image column"),
                                                     ("int_image", "image", "int64"),
                                                     ("hf_struct", "nope", "nope")])
def test_unusable_parquet_column_is_usage_error_with_nothing_written(tmp_path, model_args, variant, column, needle):
    pq = make_parquet_variants(tmp_path / "pq")
    out = tmp_path / "o.jsonl"
    args = [str(pq[variant]), "--out", str(out), *model_args] + (["--image-column", column] if column else [])
    res = run(args)
    assert res.exit_code == 2
    assert needle in res.stderr and variant in res.stderr
    assert not out.exists()


def test_bad_anchors_yaml_exit_2_names_line_and_field(tmp_path, model_args):
    make_good_images(tmp_path / "in", n=1)
    bad = tmp_path / "a.yaml"
    bad.write_text("version: 1\ntau: 5\nprefix: x\nrefusal_phrases: [no]\ncategories: []\n")
    out = tmp_path / "o.jsonl"
    res = run([str(tmp_path / "in"), "--anchors", str(bad), "--out", str(out), *model_args])
    assert res.exit_code == 2
    assert "a.yaml:2" in res.stderr and "tau" in res.stderr
    assert not out.exists()


def test_missing_input_and_missing_weights_exit_2(tmp_path, model_args):
    res = run([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.jsonl"), *model_args])
    assert res.exit_code == 2 and "nowhere" in res.stderr
    make_good_images(tmp_path / "in", n=1)
    res = run([str(tmp_path / "in"), "--out", str(tmp_path / "o.jsonl"), "--pretrained", str(tmp_path / "x.bin")])
    assert res.exit_code == 2 and "--pretrained" in res.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_parquet_output_round_trip(tmp_path, model_args):
    import pyarrow.parquet as pq

    make_good_images(tmp_path / "in", n=3)
    jl, pqo = tmp_path / "o.jsonl", tmp_path / "o.parquet"
    assert run([str(tmp_path / "in"), "--out", str(jl), *model_args]).exit_code == 0
    assert run([str(tmp_path / "in"), "--out", str(pqo), "--format", "parquet", *model_args]).exit_code == 0
    table = pq.read_table(pqo).to_pylist()
    for a, b in zip(lines(jl), table):
        assert a["id"] == b["id"] and a["verdict"] == b["verdict"]
        assert a["score"] == pytest.approx(b["score"])
        assert dict(b["categories"]) == pytest.approx(a["categories"]) if isinstance(b["categories"], dict) else True


def test_existing_output_is_not_clobbered(tmp_path, model_args):
    make_good_images(tmp_path / "in", n=1)
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "keep me"}\n')
    res = run([str(tmp_path / "in"), "--out", str(out), *model_args])
    assert res.exit_code == 2
    assert out.read_text() == '{"id": "keep me"}\n'


def test_resume_with_changed_settings_exits_2_naming_them(tmp_path, model_args):
    make_good_images(tmp_path / "in", n=3)
    out = tmp_path / "o.jsonl"
    assert run([str(tmp_path / "in"), "--out", str(out), "--tau", "0.5", *model_args]).exit_code == 0
    before = out.read_bytes()
    res = run([str(tmp_path / "in"), "--out", str(out), "--resume", "--tau", "0.7", "--patches", "dense", *model_args])
    assert res.exit_code == 2, res.output
    assert "tau: 0.5 → 0.7" in res.output and 'patches: "grid" → "dense"' in res.output
    assert out.read_bytes() == before  # nothing appended
    res = run([str(tmp_path / "in"), "--out", str(out), "--resume", "--tau", "0.5", *model_args])
    assert res.exit_code == 0 and out.read_bytes() == before  # same settings: every id already done


def test_overwrite_null_separated_stdin_and_format_from_name(tmp_path, model_args):
    paths = make_good_images(tmp_path / "in", n=2)
    out = tmp_path / "o.parquet"
    names = "\0".join(str(p) for p in sorted(paths)) + "\0"
    res = run(["-", "-0", "--out", str(out), *model_args], input=names)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"PAR1"  # inferred from the name, not JSONL in a .parquet file
    assert run(["-", "-0", "--out", str(out), *model_args], input=names).exit_code == 2  # exists
    assert run(["-", "-0", "--out", str(out), "--overwrite", *model_args], input=names).exit_code == 0
    res = run([str(tmp_path / "in"), "--out", str(tmp_path / "x.parquet"), "--format", "jsonl", *model_args])
    assert res.exit_code == 2 and "disagrees" in res.output


@pytest.mark.slow
def test_resume_after_kill_9_gives_every_id_exactly_once(tmp_path, tiny_clip_config, tiny_clip_checkpoint):
    make_good_images(tmp_path / "in", n=120, size=(16, 16))
    out = tmp_path / "o.jsonl"
    cmd = [sys.executable, "-m", "cli.main", "scan", str(tmp_path / "in"), "--out", str(out),
           "--clip-model", str(tiny_clip_config), "--pretrained", str(tiny_clip_checkpoint),
           "--device", "cpu", "--batch-size", "1", "--workers", "1", "--patches", "grid", "--grid", "4", "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 10):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_text().splitlines()
    assert 10 <= len(partial) < 120, "the kill must land mid-run"
    res = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 120
