"""A scan-only user's anchors: a YAML of at most 4 keys scans end to end, and τ = 0 flags nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from badinputs import make_good_images
from guardalign.commands.scan import scan

# 4 keys in all: tau, categories, name, variants
FOUR_KEYS = """\
tau: 0
categories:
  - name: guns
    variants: [a photo of a gun, a photo of a rifle]
"""


@pytest.fixture()
def model_kwargs(tiny_clip_config, tiny_clip_checkpoint):
    return dict(clip_model=str(tiny_clip_config), pretrained=str(tiny_clip_checkpoint), device="cpu",
                batch_size=4, workers=1, progress=False)


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_four_key_anchors_scan_and_tau_zero_flags_nothing(tmp_path, model_kwargs):
    imgs = make_good_images(tmp_path / "imgs", n=3)
    anchors = tmp_path / "mine.yaml"
    anchors.write_text(FOUR_KEYS)
    out = tmp_path / "scan.jsonl"
    summary = scan([str(tmp_path / "imgs")], anchors=str(anchors), out=str(out), **model_kwargs)
    recs = _records(out)
    assert summary.exit_code == 0 and len(recs) == len(imgs)
    assert all(r["status"] == "ok" and r["verdict"] == "safe" and r["threshold"] == 0.0 for r in recs)
    assert all(set(r["categories"]) == {"guns"} and r["category"] == "guns" for r in recs)
    # the same anchors with --tau 2 (every cost is ≤ 2) flag every image: the custom category is live
    out2 = tmp_path / "scan2.jsonl"
    scan([str(tmp_path / "imgs")], anchors=str(anchors), out=str(out2), tau=2.0, **model_kwargs)
    assert {r["verdict"] for r in _records(out2)} == {"unsafe"}
    # --tau 0 overrides a positive τ in the file and flags nothing
    anchors.write_text(FOUR_KEYS.replace("tau: 0", "tau: 2"))
    out3 = tmp_path / "scan3.jsonl"
    scan([str(tmp_path / "imgs")], anchors=str(anchors), out=str(out3), tau=0.0, **model_kwargs)
    assert {r["verdict"] for r in _records(out3)} == {"safe"}


def test_tau_zero_on_the_command_line(tmp_path, tiny_clip_config, tiny_clip_checkpoint):
    from typer.testing import CliRunner

    from cli.main import app

    make_good_images(tmp_path / "imgs", n=2)
    anchors = tmp_path / "mine.yaml"
    anchors.write_text("categories:\n  - name: guns\n    variants: [a photo of a gun]\n")  # 3 keys
    out = tmp_path / "scan.jsonl"
    res = CliRunner().invoke(app, ["scan", str(tmp_path / "imgs"), "--anchors", str(anchors), "--tau", "0",
                                   "--fail-on-unsafe", "--out", str(out), "--clip-model", str(tiny_clip_config),
                                   "--pretrained", str(tiny_clip_checkpoint), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert [r["verdict"] for r in _records(out)] == ["safe", "safe"]


def test_anchors_with_empty_prefix_answer_without_a_prefix(tmp_path, tiny_clip_config, tiny_clip_checkpoint):
    """`prefix: ""` in an anchors file: answer runs, calibrated, with no prefix in the chat."""
    import json as _json

    from guardalign.commands.answer import answer
    from lvlm_fixtures import make_image, make_tiny_lvlm

    make_image(tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text(_json.dumps({"id": "x", "image": "a.png", "prompt": "Describe it."}) + "\n")
    (tmp_path / "mine.yaml").write_text('prefix: ""\n' + FOUR_KEYS)
    model = make_tiny_lvlm("llava", tmp_path / "llava")
    out = tmp_path / "a.jsonl"
    summary = answer(str(tmp_path / "p.jsonl"), model=str(model), out=str(out), anchors=str(tmp_path / "mine.yaml"),
                     clip_model=str(tiny_clip_config), pretrained=str(tiny_clip_checkpoint), device="cpu",
                     max_new_tokens=3, layers="1:3", progress=False)
    (rec,) = _records(out)
    assert summary.exit_code == 0 and rec["status"] == "ok", rec["error"]
    assert rec["calibration"]["prefix"] == "" and rec["detection"]["verdict"] == "safe"  # tau: 0 flags nothing
    assert rec["prefix_attention"]["calibrated"] == rec["prefix_attention"]["vanilla"]  # nothing to attend to
