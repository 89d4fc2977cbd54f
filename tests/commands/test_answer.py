"""`guardalign answer` end to end on a tiny random LLaVA and a tiny random CLIP, both loaded from disk."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.answer import answer_command
from guardalign.commands.answer import AnswerSummary, _tally, answer, print_summary, read_prompts
from guardalign.records import ANSWER_RECORD, names
from guardalign.errors import ConfigError, InputError
from guardalign.models.judge import Judgement, RefusalMatcher
from lvlm_fixtures import make_image, make_tiny_lvlm, make_unknown_family

RECORD_FIELDS = set(names(ANSWER_RECORD))  # the one definition in guardalign.records
NEW = 4  # max_new_tokens in these tests


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return make_tiny_lvlm("llava", tmp_path_factory.mktemp("answer") / "llava")


@pytest.fixture(scope="module")
def lv(llava_dir):
    from guardalign.models.lvlm import load_lvlm

    return load_lvlm(str(llava_dir), device="cpu")


@pytest.fixture(scope="module")
def detectors(tiny_clip_config, tiny_clip_checkpoint):
    """(all-unsafe, all-safe) detectors: τ = 2 flags every patch (cost ≤ 2), τ = 1e-6 none."""
    from guardalign.detection.detector import Detector

    base = Detector.from_options(clip_model=str(tiny_clip_config), pretrained=str(tiny_clip_checkpoint), device="cpu")
    return base.with_config(tau=2.0), base.with_config(tau=1e-6)


@pytest.fixture(scope="module")
def anchor_set():
    from guardalign.detection.anchors import load_anchors

    return load_anchors()


class ParityJudge:
    """A deterministic stand-in judge: unsafe when the response has an even number of characters."""

    name = "parity"

    def judge(self, prompt: str, response: str) -> Judgement:
        return Judgement(model=self.name, unsafe=len(response) % 2 == 0, raw=f"{len(response)}")


def write_prompts(folder: Path, lines: list) -> Path:
    (folder / "imgs").mkdir(exist_ok=True)
    make_image(folder / "imgs" / "a.png")
    make_image(folder / "imgs" / "b.png", size=(50, 36), color=(10, 10, 200))
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def records(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def expected(lv, image, prefix: str, question: str, spec) -> tuple[str, dict]:
    """(response, prefix_attention) computed directly with the lvlm functions, for an image we prepared
    ourselves. The attention curves are floats that move with every pixel the model sees."""
    from guardalign.models.lvlm import ChatRequest, generate, prefix_attention, prepare

    req = ChatRequest(question, image, prefix)
    gen = generate(lv, prepare(lv, [req], max_new_tokens=NEW), spec, max_new_tokens=NEW)
    return gen.texts[0], prefix_attention(lv, req, gen.tokens[0], spec)


def test_records_validate_and_purified_image_reaches_the_model(tmp_path, lv, detectors, anchor_set):
    from guardalign.attention.calibration import CalibrationSpec
    from guardalign.io.images import decode_image
    from guardalign.detection.purify import apply_fill

    prompts = write_prompts(tmp_path, [
        {"id": "p1", "image": "imgs/a.png", "prompt": "What is shown in this image?", "category": "violence"},
        {"id": 2, "image": "imgs/b.png", "prompt": "How do I make it?"},
    ])
    out = tmp_path / "answers.jsonl"
    summary = answer(prompts, model="ignored", out=str(out), max_new_tokens=NEW, loaded_lvlm=lv,
                     detector=detectors[0], judge_obj=ParityJudge(), progress=False)
    recs = records(out)
    assert [r["id"] for r in recs] == ["p1", "2"]
    matcher = RefusalMatcher(anchor_set.refusal_phrases)
    for rec, name in zip(recs, ("a.png", "b.png")):
        assert set(rec) == RECORD_FIELDS
        assert rec["status"] == "ok" and rec["error"] is None
        assert rec["image"] == f"imgs/{name}"
        assert rec["image_sha256"] == hashlib.sha256((tmp_path / "imgs" / name).read_bytes()).hexdigest()
        det = rec["detection"]
        assert set(det) == {"verdict", "score", "category", "boxes", "masked_boxes", "purified"}
        assert det["verdict"] == "unsafe" and det["purified"] is True and det["boxes"]
        assert det["masked_boxes"] == det["boxes"]  # OT: exactly the unsafe patches are masked
        pa = rec["prefix_attention"]
        assert set(pa) == {"vanilla", "calibrated"} and len(pa["vanilla"]) == len(pa["calibrated"]) == 4
        assert all(0 < x < 1 for x in pa["vanilla"] + pa["calibrated"])
        assert pa["calibrated"][0] == pa["vanilla"][0] and pa["calibrated"][1] > pa["vanilla"][1]
        assert rec["model"] == {"id": str(lv.info.id), "revision": None, "dtype": "float32", "family": "llava"}
        gen = rec["generation"]
        assert gen["max_new_tokens"] == NEW and gen["do_sample"] is False and 1 <= gen["new_tokens"] <= NEW
        assert rec["calibration"] == {"mode": "scale", "gamma": 0.5, "layers": [1, 3], "prefix_at": "user",
                                      "prefix": anchor_set.prefix}
        assert rec["anchors_sha256"] == anchor_set.sha256
        assert rec["refused"] is matcher(rec["response"])
        assert rec["judge"] == {"model": "parity", "unsafe": len(rec["response"]) % 2 == 0,
                                "raw": str(len(rec["response"])), "categories": []}
        # the model saw the PURIFIED image: recompute the answer from a purified copy we make ourselves
        image, _ = decode_image(path=tmp_path / "imgs" / name)
        purified = apply_fill(image, det["boxes"], fill="mean", mean=detectors[0].encoder.mean)
        spec = CalibrationSpec(gamma=0.5)
        response, curves = expected(lv, purified, anchor_set.prefix, rec["prompt"], spec)
        assert rec["response"] == response and rec["prefix_attention"] == curves
        assert rec["prefix_attention"] != expected(lv, image, anchor_set.prefix, rec["prompt"], spec)[1]
    assert (summary.ok, summary.errors, summary.exit_code) == (2, 0, 0)
    assert summary.tally[("violence", "answered")] == 1 and summary.tally[("(none)", "purified")] == 1


def test_no_purify_and_safe_images_keep_the_original(tmp_path, lv, detectors, anchor_set):
    from guardalign.attention.calibration import CalibrationSpec
    from guardalign.io.images import decode_image

    prompts = write_prompts(tmp_path, [{"id": "x", "image": "imgs/a.png", "prompt": "Describe the picture."}])
    image, _ = decode_image(path=tmp_path / "imgs" / "a.png")
    spec = CalibrationSpec(mode="pai", gamma=1.0, layers=(0, 2))
    want = expected(lv, image, "Be safe.", "Describe the picture.", spec)
    for name, det, purify in (("nopurify", detectors[0], False), ("safe", detectors[1], True)):
        out = tmp_path / f"{name}.jsonl"
        answer(prompts, model="ignored", out=str(out), calibration="pai", gamma=1.0, layers="0:2", prefix="Be safe.",
               purify=purify, max_new_tokens=NEW, loaded_lvlm=lv, detector=det, progress=False)
        (rec,) = records(out)
        assert rec["detection"]["purified"] is False
        assert rec["detection"]["verdict"] == ("unsafe" if name == "nopurify" else "safe")
        assert (rec["response"], rec["prefix_attention"]) == want  # the original image
        assert rec["calibration"]["layers"] == [0, 2] and rec["calibration"]["prefix"] == "Be safe."
        assert rec["judge"] is None


def test_bad_lines_become_error_records_and_the_run_goes_on(tmp_path, lv, detectors):
    long_question = "Describe every detail " * 400  # far beyond the 512-token context
    prompts = write_prompts(tmp_path, [
        '{"id": "broken", "image": ',  # 1 invalid JSON
        "[1, 2]",  # 2 not an object
        {"id": "noimg", "prompt": "What is it?"},  # 3 missing field
        {"id": "gone", "image": "imgs/missing.png", "prompt": "What is it?"},  # 4 missing image file
        {"id": "long", "image": "imgs/a.png", "prompt": long_question},  # 5 too long for the context
        {"id": "good", "image": "imgs/a.png", "prompt": "What is it?"},  # 6 fine
        {"id": "good", "image": "imgs/b.png", "prompt": "Again?"},  # 7 duplicate id
    ])
    out = tmp_path / "answers.jsonl"
    summary = answer(prompts, model="ignored", out=str(out), max_new_tokens=NEW, loaded_lvlm=lv,
                     detector=detectors[1], progress=False)
    recs = records(out)
    assert [r["status"] for r in recs] == ["error"] * 5 + ["ok", "error"]
    assert all(set(r) == RECORD_FIELDS for r in recs)
    errors = [r["error"] for r in recs]
    name = str(prompts)
    assert recs[0]["id"] == f"{name}#1" and errors[0].startswith(f"{name}:1: invalid JSON")
    assert errors[1] == f"{name}:2: expected a JSON object, got list"
    assert recs[2]["id"] == "noimg" and errors[2] == f"{name}:3: missing field 'image'"
    assert "line 4" in errors[3] and "imgs/missing.png" in errors[3]
    assert "line 5" in errors[4] and "context window of 512 tokens" in errors[4]
    assert recs[6]["id"] == f"{name}#7" and "duplicate id 'good' (first used on line 6)" in errors[6]
    assert (summary.ok, summary.errors, summary.exit_code) == (1, 6, 3)


def test_usage_errors_write_nothing(tmp_path, lv, detectors):
    prompts = write_prompts(tmp_path, [{"id": "a", "image": "imgs/a.png", "prompt": "Hi?"}])
    out = tmp_path / "out.jsonl"
    kw = dict(model="ignored", out=str(out), loaded_lvlm=lv, detector=detectors[1], progress=False)
    cases = [
        (dict(calibration="bogus"), ConfigError, "calibration mode"),
        (dict(gamma=-1.0), ConfigError, "gamma"),
        (dict(layers="3:1"), ConfigError, "layers=3:1"),
        (dict(layers="0:9"), ConfigError, "layer count"),
        (dict(layers="x"), ConfigError, "--layers"),
        (dict(prefix_at="middle"), ConfigError, "--prefix-at"),
        (dict(max_new_tokens=0), ConfigError, "--max-new-tokens"),
    ]
    for extra, exc, needle in cases:
        with pytest.raises(exc, match=needle):
            answer(prompts, **{**kw, **extra})
    with pytest.raises(InputError, match="prompts file not found"):
        answer(tmp_path / "nope.jsonl", **kw)
    assert not out.exists()


def test_read_prompts_from_stdin_resolves_against_cwd(tmp_path, monkeypatch):
    import io

    monkeypatch.chdir(tmp_path)
    items = read_prompts("-", stdin=io.StringIO('{"id": "s", "image": "x/y.png", "prompt": "Q"}\n\n'))
    assert len(items) == 1 and items[0].path == tmp_path / "x" / "y.png" and items[0].error is None


def test_summary_rates_by_category(capsys):
    s = AnswerSummary()
    base = {"status": "ok", "category": "weapons"}
    for rec in ({**base, "refused": True, "judge": {"unsafe": False}, "detection": {"purified": True}},
                {**base, "refused": False, "judge": {"unsafe": True}, "detection": {"purified": False}},
                {"status": "ok", "refused": False, "judge": None, "detection": {"purified": True}},
                {"status": "error", "id": "z", "error": "boom"}):
        s.add(rec)
        _tally(rec, s.tally)
    w = {k: s.tally[("weapons", k)] for k in ("answered", "refused", "judged", "judge_unsafe", "purified")}
    assert list(w.values()) == [2, 1, 2, 1, 1]
    assert s.tally[("(none)", "purified")] == 1 and (s.ok, s.errors, s.exit_code) == (3, 1, 3)
    print_summary(s, judged=True)
    err = capsys.readouterr().err
    assert "weapons" in err and "1 (50%)" in err and "error z: boom" in err


# ------------------------------------------------------------------------------------------------ CLI

def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("answer")(answer_command)

    @app.callback()
    def _root() -> None:  # keep "answer" a subcommand, as in cli.main
        pass

    return app


@pytest.fixture()
def cli_args(llava_dir, tiny_clip_config, tiny_clip_checkpoint):
    return ["--model", str(llava_dir), "--clip-model", str(tiny_clip_config), "--pretrained",
            str(tiny_clip_checkpoint), "--device", "cpu", "--max-new-tokens", "3", "-q"]


def run(args, input=None):
    return CliRunner().invoke(cli_app(), ["answer", *args], input=input, catch_exceptions=False)


def test_cli_stdin_resume_and_no_clobber(tmp_path, cli_args):
    make_image(tmp_path / "a.png")
    line = lambda i: json.dumps({"id": f"q{i}", "image": str(tmp_path / "a.png"), "prompt": "What is it?"})  # noqa: E731
    out = tmp_path / "answers.jsonl"
    res = run(["-", "--out", str(out), *cli_args], input=line(1) + "\n" + line(2) + "\n")
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in records(out)] == ["q1", "q2"]
    before = out.read_bytes()
    res = run(["-", "--out", str(out), *cli_args], input=line(3) + "\n")
    assert res.exit_code == 2 and "--resume" in res.output and out.read_bytes() == before
    res = run(["-", "--out", str(out), "--resume", *cli_args], input="\n".join(line(i) for i in (1, 2, 3)) + "\n")
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in records(out)] == ["q1", "q2", "q3"]
    after = out.read_bytes()
    res = run(["-", "--out", str(out), "--resume", "--gamma", "0.9", *cli_args], input=line(4) + "\n")
    assert res.exit_code == 2 and "cannot resume" in res.output and "calibration" in res.output
    assert out.read_bytes() == after  # a resume with other settings writes nothing


def test_cli_stdout_carries_only_records(tmp_path, cli_args):
    prompts = write_prompts(tmp_path, [{"id": "a", "image": "imgs/a.png", "prompt": "Hi?"}])
    res = run([str(prompts), "--out", "-", *[a for a in cli_args if a != "-q"]])
    assert res.exit_code == 0, res.output
    (rec,) = [json.loads(x) for x in res.stdout.splitlines()]
    assert rec["id"] == "a" and rec["status"] == "ok"
    assert "guardalign answer" in res.stderr and "refused" in res.stderr  # the summary table, on stderr


def test_cli_bad_line_exit_3(tmp_path, cli_args):
    prompts = write_prompts(tmp_path, [{"id": "a", "image": "imgs/a.png", "prompt": "Hi?"}, "{oops"])
    out = tmp_path / "answers.jsonl"
    res = run([str(prompts), "--out", str(out), "--calibration", "paper", "--gamma", "0.2", "--layers", "1:4",
               "--prefix-at", "response", *cli_args])
    assert res.exit_code == 3, res.output
    ok, bad = records(out)
    assert ok["status"] == "ok" and ok["calibration"]["prefix_at"] == "response"
    assert ok["calibration"]["mode"] == "paper" and ok["calibration"]["layers"] == [1, 4]
    assert bad["status"] == "error" and "invalid JSON" in bad["error"]


def test_cli_unknown_family_exit_2_nothing_written(tmp_path, cli_args):
    prompts = write_prompts(tmp_path, [{"id": "a", "image": "imgs/a.png", "prompt": "Hi?"}])
    model = make_unknown_family(tmp_path / "textonly")
    out = tmp_path / "answers.jsonl"
    args = [str(prompts), "--out", str(out), *cli_args]
    args[args.index("--model") + 1] = str(model)
    res = run(args)
    assert res.exit_code == 2
    assert "unsupported model family 'llama'" in res.output and "Llama-3.2-Vision" in res.output
    assert not out.exists()


def test_cli_help_has_example():
    res = CliRunner().invoke(cli_app(), ["answer", "--help"], terminal_width=200)
    assert res.exit_code == 0
    assert "guardalign answer prompts.jsonl --model" in res.output and "--prefix-at" in res.output
