"""Regenerate the README's CLI reference from each command's ``--help``: ``python -m cli.docs``.

The block between ``<!-- cli-reference -->`` and ``<!-- /cli-reference -->`` is rewritten in place;
``tests/test_cli_docs.py`` fails when it is stale, so the README never drifts from the real flags.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- cli-reference -->", "<!-- /cli-reference -->"


def help_text(args: list[str]) -> str:
    """Plain ``--help`` output of ``guardalign ARGS``, at a fixed width and without colour."""
    from typer.testing import CliRunner

    from cli.main import app

    env = {"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}
    res = CliRunner().invoke(app, [*args, "--help"], env=env, terminal_width=100)
    return "\n".join(line.rstrip() for line in res.stdout.strip("\n").splitlines())


def reference() -> str:
    from cli.main import app
    import typer.main

    names = [c.name for c in typer.main.get_group(app).commands.values()]
    parts = ["```", help_text([]), "```"]
    for name in names:
        parts += ["", f"### `guardalign {name}`", "", "```", help_text([name]), "```"]
    return "\n".join(parts)


def render(readme: str) -> str:
    block = f"{START}\n{reference()}\n{END}"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"{README}: no {START} … {END} block to fill")
    return pattern.sub(lambda _: block, readme)


def main() -> int:
    text = README.read_text()
    new = render(text)
    if new != text:
        from guardalign.io.durable import atomic_write

        atomic_write(README, new)
        print(f"updated {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
