"""Shared plumbing for the Typer commands: turn library errors into a message and an exit code."""
from __future__ import annotations

import sys
from typing import Any, Callable

import typer

from guardalign.config import DetectConfig


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


def stdin_if_dash(paths: list[str]):
    """The process stdin when '-' is among the inputs, else None."""
    return sys.stdin if "-" in paths else None


def parse_scales(text: str) -> tuple[int, ...]:
    """'2,4' → (2, 4); '' → (); anything else is a usage error (exit 2)."""
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected comma-separated integers such as 2 or 2,4",
                                 param_hint="--scales") from None


# Options shared by the commands that read images and detect (scan, mask, calibrate). Typer only
# reads these OptionInfo objects, so one instance can serve as the default in several commands.
_D = DetectConfig()
INPUTS = typer.Argument(..., help="Folders, image files, .parquet files, or '-' (paths on stdin).")
ANCHORS = typer.Option(None, "--anchors", help="Anchor YAML (default: the shipped anchors/default.yaml).")
CLIP_MODEL = typer.Option("ViT-B-32", "--clip-model", help="open_clip model name, or an open_clip model-config JSON.")
PRETRAINED = typer.Option("openai", "--pretrained", help="Pretrained tag, a local checkpoint path, or 'none' (random: scores meaningless).")
PATCHES = typer.Option(_D.patches, "--patches", help="search (score --grid windows, then re-cut the most suspicious within --budget encodes), grid (crop the --grid windows only) or dense (one forward pass).")
GRID = typer.Option(_D.grid, "--grid", help="Grid/search mode: windows per side (the coarse windows in search mode).")
STRIDE = typer.Option(_D.stride, "--stride", help="Grid/search mode: window stride as a fraction of the window (<1 overlaps).")
SCALES = typer.Option(",".join(map(str, _D.scales)), "--scales", help="Grid/search mode: extra grid sizes, comma-separated (e.g. 2 or 2,4): multi-scale windows.")
BUDGET = typer.Option(_D.budget, "--budget", help="Search mode: most image-tower forwards per image (whole image + coarse + refined windows; 9 per refined window).")
DENSE_PATH = typer.Option(_D.dense_path, "--dense-path", help="Dense mode: maskclip (value path), clearclip (q–q attention) or sclip (correlative attention).")
THETA = typer.Option(0.16, "--theta", help="Global method: unsafe when cos ≥ θ.")
IMAGE_COLUMN = typer.Option(None, "--image-column", help="Parquet image column (default: detected).")
ID_COLUMN = typer.Option(None, "--id-column", help="Parquet column to use as record id (default: file#row).")
BATCH_SIZE = typer.Option(32, "--batch-size", help="Images per model batch.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 …")
WORKERS = typer.Option(4, "--workers", help="Image-decoding threads.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr.")
