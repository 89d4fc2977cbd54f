"""`guardalign mask`: flag parsing only; the work is guardalign.commands.mask.mask()."""
from __future__ import annotations

from typing import List, Optional

import typer

from cli._common import (  # shared option declarations
    ANCHORS, BATCH_SIZE, BUDGET, CLIP_MODEL, CONCURRENCY, DENSE_PATH, DEVICE, ENGINE, GPUS_PER_WORKER, GRID, ID_COLUMN,
    IMAGE_COLUMN, INPUTS, PATCHES, PRETRAINED, QUIET, RAY_ADDRESS, SCALES, STRIDE, THETA, WORKERS, call, parse_scales,
    stdin_if_dash,
)

HELP = """Write purified copies of images: unsafe patches masked, safe images copied byte-for-byte.

INPUTS are what `scan` takes: folders (mirrored by relative path under --out-dir), image files, .parquet files (written back as Parquet with the same schema, rows and order, the image column replaced; a row that cannot be verified keeps its place with a null image), webdataset .tar shards (written back as tar shards with the same members and order, images purified; a sample that cannot be verified is left out) or '-' for paths on stdin. Purified images keep their format where possible, are stored upright and lose EXIF/GPS metadata. --out-dir/manifest.jsonl has one line per item: id, source, status, output, verdict, masked boxes, fill, the source's sha256. Rerun the same command to finish an interrupted run.

Examples:

  guardalign mask photos/ --out-dir clean/

  guardalign scan data/ --out scan.jsonl && guardalign mask data/ --from-scan scan.jsonl --out-dir clean/ --overlay

  guardalign mask train.parquet --out-dir clean/ --fill blur --dilate 8 --only-unsafe

  guardalign mask data/ --engine ray --concurrency 1 --out-dir clean/   # on Ray: --out-dir on a folder every node shares

Exit codes: 0 done · 2 usage/config/model error, or --from-scan made with other anchors or model (nothing written) · 3 finished, but some items have no output (unreadable, missing from the scan, changed since the scan, or an existing output not overwritten); see manifest.jsonl.
"""


def mask_command(
    inputs: List[str] = INPUTS,
    out_dir: str = typer.Option(..., "--out-dir", "-o", help="Folder for purified copies and manifest.jsonl (never an input folder)."),
    from_scan: Optional[str] = typer.Option(None, "--from-scan", help="Reuse this scan's verdicts and boxes (JSONL or Parquet), matched by id, instead of scanning. The scan's records say which model, anchors and settings made them, so no model is loaded and the detection flags do not apply (an --anchors given must be the scan's). An image whose bytes differ from the scanned sha256 is an error, not copied."),
    fill: str = typer.Option("mean", "--fill", help="mean (Eq. 11: CLIP's mean colour, zero after normalisation), black, blur (Gaussian, σ half the box's long side) or pixelate (2 blocks along the box's long side, at half contrast). Blur and pixelate keep only the box's mean tone and a damped coarse layout."),
    dilate: int = typer.Option(0, "--dilate", help="Grow every masked box by PX pixels on each side."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write a ≤512 px reviewer image (patch heatmap, labelled unsafe boxes) per flagged image, into <out-dir>.overlays/ (outside the purified folder)."),
    overlay_dir: Optional[str] = typer.Option(None, "--overlay-dir", help="Folder for the reviewer images (implies --overlay; must not overlap --out-dir or an input)."),
    only_unsafe: bool = typer.Option(False, "--only-unsafe", help="Write only the purified unsafe images (Parquet: only their rows); skip safe ones."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs that differ (never the originals)."),
    force: bool = typer.Option(False, "--force", help="Allow an --out-dir inside an input folder (its contents are then not read as inputs)."),
    anchors: Optional[str] = ANCHORS,
    clip_model: str = CLIP_MODEL,
    pretrained: str = PRETRAINED,
    method: str = typer.Option("ot", "--method", help="ot (patch optimal transport) or global (ETA; masks the whole image)."),
    patches: str = PATCHES,
    grid: Optional[int] = GRID,
    stride: float = STRIDE,
    scales: Optional[str] = SCALES,
    budget: int = BUDGET,
    dense_path: str = DENSE_PATH,
    tau: Optional[float] = typer.Option(None, "--tau", help="Override every category's τ (not with --from-scan)."),
    theta: float = THETA,
    image_column: Optional[str] = IMAGE_COLUMN,
    id_column: Optional[str] = ID_COLUMN,
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    workers: int = WORKERS,
    engine: str = ENGINE,
    ray_address: Optional[str] = RAY_ADDRESS,
    concurrency: Optional[int] = CONCURRENCY,
    gpus_per_worker: Optional[float] = GPUS_PER_WORKER,
    quiet: bool = QUIET,
) -> None:
    from guardalign.commands.mask import mask

    summary = call(
        mask,
        inputs=inputs, out_dir=out_dir, from_scan=from_scan, fill=fill, dilate=dilate, overlay=overlay, overlay_dir=overlay_dir,
        only_unsafe=only_unsafe, overwrite=overwrite, force=force, anchors=anchors, clip_model=clip_model,
        pretrained=pretrained, method=method, patches=patches, grid=grid, stride=stride, scales=parse_scales(scales), budget=budget,
        dense_path=dense_path, tau=tau, theta=theta,
        image_column=image_column, id_column=id_column, batch_size=batch_size, device=device, workers=workers,
        stdin=stdin_if_dash(inputs), progress=not quiet, engine=engine, ray_address=ray_address,
        concurrency=concurrency, gpus_per_worker=gpus_per_worker,
    )
    raise typer.Exit(summary.exit_code)


mask_command.__doc__ = HELP
