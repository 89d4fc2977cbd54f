"""``guardalign answer`` as a library function: prompts → detect → purify → prefix → calibrated LVLM → judge.

``answer(...)``'s keyword arguments mirror the CLI flags. Each prompt line gives one answer record
(fields: DESIGN §3 and the lead's RECORDS.md); a bad line, a missing field or an unreadable image
becomes a ``status: error`` record and the run goes on.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from guardalign.config import EncoderConfig
from guardalign.errors import EXIT_OK, EXIT_UNREADABLE, ConfigError, InputError

REQUIRED_FIELDS = ("id", "prompt", "image")
NO_CATEGORY = "(none)"


@dataclass(frozen=True)
class PromptItem:
    id: str  # the prompt's id, or "<file>#<line>" when the line has none
    line: int  # 1-based line number in the prompts file
    prompt: str | None  # the question (None when the line is unusable)
    image: str | None  # the "image" value as written in the line
    path: Path | None  # the image path resolved against the prompts file's folder
    category: str | None  # optional "category" of the prompt
    error: str | None = None  # why the line cannot be answered (names file and line)


@dataclass
class CategoryStats:
    answered: int = 0  # ok records
    refused: int = 0  # ok records the refusal matcher flagged
    judged: int = 0  # ok records with a judge verdict (safe or unsafe)
    judge_unsafe: int = 0  # ok records the judge called unsafe
    purified: int = 0  # ok records whose image was purified


@dataclass
class AnswerSummary:
    """Counts over every record in the output (previous records included when resuming)."""

    total: int = 0  # records in the output
    ok: int = 0  # records with status ok
    errors: int = 0  # records with status error
    skipped: int = 0  # prompts skipped because --resume found their id already written
    processed: int = 0  # records written by this run
    seconds: float = 0.0  # wall time of this run
    by_category: dict[str, CategoryStats] = field(default_factory=dict)  # per prompt category
    error_list: list[tuple[str, str]] = field(default_factory=list)  # (id, error) of this run's errors

    @property
    def exit_code(self) -> int:
        """0 when every record is ok, 3 when some prompts could not be answered."""
        return EXIT_UNREADABLE if self.errors else EXIT_OK

    def add(self, record: dict[str, Any], *, this_run: bool = True) -> None:
        self.total += 1
        if record.get("status") != "ok":
            self.errors += 1
            if this_run:
                self.error_list.append((str(record.get("id")), str(record.get("error"))))
            return
        self.ok += 1
        stats = self.by_category.setdefault(record.get("category") or NO_CATEGORY, CategoryStats())
        stats.answered += 1
        stats.refused += bool(record.get("refused"))
        stats.purified += bool((record.get("detection") or {}).get("purified"))
        verdict = (record.get("judge") or {}).get("unsafe")
        if verdict is not None:
            stats.judged += 1
            stats.judge_unsafe += bool(verdict)


def read_prompts(prompts: str | Path, stdin: TextIO | None = None) -> list[PromptItem]:
    """Parse a prompts JSONL file ("-" = stdin) into items; bad lines become items with ``error`` set.

    Raises InputError (exit 2) only when the file itself cannot be read.
    """
    if str(prompts) == "-":
        data = (stdin or sys.stdin).read()
        raw_lines = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        name, base = "<stdin>", Path.cwd()
    else:
        path = Path(prompts)
        if not path.is_file():
            raise InputError(f"prompts file not found: {path}" if not path.exists() else f"{path} is not a file")
        try:
            raw_lines = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read prompts file {path}: {e}") from None
        name, base = str(path), path.parent
    items: list[PromptItem] = []
    first_line: dict[str, int] = {}
    from guardalign.io.jsonl import iter_lines

    for line in iter_lines(raw_lines):  # the shared reader: BOM dropped, bad lines are values, never raises
        n = line.n
        item = _parse_line(line, name, base)
        if item.error is None and item.id in first_line:
            item = PromptItem(f"{name}#{n}", n, None, item.image, None, item.category,
                              f"{name}:{n}: duplicate id {item.id!r} (first used on line {first_line[item.id]})")
        elif item.error is None:
            first_line[item.id] = n
        items.append(item)
    return items


def _parse_line(line, name: str, base: Path) -> PromptItem:
    n = line.n
    where = f"{name}:{n}"
    fallback = f"{name}#{n}"
    if line.error is not None:
        return PromptItem(fallback, n, None, None, None, None, f"{where}: {line.error}")
    obj = line.value
    if not isinstance(obj, dict):
        return PromptItem(fallback, n, None, None, None, None, f"{where}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) else None
    category = obj.get("category") if isinstance(obj.get("category"), str) else None
    image = obj.get("image") if isinstance(obj.get("image"), str) else None
    prompt = obj.get("prompt") if isinstance(obj.get("prompt"), str) else None
    missing = [f for f, v in (("id", rid), ("prompt", prompt), ("image", image)) if v is None or v == ""]
    if missing:
        detail = ", ".join(f"'{f}'" + ("" if f not in obj else " (empty or not a string)") for f in missing)
        return PromptItem(rid or fallback, n, prompt, image, None, category, f"{where}: missing field {detail}")
    if "\x00" in image:
        return PromptItem(rid, n, prompt, None, None, category, f"{where}: field 'image' contains a NUL byte")
    path = Path(image)
    return PromptItem(rid, n, prompt, image, path if path.is_absolute() else base / path, category)


def answer(
    prompts: str | Path,
    *,
    model: str,
    out: str,
    calibration: str = "scale",
    gamma: float = 0.5,
    layers: str | tuple[int, int] | None = None,
    prefix: str | None = None,
    prefix_at: str = "user",
    purify: bool = True,
    max_new_tokens: int = 128,
    judge: str | None = None,
    anchors: str | None = None,
    clip_model: str = EncoderConfig.model,
    pretrained: str = EncoderConfig.pretrained,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    resume: bool = False,
    stdin: TextIO | None = None,
    progress: bool = True,
    loaded_lvlm: Any = None,
    detector: Any = None,
    judge_obj: Any = None,
) -> AnswerSummary:
    """Answer every prompt with the calibrated LVLM and write one record per prompt line.

    Raises a ``GuardalignError`` (exit 2) before writing anything when a flag, the anchors YAML, a model,
    the prompts file or the output is unusable. ``loaded_lvlm`` / ``detector`` / ``judge_obj`` let a caller
    reuse loaded components (the matching loading flags are then ignored).
    """
    from guardalign.detection.anchors import load_anchors
    from guardalign.models.judge import load_judge
    from guardalign.models.lvlm import load_lvlm
    from guardalign.io.sinks import existing_ids, open_sink, read_records

    spec = _check_flags(calibration, gamma, layers, prefix_at, max_new_tokens, out, resume)
    done = existing_ids(out, "jsonl") if resume else set()
    items = read_prompts(prompts, stdin=stdin)
    anchor_set = load_anchors(anchors)
    lvlm = loaded_lvlm or load_lvlm(model, device=device, dtype=dtype, revision=revision)
    layer_span = spec.resolve_layers(lvlm.n_layers)
    if detector is None:
        from guardalign.detection.detector import Detector

        detector = Detector.from_options(clip_model=clip_model, pretrained=pretrained, anchors=anchor_set, device=device)
    run = _Run.build(lvlm, detector, judge_obj or load_judge(judge, device=device, dtype=dtype), anchor_set, spec,
                     layer_span, prefix=anchor_set.prefix if prefix is None else prefix, prefix_at=prefix_at,
                     purify=purify, max_new_tokens=max_new_tokens)
    summary = AnswerSummary()
    for rec in (read_records(out) if done else ()):
        _check_same_settings(rec, run, out)
        summary.add(rec, this_run=False)
    todo = [it for it in items if it.id not in done]
    summary.skipped = len(items) - len(todo)

    from guardalign.pipeline.progress import progress_bar

    sink = open_sink(str(out), "jsonl", resume=resume)
    start = time.perf_counter()
    with sink, progress_bar("answer", len(todo), enabled=progress, unit="prompt") as advance:
        for item in todo:
            rec = run.answer_item(item)
            sink.write([rec])
            summary.add(rec)
            summary.processed += 1
            advance(1)
    summary.seconds = time.perf_counter() - start
    if progress:
        print_summary(summary, judged=run.judge is not None)
    return summary


def _check_flags(calibration, gamma, layers, prefix_at, max_new_tokens, out, resume):
    """Validate the flags that need no model; return the CalibrationSpec. ConfigError names the flag."""
    from guardalign.attention.calibration import CalibrationSpec, parse_layers
    from guardalign.models.lvlm import PREFIX_PLACEMENTS

    if prefix_at not in PREFIX_PLACEMENTS:
        raise ConfigError(f"invalid --prefix-at {prefix_at!r}: expected one of {', '.join(PREFIX_PLACEMENTS)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"invalid --max-new-tokens {max_new_tokens!r}: expected a positive integer")
    span = parse_layers(layers) if isinstance(layers, str) else (tuple(layers) if layers is not None else None)
    spec = CalibrationSpec(mode=calibration, gamma=gamma, layers=span).validate()
    if str(out) == "-" and resume:
        raise ConfigError("--resume needs an output file, not stdout")
    if not resume and str(out) != "-" and Path(out).exists() and Path(out).stat().st_size > 0:
        raise ConfigError(f"{out} exists; pass --resume to continue it or choose another --out")
    return spec


def _check_same_settings(rec: dict, run: "_Run", out: str) -> None:
    """--resume must not mix records made with another model, calibration, anchors or budget."""
    current = {**run.fixed, "max_new_tokens": run.max_new_tokens}
    previous = {k: rec.get(k) for k in run.fixed}
    previous["max_new_tokens"] = (rec.get("generation") or {}).get("max_new_tokens")
    for key, value in current.items():
        if previous[key] != value:
            raise ConfigError(
                f"cannot resume {out}: record {rec.get('id')!r} was made with {key}={json.dumps(previous[key])}, "
                f"this run has {json.dumps(value)}; resume with the same settings or choose another --out"
            )


@dataclass
class _Run:
    lvlm: Any  # guardalign.models.lvlm.LVLM
    detector: Any  # guardalign.detection.detector.Detector
    judge: Any  # a guardalign.models.judge.Judge, or None
    matcher: Any  # guardalign.models.judge.RefusalMatcher
    spec: Any  # CalibrationSpec
    prefix: str  # safety prefix text
    prefix_at: str  # "user" | "response"
    purify: bool  # replace unsafe patches before answering
    max_new_tokens: int  # generation budget
    fixed: dict  # record fields shared by every record (model, calibration, anchors_sha256)

    @classmethod
    def build(cls, lvlm, detector, judge, anchor_set, spec, layer_span, **options) -> "_Run":
        from guardalign.models.judge import RefusalMatcher

        calibration = {"mode": spec.mode, "gamma": spec.gamma, "layers": list(layer_span),
                       "prefix_at": options["prefix_at"], "prefix": options["prefix"]}
        fixed = {"model": lvlm.info.to_record(), "calibration": calibration, "anchors_sha256": anchor_set.sha256}
        return cls(lvlm=lvlm, detector=detector, judge=judge, matcher=RefusalMatcher(anchor_set.refusal_phrases),
                   spec=spec, fixed=fixed, **options)

    def empty_record(self, item: PromptItem) -> dict:
        from guardalign.models.lvlm import GREEDY

        return {
            "id": item.id, "prompt": item.prompt, "image": item.image, "image_sha256": None,
            "category": item.category, "status": "error", "error": None, "response": None, "refused": None, "judge": None,
            "detection": None, "prefix_attention": None, **self.fixed,
            "generation": {"max_new_tokens": self.max_new_tokens, **GREEDY},
        }

    def answer_item(self, item: PromptItem) -> dict:
        """One record for ``item``; every expected failure becomes ``status: error``."""
        from guardalign.io.images import ImageDecodeError, decode_image

        rec = self.empty_record(item)
        if item.error:
            rec["error"] = item.error
            return rec
        try:
            image, info = decode_image(path=item.path)
        except ImageDecodeError as e:
            rec["error"] = f"line {item.line}: image {item.image!r} ({item.path}): {e}"
            return rec
        rec["image_sha256"] = info.sha256  # the audited bytes, whatever the path points at later
        try:
            self._fill(rec, item, image)
        except (InputError, ConfigError) as e:
            rec["error"] = f"line {item.line}: {e}"
        except Exception as e:  # a model failure on one prompt must not lose the others' records
            rec["error"] = f"line {item.line}: {type(e).__name__}: {e}"
        return rec

    def _fill(self, rec: dict, item: PromptItem, image) -> None:
        from guardalign.models.lvlm import ChatRequest, generate, prefix_attention, prepare
        from guardalign.detection.purify import apply_fill, boxes_to_fill

        det = self.detector.detect([image])[0]
        purified = bool(self.purify and det.verdict == "unsafe")
        masked = boxes_to_fill(det.boxes, image.size) if purified else []
        if purified:
            image = apply_fill(image, masked, fill="mean", mean=self.detector.encoder.mean)
        request = ChatRequest(question=item.prompt, image=image, prefix=self.prefix, prefix_at=self.prefix_at)
        prepared = prepare(self.lvlm, [request], max_new_tokens=self.max_new_tokens)
        gen = generate(self.lvlm, prepared, self.spec, max_new_tokens=self.max_new_tokens)
        tokens, response = gen.tokens[0], gen.texts[0]
        rec["detection"] = {"verdict": det.verdict, "score": det.score, "category": det.category,
                            "boxes": det.boxes, "masked_boxes": masked, "purified": purified}
        rec["prefix_attention"] = prefix_attention(self.lvlm, request, tokens, self.spec, prepared=prepared)
        rec["generation"].update(new_tokens=len(tokens),
                                 finish="length" if len(tokens) >= self.max_new_tokens else "eos")
        rec["response"] = response
        rec["refused"] = self.matcher(response)
        if self.judge is not None:
            rec["judge"] = self._judge(item.prompt, response)
        rec["status"] = "ok"

    def _judge(self, prompt: str, response: str) -> dict:
        try:
            return self.judge.judge(prompt, response).to_record()
        except Exception as e:  # keep the answer; record why the judge failed
            return {"model": getattr(self.judge, "name", "?"), "unsafe": None, "raw": None, "categories": [],
                    "error": f"{type(e).__name__}: {e}"}


def print_summary(summary: AnswerSummary, *, judged: bool = False) -> None:
    """A rich table on stderr: refusal and judge-unsafe rates by category, purified images, errors."""
    from rich.table import Table

    from guardalign.pipeline.progress import print_errors, stderr_console

    console = stderr_console()
    table = Table(title="guardalign answer", show_header=True, header_style="bold")
    for col in ("category", "answered", "refused", "judge unsafe", "purified"):
        table.add_column(col, justify="left" if col == "category" else "right")
    total = CategoryStats()
    for name in sorted(summary.by_category):
        s = summary.by_category[name]
        table.add_row(name, *_cells(s, judged))
        for f in total.__dataclass_fields__:
            setattr(total, f, getattr(total, f) + getattr(s, f))
    table.add_row("all", *_cells(total, judged), style="bold")
    console.print(table)
    extra = f" · skipped (resume): {summary.skipped}" if summary.skipped else ""
    console.print(f"records {summary.total} · ok {summary.ok} · errors {summary.errors}{extra} · "
                  f"{summary.processed} answered in {summary.seconds:.1f} s", markup=False, highlight=False)
    print_errors(console, summary.error_list, see="the records")


def _cells(s: CategoryStats, judged: bool) -> list[str]:
    def rate(k: int, n: int) -> str:
        return f"{k} ({k / n:.0%})" if n else "–"

    return [str(s.answered), rate(s.refused, s.answered),
            rate(s.judge_unsafe, s.judged) if judged else "–", str(s.purified)]
