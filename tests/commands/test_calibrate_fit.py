"""calibrate: small-sample warnings with intervals, and the tuned YAML's fitted_for (read back by the Detector)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from guardalign.commands.calibrate import MIN_PER_LABEL, calibrate
from guardalign.detection.anchors import FittedFor, load_anchors
from guardalign.detection.thresholds import wilson_interval

ANCHORS = "categories:\n  - name: alpha\n    variants: [an alpha, alpha sign]\n  - name: beta\n    variants: [a beta]\n"


def _rec(a, b, label, **extra):
    return {"status": "ok", "method": "ot", "score": min(a, b), "categories": {"alpha": a, "beta": b},
            "label": label, **extra}


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def anchors_file(tmp_path) -> Path:
    p = tmp_path / "anchors.yaml"
    p.write_text(ANCHORS)
    return p


def test_tiny_sample_warns_with_intervals_even_when_quiet(tmp_path, anchors_file):
    rows = [_rec(0.1, 0.9, "unsafe", category="alpha"), _rec(0.6, 0.9, "safe"), _rec(0.7, 0.8, "safe")]
    lab = _write(tmp_path / "lab.jsonl", rows)
    res = calibrate(lab, anchors=anchors_file, target_fpr=0.05, bootstrap=20, progress=False)
    assert (res.n_pos, res.n_neg) == (1, 2)
    assert res.tpr_ci == wilson_interval(1, 1) and res.fpr_ci == wilson_interval(0, 2)
    first = res.warnings[0]
    assert "only 1 unsafe and 2 safe images" in first and f"fewer than {MIN_PER_LABEL}" in first
    lo, hi = wilson_interval(1, 1)
    assert f"{lo:.2f}–{hi:.2f}" in first and f"0.00–{wilson_interval(0, 2)[1]:.2f}" in first
    assert any("--target-fpr 0.05 is finer than 2 safe images" in w for w in res.warnings)
    # through the CLI with -q: no tables, but the warning lines, and the JSON summary carries them
    out = tmp_path / "tuned.yaml"
    r = CliRunner().invoke(app, ["calibrate", str(lab), "--anchors", str(anchors_file), "-q", "--bootstrap", "20",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "warning: τ = " in r.stderr and "only 1 unsafe and 2 safe" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["warnings"] == res.warnings and summary["fpr_ci"] == list(wilson_interval(0, 2))
    # synthetic lines carry no settings: only the method is known, and only that is recorded
    assert load_anchors(out).fitted_for == FittedFor(method="ot") and summary["fitted_for"] == {"method": "ot"}


def test_enough_images_no_warning(tmp_path, anchors_file):
    rng = np.random.default_rng(0)
    rows = [_rec(float(rng.uniform(0, 0.5)), 0.9, "unsafe") for _ in range(MIN_PER_LABEL)]
    rows += [_rec(float(rng.uniform(0.4, 1)), 0.9, "safe") for _ in range(MIN_PER_LABEL * 2)]
    res = calibrate(_write(tmp_path / "lab.jsonl", rows), anchors=anchors_file, target_fpr=0.05, bootstrap=20,
                    progress=False)
    assert res.warnings == []


def test_fitted_for_from_records_that_disagree_keeps_only_what_they_share(tmp_path, anchors_file):
    s1 = {"model": "ViT-B-32:openai", "method": "ot", "patches": "grid", "grid": 3, "stride": 1.0}
    s2 = {**s1, "grid": 4}
    rows = [_rec(0.1, 0.9, "unsafe", settings=s1), _rec(0.2, 0.9, "unsafe", settings=s2),
            _rec(0.6, 0.9, "safe", settings=s1), _rec(0.7, 0.9, "safe", settings=s1)]
    out = tmp_path / "tuned.yaml"
    res = calibrate(_write(tmp_path / "lab.jsonl", rows), anchors=anchors_file, bootstrap=20, progress=False, out=out)
    assert res.fitted_for == {"model": "ViT-B-32", "pretrained": "openai", "method": "ot", "patches": "grid",
                              "stride": 1.0}  # grid differs between the records: not claimed
    text = out.read_text()
    assert "fitted_for:" in text and "written by guardalign calibrate" in text
    assert text.startswith(f"tau: {res.chosen.threshold}\n" + ANCHORS)  # τ added before categories, rest kept


def test_tuned_yaml_records_real_settings_and_detector_warns_on_others(tmp_path, anchors_file, tiny_clip_config,
                                                                     tiny_clip_checkpoint):
    from guardalign.detection.detector import Detector

    rng = np.random.default_rng(0)
    rows = []
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / f"i{k}.png")
        rows.append({"image": f"i{k}.png", "label": "unsafe" if k % 2 else "safe"})
    out = tmp_path / "tuned.yaml"
    calibrate(_write(tmp_path / "lab.jsonl", rows), anchors=anchors_file, clip_model=str(tiny_clip_config),
              pretrained=str(tiny_clip_checkpoint), device="cpu", grid=2, stride=0.5, target_fpr=0.5, bootstrap=20,
              out=out, progress=False)
    tuned = load_anchors(out)
    assert tuned.fitted_for == FittedFor(model="tiny-clip.json", pretrained=str(Path(tiny_clip_checkpoint).resolve()),
                                         method="ot", patches="grid", grid=2, stride=0.5)
    opts = dict(clip_model=str(tiny_clip_config), pretrained=str(tiny_clip_checkpoint), device="cpu", anchors=tuned)
    same = Detector.from_options(grid=2, stride=0.5, **opts)
    assert same.fitted_for_warning() is None
    other = same.with_config(grid=3)
    msg = other.fitted_for_warning()
    assert msg is not None and "\n" not in msg
    assert "fitted for grid=2" in msg and "this run uses grid=3" in msg and str(out) in msg and "stride" not in msg
    dense = same.with_config(patches="dense")
    assert "patches=grid" in dense.fitted_for_warning() and "patches=dense" in dense.fitted_for_warning()
    assert same.with_config(grid=3, tau=0.5).fitted_for_warning() is None  # --tau: the file's τ is not used
    assert same.with_config(grid=3, method="global").fitted_for_warning() is None  # global uses θ
    plain = Detector(same.encoder, load_anchors(anchors_file), same.config.__class__(grid=3))
    assert plain.fitted_for_warning() is None  # nothing recorded, nothing to compare
