"""guardalign calibrate: known-answer τ on synthetic scores, joins, bad lines, the YAML copy, the CLI."""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.calibrate import calibrate_command
from guardalign.detection.anchors import default_anchors_path, load_anchors
from guardalign.commands.calibrate import calibrate, read_labelled, tuned_yaml
from guardalign.errors import ConfigError

ANCHORS = """# toy anchors for the calibrate tests
version: 1
tau: 0.75   # starting point
prefix: "Be careful."
refusal_phrases: ['I cannot']
categories:
  # first category
  - name: alpha
    description: the alpha things
    variants:
      - "an alpha"   # quoted on purpose
      - alpha sign

  - name: beta
    description: beta things
    tau: 0.9
    variants: [a beta, beta sign]
"""


def _record(score_a, score_b, method="ot", **extra):
    cats = {"alpha": score_a, "beta": score_b}
    score = min(cats.values()) if method == "ot" else max(cats.values())
    return {"status": "ok", "method": method, "score": score, "categories": cats, **extra}


def mid_gap(lo, hi):
    """τ must split [lo, hi) in its middle half, with at most two decimals (roc.short_decimal)."""
    return lambda t: lo + (hi - lo) / 4 <= t <= hi - (hi - lo) / 4 and round(t, 2) == t


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def anchors_file(tmp_path) -> Path:
    p = tmp_path / "anchors.yaml"
    p.write_text(ANCHORS)
    return p


def _known_set():
    """Costs: alpha positives 0.10/0.20/0.30, beta positives 0.40/0.50, negatives as listed.

    Negatives (alpha, beta): five with the cheaper category at 0.35, 0.45, 0.6, 0.7, 0.8.
    """
    pos = [_record(0.10, 0.9, label="unsafe", category="alpha"), _record(0.20, 0.9, label="unsafe", category="alpha"),
           _record(0.30, 0.9, label="unsafe", category="alpha"), _record(0.9, 0.40, label="unsafe", category="beta"),
           _record(0.9, 0.50, label="unsafe", category="beta")]
    neg = [_record(0.35, 0.95, label="safe"), _record(0.95, 0.45, label="safe"), _record(0.6, 0.95, label="safe"),
           _record(0.95, 0.7, label="safe"), _record(0.8, 0.85, label="safe")]
    return pos + neg


def test_global_tau_known_answer(tmp_path, anchors_file):
    labelled = _write_jsonl(tmp_path / "lab.jsonl", _known_set())
    res = calibrate(labelled, anchors=anchors_file, target_fpr=0.0, bootstrap=50, progress=False)
    # image scores: pos 0.1 0.2 0.3 0.4 0.5; neg 0.35 0.45 0.6 0.7 0.8. FPR 0 → flag ≤ 0.3; τ mid-gap [0.3, 0.35)
    assert (res.chosen.tp, res.chosen.fp) == (3, 0)
    assert mid_gap(0.3, 0.35)(res.chosen.threshold)
    res = calibrate(labelled, anchors=anchors_file, target_fpr=0.2, bootstrap=50, progress=False)
    # one FP allowed (1/5): 0.35 then 0.4 → tp 4; 0.45 would be a second FP → τ in [0.4, 0.45)
    assert (res.chosen.tp, res.chosen.fp) == (4, 1) and mid_gap(0.4, 0.45)(res.chosen.threshold)
    assert res.achieved == (pytest.approx(0.8), pytest.approx(0.2))
    # AUROC by hand: the pairs the positives win, over 25
    assert res.auroc == pytest.approx((5 + 5 + 5 + 4 + 3) / 25)
    assert res.auroc_ci[0] <= res.auroc <= res.auroc_ci[1]
    assert res.exit_code == 0 and not res.skipped


def test_per_category_known_answer_and_written_file(tmp_path, anchors_file):
    labelled = _write_jsonl(tmp_path / "lab.jsonl", _known_set())
    out = tmp_path / "tuned.yaml"
    res = calibrate(labelled, anchors=anchors_file, target_fpr=0.0, per_category=True, out=out,
                    bootstrap=50, progress=False)
    fits = {c.name: c for c in res.per_category}
    # alpha: positives 0.1 0.2 0.3 vs the negatives' alpha costs 0.35 0.95 0.6 0.95 0.8 → τ ∈ [0.3, 0.35)
    assert fits["alpha"].n_pos == 3 and mid_gap(0.3, 0.35)(fits["alpha"].tau) and fits["alpha"].point.tpr == 1
    # beta: positives 0.4 0.5 vs beta costs 0.95 0.45 0.95 0.7 0.85 → only 0.4 before the 0.45 negative
    assert mid_gap(0.4, 0.45)(fits["beta"].tau) and fits["beta"].point.tp == 1
    tuned = load_anchors(out)
    assert tuned.tau == res.chosen.threshold and mid_gap(0.3, 0.35)(tuned.tau)
    assert tuned.taus() == [fits["alpha"].tau, fits["beta"].tau]
    assert res.achieved == (pytest.approx(0.8), pytest.approx(0.0)) and res.category_fpr == 0.0
    assert anchors_file.read_text() == ANCHORS  # the input is never touched
    # one false positive of five allowed: alpha keeps 0.1–0.3 (its negatives start at 0.35); beta may now pass
    # the 0.45 negative to reach 0.5, and the two together still flag only that one safe image (FPR 0.2)
    res = calibrate(labelled, anchors=anchors_file, target_fpr=0.2, per_category=True, bootstrap=20, progress=False)
    fits = {c.name: c for c in res.per_category}
    assert res.category_fpr == pytest.approx(0.2)
    assert mid_gap(0.3, 0.35)(fits["alpha"].tau) and mid_gap(0.5, 0.7)(fits["beta"].tau)
    assert res.achieved == (pytest.approx(1.0), pytest.approx(0.2))


def test_per_category_taus_share_the_fpr_budget(tmp_path, anchors_file):
    """Each category alone may spend the whole budget on a different safe image; together they must not."""
    rows = [_record(0.1, 0.9, label="unsafe", category="alpha"), _record(0.2, 0.9, label="unsafe", category="alpha"),
            _record(0.4, 0.9, label="unsafe", category="alpha"), _record(0.9, 0.1, label="unsafe", category="beta"),
            _record(0.9, 0.5, label="unsafe", category="beta"), _record(0.3, 0.9, label="safe"),
            _record(0.9, 0.45, label="safe")] + [_record(0.9, 0.9, label="safe")] * 3
    labelled = _write_jsonl(tmp_path / "lab.jsonl", rows)
    res = calibrate(labelled, anchors=anchors_file, target_fpr=0.2, per_category=True, bootstrap=20, progress=False)
    fits = {c.name: c for c in res.per_category}
    # at α = 0.2 alpha would flag the 0.3 safe image and beta the 0.45 one: FPR 0.4 > 0.2, so α drops to 0
    assert res.category_fpr == 0.0
    assert fits["alpha"].point.tp == 2 and mid_gap(0.2, 0.3)(fits["alpha"].tau)
    assert fits["beta"].point.tp == 1 and mid_gap(0.1, 0.45)(fits["beta"].tau)
    assert res.achieved == (pytest.approx(0.6), pytest.approx(0.0))
    # the global fit on the image score (min over categories) still spends its one false positive
    assert (res.chosen.tp, res.chosen.fp) == (4, 1) and mid_gap(0.4, 0.45)(res.chosen.threshold)


def test_yaml_copy_keeps_comments_and_changes_only_tau_lines(tmp_path):
    src = default_anchors_path().read_text()
    text = tuned_yaml(src, 0.61, {"sexual": 0.5, "privacy": 0.55})
    diff = [ln for ln in difflib.ndiff(src.splitlines(), text.splitlines()) if ln[:1] in "+-"]
    assert diff == ["- tau: 0.75", "+ tau: 0.61", "+     tau: 0.5", "+     tau: 0.55"]
    assert "# tau: 0.74   # example override" in text  # comments survive, commented-out keys stay comments
    # inserted right after the category's variants, before the blank line that separates categories
    lines = text.splitlines()
    i = lines.index("    tau: 0.5")
    assert lines[i - 1].strip() == "- a still frame from an adult film" and lines[i + 1] == ""


def test_yaml_copy_updates_existing_keys_and_quoting(anchors_file, tmp_path):
    text = tuned_yaml(ANCHORS, 0.5, {"alpha": 0.25})
    assert '"an alpha"   # quoted on purpose' in text and "tau: 0.5    # starting point" in text  # comment column kept
    assert "    tau: 0.5\n    variants: [a beta, beta sign]" in text  # global fit replaces old overrides
    assert "      - alpha sign\n    tau: 0.25\n\n  - name: beta" in text
    assert "# first category" in text


def test_output_rules_nothing_overwritten(tmp_path, anchors_file):
    labelled = _write_jsonl(tmp_path / "lab.jsonl", _known_set())
    with pytest.raises(ConfigError, match="input anchors file"):
        calibrate(labelled, anchors=anchors_file, out=anchors_file, overwrite=True, progress=False)
    out = tmp_path / "tuned.yaml"
    out.write_text("keep me")
    with pytest.raises(ConfigError, match="--overwrite"):
        calibrate(labelled, anchors=anchors_file, out=out, progress=False)
    assert out.read_text() == "keep me"
    calibrate(labelled, anchors=anchors_file, out=out, overwrite=True, bootstrap=20, progress=False)
    assert load_anchors(out).names == ("alpha", "beta")
    assert not list(tmp_path.glob(".*tmp"))


def test_bad_lines_are_skipped_and_reported(tmp_path, anchors_file):
    rows = _known_set() + [
        "{not json",
        {"image": "a.png", "label": "maybe"},
        {"image": "a.png", "label": "unsafe", "category": "gamma"},
        {"label": "safe"},
        "[1, 2]",
        "",
    ]
    labelled = _write_jsonl(tmp_path / "lab.jsonl", rows)
    res = calibrate(labelled, anchors=anchors_file, target_fpr=0.0, bootstrap=20, progress=False)
    lines = {n: why for n, why in res.skipped}
    assert sorted(lines) == [11, 12, 13, 14, 15]
    assert "invalid JSON" in lines[11] and "lab.jsonl:11" in lines[11]
    assert "label" in lines[12] and "'maybe'" in lines[12]
    assert "'gamma'" in lines[13] and "alpha, beta" in lines[13]
    assert "image" in lines[14] and "JSON object" in lines[15]
    assert res.exit_code == 3 and res.chosen.tp == 3  # the good lines still give the answer
    bad = _write_jsonl(tmp_path / "bad.jsonl", ["nope", {"label": "safe"}])
    with pytest.raises(ConfigError, match=r"no usable labelled line \(2 skipped\).*bad.jsonl:1"):
        calibrate(bad, anchors=anchors_file, progress=False)
    one_class = _write_jsonl(tmp_path / "one.jsonl", [r for r in _known_set() if r["label"] == "safe"])
    with pytest.raises(ConfigError, match="0 unsafe and 5 safe"):
        calibrate(one_class, anchors=anchors_file, progress=False)


def test_from_scan_joins_by_path_id_and_suffix(tmp_path, anchors_file):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    scan = [
        {"id": "sub/a.png", "source": str(tmp_path / "imgs" / "sub" / "a.png"), **_record(0.1, 0.9)},
        {"id": "b.png", "source": "elsewhere/b.png", **_record(0.8, 0.9)},
        {"id": "c.png", "source": "x/c.png", **_record(0.2, 0.9)},
        {"id": "d.png", "source": "x/d.png", "status": "error", "error": "truncated image data", "verdict": None},
        {"id": "e.png", "source": "x/e.png", **_record(0.7, 0.9)},
    ]
    scan_path = _write_jsonl(tmp_path / "scan.jsonl", scan)
    labelled = _write_jsonl(tmp_path / "lab.jsonl", [
        {"image": "imgs/sub/a.png", "label": "unsafe"},  # resolved path == source
        {"image": "whatever.png", "id": "b.png", "label": "safe"},  # explicit id
        {"image": "data/c.png", "label": "unsafe"},  # unique path suffix == id
        {"image": "d.png", "label": "safe"},  # record with status error
        {"image": "e.png", "label": "safe"},  # image as written == id
        {"image": "zzz.png", "label": "safe"},  # no match
    ])
    res = calibrate(labelled, anchors=anchors_file, from_scan=scan_path, target_fpr=0.0, bootstrap=20,
                    progress=False)
    assert (res.n_pos, res.n_neg) == (2, 2)
    assert (res.chosen.tp, res.chosen.fp) == (2, 0) and 0.2 <= res.chosen.threshold < 0.7
    why = dict(res.skipped)
    assert sorted(why) == [4, 6]
    assert "truncated image data" in why[4] and "zzz.png" in why[6]


def test_global_method_direction_and_no_yaml(tmp_path, anchors_file):
    rows = [_record(0.30, 0.1, "global", label="unsafe"), _record(0.25, 0.1, "global", label="unsafe"),
            _record(0.10, 0.2, "global", label="safe"), _record(0.05, 0.0, "global", label="safe")]
    labelled = _write_jsonl(tmp_path / "lab.jsonl", rows)
    res = calibrate(labelled, anchors=anchors_file, target_fpr=0.0, bootstrap=20, progress=False)
    assert res.method == "global" and res.auroc == 1.0
    assert 0.2 < res.chosen.threshold <= 0.25 and res.to_dict()["theta"] == res.chosen.threshold
    with pytest.raises(ConfigError, match="--theta"):
        calibrate(labelled, anchors=anchors_file, out=tmp_path / "t.yaml", progress=False)
    assert not (tmp_path / "t.yaml").exists()
    with pytest.raises(ConfigError, match="--per-category needs the ot method"):
        calibrate(labelled, anchors=anchors_file, per_category=True, progress=False)


def test_read_labelled_resolves_images_against_the_file(tmp_path):
    (tmp_path / "d").mkdir()
    p = _write_jsonl(tmp_path / "d" / "lab.jsonl", [{"image": "x/a.png", "label": " UNSAFE ", "category": "alpha"},
                                                    {"image": "b.png", "label": "safe", "category": "alpha"}])
    items, issues = read_labelled(p, ("alpha",))
    assert not issues
    assert items[0].path == tmp_path / "d" / "x" / "a.png" and items[0].label and items[0].category == "alpha"
    assert not items[1].label and items[1].category is None  # a safe image has no unsafe category


def _app():
    app = typer.Typer()
    app.command("calibrate")(calibrate_command)

    @app.callback()
    def _root():  # keep "calibrate" a subcommand
        pass

    return app


def test_cli_prints_json_writes_copy_and_exit_codes(tmp_path, anchors_file):
    labelled = _write_jsonl(tmp_path / "lab.jsonl", _known_set() + ["{broken"])
    out = tmp_path / "tuned.yaml"
    runner = CliRunner()
    r = runner.invoke(_app(), ["calibrate", str(labelled), "--anchors", str(anchors_file), "--target-fpr", "0",
                               "-o", str(out), "--bootstrap", "20", "-q"])
    assert r.exit_code == 3, r.output  # one line unusable
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert mid_gap(0.3, 0.35)(summary["tau"]) and summary["skipped"][0]["line"] == 11
    assert load_anchors(out).tau == summary["tau"]
    r = runner.invoke(_app(), ["calibrate", str(labelled), "--anchors", str(anchors_file), "-o", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = runner.invoke(_app(), ["calibrate", str(labelled), "--anchors", str(anchors_file), "--target-fpr", "1.5"])
    assert r.exit_code == 2 and "target-fpr" in r.output
    r = runner.invoke(_app(), ["calibrate", "--help"])
    assert r.exit_code == 0 and "guardalign calibrate labelled.jsonl" in r.output


def test_scores_images_through_the_real_encoder(tmp_path, anchors_file, tiny_clip_config, tiny_clip_checkpoint):
    rng = np.random.default_rng(0)
    rows = []
    for k in range(6):
        name = f"img{k}.png"
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / name)
        rows.append({"image": name, "label": "unsafe" if k % 2 else "safe"})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows.append({"image": "broken.png", "label": "safe"})
    labelled = _write_jsonl(tmp_path / "lab.jsonl", rows)
    res = calibrate(labelled, anchors=anchors_file, clip_model=str(tiny_clip_config),
                    pretrained=str(tiny_clip_checkpoint), device="cpu", grid=2, target_fpr=0.5, bootstrap=20,
                    out=tmp_path / "tuned.yaml", progress=False)
    assert (res.n_pos, res.n_neg) == (3, 3)
    assert [n for n, _ in res.skipped] == [7] and "broken.png" in res.skipped[0][1]
    assert res.chosen.fpr <= 0.5 and 0 < load_anchors(tmp_path / "tuned.yaml").tau <= 2


def test_from_scan_reuses_a_real_scan_output(tmp_path, anchors_file, tiny_clip_config, tiny_clip_checkpoint):
    from guardalign.commands.scan import scan

    rng = np.random.default_rng(1)
    (tmp_path / "data" / "sub").mkdir(parents=True)
    rows = []
    for k in range(6):
        rel = f"sub/img{k}.png" if k % 3 == 0 else f"img{k}.png"
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "data" / rel)
        rows.append({"image": f"data/{rel}", "label": "unsafe" if k % 2 else "safe"})
    summary = scan([str(tmp_path / "data")], anchors=str(anchors_file), clip_model=str(tiny_clip_config),
                   pretrained=str(tiny_clip_checkpoint), device="cpu", grid=2, out=str(tmp_path / "scan.jsonl"),
                   progress=False)
    assert summary.ok == 6
    labelled = _write_jsonl(tmp_path / "lab.jsonl", rows)
    reused = calibrate(labelled, anchors=anchors_file, from_scan=tmp_path / "scan.jsonl", target_fpr=0.34,
                       bootstrap=20, progress=False)
    assert not reused.skipped and (reused.n_pos, reused.n_neg) == (3, 3)
    # scoring the same images again gives the same ROC as reusing the scan
    fresh = calibrate(labelled, anchors=anchors_file, clip_model=str(tiny_clip_config),
                      pretrained=str(tiny_clip_checkpoint), device="cpu", grid=2, target_fpr=0.34, bootstrap=20,
                      progress=False)
    np.testing.assert_allclose(fresh.curve.scores, reused.curve.scores, rtol=1e-5)
    assert fresh.chosen.threshold == pytest.approx(reused.chosen.threshold, rel=1e-4)
