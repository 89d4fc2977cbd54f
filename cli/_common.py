"""Shared plumbing for the Typer commands: turn library errors into a message and an exit code."""
from __future__ import annotations

import sys
from typing import Any, Callable

import typer
from typer.core import TyperCommand, TyperGroup


def call(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Call a library entry point; a GuardalignError becomes 'error: …' on stderr and its exit code (2).

    KeyboardInterrupt exits 130 without a traceback; anything else is a bug and keeps its traceback.
    """
    from guardalign.errors import GuardalignError

    try:
        return fn(**kwargs)
    except GuardalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _hide_flag_types(params: list) -> list:
    """Give flags an empty metavar: Typer's rich help prints an option's metavar, else its type, in the type
    column, so a flag would read ``<bool>`` and suggest ``--resume true`` (which click rejects). Flags take no
    value, so the column stays empty for them."""
    for p in params:  # Typer vendors its own click: test by duck type, not isinstance(click.Option)
        if getattr(p, "param_type_name", "") == "option" and getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class Command(TyperCommand):
    """Every guardalign command: Typer's, with flags shown without a value type in --help."""

    def get_params(self, ctx):
        return _hide_flag_types(super().get_params(ctx))


class Group(TyperGroup):
    """The root ``guardalign`` group, with the same flag display as :class:`Command`."""

    def get_params(self, ctx):
        return _hide_flag_types(super().get_params(ctx))


def stdin_if_dash(paths: list[str]):
    """The process stdin when '-' is among the inputs, else None."""
    return sys.stdin if "-" in paths else None


# Options shared by the commands that read images and detect (scan, mask, calibrate). Typer only
# reads these OptionInfo objects, so one instance can serve as the default in several commands.
INPUTS = typer.Argument(..., help="Folders, image files, .parquet files, or '-' (paths on stdin).")
ANCHORS = typer.Option(None, "--anchors", help="Anchor YAML (default: the shipped anchors/default.yaml).")
CLIP_MODEL = typer.Option("ViT-B-32", "--clip-model", help="open_clip model name, or an open_clip model-config JSON.")
PRETRAINED = typer.Option("openai", "--pretrained", help="Pretrained tag, a local checkpoint path, or 'none' (random: scores meaningless).")
PATCHES = typer.Option("grid", "--patches", help="grid (crop r×c windows) or dense (one forward pass).")
GRID = typer.Option(3, "--grid", help="Grid mode: windows per side.")
STRIDE = typer.Option(1.0, "--stride", help="Grid mode: window stride as a fraction of the window (<1 overlaps).")
THETA = typer.Option(0.16, "--theta", help="Global method: unsafe when cos ≥ θ.")
IMAGE_COLUMN = typer.Option(None, "--image-column", help="Parquet image column (default: detected).")
ID_COLUMN = typer.Option(None, "--id-column", help="Parquet column to use as record id (default: file#row).")
BATCH_SIZE = typer.Option(32, "--batch-size", help="Images per model batch.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 …")
WORKERS = typer.Option(4, "--workers", help="Image-decoding threads.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr.")
