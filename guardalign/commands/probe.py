"""``guardalign probe`` as a library function: the TGA diagnosis of why safety does not transfer from text to
images (DESIGN §1.3), with GuardAlign's defences on and off.

``probe(...)``'s keyword arguments mirror the CLI flags. Each pair (an image and its equivalent text) gives one
record of per-layer measurements (docs/records.md, ``probe``); a bad line or row, or an unreadable image,
becomes a ``status: error`` record and the run goes on. A summary goes to stderr;
``guardalign report probe.jsonl`` renders the curves (HTML) or the same numbers as Markdown / JSON.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from guardalign.commands.answer import calibration_and_out
from guardalign.config import EncoderConfig
from guardalign.errors import ConfigError
from guardalign.pipeline.runner import RunSummary
from guardalign.pipeline.probe_stage import DEFAULT_PROMPT, DEFAULT_TEMPLATE


@dataclass
class ProbeSummary(RunSummary):
    """The runner's summary plus the probe numbers (:meth:`ProbePool.summary`) over every record in the output."""

    stats: dict | None = None  # mean curves, refusal starts and rates per form and category


def probe(
    pairs: str | Path,
    *,
    model: str,
    out: str,
    format: str = "jsonl",
    prompt: str = DEFAULT_PROMPT,
    text_template: str = DEFAULT_TEMPLATE,
    defences: str | list[str] = "none",
    lens: str = "standard",
    top_k: int = 10,
    refusal_tokens: str | list[str] | None = None,
    anchors: str | None = None,
    prefix: str | None = None,
    prefix_at: str = "user",
    calibration: str = "scale",
    gamma: float = 0.5,
    layers: str | tuple[int, int] | None = None,
    clip_model: str = EncoderConfig.model,
    pretrained: str = EncoderConfig.pretrained,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    batch_size: int = 1,
    resume: bool = False,
    workers: int = 2,
    stdin: TextIO | None = None,
    progress: bool = True,
    loaded_lvlm: Any = None,
    detector: Any = None,
) -> ProbeSummary:
    """Probe every pair and write one record per pair to ``out`` (JSONL, ``"-"`` = stdout).

    Raises a ``GuardalignError`` (exit 2) before writing anything when a flag, the anchors YAML, a model, the
    pairs input or the output is unusable, or when ``resume`` meets records made with other settings.
    ``loaded_lvlm`` / ``detector`` let a caller reuse loaded components (their loading flags are then ignored).
    """
    from guardalign.detection.anchors import load_anchors
    from guardalign.io.pairs import read_pairs
    from guardalign.io.sinks import open_sink, read_records
    from guardalign.models.lvlm import load_lvlm
    from guardalign.models.probe_forward import probe_attention_on
    from guardalign.pipeline.runner import run_job
    from guardalign.reporting.probe_stats import ProbePool, check_probe

    chosen, spec = _check_flags(format, prompt, text_template, defences, lens, top_k, prefix_at, calibration, gamma,
                                layers, batch_size, out, resume)
    items = read_pairs(pairs, format=format, stdin=stdin)
    anchor_set = load_anchors(anchors)
    words = _words(refusal_tokens) if refusal_tokens is not None else anchor_set.refusal_words()
    if loaded_lvlm is None:
        from guardalign.attention.probe import register_probe

        loaded_lvlm = load_lvlm(model, device=device, dtype=dtype, revision=revision,
                                attn_implementation=register_probe())
    spec.resolve_layers(loaded_lvlm.n_layers)  # a --layers range outside the model: exit 2 before any work
    if "guardalign" in chosen and detector is None:
        from guardalign.detection.detector import Detector

        detector = Detector.from_options(clip_model=clip_model, pretrained=pretrained, anchors=anchor_set, device=device)
    stage = _stage(loaded_lvlm, words, anchor_set, chosen, spec, detector, lens=lens, top_k=top_k, prompt=prompt,
                   template=text_template, prefix=anchor_set.prefix if prefix is None else prefix, prefix_at=prefix_at,
                   batch_size=batch_size)
    pool = ProbePool()
    stage.on_record = lambda rec: _pool_add(pool, check_probe, rec)
    sink = open_sink(str(out), "jsonl", resume=resume)
    previous = read_records(out) if resume and sink.existing else ()
    with sink, probe_attention_on(loaded_lvlm):
        summary = run_job((_as_item(p) for p in items), stage, sink, previous=previous, out=str(out),
                          total=len(items), workers=workers, progress=progress, summary=ProbeSummary())
    summary.stats = pool.summary()
    if progress:
        print_summary(summary)
    return summary


def _words(value: str | list[str]) -> tuple[str, ...]:
    words = [w.strip() for w in (value.split(",") if isinstance(value, str) else value)]
    words = [w for w in words if w]
    if not words or any(len(w.split()) != 1 for w in words):
        raise ConfigError(f"invalid --refusal-tokens {value!r}: expected comma-separated single words, e.g. Sorry,I,cannot")
    return tuple(dict.fromkeys(words))


def _pool_add(pool, check, record: dict) -> None:
    from guardalign.reporting.stats import Bad

    try:
        pool.add(check(record), record)
    except Bad:  # a record of another run (resume) that the summary cannot use: the file is still complete
        pass


def _check_flags(format, prompt, template, defences, lens, top_k, prefix_at, calibration, gamma, layers, batch_size,
                 out, resume):
    """Validate the flags that need no model; return (defences, CalibrationSpec). ConfigError names the flag."""
    from guardalign.attention.probe import LENSES
    from guardalign.io.pairs import INPUT_FORMATS
    from guardalign.models.lvlm import PREFIX_PLACEMENTS
    from guardalign.pipeline.probe_stage import check_template, parse_defences

    if format not in INPUT_FORMATS:
        raise ConfigError(f"invalid --format {format!r}: expected one of {', '.join(INPUT_FORMATS)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("invalid --prompt: expected a non-empty question")
    check_template(template)
    if lens not in LENSES:
        raise ConfigError(f"invalid --lens {lens!r}: expected one of {', '.join(LENSES)}")
    for flag, value in (("--top-k", top_k), ("--batch-size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"invalid {flag} {value!r}: expected a positive integer")
    if prefix_at not in PREFIX_PLACEMENTS:
        raise ConfigError(f"invalid --prefix-at {prefix_at!r}: expected one of {', '.join(PREFIX_PLACEMENTS)}")
    spec = calibration_and_out(calibration, gamma, layers, out, resume)
    return parse_defences(defences), spec


def _stage(lvlm, words, anchor_set, chosen, spec, detector, **options):
    from guardalign.models.probe_forward import refusal_tokens
    from guardalign.pipeline.probe_stage import ProbeStage

    try:
        tokens = refusal_tokens(lvlm.tokenizer, words)
    except ValueError as e:
        raise ConfigError(f"refusal tokens: {e}") from None
    fixed = {"model": lvlm.info.to_record(), "anchors_sha256": anchor_set.sha256}
    return ProbeStage(lvlm=lvlm, tokens=tokens, defences=chosen, spec=spec, detector=detector, fixed=fixed, **options)


def _as_item(pair):
    """A pair as a runner item: the image to decode, the pair in ``meta``."""
    from guardalign.records import Item

    return Item(id=pair.id, source=str(pair.path) if pair.path is not None else pair.where, path=pair.path,
                error=pair.error, meta={"pair": pair})


def print_summary(summary: ProbeSummary) -> None:
    """Rich tables on stderr: per form and per category (the same numbers as ``report --format md``)."""
    from rich.table import Table

    from guardalign.pipeline.progress import print_errors, stderr_console
    from guardalign.reporting.probe import FORM_HEAD, category_rows, form_rows

    console = stderr_console()
    stats = summary.stats or {}
    if stats.get("ok"):
        for title, head, rows in (("guardalign probe: per form", FORM_HEAD, form_rows(stats)),
                                  ("per category", *category_rows(stats))):
            table = Table(title=title, show_header=True, header_style="bold")
            for i, col in enumerate(head):
                table.add_column(col, justify="left" if i == 0 else "right")
            for row in rows:
                table.add_row(*row)
            console.print(table)
    extra = f" · resumed (already done): {summary.resumed}" if summary.resumed else ""
    console.print(f"records {summary.total} · ok {summary.ok} · errors {summary.errors}{extra} · "
                  f"{summary.processed} probed in {summary.seconds:.1f} s · curves: guardalign report",
                  markup=False, highlight=False)
    print_errors(console, summary.error_list, see="the records")
