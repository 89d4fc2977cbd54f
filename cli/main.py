"""Root Typer app. Each stage lives in its own module and is registered here.

Only typer is imported at module level; command modules import torch & co. inside
the command body, so ``guardalign --help`` is instant.
"""
from __future__ import annotations

import typer

from cli import answer as _answer
from cli import calibrate as _calibrate
from cli import mask as _mask
from cli import probe as _probe
from cli import report as _report
from cli import scan as _scan

app = typer.Typer(
    name="guardalign",
    help=(
        "Keep unsafe images out of vision-language models and the datasets they train on.\n\n"
        "Stages compose in shell pipelines and CI:\n\n"
        "  guardalign scan data/ --out scan.jsonl --fail-on-unsafe\n\n"
        "  guardalign mask data/ --from-scan scan.jsonl --out-dir purified/\n\n"
        "  guardalign answer prompts.jsonl --model llava-hf/llava-1.5-7b-hf --out answers.jsonl\n\n"
        "  guardalign probe pairs.jsonl --model llava-hf/llava-1.5-7b-hf --out probe.jsonl\n\n"
        "  guardalign report scan.jsonl answers.jsonl -o report.html\n\n"
        "Exit codes: 0 done (gates passed) · 1 a gate failed · 2 usage, config or model error "
        "(nothing written) · 3 finished, but some inputs could not be read."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)



def _version(value: bool) -> None:
    if value:
        from guardalign import __version__

        typer.echo(f"guardalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Keep unsafe images out of vision-language models and the datasets they train on."""


app.command("scan", no_args_is_help=True)(_scan.scan_command)
app.command("mask", no_args_is_help=True)(_mask.mask_command)
app.command("answer", no_args_is_help=True)(_answer.answer_command)
app.command("report", no_args_is_help=True)(_report.report_command)
app.command("calibrate", no_args_is_help=True)(_calibrate.calibrate_command)
app.command("probe", no_args_is_help=True)(_probe.probe_command)


def main() -> None:  # pragma: no cover - thin wrapper for ``python -m cli.main``
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
