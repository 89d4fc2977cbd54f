"""``guardalign mask`` as a library function: purified copies of images and Parquet datasets (DESIGN §1.1, Eq. 11).

Per item, using a reused scan (``from_scan``, matched by id) or an inline scan:

- unsafe: the unsafe patch boxes are filled at the original resolution (:func:`guardalign.detection.purify.apply_fill`)
  and the image is re-encoded in its original format where Pillow can write it (else PNG), upright (EXIF
  orientation baked in) and without metadata (EXIF/GPS, XMP, text chunks; the RGB ICC profile is kept);
- safe: copied byte-for-byte, or left out with ``only_unsafe``;
- unreadable (or missing from the scan): no output, ``status: error`` in the manifest, exit 3.

Layout under ``out_dir``: folder inputs are mirrored by relative path (the item id), files given directly
land at their base name (like ``cp``), and stdin list lines at their path as given, sanitised (``..``, the
root and drive letters dropped; recorded in the manifest). A Parquet input gives Parquet at the same place,
with the same schema, rows and row order (``only_unsafe``: just the unsafe rows), written row group by row
group. Its image column is replaced: ``struct``/``binary`` cells get the purified bytes; ``path`` cells keep
their relative path and the images are written beside the output Parquet at that path (a path that had to
be sanitised is rewritten in the cell). A row that could not be verified (unreadable, changed since the scan,
missing from it) stays in place with its image cell null, and is reported. A Parquet output is
written only when every row was handled: one that cannot be is abandoned (never half-purified). ``--overlay`` writes
reviewer images to their own folder, ``<out_dir>.overlays/`` (or ``--overlay-dir``), never inside the purified
tree: ``<output>.overlay.png`` per flagged file, ``<parquet>.overlays/<row>.overlay.png`` per flagged row.
``manifest.jsonl`` has one line per item (fields in :func:`_entry`).

Safety: nothing is written outside ``out_dir`` (``..``, absolute paths and symlinked sub-folders are
refused or sanitised), an original is never overwritten, an existing output is replaced only with
``overwrite`` (an identical one counts as done), every file is written to a temp file and renamed, and a
rerun skips items the manifest records as complete, so a crashed run can simply be run again.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from guardalign.config import DetectConfig, EncoderConfig
from guardalign.errors import ConfigError, InputError
from guardalign.pipeline.mask_out import MANIFEST, inside, safe_relpath  # noqa: F401 (safe_relpath re-exported)
from guardalign.pipeline.mask_stage import MaskStage, MaskSummary
from guardalign.pipeline.mask_stage import decode_unchanged as _decode_unchanged
from guardalign.records import MASK_NEEDS


def mask(
    inputs: Sequence[str],
    *,
    out_dir: str,
    from_scan: str | None = None,
    fill: str = "mean",
    dilate: int = 0,
    overlay: bool = False,
    overlay_dir: str | None = None,
    only_unsafe: bool = False,
    overwrite: bool = False,
    force: bool = False,
    anchors: str | None = None,
    clip_model: str = EncoderConfig.model,
    pretrained: str = EncoderConfig.pretrained,
    method: str = DetectConfig.method,
    patches: str = DetectConfig.patches,
    grid: int | None = DetectConfig.grid,
    stride: float = DetectConfig.stride,
    scales: tuple[int, ...] | None = DetectConfig.scales,
    budget: int = DetectConfig.budget,
    dense_path: str = DetectConfig.dense_path,
    tau: float | None = None,
    theta: float = DetectConfig.theta,
    eps: float = DetectConfig.eps,
    image_column: str | None = None,
    id_column: str | None = None,
    batch_size: int = DetectConfig.batch_size,
    device: str = EncoderConfig.device,
    precision: str = EncoderConfig.precision,
    workers: int = 4,
    stdin: TextIO | None = None,
    progress: bool = True,
    detector: Any = None,
    engine: str = "local",
    ray_address: str | None = None,
    concurrency: int | None = None,
    gpus_per_worker: float | None = None,
) -> MaskSummary:
    """Write purified copies of ``inputs`` under ``out_dir`` (module docstring) and a ``manifest.jsonl``.

    Raises a ``GuardalignError`` (exit 2) before writing anything for bad flags, an ``out_dir`` inside an
    input folder (unless ``force``), unusable inputs or model, or a ``from_scan`` file whose provenance
    (model, anchors sha256) differs from the detector these flags build. ``detector`` reuses a loaded one.
    ``engine="ray"`` runs on a Ray cluster (:mod:`guardalign.pipeline.ray_mask`); ``out_dir`` must then be a
    folder every node can write (a shared filesystem).
    """
    from guardalign.detection.purify import FILLS
    from guardalign.io.sinks import open_sink, read_records
    from guardalign.io.sources import count_items, iter_items
    from guardalign.pipeline.mask_out import compact_manifest, remove_stale_tmp
    from guardalign.pipeline.runner import run_job

    if fill not in FILLS:
        raise ConfigError(f"invalid --fill {fill!r}: expected one of {', '.join(FILLS)}")
    if dilate < 0:
        raise ConfigError(f"invalid --dilate {dilate}: expected pixels ≥ 0")
    if from_scan is not None and tau is not None:
        raise ConfigError("--tau cannot be combined with --from-scan: the scan's verdicts are reused "
                          "(rescan with --tau)")
    root = _check_out_dir(inputs, out_dir, force)
    overlay_root = _overlay_root(root, inputs, overlay, overlay_dir)
    cfg = DetectConfig(method=method, patches=patches, grid=grid, stride=stride, tau=tau, theta=theta, eps=eps,
                       batch_size=batch_size, scales=scales, budget=budget, dense_path=dense_path).validate()
    from dataclasses import asdict

    from guardalign.pipeline.ray_engine import engine_config

    ray_cfg = engine_config(engine, ray_address=ray_address, concurrency=concurrency, gpus_per_worker=gpus_per_worker)
    items = iter_items(list(inputs), image_column=image_column, id_column=id_column, stdin=stdin) if ray_cfg is None else ()
    _refuse_unscanned_columns(getattr(items, "plans", {}))
    if progress:
        from guardalign.pipeline.summary import say_columns

        say_columns(getattr(items, "plans", {}))
    options = dict(clip_model=clip_model, pretrained=pretrained, anchors=anchors, precision=precision, **asdict(cfg))
    index = mean = None
    if from_scan is not None:  # the scan's records say which model and anchors made them: no model to load
        index, scan_settings = _load_scan(from_scan)
        _check_anchors(from_scan, index, anchors)
        mean = (scan_settings or {}).get("image_mean")
    if detector is None and (index is None or mean is None or ray_cfg is not None):
        from guardalign.detection.detector import Detector

        # --engine ray: this copy (CPU) checks the options and gives settings; CPU actors reuse it, GPU ones load
        detector = Detector.from_options(device=device if ray_cfg is None else "cpu", **options)
    elif detector is not None and ray_cfg is not None:
        raise ConfigError("engine='ray' builds a Detector in every actor from the model options; pass those, "
                          "not a loaded detector")
    if index is not None and detector is not None:
        _check_provenance(from_scan, index, detector.provenance)
    mean = tuple(mean) if mean is not None else tuple(detector.encoder.mean)
    settings = {"fill": fill, "dilate": dilate, "overlay": str(overlay_root) if overlay_root else None,
                "only_unsafe": only_unsafe,
                "detector": detector.settings() if index is None else None,
                "from_scan": str(Path(from_scan).resolve()) if from_scan is not None else None}
    if ray_cfg is not None:
        from guardalign.pipeline import ray_mask
        from guardalign.pipeline.ray_engine import actor_options

        options = actor_options(options, detector, device)
        detector = None  # the driver's copy now lives only in options (ray_engine.DriverDetector)
        summary = ray_mask.mask(
            list(inputs), root=root, settings=settings, options=options, index=index,
            batch_size=batch_size, stage_kwargs=dict(fill=fill, dilate=dilate, overlay=overlay_root,
                                                     only_unsafe=only_unsafe, overwrite=overwrite, mean=mean),
            cfg=ray_cfg, force=force, image_column=image_column, id_column=id_column, progress=progress)
        if progress:
            print_summary(summary, root)
        return summary
    total = None if "-" in inputs else count_items(list(inputs), image_column=image_column, id_column=id_column)
    stage = MaskStage(root, inputs, fill=fill, dilate=dilate, overlay=overlay_root, only_unsafe=only_unsafe,
                      overwrite=overwrite, mean=mean, settings=settings, detector=detector,
                      index=index, batch_size=batch_size if index is None else 64)
    root.mkdir(parents=True, exist_ok=True)
    manifest = open_sink(str(root / MANIFEST), "jsonl", resume=True)
    manifest.claim()  # one run per out_dir: locked before anything is read, written or cleaned up
    previous = {str(e.get("id")): e for e in read_records(root / MANIFEST)}  # the last line per id counts
    if overwrite:  # entries made with other settings are redone (and their outputs replaced), not refused
        previous = {k: e for k, e in previous.items() if e.get("settings") == settings}
    remove_stale_tmp(root)  # safe now: no other run can own a temp file here
    summary = MaskSummary()
    todo = _outside_out_dir(items, root, inputs, summary)
    with manifest:
        run_job(todo, stage, manifest, previous=previous.values(), done_if=stage.finished,
                out=f"--out-dir {out_dir}", total=total, workers=workers, progress=progress, summary=summary,
                decode=_decode_unchanged(index) if index is not None else True)
    _empty_parquet_outputs(getattr(items, "plans", {}), root, inputs, overwrite)
    compact_manifest(root / MANIFEST)
    if progress:
        print_summary(summary, root)
    return summary


def _refuse_unscanned_columns(plans: dict) -> None:
    """A Parquet file with a second image column would pass that column's bytes through unpurified: refuse it."""
    for plan in plans.values():
        if plan.others:
            raise ConfigError(
                f"{plan.path}: besides the image column {plan.column!r} it has other image columns "
                f"({', '.join(plan.others)}) that mask would copy through unpurified. Drop them from the file, "
                "or mask each image column into its own Parquet (--image-column).")


def _empty_parquet_outputs(plans: dict, root: Path, inputs: Sequence[str], overwrite: bool) -> None:
    """A zero-row Parquet input has no items, so no row writes its output: give it a zero-row copy (same
    schema and metadata), as every other Parquet input gets its purified copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from guardalign.io.durable import write_parts
    from guardalign.pipeline.mask_out import parquet_base

    for plan in plans.values():
        if plan.error or plan.num_rows:
            continue
        target = root / safe_relpath(parquet_base(str(plan.path), inputs))[0]
        if target.exists() and not overwrite:
            continue
        schema = pq.read_schema(pa.OSFile(os.fsencode(plan.path)))
        write_parts(target, lambda tmp, s=schema: pq.write_table(s.empty_table(), tmp), inside=root)


def _outside_out_dir(items: Iterator, root: Path, inputs: Sequence[str], summary: MaskSummary) -> Iterator:
    """With --force, out_dir may lie inside an input folder: files there are outputs, not inputs (counted)."""
    if not any(g != "-" and Path(g).is_dir() and inside(str(root), Path(g).resolve()) for g in inputs):
        yield from items
        return
    for item in items:
        src = item.meta.get("parquet") or item.meta.get("tar") or (str(item.path) if item.path is not None else None)
        if src is not None and inside(src, root):
            summary.tally["excluded"] += 1
            continue
        yield item


# ----------------------------------------------------------------------------- checks done before writing


def _check_out_dir(inputs: Sequence[str], out_dir: str, force: bool) -> Path:
    """Resolved out_dir; ConfigError when it is a file or overlaps an input in either direction (``force``
    allows only an out_dir inside an input folder, whose files are then not taken as inputs)."""
    from guardalign.io.durable import check_out_dir

    if not str(out_dir).strip():
        raise ConfigError("--out-dir is required")
    return check_out_dir(Path(out_dir).expanduser(), inputs, force=force)


def _overlay_root(root: Path, inputs: Sequence[str], overlay: bool, overlay_dir: str | None) -> Path | None:
    """Where reviewer overlays go: their own folder beside --out-dir (``<out-dir>.overlays``), never inside the
    purified tree (a later scan of the clean folder must not pick up unmasked images under a tint)."""
    if not overlay and overlay_dir is None:
        return None
    where = Path(overlay_dir).expanduser().resolve() if overlay_dir else root.with_name(root.name + ".overlays")
    if where == root or root in where.parents or where in root.parents:
        raise ConfigError(f"--overlay-dir {where} overlaps --out-dir {root}: overlays show the unmasked image, so "
                          "they must stay out of the purified folder")
    for given in inputs:
        if given != "-" and Path(given).is_dir():
            folder = Path(given).resolve()
            if where == folder or folder in where.parents or where in folder.parents:
                raise ConfigError(f"--overlay-dir {where} overlaps the input folder {given}")
    if where.exists() and not where.is_dir():
        raise ConfigError(f"--overlay-dir {where} exists and is not a directory")
    return where


def _load_scan(path: str) -> tuple[dict[str, dict], dict | None]:
    """Index a scan output by id (the fields mask needs) and return the scan's settings.

    ConfigError when its ok records were made with different settings (a mixed file cannot be trusted).
    """
    from guardalign.io.sinks import read_records
    from guardalign.pipeline.runner import settings_diff

    index: dict[str, dict] = {}
    settings, first = None, None
    for n, rec in enumerate(read_records(path), 1):
        if rec.get("id") is None:
            raise InputError(f"--from-scan {path}: record {n} has no 'id'")
        if rec.get("status") == "ok" and rec.get("settings") is not None:
            if first is None:
                settings, first = rec["settings"], rec["id"]
            elif rec["settings"] != settings:
                raise ConfigError(f"--from-scan {path}: record {n} (id {rec['id']!r}) was made with other settings "
                                  f"than record {first!r} (" + "; ".join(settings_diff(settings, rec["settings"]))
                                  + "); rescan into one file with one set of settings")
        index[str(rec["id"])] = {k: rec.get(k) for k in MASK_NEEDS}
    return index, settings


def _check_anchors(path: str, index: dict[str, dict], anchors: str | None) -> None:
    """--anchors given with --from-scan must be the scan's anchor set (checked by content hash, no model)."""
    if anchors is None:
        return
    from guardalign.detection.anchors import load_anchors

    sha = load_anchors(anchors).sha256
    for rid, rec in index.items():
        if rec.get("status") == "ok" and rec.get("anchors_sha256") not in (None, sha):
            raise ConfigError(f"--from-scan {path}: record {rid!r} was scanned with anchors sha256 "
                              f"{rec['anchors_sha256'][:12]}…, but --anchors {anchors} has {sha[:12]}…. Drop "
                              "--anchors (the scan's are used), or mask without --from-scan to rescan.")


def _check_provenance(path: str, index: dict[str, dict], provenance: dict[str, str]) -> None:
    """A loaded detector (older scans without settings, or one passed in) must be the scan's."""
    for rid, rec in index.items():
        if rec.get("status") != "ok":
            continue
        for key, what in (("anchors_sha256", "anchors sha256"), ("model", "CLIP model")):
            if rec.get(key) != provenance[key]:
                raise ConfigError(
                    f"--from-scan {path}: record {rid!r} was scanned with {what} {rec.get(key)!r}, but these "
                    f"flags give {provenance[key]!r}. Pass the --anchors, --clip-model and --pretrained the scan "
                    "used, or mask without --from-scan to rescan.")


def print_summary(summary: MaskSummary, root: Path) -> None:
    """What was purified, copied, skipped, resumed, and what failed (a rich table on stderr)."""
    from guardalign.pipeline.summary import print_summary as show

    rows = [(what, str(n)) for what, n in (
        ("purified (unsafe)", summary.purified), ("copied (safe)", summary.copied),
        ("skipped (--only-unsafe)", summary.skipped), ("overlays", summary.overlays),
        ("paths sanitised", summary.sanitized), ("not overwritten (exists)", summary.conflicts),
        ("excluded (inside --out-dir)", summary.excluded)) if n or what.startswith(("purified", "copied"))]
    show(summary, title=f"guardalign mask → {root}", extra_rows=rows, verdicts=False)
