"""`guardalign eval` end to end on a tiny random LLaVA and a tiny random CLIP, both loaded from disk."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmark_layouts import make_figstep, make_mmsafety
from guardalign.commands.eval import RECORDS, condense_errors, evaluate, write_summary
from guardalign.errors import ConfigError
from guardalign.models.judges.refusal import refusal_phrase
from guardalign.pipeline.eval_stage import DEFENCES, exact_match, normalize_answer, parse_defences

NEW = 4  # max_new_tokens in these tests
ALL6 = list(DEFENCES)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lvlm_fixtures import make_tiny_lvlm

    root = tmp_path_factory.mktemp("eval")
    return {"llava": make_tiny_lvlm("llava", root / "llava"), "figstep": make_figstep(root / "FigStep"),
            "mmsafety": make_mmsafety(root / "MM"), "root": root}


@pytest.fixture(scope="module")
def lv(world):
    from guardalign.models.lvlm import load_lvlm

    return load_lvlm(str(world["llava"]), device="cpu")


@pytest.fixture(scope="module")
def unsafe_detector(tiny_clip_config, tiny_clip_checkpoint):
    """τ = 2 flags every patch (cost ≤ 2): every image is purified."""
    from guardalign.detection.detector import Detector

    return Detector.from_options(clip_model=str(tiny_clip_config), pretrained=str(tiny_clip_checkpoint),
                                 device="cpu", tau=2.0)


def run(world, lv, detector, out: Path, **kw):
    args = dict(model=str(world["llava"]), out=str(out), max_new_tokens=NEW, loaded_lvlm=lv, detector=detector,
                progress=False, bootstrap=200)
    args.update(kw)
    return evaluate(args.pop("benchmarks"), **args)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RECORDS).read_text().splitlines()]


@pytest.fixture(scope="module")
def full(world, lv, unsafe_detector):
    """figstep + mmsafety, all six defences, refusal judge: the run most tests read."""
    out = world["root"] / "full"
    summary = run(world, lv, unsafe_detector, out,
                  benchmarks=[f"figstep:{world['figstep']}", f"mmsafety:{world['mmsafety']}"])
    return summary, out, records(out)


@pytest.mark.slow
def test_one_record_per_item_and_defence(full):
    summary, out, recs = full
    assert summary.exit_code == 3 and summary.total == len(recs) == 10 * 6  # 10 items (3 bad) × 6 defences
    assert len({r["id"] for r in recs}) == len(recs)
    by_item = Counter(r["item_id"] for r in recs)
    assert set(by_item.values()) == {6} and len(by_item) == 10
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) == 7 * 6 and all(r["id"] == f"{r['item_id']}@{r['defence']}" for r in recs)
    bad = {r["item_id"]: r["error"] for r in recs if r["status"] == "error"}
    assert "safebench.csv:5: image not found" in bad["figstep/ForbidQI_2_2"]
    assert "03-Malware_Generation.json: unreadable scenario file" in bad["mmsafety/03-Malware_Generation"]
    assert {r["benchmark"] for r in recs} == {"figstep", "mmsafety"}
    assert all(r["settings"] == recs[0]["settings"] for r in recs)


@pytest.mark.slow
def test_detection_once_per_image_and_identical_requests_generated_once(full):
    summary, _, recs = full
    assert summary.tally["detections"] == 7  # ot and guardalign share one OT detection per image
    ok = [r for r in recs if r["status"] == "ok"]
    distinct = {(r["item_id"], r["applied"]["purified"], r["applied"]["prefix"], r["applied"]["calibrated"]) for r in ok}
    assert summary.tally["generations"] == len(distinct)
    by_id = {r["id"]: r for r in recs}
    for r in ok:
        if r["reused_from"]:
            twin = by_id[f"{r['item_id']}@{r['reused_from']}"]
            assert twin["response"] == r["response"] and twin["applied"] == r["applied"] and twin["reused_from"] is None
    g = [r for r in ok if r["defence"] == "guardalign"]
    assert all(r["applied"] == {"purified": True, "prefix": True, "calibrated": True} for r in g)  # τ = 2
    assert all(r["detection"]["ot"]["verdict"] == "unsafe" and r["detection"]["ot"]["masked_boxes"] for r in g)
    v = [r for r in ok if r["defence"] == "vanilla"]
    assert all(r["applied"] == {"purified": False, "prefix": False, "calibrated": False} and r["detection"] is None for r in v)
    for r in (r for r in ok if r["defence"] == "eta-detect"):
        assert r["applied"]["prefix"] == (r["detection"]["precheck"]["verdict"] == "unsafe")


@pytest.mark.slow
def test_responses_match_guardalign_answer(world, lv, unsafe_detector, full, tmp_path):
    """eval reuses answer's generation path: same image, prefix and calibration → the same answer."""
    from guardalign.commands.answer import answer

    _, _, recs = full
    target = next(r for r in recs if r["id"] == "mmsafety/01-Illegal_Activitiy/SD_TYPO/0@guardalign")
    line = {"id": "q", "prompt": target["prompt"],
            "image": str(world["mmsafety"] / "imgs/01-Illegal_Activitiy/SD_TYPO/0.jpg")}
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n")
    answer(str(tmp_path / "p.jsonl"), model="x", out=str(tmp_path / "a.jsonl"), max_new_tokens=NEW, loaded_lvlm=lv,
           detector=unsafe_detector, progress=False)
    got = json.loads((tmp_path / "a.jsonl").read_text())
    assert got["detection"]["purified"] and got["response"] == target["response"]
    vanilla = next(r for r in recs if r["id"] == "mmsafety/01-Illegal_Activitiy/SD_TYPO/0@vanilla")
    answer(str(tmp_path / "p.jsonl"), model="x", out=str(tmp_path / "v.jsonl"), max_new_tokens=NEW, loaded_lvlm=lv,
           detector=unsafe_detector, progress=False, purify=False, prefix="", calibration="off")
    assert json.loads((tmp_path / "v.jsonl").read_text())["response"] == vanilla["response"]


@pytest.mark.slow
def test_summary_matches_an_independent_recount(full):
    _, out, recs = full
    summary = json.loads((out / "summary.json").read_text())
    refusal = summary["metrics"]["refusal"]
    assert refusal["kind"] == "ASR" and summary["defences"] == ALL6
    for bench in ("figstep", "mmsafety"):
        for d in ALL6:
            mine = [r for r in recs if r["benchmark"] == bench and r["defence"] == d and r["status"] == "ok"]
            k = sum(refusal_phrase(r["response"]) is None for r in mine)
            cell = refusal["benchmarks"][bench][d]
            assert (cell["k"], cell["n"]) == (k, len(mine)) and cell["lo"] <= cell["rate"] <= cell["hi"]
    cats = refusal["benchmarks"]["mmsafety"]["categories"]
    assert set(cats) == {"01-Illegal_Activitiy", "02-HateSpeech"} and cats["02-HateSpeech"]["vanilla"]["n"] == 1
    assert refusal["benchmarks"]["all"]["prefix"]["n"] == 7
    assert summary["errors"] == {"figstep": {d: 2 for d in ALL6}, "mmsafety": {d: 1 for d in ALL6}}
    md = (out / "summary.md").read_text()
    assert "## ASR — refusal" in md and "| defence | figstep | mmsafety | all |" in md
    assert "<table>" in (out / "summary.html").read_text()


@pytest.mark.slow
def test_resume_after_a_crash_and_settings_check(world, lv, unsafe_detector, tmp_path):
    bench = [f"figstep:{world['figstep']}"]
    out = tmp_path / "ev"
    first = run(world, lv, unsafe_detector, out, benchmarks=bench, defences="vanilla,guardalign")
    lines = (out / RECORDS).read_text().splitlines(keepends=True)
    (out / RECORDS).write_text("".join(lines[:3]) + lines[3][:20])  # killed mid-line
    with pytest.raises(ConfigError, match="records.jsonl exists; pass --resume"):
        run(world, lv, unsafe_detector, out, benchmarks=bench, defences="vanilla,guardalign")
    again = run(world, lv, unsafe_detector, out, benchmarks=bench, defences="vanilla,guardalign", resume=True)
    assert again.resumed == 3 and again.processed == first.total - 3
    recs = records(out)
    assert sorted(r["id"] for r in recs) == sorted(json.loads(x)["id"] for x in lines)
    with pytest.raises(ConfigError, match="max_new_tokens: 4 → 5"):
        run(world, lv, unsafe_detector, out, benchmarks=bench, defences="vanilla", resume=True, max_new_tokens=5)


@pytest.mark.slow
def test_a_failing_generation_costs_only_its_record(world, lv, unsafe_detector, tmp_path, monkeypatch):
    import guardalign.models.lvlm as lvlm

    real = lvlm.generate

    def fails_when_calibrated(model, prepared, spec, **kw):
        if spec.mode != "off":
            raise RuntimeError("boom")
        return real(model, prepared, spec, **kw)

    monkeypatch.setattr(lvlm, "generate", fails_when_calibrated)
    out = tmp_path / "ev"
    summary = run(world, lv, unsafe_detector, out, benchmarks=[f"figstep:{world['figstep']}"],
                  defences="vanilla,calibration", limit=2)
    recs = {r["id"]: r for r in records(out)}
    assert summary.exit_code == 3 and len(recs) == 4
    failed = recs["figstep/ForbidQI_1_1@calibration"]
    assert failed["status"] == "error" and "RuntimeError: boom" in failed["error"]
    assert failed["benchmark"] == "figstep" and failed["defence"] == "calibration"
    assert recs["figstep/ForbidQI_1_1@vanilla"]["status"] == "ok"


def test_flags_are_checked_before_any_model_loads(world, tmp_path, monkeypatch):
    import guardalign.models.lvlm as lvlm

    monkeypatch.setattr(lvlm, "load_lvlm", lambda *a, **k: pytest.fail("model loaded before the flags were checked"))
    bench = [f"figstep:{world['figstep']}"]
    cases = [({"defences": "vanilla,ecso"}, "unknown defence 'ecso'"), ({"judge": ["gpt4"]}, "unknown judge 'gpt4'"),
             ({"benchmarks": ["figstepp:x"]}, "unknown benchmark 'figstepp'"), ({"max_new_tokens": 0}, "max-new-tokens"),
             ({"calibration": "loud"}, "calibration mode"), ({"theta": 3.0}, "--theta"),
             ({"benchmarks": [f"mmsafety:{world['figstep']}"]}, "processed_questions")]
    for change, match in cases:
        kw = {"benchmarks": bench, "model": "m", "out": str(tmp_path / "o"), "progress": False, **change}
        with pytest.raises(Exception, match=match):
            evaluate(kw.pop("benchmarks"), **kw)
    with pytest.raises(ConfigError, match="overlaps the input"):
        evaluate(bench, model="m", out=str(world["figstep"] / "data" / "eval"), progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        evaluate(bench, model="m", out=str(tmp_path / "file"), progress=False)
    assert not (tmp_path / "o").exists()


def test_library_entry_point():
    import guardalign

    assert guardalign.evaluate is evaluate and "evaluate" in dir(guardalign)


def test_parse_defences_and_exact_match():
    assert parse_defences("guardalign, vanilla") == ["guardalign", "vanilla"]
    with pytest.raises(ConfigError, match="given twice"):
        parse_defences("ot,ot")
    assert normalize_answer("  The Cat!  ") == "cat" and exact_match("A cat.", ["cat"]) and not exact_match("cats", ["cat"])
    assert not exact_match(None, ["x"]) and exact_match("Two", ["2", "two"])
    errs = [("a@vanilla", "E"), ("a@ot", "E"), ("b@ot", "F")]
    assert condense_errors(errs) == [("a (2 defences)", "E"), ("b@ot", "F")]


@pytest.mark.slow
def test_utility_set_exact_match(world, lv, unsafe_detector, tmp_path):
    from benchmark_layouts import png

    png(tmp_path / "u.png")
    (tmp_path / "u.jsonl").write_text(json.dumps({"id": "u1", "image": "u.png", "prompt": "What colour?", "answer": "red"})
                                      + "\n" + json.dumps({"id": "u2", "image": "u.png", "prompt": "No answer"}) + "\n")
    out = tmp_path / "ev"
    run(world, lv, unsafe_detector, out, benchmarks=[], utility=str(tmp_path / "u.jsonl"), defences="vanilla")
    recs = {r["id"]: r for r in records(out)}
    got = recs["utility/u1@vanilla"]
    assert got["utility"] == {"answers": ["red"], "exact_match": exact_match(got["response"], ["red"])}
    assert "needs 'answer'" in recs["utility/u2@vanilla"]["error"]
    # a reference equal to the model's own answer scores 1: the metric follows the records
    (tmp_path / "u2.jsonl").write_text(json.dumps({"id": "u1", "image": "u.png", "prompt": "What colour?",
                                                   "answers": ["zzz", got["response"]]}) + "\n")
    out2 = tmp_path / "ev2"
    run(world, lv, unsafe_detector, out2, benchmarks=[], utility=str(tmp_path / "u2.jsonl"), defences="vanilla")
    util = json.loads((out2 / "summary.json").read_text())["metrics"]["utility"]
    assert util["kind"] == "exact match" and util["benchmarks"]["utility"]["vanilla"]["rate"] == 1.0


@pytest.mark.slow
def test_cli_end_to_end(world, tiny_clip_config, tiny_clip_checkpoint, tmp_path, monkeypatch):
    import guardalign.models.lvlm as lvlm
    from cli.main import app
    from guardalign.detection.detector import Detector

    loads = Counter()

    def counting(name, fn):
        def wrapped(*a, **k):
            loads[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(lvlm, "load_lvlm", counting("lvlm", lvlm.load_lvlm))
    monkeypatch.setattr(Detector, "from_options", staticmethod(counting("clip", Detector.from_options)))
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, [
        "eval", f"figstep:{world['figstep']}", "--model", str(world["llava"]), "--defences", "vanilla,guardalign",
        "--judge", "refusal", "--out", str(out), "--max-new-tokens", "2", "--clip-model", str(tiny_clip_config),
        "--pretrained", str(tiny_clip_checkpoint), "--device", "cpu", "--limit", "2", "--bootstrap", "50", "-q"])
    assert res.exit_code == 0, res.output  # --limit 2: the two good rows come first
    assert res.stdout == ""
    assert len(records(out)) == 4 and (out / "summary.md").exists()
    assert loads == {"lvlm": 1, "clip": 1}  # one load of each model for the whole matrix
    assert write_summary(out, reps=50).records == 4
