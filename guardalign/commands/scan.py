"""``guardalign scan`` as a library function: source → decode → detector → sink, with CI gates.

``scan(...)``'s keyword arguments mirror the CLI flags one for one.
"""
from __future__ import annotations

from typing import Any, Sequence, TextIO

from guardalign.config import DetectConfig, EncoderConfig
from guardalign.errors import ConfigError
from guardalign.pipeline.runner import Gates, RunSummary

FORMATS = ("jsonl", "parquet")
ScanSummary = RunSummary  # the summary of a scan is the runner's


def scan(
    inputs: Sequence[str],
    *,
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
    out: str = "-",
    format: str | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    batch_size: int = DetectConfig.batch_size,
    device: str = EncoderConfig.device,
    precision: str = EncoderConfig.precision,
    workers: int = 4,
    resume: bool = False,
    overwrite: bool = False,
    fail_on_unsafe: bool = False,
    max_unsafe_rate: float | None = None,
    stdin: TextIO | None = None,
    null: bool = False,
    progress: bool = True,
    detector: Any = None,
    engine: str = "local",
    ray_address: str | None = None,
    concurrency: int | None = None,
    gpus_per_worker: float | None = None,
    merge: str | None = None,
) -> ScanSummary:
    """Scan images and write one record per input (fields: DESIGN §3).

    Raises a ``GuardalignError`` (exit 2) before writing anything when flags, the anchors YAML, the
    model or an input is unusable. Unreadable images become ``status: error`` records and the run goes on.
    ``detector`` lets a caller reuse an already-loaded ``Detector`` (the other detection flags are then ignored).
    ``engine="ray"`` runs on a Ray cluster into the folder ``out`` (:mod:`guardalign.pipeline.ray_scan`).
    """
    from guardalign.io.sinks import open_sink, read_records
    from guardalign.io.sources import count_items, iter_items
    from guardalign.pipeline.detect import DetectStage
    from guardalign.pipeline.runner import run_job

    from guardalign.pipeline.ray_engine import engine_config

    ray_cfg = engine_config(engine, ray_address=ray_address, concurrency=concurrency,
                            gpus_per_worker=gpus_per_worker, merge=merge)
    format = _check_output(format, out, resume, overwrite, inputs) if ray_cfg is None else format
    gates = Gates(fail_on_unsafe, max_unsafe_rate).validate()
    cfg = DetectConfig(
        method=method, patches=patches, grid=grid, stride=stride, tau=tau, theta=theta, eps=eps, batch_size=batch_size,
        scales=scales, budget=budget, dense_path=dense_path,
    ).validate()
    if ray_cfg is not None:
        from guardalign.pipeline import ray_scan

        if detector is not None:
            raise ConfigError("engine='ray' builds a Detector in every actor from the model options; pass those, "
                              "not a loaded detector")
        options = dict(clip_model=clip_model, pretrained=pretrained, anchors=anchors, precision=precision,
                       **_config_kwargs(cfg))
        from guardalign.pipeline.ray_engine import actor_options

        checked = _validation_detector(options)  # loaded on CPU: checks the options; CPU actors reuse it
        settings, options = checked.settings(), actor_options(options, checked, device)
        del checked
        summary = ray_scan.scan(
            list(inputs), out=out, fmt=format, settings=settings, batch_size=batch_size, options=options,
            cfg=ray_cfg, resume=resume, overwrite=overwrite, merge_to=merge, gates=gates, image_column=image_column,
            id_column=id_column, progress=progress)
        if progress:
            print_summary(summary)
        return summary
    inputs = list(inputs)
    # iter_items validates every input and Parquet schema now, before anything is written.
    items = iter_items(inputs, image_column=image_column, id_column=id_column, stdin=stdin, null=null)
    if detector is None:
        from guardalign.detection.detector import Detector

        detector = Detector.from_options(
            clip_model=clip_model, pretrained=pretrained, anchors=anchors, device=device, precision=precision,
            **_config_kwargs(cfg),
        )
    if progress:
        from guardalign.pipeline.summary import say_columns

        say_columns(getattr(items, "plans", {}))
    fitted = getattr(detector, "fitted_for_warning", None)
    if progress and fitted is not None and (line := fitted()):
        from guardalign.errors import warn

        warn(line)  # tuned anchors used with other settings than they were fitted for
    if overwrite and not resume:
        _remove_output(out, format)
    sink = open_sink(out, format, resume=resume)
    previous = read_records(out) if resume and sink.existing else ()
    total = None if "-" in inputs else count_items(inputs, image_column=image_column, id_column=id_column)
    # The sink creates its file on the first write and aborts cleanly (nothing new) on an exception.
    with sink:
        summary = run_job(items, DetectStage(detector, batch_size=batch_size), sink, previous=previous, out=out, total=total,
                          workers=workers, progress=progress, gates=gates, skipped=getattr(items, "skipped", None))
    if progress:
        print_summary(summary)
    return summary


def _check_output(format: str | None, out: str, resume: bool, overwrite: bool, inputs: Sequence[str]) -> str:
    """The output format (inferred from a .parquet/.jsonl name when not given); ConfigError for a bad combination."""
    from pathlib import Path

    suffix = Path(out).suffix.lower() if out != "-" else ""
    inferred = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix)
    if format is None:
        format = inferred or "jsonl"
    if format not in FORMATS:
        raise ConfigError(f"invalid --format {format!r}: expected one of {', '.join(FORMATS)}")
    if inferred is not None and inferred != format:
        raise ConfigError(f"--format {format} disagrees with the name --out {out}: drop --format, or name the "
                          f"file *.{format}")
    if format == "parquet" and out == "-":
        raise ConfigError("--format parquet needs a file: pass --out results.parquet (stdout is JSONL only)")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pick one")
    if out != "-":
        from guardalign.io.durable import check_not_input

        check_not_input(out, inputs)
    return format


def _remove_output(out: str, format: str) -> None:
    """--overwrite: remove an earlier output (and a Parquet journal) before the run starts."""
    import os
    from pathlib import Path

    if out == "-":
        return
    from guardalign.io.durable import _oserror

    for path in (Path(out), Path(out + ".partial.jsonl")):
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif os.path.lexists(path):
                raise ConfigError(f"--out {path} is not a regular file; not overwriting it")
        except OSError as exc:
            raise _oserror(path, exc, "cannot replace") from None


def _validation_detector(options: dict[str, Any]):
    """The driver's copy of a Ray run's detector (CPU): checks the options and gives the settings before any actor
    starts; CPU actors then take this copy rather than load their own (``ray_engine.actor_options``)."""
    from guardalign.detection.detector import Detector

    return Detector.from_options(device="cpu", **options)


def _config_kwargs(cfg: DetectConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def print_summary(summary: ScanSummary) -> None:
    """The scan summary on stderr (guardalign.pipeline.summary)."""
    from guardalign.pipeline.summary import print_summary as show

    show(summary, title="guardalign scan")
