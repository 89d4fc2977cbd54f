"""``guardalign answer`` as a library function: prompts → detect → purify → prefix → calibrated LVLM → judge.

``answer(...)``'s keyword arguments mirror the CLI flags. Each prompt line gives one answer record
(fields: DESIGN §3 and the lead's RECORDS.md); a bad line, a missing field or an unreadable image
becomes a ``status: error`` record and the run goes on.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from guardalign.config import EncoderConfig
from guardalign.errors import ConfigError, InputError
from guardalign.pipeline.runner import RunSummary

AnswerSummary = RunSummary  # the summary of an answer run is the runner's

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


STATS = ("answered", "refused", "judged", "judge_unsafe", "purified")  # per-category counts in the summary tally


def _tally(record: dict[str, Any], tally) -> None:
    """Per-category counts of ok answer records, keyed ``(category, stat)`` in the runner summary's tally."""
    if record.get("status") != "ok":
        return
    cat = record.get("category") or NO_CATEGORY
    tally[(cat, "answered")] += 1
    tally[(cat, "refused")] += bool(record.get("refused"))
    tally[(cat, "purified")] += bool((record.get("detection") or {}).get("purified"))
    verdict = (record.get("judge") or {}).get("unsafe")
    if verdict is not None:
        tally[(cat, "judged")] += 1
        tally[(cat, "judge_unsafe")] += bool(verdict)


def read_prompts(prompts: str | Path, stdin: TextIO | None = None, image_root: str | Path | None = None) -> list[PromptItem]:
    """Parse a prompts JSONL file ("-" = stdin) into items; bad lines become items with ``error`` set.

    Relative image paths resolve against ``image_root`` when given, else the prompts file's folder (stdin: the
    current directory).

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
    if image_root is not None:
        base = Path(image_root)
        if not base.is_dir():
            raise InputError(f"--image-root {image_root}: no such directory")
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
    image_root: str | None = None,
    resume: bool = False,
    workers: int = 2,
    stdin: TextIO | None = None,
    progress: bool = True,
    loaded_lvlm: Any = None,
    detector: Any = None,
    judge_obj: Any = None,
) -> AnswerSummary:
    """Answer every prompt with the calibrated LVLM and write one record per prompt line.

    Raises a ``GuardalignError`` (exit 2) before writing anything when a flag, the anchors YAML, a model,
    the prompts file or the output is unusable, or when ``resume`` meets records made with other settings.
    ``loaded_lvlm`` / ``detector`` / ``judge_obj`` let a caller reuse loaded components (the matching loading
    flags are then ignored).
    """
    from guardalign.detection.anchors import load_anchors
    from guardalign.io.sinks import open_sink, read_records
    from guardalign.models.judge import load_judge
    from guardalign.models.lvlm import load_lvlm
    from guardalign.pipeline.runner import run_job

    spec = _check_flags(calibration, gamma, layers, prefix_at, max_new_tokens, out, resume)
    items = read_prompts(prompts, stdin=stdin, image_root=image_root)
    anchor_set = load_anchors(anchors)
    lvlm = loaded_lvlm or load_lvlm(model, device=device, dtype=dtype, revision=revision)
    layer_span = spec.resolve_layers(lvlm.n_layers)
    if detector is None:
        from guardalign.detection.detector import Detector

        detector = Detector.from_options(clip_model=clip_model, pretrained=pretrained, anchors=anchor_set, device=device)
    stage = _Run.build(lvlm, detector, judge_obj or load_judge(judge, device=device, dtype=dtype), anchor_set, spec,
                       layer_span, prefix=anchor_set.prefix if prefix is None else prefix, prefix_at=prefix_at,
                       purify=purify, max_new_tokens=max_new_tokens)
    sink = open_sink(str(out), "jsonl", resume=resume)
    previous = read_records(out) if resume and sink.existing else ()
    with sink:
        summary = run_job((_as_item(it) for it in items), stage, sink, previous=previous, out=str(out),
                          total=len(items), workers=workers, progress=progress)
    if progress:
        print_summary(summary, judged=stage.judge is not None)
    return summary


def _as_item(p: PromptItem):
    """A prompt line as a runner item: the image to decode, the line's fields in ``meta``."""
    from guardalign.records import Item

    error = p.error
    return Item(id=p.id, source=str(p.path) if p.path is not None else f"line {p.line}", path=p.path,
                error=error, meta={"prompt_item": p})


def _check_flags(calibration, gamma, layers, prefix_at, max_new_tokens, out, resume):
    """Validate the flags that need no model; return the CalibrationSpec. ConfigError names the flag."""
    from guardalign.models.lvlm import PREFIX_PLACEMENTS

    if prefix_at not in PREFIX_PLACEMENTS:
        raise ConfigError(f"invalid --prefix-at {prefix_at!r}: expected one of {', '.join(PREFIX_PLACEMENTS)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"invalid --max-new-tokens {max_new_tokens!r}: expected a positive integer")
    spec = calibration_and_out(calibration, gamma, layers, out, resume)
    return spec


@dataclass
class _Run:
    """The answer stage: one decoded prompt image → purify → prefix → calibrated generation → judge."""

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
    name: str = "answer"  # runner: progress label
    unit: str = "prompt"  # runner: progress unit
    batch_size: int = 1  # runner: prompts per process() call (generation runs one prompt at a time)

    def settings(self) -> dict:
        """What a resumed run must share: the LVLM, calibration, anchors, budget, detector and judge."""
        return {**self.fixed, "max_new_tokens": self.max_new_tokens, "purify": self.purify,
                "detector": self.detector.settings(), "judge": getattr(self.judge, "name", None)}

    def process(self, batch: list) -> list[dict]:
        return [self.answer_item(d) for d in batch]

    def account(self, record: dict, tally) -> None:
        _tally(record, tally)

    @classmethod
    def build(cls, lvlm, detector, judge, anchor_set, spec, layer_span, **options) -> "_Run":
        from guardalign.models.judge import RefusalMatcher

        off = spec.mode == "off" or spec.gamma == 0
        calibration = {"mode": spec.mode, "gamma": None if off else spec.gamma,  # what ran, not what was asked
                       "layers": None if off else list(layer_span),
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

    def answer_item(self, decoded) -> dict:
        """One record for a decoded prompt line; every expected failure becomes ``status: error``."""
        item: PromptItem = decoded.item.meta["prompt_item"]
        rec = self.empty_record(item)
        if item.error:
            rec["error"] = item.error
            return rec
        if decoded.error is not None or decoded.image is None:
            rec["error"] = f"line {item.line}: image {item.image!r} ({item.path}): {decoded.error}"
            return rec
        rec["image_sha256"] = decoded.info.sha256  # the audited bytes, whatever the path points at later
        try:
            self._fill(rec, item, decoded.image)
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
    cats = sorted({cat for cat, _ in summary.tally})
    for name in cats + ["all"]:
        s = {k: (sum(summary.tally[(c, k)] for c in cats) if name == "all" else summary.tally[(name, k)]) for k in STATS}
        table.add_row(name, *_cells(s, judged), style="bold" if name == "all" else None)
    console.print(table)
    extra = f" · resumed (already done): {summary.resumed}" if summary.resumed else ""
    console.print(f"records {summary.total} · ok {summary.ok} · errors {summary.errors}{extra} · "
                  f"{summary.processed} answered in {summary.seconds:.1f} s", markup=False, highlight=False)
    print_errors(console, summary.error_list, see="the records")


def _cells(s: dict, judged: bool) -> list[str]:
    def rate(k: int, n: int) -> str:
        return f"{k} ({k / n:.0%})" if n else "–"

    return [str(s["answered"]), rate(s["refused"], s["answered"]),
            rate(s["judge_unsafe"], s["judged"]) if judged else "–", str(s["purified"])]


def calibration_and_out(calibration, gamma, layers, out, resume: bool):
    """The validated CalibrationSpec of answer/probe flags; ConfigError for a resume to stdout or an output
    that already holds records without --resume (shared by answer and probe)."""
    from guardalign.attention.calibration import CalibrationSpec, parse_layers

    span = parse_layers(layers) if isinstance(layers, str) else (tuple(layers) if layers is not None else None)
    spec = CalibrationSpec(mode=calibration, gamma=gamma, layers=span).validate()
    if str(out) == "-" and resume:
        raise ConfigError("--resume needs an output file, not stdout")
    if not resume and str(out) != "-" and Path(out).exists() and Path(out).stat().st_size > 0:
        raise ConfigError(f"{out} exists; pass --resume to continue it or choose another --out")
    return spec
