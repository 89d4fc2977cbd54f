"""``mask --engine ray``: detection on the model actors (as ``scan``), then one CPU task per fragment that runs the
local runner with the same :class:`~guardalign.pipeline.mask_stage.MaskStage`, using those detections as a reused
scan (``--from-scan`` reuses the given scan and skips the actors).

Each fragment task re-reads its items, checks that every image still has the scanned sha256 (so what is written is
what was scanned), purifies and writes exactly as a local run: a Parquet input gives a Parquet file and a tar shard a
tar shard, with the same schema / members and order (a Parquet file is therefore one fragment). Its manifest entries
go to ``_manifest/<fragment>.jsonl``; when it is done its ``_fragments/`` entry is written, and at the end all parts
are combined into ``manifest.jsonl`` in input order. A rerun skips finished fragments. ``out_dir`` must be a folder
every node can write (a shared filesystem).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from guardalign.errors import ConfigError
from guardalign.pipeline.mask_stage import MaskSummary

PARTS = "_manifest"


def mask_fragment(frag_json: str, index_src: Any, root: str, inputs: list[str], stage_kwargs: dict, settings: dict,
                  image_column: str | None, id_column: str | None, part: str) -> dict:
    """Ray task: the local runner with MaskStage over one fragment; its counts. ``index_src``: scan records (a
    dict by id, or the path of the fragment's JSONL scan records)."""
    from guardalign.io.sinks import open_sink, read_records
    from guardalign.pipeline import fragments
    from guardalign.pipeline.mask_out import compact_manifest
    from guardalign.pipeline.mask_stage import MaskStage, decode_unchanged
    from guardalign.pipeline.runner import run_job
    from guardalign.records import MASK_NEEDS

    if isinstance(index_src, str):
        index = {str(r["id"]): {k: r.get(k) for k in MASK_NEEDS} for r in read_records(index_src)}
    else:
        index = index_src
    frag = fragments.Fragment.from_dict(json.loads(frag_json))
    stage = MaskStage(Path(root), inputs, settings=settings, index=index, batch_size=64, **stage_kwargs)
    part_path = Path(root) / part
    part_path.unlink(missing_ok=True)  # a crashed attempt's entries: this fragment is redone from the start
    summary = MaskSummary()
    with open_sink(str(part_path), "jsonl") as sink:
        run_job(fragments.items(frag, image_column=image_column, id_column=id_column), stage, sink,
                out=f"--out-dir {root}", workers=2, progress=False, summary=summary, decode=decode_unchanged(index))
    compact_manifest(part_path)
    return {"records": summary.total, "ok": summary.ok, "errors": summary.errors, "unsafe": summary.unsafe,
            "by_category": dict(summary.by_category), "tally": dict(summary.tally),
            "error_list": [list(e) for e in summary.error_list]}


def _add(summary: MaskSummary, res: dict) -> None:
    summary.total += res["records"]
    summary.ok += res["ok"]
    summary.errors += res["errors"]
    summary.unsafe += res["unsafe"]
    summary.by_category.update(res["by_category"])
    summary.tally.update(res["tally"])
    summary.error_list.extend(tuple(e) for e in res["error_list"])
    summary.processed += res["records"]


class _Tasks:
    """Fragment tasks in flight: each finished one gets its entry written and is counted."""

    def __init__(self, ray, outdir, settings: dict, summary: MaskSummary, advance):
        self.ray, self.outdir, self.settings, self.summary, self.advance = ray, outdir, settings, summary, advance
        self.pending: dict[Any, tuple[Any, str, Path | None]] = {}
        self.entries: dict[str, dict] = {}

    def add(self, ref, frag, name: str, staged: Path | None) -> None:
        self.pending[ref] = (frag, name, staged)
        self.harvest(wait=False)

    def harvest(self, wait: bool) -> None:
        from guardalign.pipeline.shards import entry_rel

        while self.pending:
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=None if wait else 0)
            if not ready:
                return
            frag, name, staged = self.pending.pop(ready[0])
            res = self.ray.get(ready[0])
            _add(self.summary, res)
            self.advance(res["records"])
            entry = {"fragment": frag.key, "kind": frag.kind, "input": frag.path or None, "stamp": frag.stamp,
                     "shard": f"{PARTS}/{name}.jsonl", "format": "jsonl",
                     **{k: res[k] for k in ("records", "ok", "errors", "unsafe", "by_category", "tally")},
                     "settings": self.settings, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self.outdir.write_bytes(entry_rel(name), json.dumps(entry, ensure_ascii=False).encode())
            self.entries[frag.key] = entry
            if staged is not None:
                staged.unlink(missing_ok=True)


def mask(inputs: Sequence[str], *, root: Path, settings: dict, options: dict, index: dict | None, batch_size: int,
         stage_kwargs: dict, cfg, force: bool, image_column: str | None, id_column: str | None,
         progress: bool) -> MaskSummary:
    """Run mask on Ray into the local (shared) folder ``root``; the summary of every item, earlier runs' included."""
    from guardalign.pipeline import fragments, shards
    from guardalign.pipeline.mask_out import remove_stale_tmp
    from guardalign.pipeline.progress import progress_bar
    from guardalign.pipeline.ray_engine import DetectActor, pipeline, ray_session
    from guardalign.pipeline.ray_scan import collect
    from guardalign.pipeline.runner import RunSummary

    if force:
        raise ConfigError("--force is not available with --engine ray: choose an --out-dir outside the inputs")
    frags = fragments.plan(inputs, image_column=image_column, id_column=id_column, fragment_rows=cfg.fragment_rows,
                           split_parquet=False)
    outdir = shards.OutDir(str(root))
    outdir.claim()
    summary = MaskSummary(name="mask")
    try:
        remove_stale_tmp(root)
        todo, done = shards.prepare(outdir, frags, settings, resume=True, overwrite=stage_kwargs["overwrite"])
        for e in done:
            shards.add_counts(summary, e)
        start = time.perf_counter()
        with ray_session(cfg) as ray, progress_bar("mask", _total(frags), enabled=progress, unit="img",
                                                   completed=summary.resumed) as advance:
            task = ray.remote(num_cpus=1)(mask_fragment)
            tasks = _Tasks(ray, outdir, settings, summary, advance)
            common = (str(root), list(inputs), stage_kwargs, settings, image_column, id_column)

            def submit(frag, src, staged=None):
                name = shards.shard_name(frag.key)
                ref = task.remote(json.dumps(frag.to_dict()), src, *common, f"{PARTS}/{name}.jsonl")
                tasks.add(ref, frag, name, staged)

            if index is not None:  # --from-scan: no detection, the scan is shared by every task
                shared = ray.put(index)
                for frag in todo:
                    submit(frag, shared)
            elif todo:
                actor = {"options": options, "fmt": "jsonl", "settings": settings["detector"]}
                ds = pipeline(ray, todo, DetectActor, actor, cfg, batch_size=batch_size,
                              image_column=image_column, id_column=id_column)

                def detected(frag, writer) -> dict:
                    staged = writer.close_staged()
                    submit(frag, str(staged), staged)
                    return {}

                collect(ds, todo, lambda f: shards.ShardWriter(outdir, f, "jsonl", settings["detector"]),
                        RunSummary(), lambda n=1: None, detected)
            tasks.harvest(wait=True)
        summary.seconds = time.perf_counter() - start
        entries = [({e["fragment"]: e for e in done} | tasks.entries)[f.key] for f in frags]
        _combine(root, entries)
        shards.write_manifest(outdir, entries, settings, {"command": "mask", "engine": "ray", "inputs": list(inputs),
                                                          "concurrency": cfg.concurrency}, summary)
    finally:
        outdir.release()
    return summary


def _total(frags: list) -> int | None:
    from guardalign.pipeline.ray_scan import _total as total

    return total(frags)


def _combine(root: Path, entries: list[dict]) -> None:
    """``manifest.jsonl``: every fragment's entries, in input order (temp file + rename)."""
    from guardalign.pipeline.mask_out import MANIFEST, TMP_SUFFIX

    target = root / MANIFEST
    tmp = root / f".{MANIFEST}.{os.getpid()}{TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as out:
            for e in entries:
                with open(root / e["shard"], "rb") as part:
                    while chunk := part.read(1 << 20):
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
