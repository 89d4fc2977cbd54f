"""``scan --engine ray``: fragments → Ray Data (decode tasks, DetectStage actors) → one shard per fragment.

The driver plans the fragments, checks resume and settings (the runner's :func:`check_settings`), writes each
fragment's records into its shard in input order, keeps the run's :class:`RunSummary` (gates and exit codes
mean what they mean locally), writes ``manifest.json`` and, with ``merge``, one combined file.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from guardalign.errors import ConfigError
from guardalign.pipeline.runner import Gates, RunSummary


def collect(ds, todo: list, make_writer: Callable[[Any], Any], summary: RunSummary, advance,
            on_finish: Callable[[Any, Any], dict]) -> dict[str, dict]:
    """Drain the pipeline's results into one writer per fragment; each finished fragment's entry by key.

    Repeated positions (a block re-run after a worker died) are dropped by the writer; a fragment is finished
    when its sentinel's count of items has been written.
    """
    from guardalign.pipeline.ray_engine import results

    writers: dict[int, Any] = {}
    finished: set[int] = set()
    entries: dict[str, dict] = {}
    try:
        for idx, pos, end, fields, payload in results(ds):
            if idx in finished:
                continue
            w = writers.get(idx)
            if w is None:
                w = writers[idx] = make_writer(todo[idx])
            if end >= 0:
                w.set_end(end)
            else:
                written = w.add(pos, fields, payload)
                for rec in written:
                    summary.add(rec)
                summary.processed += len(written)
                advance(len(written))
            if w.complete:
                entries[todo[idx].key] = on_finish(todo[idx], writers.pop(idx))
                finished.add(idx)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if writers:  # the pipeline ended without a fragment's items: never report it as done
        bad = ", ".join(f"{todo[i].key} ({w.next} of {w.end} items)" for i, w in writers.items())
        for w in writers.values():
            w.abort()
        raise RuntimeError(f"Ray pipeline ended before these fragments were complete: {bad}")
    return entries


class _RunIds:
    """With --id-column, ids can repeat across files: a repeat becomes an error record ``<id>#<k>`` (as locally)."""

    def __init__(self):
        self.seen: dict[str, tuple[int, str]] = {}

    def __call__(self, rec: dict) -> dict:
        rid = str(rec.get("id"))
        count, first = self.seen.get(rid, (0, str(rec.get("source"))))
        self.seen[rid] = (count + 1, first)
        if not count:
            return rec
        return {"id": f"{rid}#{count + 1}", "source": rec.get("source"), "status": "error",
                "error": f"duplicate id {rid!r} (first seen at {first}); every input needs its own id", "verdict": None}


def refuse_out_in_inputs(out: str, inputs: Sequence[str]) -> None:
    """A local output folder may not lie inside (or be) a local input folder: its shards would become inputs."""
    if "://" in out:
        return
    root = Path(out).resolve()
    for g in inputs:
        if "://" not in g and Path(g).is_dir():
            folder = Path(g).resolve()
            if root == folder or folder in root.parents:
                raise ConfigError(f"--out {out} is inside the input folder {g}: its shards would be read as inputs "
                                  "by the next run; choose another --out")


def scan(inputs: Sequence[str], *, out: str, fmt: str | None, settings: dict, batch_size: int, options: dict, cfg,
         resume: bool,
         overwrite: bool, merge_to: str | None, gates: Gates, image_column: str | None, id_column: str | None,
         progress: bool) -> RunSummary:
    """Run a scan on Ray into the folder ``out``. ``settings`` are those of the detector that ``options`` build
    (every actor builds its own from them); ``batch_size`` images go to each ``DetectStage.process`` call."""
    from guardalign.pipeline import fragments, shards
    from guardalign.pipeline.progress import progress_bar
    from guardalign.pipeline.ray_engine import DetectActor, gpus, pipeline, ray_session

    fmt = fmt or "parquet"
    if fmt not in shards.FORMATS:
        raise ConfigError(f"invalid --format {fmt!r}: expected one of {', '.join(shards.FORMATS)}")
    if out == "-" or not out.strip():
        raise ConfigError("--engine ray writes a folder of shards: pass --out DIR (or a URI such as s3://b/scan/)")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pick one")
    frags = fragments.plan(inputs, image_column=image_column, id_column=id_column, fragment_rows=cfg.fragment_rows)
    refuse_out_in_inputs(out, fragments.expand(inputs))
    outdir = shards.OutDir(out)
    outdir.claim()
    summary = RunSummary(name="scan")
    try:
        todo, done = shards.prepare(outdir, frags, settings, resume=resume, overwrite=overwrite)
        for e in done:
            shards.add_counts(summary, e)
        entries = {e["fragment"]: e for e in done}
        total = _total(frags)
        start = time.perf_counter()
        provenance = {"command": "scan", "engine": "ray", "inputs": list(inputs), "format": fmt,
                      "concurrency": cfg.concurrency, "fragment_rows": cfg.fragment_rows}
        if todo:
            ids = _RunIds() if id_column else None
            with ray_session(cfg) as ray, progress_bar("scan", total, enabled=progress, unit="img",
                                                       completed=summary.resumed) as advance:
                provenance["gpus_per_worker"] = gpus(ray, cfg)
                ds = pipeline(ray, todo, DetectActor, {"options": options, "fmt": fmt, "settings": settings}, cfg,
                              batch_size=batch_size, image_column=image_column, id_column=id_column)
                entries.update(collect(ds, todo, lambda f: shards.ShardWriter(outdir, f, fmt, settings, transform=ids),
                                       summary, advance, lambda f, w: w.finish()))
        summary.seconds = time.perf_counter() - start
        ordered = [entries[f.key] for f in frags]
        shards.write_manifest(outdir, ordered, settings, provenance, summary)
        if merge_to:
            from guardalign.pipeline.merge import merge

            merge(outdir, ordered, merge_to, overwrite=overwrite)
    finally:
        outdir.release()
    summary.apply_gates(gates)
    return summary


def _total(frags: list) -> int | None:
    """Items the plan will give, for the progress bar: local tars are counted from their member index."""
    from guardalign.io.webdataset import count_samples

    total = 0
    for f in frags:
        if f.size is not None:
            total += f.size
        elif f.kind == "tar" and "://" not in f.path:
            total += count_samples(f.path)
        else:
            return None
    return total
