"""`guardalign scan`: flag parsing only; the work is guardalign.commands.scan.scan()."""
from __future__ import annotations

from typing import List, Optional

import typer

from cli._common import (  # shared option declarations
    ANCHORS, BATCH_SIZE, BUDGET, CLIP_MODEL, CONCURRENCY, DENSE_PATH, DEVICE, ENGINE, GPUS_PER_WORKER, GRID, ID_COLUMN,
    IMAGE_COLUMN, INPUTS, PATCHES, PRETRAINED, QUIET, RAY_ADDRESS, SCALES, STRIDE, THETA, WORKERS, call, parse_scales,
    stdin_if_dash,
)

HELP = """Score images for unsafe content and write one record per image.

INPUTS are folders (recursive), image files, .parquet files, webdataset .tar shards (id shard.tar#key), folders of them, or '-' for a list of paths on stdin. Records go to --out (JSONL, or Parquet with --format parquet); '-' is stdout.

With --engine ray the same detection runs on a Ray cluster: INPUTS may also be quoted globs and URIs (s3://, gs://, file://), and --out is a folder (or URI) of record shards, one per input fragment, plus manifest.json; --resume skips finished fragments, --merge FILE combines the shards into one file.

Examples:

  guardalign scan photos/ --out scan.jsonl

  guardalign scan data/train.parquet --image-column image --out scan.parquet

  find imgs -name '*.png' | guardalign scan - --patches dense --max-unsafe-rate 0.01 --out scan.jsonl

  find imgs -type f -print0 | guardalign scan - -0 --out scan.jsonl --overwrite

  guardalign scan photos/ --grid 3 --out scan.jsonl   # the paper's 3×3 grid: 10 encodes per image instead of 30

  guardalign scan imgs/ --clip-model ViT-B-32 --pretrained ./open_clip_pytorch_model.bin   # offline weights

  guardalign scan data/ --engine ray --concurrency 1 --out scan-shards/ --merge scan.parquet   # Ray (README: Scaling out)

Exit codes: 0 done, gates passed · 1 a gate failed (--fail-on-unsafe, --max-unsafe-rate) · 2 usage/config/model error, nothing written · 3 finished, but some inputs could not be read (see their status=error records).
"""


def scan_command(
    inputs: List[str] = INPUTS,
    anchors: Optional[str] = ANCHORS,
    clip_model: str = CLIP_MODEL,
    pretrained: str = PRETRAINED,
    method: str = typer.Option("ot", "--method", help="ot (patch optimal transport) or global (ETA whole-image cosine)."),
    patches: str = PATCHES,
    grid: Optional[int] = GRID,
    stride: float = STRIDE,
    scales: Optional[str] = SCALES,
    budget: int = BUDGET,
    dense_path: str = DENSE_PATH,
    tau: Optional[float] = typer.Option(None, "--tau", help="Override every category's τ (a cost 1−cos; unsafe when d ≤ τ)."),
    theta: float = THETA,
    out: str = typer.Option("-", "--out", "-o", help="Output file, or '-' for stdout (JSONL); with --engine ray a folder or URI of shards."),
    format: Optional[str] = typer.Option(None, "--format", help="jsonl or parquet (default: from the --out name, else jsonl; shards: parquet)."),
    image_column: Optional[str] = IMAGE_COLUMN,
    id_column: Optional[str] = ID_COLUMN,
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    workers: int = WORKERS,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run: skip ids already in --out (same settings only)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out instead of refusing."),
    null: bool = typer.Option(False, "--null", "-0", help="With '-': paths on stdin are NUL-separated (find -print0)."),
    fail_on_unsafe: bool = typer.Option(False, "--fail-on-unsafe", help="Exit 1 if any image is unsafe."),
    max_unsafe_rate: Optional[float] = typer.Option(None, "--max-unsafe-rate", help="Exit 1 if the unsafe fraction exceeds R."),
    engine: str = ENGINE,
    ray_address: Optional[str] = RAY_ADDRESS,
    concurrency: Optional[int] = CONCURRENCY,
    gpus_per_worker: Optional[float] = GPUS_PER_WORKER,
    merge: Optional[str] = typer.Option(None, "--merge", help="--engine ray: also combine the shards, in input order, into this one file (.parquet or .jsonl)."),
    quiet: bool = QUIET,
) -> None:
    from guardalign.commands.scan import scan

    summary = call(
        scan,
        inputs=inputs, anchors=anchors, clip_model=clip_model, pretrained=pretrained, method=method,
        patches=patches, grid=grid, stride=stride, scales=parse_scales(scales), budget=budget,
        dense_path=dense_path, tau=tau, theta=theta, out=out, format=format,
        image_column=image_column, id_column=id_column, batch_size=batch_size, device=device,
        workers=workers, resume=resume, overwrite=overwrite, null=null, fail_on_unsafe=fail_on_unsafe, max_unsafe_rate=max_unsafe_rate,
        stdin=stdin_if_dash(inputs), progress=not quiet, engine=engine, ray_address=ray_address,
        concurrency=concurrency, gpus_per_worker=gpus_per_worker, merge=merge,
    )
    raise typer.Exit(summary.exit_code)


scan_command.__doc__ = HELP
