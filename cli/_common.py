"""Shared plumbing for the Typer commands: turn every failure into one line and a documented exit code."""
from __future__ import annotations

import sys
from typing import Any, Callable

import typer
from typer.core import TyperCommand, TyperGroup


DEBUG = {"on": False}  # set by the global --debug option (or GUARDALIGN_DEBUG=1): show tracebacks


def debug_enabled() -> bool:
    import os

    return DEBUG["on"] or os.environ.get("GUARDALIGN_DEBUG", "") not in ("", "0")

from guardalign.config import DetectConfig


def call(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Call a library entry point and turn every failure into one line on stderr and a documented exit code.

    A GuardalignError exits with its own code (2 usage/config/model/input, 4 nothing scanned under a gate,
    5 output not written); Ctrl-C exits 130; anything else is a bug: exit 70 with one line, and the
    traceback only with ``guardalign --debug``.
    """
    from guardalign.errors import EXIT_INTERRUPTED, GuardalignError

    try:
        return fn(**kwargs)
    except GuardalignError as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the last resort: never a bare traceback, never exit 1
        internal_error(exc)


def internal_error(exc: BaseException) -> None:
    """Report an unexpected exception in one line (plus the traceback with --debug); exit 70."""
    import traceback

    from guardalign.errors import EXIT_INTERNAL

    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    typer.echo(f"internal error: {type(exc).__name__}: {_one_line(exc)} (a bug; rerun with "
               "'guardalign --debug ...' for the traceback)", err=True)
    raise typer.Exit(EXIT_INTERNAL) from None


def _one_line(exc: BaseException) -> str:
    from guardalign.pathnames import printable

    text = " ".join(str(exc).split()) or type(exc).__name__
    return printable(text)


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


def parse_scales(text: str | None) -> tuple[int, ...] | None:
    """'2,4' → (2, 4); '' → (); None (flag not given) → None, the --patches mode's default; else exit 2."""
    if text is None:
        return None
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
PATCHES = typer.Option(_D.patches, "--patches", help="grid (crop the --grid and --scales windows; default 5×5 + 2×2, 30 encodes), search (score --grid windows, then re-cut the most suspicious within --budget encodes) or dense (one forward pass).")
GRID = typer.Option(None, "--grid", show_default=False, help="Grid/search mode: windows per side (the coarse windows in search mode). [default: 5 with --patches grid, 3 with search]")
STRIDE = typer.Option(_D.stride, "--stride", help="Grid/search mode: window stride as a fraction of the window (<1 overlaps).")
SCALES = typer.Option(None, "--scales", show_default=False, help="Grid/search mode: extra grid sizes, comma-separated (e.g. 2 or 2,4; '' for none): multi-scale windows. [default: 2 with the default --patches grid --grid 5, else none]")
BUDGET = typer.Option(_D.budget, "--budget", help="Search mode: most image-tower forwards per image (whole image + coarse + refined windows; 9 per refined window).")
DENSE_PATH = typer.Option(_D.dense_path, "--dense-path", help="Dense mode: maskclip (value path), clearclip (q–q attention) or sclip (correlative attention).")
THETA = typer.Option(0.16, "--theta", help="Global method: unsafe when cos ≥ θ.")
IMAGE_COLUMN = typer.Option(None, "--image-column", help="Parquet image column (default: detected).")
ID_COLUMN = typer.Option(None, "--id-column", help="Parquet column to use as record id (default: file#row).")
BATCH_SIZE = typer.Option(32, "--batch-size", help="Images per model batch.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 …")
WORKERS = typer.Option(4, "--workers", min=1, help="Image-decoding threads (≥ 1).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr.")

# The Ray engine (scan and mask): `--engine ray` runs the same stages on a Ray cluster (pip install 'guardalign[ray]').
ENGINE = typer.Option("local", "--engine", help="local (this process) or ray (a Ray cluster: decoding in CPU tasks, detection in model actors; scan's --out is then a folder of record shards).")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else one started on this machine with `ray start`, else a local Ray just for the run).")
CONCURRENCY = typer.Option(None, "--concurrency", help="--engine ray: model actors, each holding one detector (default 1).")
GPUS_PER_WORKER = typer.Option(None, "--gpus-per-worker", help="--engine ray: GPUs per model actor (default: 1 when the cluster has GPUs, else 0).")
