"""Fault suite, CLI (issue 11): exit codes mean what the table says; no traceback without --debug.

Each case asserts the exit code, that stderr holds one ``error:`` / ``internal error:`` line and no traceback,
and that nothing was left behind where nothing should be written.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from badinputs import make_good_images
from cli.main import app
from guardalign.errors import EXIT_CODES, EXIT_INTERNAL, EXIT_NOTHING, EXIT_OUTPUT, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def model_args(tiny_clip_config, tiny_clip_checkpoint):
    return ["--clip-model", str(tiny_clip_config), "--pretrained", str(tiny_clip_checkpoint), "--device", "cpu",
            "--batch-size", "4", "--quiet"]


def invoke(args, **kw):
    return CliRunner().invoke(app, args, catch_exceptions=False, **kw)


def one_line_error(res, prefix="error: ") -> str:
    err = [x for x in res.stderr.splitlines() if x.strip()]
    assert "Traceback" not in res.stderr, res.stderr
    assert len([x for x in err if x.startswith(prefix)]) == 1, res.stderr
    return next(x for x in err if x.startswith(prefix))


# ----------------------------------------------------------------------------- the last-resort handler


def test_unexpected_exception_exits_70_with_one_line(monkeypatch, tmp_path):
    import guardalign.commands.scan as scan_mod

    def boom(*a, **k):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(scan_mod, "scan", boom)
    res = invoke(["scan", str(tmp_path)])
    assert res.exit_code == EXIT_INTERNAL == 70
    line = one_line_error(res, "internal error: ")
    assert "RuntimeError: something unexpected" in line and "--debug" in line
    res = invoke(["--debug", "scan", str(tmp_path)])
    assert res.exit_code == 70 and "Traceback" in res.stderr and "RuntimeError" in res.stderr
    res = invoke(["scan", str(tmp_path)])  # --debug does not stick to later runs
    assert "Traceback" not in res.stderr


def test_exception_outside_the_library_call_exits_70_in_a_real_process(tmp_path):
    code = ("import cli.scan, sys\n"
            "def bad(paths): raise KeyError('boom')\n"
            "cli.scan.stdin_if_dash = bad\n"
            "from cli.main import app\n"
            f"app(['scan', {str(tmp_path)!r}, '--pretrained', 'none'])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == EXIT_INTERNAL, res.stderr
    assert "Traceback" not in res.stderr and "internal error: KeyError" in res.stderr


@pytest.mark.parametrize("workers", ["0", "-1"])
@pytest.mark.parametrize("command", ["scan", "mask"])
def test_workers_below_one_is_a_usage_error_and_writes_nothing(tmp_path, command, workers):
    make_good_images(tmp_path / "in", 1)
    args = [command, str(tmp_path / "in"), "--workers", workers, "--pretrained", "none"]
    args += ["--out-dir", str(tmp_path / "out")] if command == "mask" else ["--out", str(tmp_path / "s.jsonl")]
    res = invoke(args)
    assert res.exit_code == EXIT_USAGE and "--workers" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no empty out-dir, no output file


def test_deep_yaml_is_exit_2_with_a_message(tmp_path, model_args):
    make_good_images(tmp_path / "in", 1)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    res = invoke(["scan", str(tmp_path / "in"), "--anchors", str(deep), "--out", str(tmp_path / "s.jsonl"),
                  *model_args])
    assert res.exit_code == EXIT_USAGE
    line = one_line_error(res)
    assert ("nested too deeply" in line or "nested more than" in line) and "deep.yaml" in line
    assert not (tmp_path / "s.jsonl").exists()


# ----------------------------------------------------------------------------- outputs that fail


@pytest.mark.parametrize("out, code, message", [
    ("/dev/full", EXIT_OUTPUT, "disk full"),
    ("{tmp}/" + "n" * 300 + ".jsonl", EXIT_OUTPUT, "file name too long"),
    ("/dev/null", 0, None),
])
def test_failing_outputs_exit_5_with_one_line(tmp_path, model_args, out, code, message):
    make_good_images(tmp_path / "in", 2)
    res = invoke(["scan", str(tmp_path / "in"), "--out", out.format(tmp=tmp_path), *model_args])
    assert res.exit_code == code, res.stderr
    if message:
        assert message in one_line_error(res)
    assert "Traceback" not in res.stderr


def test_zero_images_under_a_gate_exits_4(tmp_path, model_args):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no images")
    res = invoke(["scan", str(tmp_path / "in"), "--out", str(tmp_path / "s.jsonl"), "--fail-on-unsafe", *model_args])
    assert res.exit_code == EXIT_NOTHING == 4 and (tmp_path / "s.jsonl").read_text() == ""


def test_mask_through_a_symlinked_manifest_exits_5(tmp_path, model_args):
    make_good_images(tmp_path / "in", 1)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.jsonl").symlink_to(victim)
    res = invoke(["mask", str(tmp_path / "in"), "--out-dir", str(tmp_path / "out"), *model_args])
    assert res.exit_code == EXIT_OUTPUT and "symlink" in one_line_error(res)
    assert victim.read_text() == "keep me\n"


# ----------------------------------------------------------------------------- the documented table


def test_readme_exit_code_table_covers_every_code():
    readme = (ROOT / "README.md").read_text()
    table = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\|\s*`?(\d+)`?\s*\|([^|\n]+)\|", readme, re.M)}
    assert set(EXIT_CODES) <= set(table), set(EXIT_CODES) - set(table)
    main_help = invoke(["--help"]).stdout
    for code in EXIT_CODES:
        assert re.search(rf"\b{code} ", main_help), code


def test_exit_codes_are_defined_once():
    """No module spells an exit code as a bare number: they come from guardalign.errors."""
    bad = []
    for path in list((ROOT / "guardalign").rglob("*.py")) + list((ROOT / "cli").rglob("*.py")):
        if path.name == "errors.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"typer\.Exit\(\s*\d|exit_code\s*=\s*\d|EXIT_\w+\s*=\s*\d|return \d+ if self\.", line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert bad == []
