"""`guardalign calibrate`: flag parsing only; the work is guardalign.commands.calibrate.calibrate()."""
from __future__ import annotations

from typing import Optional

import typer

from cli._common import (
    BATCH_SIZE, BUDGET, CLIP_MODEL, DENSE_PATH, DEVICE, GRID, PATCHES, PRETRAINED, SCALES, STRIDE, call, parse_scales,
)

HELP = """Fit τ on labelled images: print a ROC table and write a tuned copy of the anchors YAML.

LABELLED is a JSONL file with one line per image: {"image": "imgs/a.png", "label": "safe"|"unsafe", "category": "weapons"} (category optional; image paths relative to the file). A scan output with a "label" added to each line works too. τ is the threshold with the highest true-positive rate whose false-positive rate on the safe images is at most --target-fpr; --per-category also fits one τ per category from its own labelled positives, all at the one FPR level that keeps the combined FPR (an image is unsafe when any category flags it) within the target. The copy keeps comments, key order and quoting; only tau lines change, and a fitted_for block records the model, weights, method, patches, grid and stride the scores were made with (scan warns when they differ). Fewer than 30 unsafe or 30 safe images give a warning with the 95% intervals of the chosen TPR and FPR. A JSON summary goes to stdout, the tables and warnings to stderr.

Examples:

  guardalign calibrate labelled.jsonl --anchors anchors.yaml --target-fpr 0.05 -o tuned.yaml

  guardalign calibrate labelled.jsonl --anchors anchors.yaml --per-category --from-scan scan.jsonl -o tuned.yaml

  guardalign calibrate labelled.jsonl --method global    # prints θ for `scan --method global --theta X`

Exit codes: 0 done · 2 usage/config/model error, nothing written · 3 done, but some lines could not be used (listed on stderr).
"""


def calibrate_command(
    labelled: str = typer.Argument(..., help="Labelled JSONL: {image, label: safe|unsafe, category?} per line."),
    anchors: Optional[str] = typer.Option(None, "--anchors", help="Anchor YAML to tune (default: the shipped anchors/default.yaml)."),
    target_fpr: float = typer.Option(0.05, "--target-fpr", help="Largest false-positive rate allowed on the safe images."),
    per_category: bool = typer.Option(False, "--per-category", help="Also fit one τ per category from its labelled positives."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write the tuned anchors YAML here (a copy; the input is never changed)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing -o file."),
    from_scan: Optional[str] = typer.Option(None, "--from-scan", help="Reuse the scores of a scan output (JSONL/Parquet), joined by id or image path."),
    clip_model: str = CLIP_MODEL,
    pretrained: str = PRETRAINED,
    method: str = typer.Option("ot", "--method", help="ot (fit τ, unsafe when cost ≤ τ) or global (fit θ, unsafe when cos ≥ θ); with --from-scan the records decide."),
    patches: str = PATCHES,
    grid: Optional[int] = GRID,
    stride: float = STRIDE,
    scales: Optional[str] = SCALES,
    budget: int = BUDGET,
    dense_path: str = DENSE_PATH,
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the AUROC interval."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or tables on stderr."),
) -> None:
    import json

    from guardalign.commands.calibrate import calibrate

    result = call(
        calibrate,
        labelled=labelled, anchors=anchors, target_fpr=target_fpr, per_category=per_category, out=out,
        overwrite=overwrite, from_scan=from_scan, clip_model=clip_model, pretrained=pretrained, method=method,
        patches=patches, grid=grid, stride=stride, scales=parse_scales(scales), budget=budget,
        dense_path=dense_path, batch_size=batch_size, device=device, bootstrap=bootstrap,
        seed=seed, progress=not quiet,
    )
    typer.echo(json.dumps(result.to_dict()))
    raise typer.Exit(result.exit_code)


calibrate_command.__doc__ = HELP
