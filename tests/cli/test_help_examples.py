"""Every example line of every command's --help runs as written, and --help shows flags as flags.

How an example runs: each line of a help text that starts with ``guardalign `` or pipes into it is taken
from the rendered ``--help`` (at a width where nothing wraps), split like a POSIX shell would (quotes,
``|``, ``&&``, ``>>``, ``$VARS``, ``#`` comments) and run in a fresh copy of a prepared folder that holds
every input the examples name (``photos/``, ``data/``, ``imgs/``, ``train.parquet``, ``prompts.jsonl``,
``labelled.jsonl``, ``anchors.yaml``, ``scan.jsonl``, ``answers.jsonl``). ``guardalign`` runs in-process;
``find`` and ``cat`` run as real programs. Outputs the example names (``--out``, ``-o``, ``--out-dir``)
are removed from the copy first, so each example writes them afresh, and must exist afterwards.

Documented substitutions, because the tests run offline with no real weights:

- A command that loads CLIP gets ``--clip-model tiny-clip.json --pretrained tiny-clip.safetensors
  --device cpu`` appended. The last value of an option wins, so the example's own ``--clip-model`` /
  ``--pretrained`` (``ViT-B-32``, ``./open_clip_pytorch_model.bin``) are replaced by the tiny fixture.
- LVLMs keep the example's ``--model``/``--judge`` value: ``llava-hf/llava-1.5-7b-hf`` is resolved by
  transformers from a temporary Hugging Face cache that holds a tiny random LLaVA under that id, and
  ``./Qwen2-VL-2B-Instruct`` (with 20 decoder layers, so ``--layers 6:20`` is valid) and ``./Llama-Guard-3-1B``
  are tiny random models at those paths; ``./llava`` is the tiny LLaVA and ``meta-llama/Llama-Guard-3-8B`` the
  tiny judge in the cache. ``benchmarks/`` holds one-item miniatures of FigStep, MM-SafetyBench, SPA-VL and HADES
  in their published layouts (tests/benchmark_layouts.py) and ``vqa.jsonl`` a one-line utility set.
- Before substitution, each example's argument list is also parsed by click exactly as written: every
  flag must exist and take the value it is given.

An example must exit 0, except that one with a gate (``--fail-on-unsafe``, ``--max-unsafe-rate``) may exit 1
with its "GATE FAILED" line: the random tiny CLIP's scores mean nothing, so it may flag the images.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.docs import help_text
from cli.main import app

COMMANDS = ("", "scan", "mask", "answer", "report", "calibrate", "eval")
CLIP_FLAGS = "--clip-model", "--pretrained", "--device"
OUTPUT_FLAGS = ("--out", "-o", "--out-dir")
LLAVA_ID = "llava-hf/llava-1.5-7b-hf"


def _wide_help(args: list[str]) -> str:
    env = {"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}
    res = CliRunner().invoke(app, [*args, "--help"], env=env, terminal_width=400)
    assert res.exit_code == 0, res.output
    return res.stdout


def examples() -> list[tuple[str, str]]:
    """(command, example line) for every example in every --help."""
    found = []
    for cmd in COMMANDS:
        for line in _wide_help([cmd] if cmd else []).splitlines():
            text = line.strip()
            if text.startswith("guardalign ") or re.search(r"\|\s*guardalign ", text):
                found.append((cmd or "guardalign", text))
    return found


EXAMPLES = examples()


def _split(line: str) -> list[str]:
    lx = shlex.shlex(line, posix=True, punctuation_chars=True)
    lx.whitespace_split = True
    lx.commenters = "#"
    return list(lx)


def _segments(tokens: list[str]) -> list[list[list[str]]]:
    """``a | b && c`` → [[a, b], [c]]: a list of pipelines, each a list of commands."""
    chains, pipe, cmd = [], [], []
    for tok in tokens:
        if tok == "&&":
            chains.append(pipe + [cmd])
            pipe, cmd = [], []
        elif tok == "|":
            pipe.append(cmd)
            cmd = []
        else:
            cmd.append(tok)
    chains.append(pipe + [cmd])
    return chains


def _command_params(name: str):
    import typer.main

    return typer.main.get_command(app).commands[name]


# ------------------------------------------------------------------------------------------ --help display
def test_examples_were_found_in_every_command():
    per = {c for c, _ in EXAMPLES}
    assert per == {"guardalign", "scan", "mask", "answer", "report", "calibrate", "eval"}, per
    assert len(EXAMPLES) >= 15


@pytest.mark.parametrize("cmd", COMMANDS)
def test_flags_show_no_value_type(cmd):
    text = help_text([cmd] if cmd else [])
    assert "<bool>" not in text
    flag_rows = [line for line in text.splitlines() if re.search(r"│\s+(--help|--quiet|--resume|--version)\b", line)]
    assert flag_rows and all("<" not in row for row in flag_rows), flag_rows
    if cmd:
        assert "<int>" in text or "<str>" in text  # options that take a value still say which


def test_flag_given_a_value_is_still_a_usage_error():
    res = CliRunner().invoke(app, ["scan", "x.png", "--resume=true"])
    assert res.exit_code == 2 and "does not take a value" in res.output


def test_answer_help_explains_every_calibration_mode():
    text = " ".join(help_text(["answer"]).split())
    for mode, meaning in (("scale (default):", "Z·(1+γ) where Z > 0"), ("paper:", "Z + γ·max(0, Z)·Z"),
                          ("pai:", "Z + γ·|Z|"), ("off:", "no calibration")):
        assert mode in text and meaning in text, mode
    assert "γ = 0" in text


# ------------------------------------------------------------------------------------------ examples parse
@pytest.mark.parametrize("cmd,line", EXAMPLES, ids=[f"{c}:{i}" for i, (c, _) in enumerate(EXAMPLES)])
def test_example_parses_as_written(cmd, line):
    for pipeline in _segments(_split(line)):
        for argv in pipeline:
            if argv[0] != "guardalign":
                assert argv[0] in ("find", "cat"), f"unexpected program {argv[0]!r} in an example: {line}"
                continue
            argv = argv[: argv.index(">>")] if ">>" in argv else argv
            command = _command_params(argv[1])
            command.make_context(argv[1], list(argv[2:]))  # raises a UsageError for an unknown flag or bad value


# ------------------------------------------------------------------------------------------ examples run
def _png(path: Path, color, size=(48, 40)) -> Path:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    ImageDraw.Draw(img).rectangle([4, 4, size[0] // 2, size[1] // 2], fill=(255 - color[0], 90, 30))
    img.save(path)
    return path


def _parquet(path: Path, n: int = 3) -> Path:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    cells = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (40, 32), (30 * i, 120, 200)).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": f"row{i}.png"})
    table = pa.table({"image": pa.array(cells, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(list(range(n)))})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _hub_cache_entry(cache: Path, repo_id: str, model_dir: Path) -> None:
    """Lay ``model_dir`` out as the Hugging Face cache does for ``repo_id`` at revision main."""
    commit = "0" * 39 + "1"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(model_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


class Shell:
    """Runs one example line in ``cwd``: guardalign in-process, find/cat as programs."""

    def __init__(self, cwd: Path, clip_args: list[str], env: dict[str, str]):
        self.cwd, self.clip_args, self.env = cwd, clip_args, env

    def guardalign(self, argv: list[str], stdin: bytes | None):
        params = {opt for p in _command_params(argv[0]).params for opt in p.opts}
        extra = self.clip_args if "--clip-model" in params else []
        return CliRunner().invoke(app, [*argv, *extra], input=stdin, catch_exceptions=False)

    def run(self, line: str) -> list:
        results = []
        for pipeline in _segments([os.path.expandvars(t) if t.startswith("$") else t for t in _split(line)]):
            stdin = None
            for argv in pipeline:
                append_to = None
                if ">>" in argv:
                    append_to, argv = self.cwd / argv[argv.index(">>") + 1], argv[: argv.index(">>")]
                if argv[0] == "guardalign":
                    res = self.guardalign(argv[1:], stdin)
                    code, out = res.exit_code, res.stdout_bytes
                    results.append((argv, code, res.stderr))
                else:
                    proc = subprocess.run(argv, cwd=self.cwd, capture_output=True, check=False)
                    code, out = proc.returncode, proc.stdout
                    results.append((argv, code, proc.stderr.decode(errors="replace")))
                if append_to is not None:
                    with open(append_to, "ab") as f:
                        f.write(out)
                if code != 0:
                    return results
                stdin = out
        return results


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_config, tiny_clip_checkpoint):
    """The prepared folder, the tiny models and the Hugging Face cache every example needs."""
    import huggingface_hub.constants as hub_constants

    from lvlm_fixtures import make_tiny_judge, make_tiny_lvlm

    root = tmp_path_factory.mktemp("examples")
    models = root / "models"
    llava = make_tiny_lvlm("llava", models / "llava")
    qwen = make_tiny_lvlm("qwen2_vl", models / "Qwen2-VL-2B-Instruct", text_layers=20)
    judge = make_tiny_judge(models / "Llama-Guard-3-1B")
    make_tiny_lvlm("llava_next", models / "llava-v1.6-mistral-7b-hf")  # probe's --lens raw example
    cache = root / "hub"
    _hub_cache_entry(cache, LLAVA_ID, llava)
    _hub_cache_entry(cache, "meta-llama/Llama-Guard-3-8B", judge)

    ws = root / "workspace"
    for i, color in enumerate([(200, 40, 40), (40, 160, 60), (30, 60, 200)]):
        _png(ws / "photos" / f"p{i}.png", color)
        _png(ws / "data" / f"img{i}.png", color[::-1])
        _png(ws / "imgs" / f"i{i}.png", (color[1], color[2], color[0]))
    _parquet(ws / "data" / "train.parquet")
    _parquet(ws / "train.parquet")
    shutil.copy(Path(__file__).resolve().parents[2] / "anchors" / "default.yaml", ws / "anchors.yaml")
    prompts = [{"id": f"q{i}", "prompt": "What is shown in this image?", "image": f"photos/p{i}.png",
                "category": "weapons" if i == 0 else None} for i in range(2)]
    (ws / "prompts.jsonl").write_text("".join(json.dumps({k: v for k, v in p.items() if v}) + "\n" for p in prompts))
    labels = [{"image": f"data/img{i}.png", "label": "unsafe" if i == 0 else "safe", "category": "weapons"}
              for i in range(3)]
    for rec in labels[1:]:
        rec.pop("category")
    (ws / "labelled.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labels))
    for name in ("Qwen2-VL-2B-Instruct", "Llama-Guard-3-1B", "llava", "llava-v1.6-mistral-7b-hf"):
        (ws / name).symlink_to(models / name, target_is_directory=True)
    from benchmark_layouts import make_figstep, make_hades, make_mmsafety, make_spavl

    make_figstep(ws / "benchmarks" / "FigStep", good=1, bad=False)
    make_figstep(ws / "FigStep", good=1, bad=False)  # probe --format figstep FigStep/
    (ws / "pairs.jsonl").write_text(json.dumps({"id": "p1", "image": "photos/p0.png", "text": "a red square",
                                                "category": "weapons"}) + "\n")
    from guardalign.commands.probe import probe

    probe(str(ws / "pairs.jsonl"), model=str(models / "llava"), out=str(ws / "probe.jsonl"), device="cpu",
          progress=False)  # report's `report probe.jsonl` example reads a real probe run
    make_mmsafety(ws / "benchmarks" / "MM-SafetyBench", good=1, bad=False)
    make_spavl(ws / "benchmarks" / "SPA-VL", good=1, bad=False)
    make_hades(ws / "benchmarks" / "HADES", good=1, bad=False)
    (ws / "vqa.jsonl").write_text(json.dumps({"id": "v1", "image": "photos/p0.png", "prompt": "What colour is it?",
                                              "answer": "red"}) + "\n")

    clip_args = ["--clip-model", str(tiny_clip_config), "--pretrained", str(tiny_clip_checkpoint), "--device", "cpu"]
    saved_cache, saved_cwd = hub_constants.HF_HUB_CACHE, os.getcwd()
    hub_constants.HF_HUB_CACHE = str(cache)
    os.chdir(ws)
    try:
        shell = Shell(ws, clip_args, {})
        for line in ("guardalign scan data/ --out scan.jsonl",
                     f"guardalign answer prompts.jsonl --model {LLAVA_ID} --max-new-tokens 4 --out answers.jsonl"):
            for argv, code, err in shell.run(line):
                assert code == 0, (argv, err)
    finally:
        os.chdir(saved_cwd)
        hub_constants.HF_HUB_CACHE = saved_cache
    return {"workspace": ws, "cache": cache, "clip_args": clip_args, "judge": judge, "qwen": qwen}


def _outputs(line: str) -> list[str]:
    names = []
    for pipeline in _segments(_split(line)):
        for argv in pipeline:
            names += [argv[i + 1] for i, tok in enumerate(argv[:-1]) if tok in OUTPUT_FLAGS and argv[i + 1] != "-"]
            names += [argv[i + 1] for i, tok in enumerate(argv[:-1]) if tok == ">>"]
    return names


@pytest.mark.slow
@pytest.mark.parametrize("cmd,line", EXAMPLES, ids=[f"{c}:{i}" for i, (c, _) in enumerate(EXAMPLES)])
def test_example_runs_as_written(cmd, line, world, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    ws = tmp_path / "ws"
    shutil.copytree(world["workspace"], ws, symlinks=True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", "step_summary.md")
    monkeypatch.chdir(ws)
    written = [n for n in _outputs(line) if not n.startswith("$")]
    for name in written:
        target = ws / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    results = Shell(ws, world["clip_args"], {}).run(line)
    for argv, code, err in results:
        gated = {"--fail-on-unsafe", "--max-unsafe-rate"} & set(argv)
        if code == 1 and gated:  # the random tiny CLIP may flag images: a tripped gate is the gate working
            assert "GATE FAILED" in err, err
            continue
        assert code == 0, f"{line}\n→ {argv} exited {code}:\n{err}"
    for name in _outputs(line):
        target = ws / os.path.expandvars(name)
        assert target.exists(), f"{line}: {name} was not written"
        assert target.is_dir() or target.stat().st_size > 0, f"{line}: {name} is empty"
