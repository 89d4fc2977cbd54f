"""``guardalign eval`` as a library function: benchmarks × defences × judges → records and the paper's table.

``evaluate(benchmarks, ...)``'s keyword arguments mirror the CLI flags. The LVLM, the CLIP detector and every
judge are loaded once; each benchmark item is answered once per defence on the runner
(:class:`guardalign.pipeline.eval_stage.EvalStage`), detection computed once per image and shared. Written
into ``--out DIR``:

- ``records.jsonl``: one record per item × defence (``<item id>@<defence>``), resumable with ``--resume``;
- ``summary.json`` / ``summary.md`` / ``summary.html``: rates per benchmark × defence and per category with
  bootstrap intervals (:mod:`guardalign.reporting.evaltable`), rebuilt from all records after every run.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator, Sequence

from guardalign.config import DetectConfig, EncoderConfig
from guardalign.errors import ConfigError
from guardalign.pipeline.runner import RunSummary

RECORDS, SUMMARY_JSON, SUMMARY_MD, SUMMARY_HTML = "records.jsonl", "summary.json", "summary.md", "summary.html"
DETECTING = ("ot", "guardalign")  # defences that need the OT detector
PRECHECKING = ("eta-detect",)  # defences that need the global pre-check


def evaluate(
    benchmarks: Sequence[str],
    *,
    model: str,
    out: str,
    defences: str | Sequence[str] = "vanilla,prefix,eta-detect,ot,calibration,guardalign",
    judge: Sequence[str] = ("refusal",),
    utility: str | None = None,
    limit: int | None = None,
    calibration: str = "scale",
    gamma: float = 0.5,
    layers: str | None = None,
    prefix: str | None = None,
    prefix_at: str = "user",
    max_new_tokens: int = 128,
    theta: float = 0.16,
    anchors: str | None = None,
    clip_model: str = EncoderConfig.model,
    pretrained: str = EncoderConfig.pretrained,
    patches: str = DetectConfig.patches,
    grid: int | None = DetectConfig.grid,
    tau: float | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    trust_remote_code: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    resume: bool = False,
    progress: bool = True,
    loaded_lvlm: Any = None,
    detector: Any = None,
    judges: dict | None = None,
) -> RunSummary:
    """Run every (benchmark item, defence) pair, write the records and the summary; return the run summary.

    Raises a ``GuardalignError`` (exit 2) before writing anything when a flag, a benchmark layout, a model or
    the output is unusable, or when ``resume`` meets records made with other settings. ``loaded_lvlm`` /
    ``detector`` / ``judges`` ({label: judge}) let a caller reuse loaded components.
    """
    from guardalign.attention.calibration import CalibrationSpec, parse_layers
    from guardalign.detection.anchors import load_anchors
    from guardalign.io.benchmarks import open_benchmarks, parse_spec, parse_specs
    from guardalign.io.sinks import open_sink, read_records
    from guardalign.models.judge import RefusalMatcher
    from guardalign.models.judges import load_judge, parse_judge_specs
    from guardalign.models.lvlm import PREFIX_PLACEMENTS, load_lvlm
    from guardalign.pipeline.eval_stage import EvalStage, expand, parse_defences
    from guardalign.pipeline.runner import run_job

    names = parse_defences(defences)
    specs = parse_specs(list(benchmarks))
    util_spec = parse_spec(f"prompts,label=utility:{utility}") if utility else None
    if util_spec is not None and any(s.label == "utility" for s in specs):
        raise ConfigError("the label 'utility' is taken by --utility; give that benchmark another label=")
    judge_specs = parse_judge_specs(judge) if judges is None else []
    if prefix_at not in PREFIX_PLACEMENTS:
        raise ConfigError(f"invalid --prefix-at {prefix_at!r}: expected one of {', '.join(PREFIX_PLACEMENTS)}")
    _check_numbers(max_new_tokens=max_new_tokens, limit=limit, bootstrap=bootstrap, theta=theta)
    span = parse_layers(layers) if isinstance(layers, str) else (tuple(layers) if layers is not None else None)
    spec = CalibrationSpec(mode=calibration, gamma=gamma, layers=span).validate()
    if not specs and util_spec is None:
        raise ConfigError("no benchmarks given: pass NAME:DIR arguments (e.g. figstep:data/FigStep) or --utility")
    root = _out_dir(out, resume, [s.root for s in specs] + ([util_spec.root] if util_spec else []))
    streams = open_benchmarks(specs)  # checks every layout before any model is loaded
    util_stream = open_benchmarks([util_spec]) if util_spec else iter(())
    anchor_set = load_anchors(anchors)
    lvlm = loaded_lvlm or load_lvlm(model, device=device, dtype=dtype, revision=revision)
    spec.resolve_layers(lvlm.n_layers)
    if detector is None and any(n in DETECTING + PRECHECKING for n in names):
        from guardalign.detection.detector import Detector

        detector = Detector.from_options(clip_model=clip_model, pretrained=pretrained, anchors=anchor_set,
                                         device=device, patches=patches, grid=grid, tau=tau)
    ot = detector if any(n in DETECTING for n in names) else None
    pre = detector.with_config(method="global", theta=theta) if any(n in PRECHECKING for n in names) else None
    if judges is None:
        judges = {s.label: load_judge(s, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
                  for s in judge_specs}
    stage = EvalStage(lvlm, spec, prefix=anchor_set.prefix if prefix is None else prefix, prefix_at=prefix_at,
                      max_new_tokens=max_new_tokens, detector=ot, precheck=pre, judges=judges,
                      matcher=RefusalMatcher(anchor_set.refusal_phrases), anchors_sha256=anchor_set.sha256)
    stage.batch_size = len(names)  # one image's defences per batch: one durable write (fsync) per image
    items = itertools.chain(_limited(streams, limit), _utility(util_stream, limit))
    sink = open_sink(str(root / RECORDS), "jsonl", resume=resume)
    previous = read_records(root / RECORDS) if resume and sink.existing else ()
    with sink:
        summary = run_job(expand(items, names), stage, sink, previous=previous, out=str(root / RECORDS),
                          progress=progress, decode=False)
    table = write_summary(root, defences=names, reps=bootstrap, seed=seed)
    summary.tally["detections"] = stage.detections
    summary.tally["generations"] = stage.generations
    if progress:
        _print(summary, table, reps=bootstrap, seed=seed, root=root)
    return summary


def _check_numbers(*, max_new_tokens, limit, bootstrap, theta) -> None:
    def positive(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not positive(max_new_tokens):
        raise ConfigError(f"invalid --max-new-tokens {max_new_tokens!r}: expected a positive integer")
    if limit is not None and not positive(limit):
        raise ConfigError(f"invalid --limit {limit!r}: expected a positive integer")
    if not positive(bootstrap):
        raise ConfigError(f"invalid --bootstrap {bootstrap!r}: expected a positive number of resamples")
    if not -1 <= theta <= 1:
        raise ConfigError(f"invalid --theta {theta!r}: expected a cosine in [-1, 1]")


def _out_dir(out: str, resume: bool, inputs: Sequence[Path]) -> Path:
    """The output folder: refused when it is a file or a symlink, overlaps a benchmark's files, or holds
    records without --resume (nothing the user gave is overwritten)."""
    import os

    root = Path(out)
    if root.is_symlink():
        raise ConfigError(f"--out {out} is a symbolic link; give a real folder")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {out} is a file; eval writes a folder (records.jsonl, summary.*)")
    real = os.path.realpath(root)
    for given in inputs:
        if not os.path.lexists(given):
            continue
        other = os.path.realpath(given)
        if any(a == b or a.startswith(b.rstrip(os.sep) + os.sep) for a, b in ((real, other), (other, real))):
            raise ConfigError(f"--out {out} overlaps the input {given}: eval writes records.jsonl and summary.* "
                              "there; choose a folder outside every benchmark")
    rec = root / RECORDS
    if rec.exists() and rec.stat().st_size > 0 and not resume:
        raise ConfigError(f"{rec} exists; pass --resume to continue it or choose another --out")
    for name in (SUMMARY_JSON, SUMMARY_MD, SUMMARY_HTML):
        if (root / name).is_symlink():
            raise ConfigError(f"{root / name} is a symbolic link; not writing through it")
    return root


def _limited(stream: Iterator, limit: int | None) -> Iterator:
    """At most ``limit`` items per benchmark (items arrive grouped by benchmark)."""
    if limit is None:
        yield from stream
        return
    for _, group in itertools.groupby(stream, key=lambda it: it.meta.get("benchmark")):
        yield from itertools.islice(group, limit)


def _utility(stream: Iterator, limit: int | None) -> Iterator:
    """Utility items: the reference answers (``answer`` or ``answers``) go to ``meta["utility"]``."""
    from dataclasses import replace

    for it in _limited(stream, limit):
        ref = it.meta.get("reference") or {}
        answers = ref.get("answers", ref.get("answer"))
        answers = [answers] if isinstance(answers, str) else answers
        if it.error is None and not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            it = replace(it, error=f"{it.source}: a utility line needs 'answer' (a string) or 'answers' (strings)")
        yield replace(it, meta={**it.meta, "utility": answers if it.error is None else None})


def write_summary(root: Path, *, defences: Sequence[str] = (), reps: int = 1000, seed: int = 0):
    """Rebuild the summary from every record in ``root/records.jsonl``; write summary.{json,md,html} atomically."""
    from guardalign.io.durable import atomic_write
    from guardalign.io.sinks import read_records
    from guardalign.reporting.evaltable import EvalTable, dumps

    table = EvalTable(defences=list(defences))
    path = root / RECORDS
    if path.exists():
        for rec in read_records(path):
            table.add(rec)
    atomic_write(root / SUMMARY_JSON, dumps(table.to_json(reps=reps, seed=seed)), inside=root)
    atomic_write(root / SUMMARY_MD, table.to_markdown(reps=reps, seed=seed), inside=root)
    atomic_write(root / SUMMARY_HTML, table.to_html(reps=reps, seed=seed), inside=root)
    return table


def _print(summary: RunSummary, table, *, reps: int, seed: int, root: Path) -> None:
    """The Table-1 layout of every metric, then counts and errors, on stderr."""
    from rich.table import Table

    from guardalign.pipeline.progress import print_errors, stderr_console
    from guardalign.reporting.evaltable import metric_kind

    console = stderr_console()
    for m in table.metrics:
        header, rows = table.main_rows(m, reps=reps, seed=seed)
        t = Table(title=f"{metric_kind(m, table.targets.get(m))} — {m} (%, 95% bootstrap CI)", header_style="bold")
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*r)
        console.print(t)
    extra = f" · resumed (already done): {summary.resumed}" if summary.resumed else ""
    console.print(f"records {summary.total} · ok {summary.ok} · errors {summary.errors}{extra} · "
                  f"{summary.processed} answered in {summary.seconds:.1f} s ({summary.tally['generations']} "
                  f"generations, {summary.tally['detections']} detections) · summary in {root}",
                  markup=False, highlight=False)
    print_errors(console, condense_errors(summary.error_list), see=str(root / RECORDS))


def condense_errors(errors: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One line per item for an error every defence of it shares: ``("<item> (6 defences)", error)``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for rid, err in errors:
        groups.setdefault((rid.rsplit("@", 1)[0], err), []).append(rid)
    return [(f"{item} ({len(ids)} defences)" if len(ids) > 1 else ids[0], err) for (item, err), ids in groups.items()]
