"""The README's CLI reference is generated from --help and must be current; --help is instant."""
from __future__ import annotations

import subprocess
import sys

from cli.docs import README, render


def test_readme_cli_reference_is_current():
    text = README.read_text()
    assert render(text) == text, "README CLI reference is stale: run `python -m cli.docs`"


def test_help_lists_every_stage_and_imports_no_heavy_library():
    code = (
        "import sys; from typer.testing import CliRunner; from cli.main import app; "
        "r = CliRunner().invoke(app, ['--help']); print(r.stdout); "
        "heavy = [m for m in ('torch', 'open_clip', 'transformers', 'ot', 'pyarrow', 'ray') if m in sys.modules]; "
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    for stage in ("scan", "report"):
        assert stage in out


def test_every_command_help_has_an_example():
    from typer.testing import CliRunner
    import typer.main

    from cli.main import app

    for name in typer.main.get_group(app).commands:
        res = CliRunner().invoke(app, [name, "--help"])
        assert res.exit_code == 0
        assert f"guardalign {name}" in res.stdout, f"`guardalign {name} --help` shows no example"
