"""Root Typer app. Each stage lives in its own module and is registered here.

Only typer is imported at module level; command modules import torch & co. inside
the command body, so ``guardalign --help`` is instant.
"""
from __future__ import annotations

import typer

from cli import answer as _answer
from cli import calibrate as _calibrate
from cli import eval as _eval
from cli import mask as _mask
from cli import probe as _probe
from cli import report as _report
from cli import scan as _scan
from cli._common import Command, Group

class _App(typer.Typer):
    """The Typer app, with a last-resort handler: an exception that escapes a command (outside the library
    call, which ``cli._common.call`` already guards) exits 70 with one line, never a traceback and exit 1."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 (SystemExit from typer.Exit is a BaseException: passes)
            from cli._common import internal_error

            try:
                internal_error(exc)
            except typer.Exit as done:
                raise SystemExit(done.exit_code) from None


app = _App(
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
        "(nothing written) · 3 finished, but some inputs could not be read · 4 a gate was asked for but no "
        "image was scanned · 5 an output could not be written · 70 internal error (a bug; --debug shows "
        "the traceback) · 130 interrupted."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=Group,
)


def _version(value: bool) -> None:
    if value:
        from guardalign import __version__

        typer.echo(f"guardalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="On an internal error, print the traceback (before the command: "
                               "guardalign --debug scan ...)."),
) -> None:
    """Keep unsafe images out of vision-language models and the datasets they train on."""
    from cli._common import DEBUG

    DEBUG["on"] = debug


app.command("scan", cls=Command, no_args_is_help=True)(_scan.scan_command)
app.command("mask", cls=Command, no_args_is_help=True)(_mask.mask_command)
app.command("answer", cls=Command, no_args_is_help=True)(_answer.answer_command)
app.command("report", cls=Command, no_args_is_help=True)(_report.report_command)
app.command("calibrate", cls=Command, no_args_is_help=True)(_calibrate.calibrate_command)
app.command("eval", cls=Command, no_args_is_help=True)(_eval.eval_command)
app.command("probe", cls=Command, no_args_is_help=True)(_probe.probe_command)


def main() -> None:  # pragma: no cover - thin wrapper for ``python -m cli.main``
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
