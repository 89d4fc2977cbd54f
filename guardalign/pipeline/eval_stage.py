"""The eval stage: one benchmark item × one defence → one record, with detection shared across defences.

The runner sees one item per (image, defence), id ``<item id>@<defence>``, consecutive for one image
(:func:`expand`). The stage decodes an image once, detects once (OT detection for ``ot``/``guardalign``, the
ETA global pre-check for ``eta-detect``), purifies once, and keeps that for the image's defences. Two
defences that end up asking the model the same thing (same image, same prefix, same calibration: e.g.
``ot`` on an image judged safe is ``vanilla``) share one greedy generation (``reused_from`` in the record);
a judge sees each distinct (prompt, response) or image once. Only the current image's state is kept, so
memory does not grow with the number of items.

Defences (DESIGN §1, issue 16):

============  ==========  ==========  ===========  ===========================================
defence       purify      prefix      calibration  note
============  ==========  ==========  ===========  ===========================================
vanilla       no          no          off
prefix        no          yes         off
eta-detect    no          if unsafe   off          ETA's global CLIP pre-check (cos ≥ θ) gates the prefix
ot            if unsafe   no          off          OT patch detection + purification
calibration   no          yes         on
guardalign    if unsafe   yes         on           OT + purification + prefix + calibration
============  ==========  ==========  ===========  ===========================================

Generation reuses ``guardalign.models.lvlm`` (``prepare``/``generate``) and the calibration spec of
``guardalign.attention.calibration``, exactly as ``guardalign answer`` does.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

from guardalign.errors import ConfigError, InputError
from guardalign.records import Decoded, Item


@dataclass(frozen=True)
class Defence:
    purify: bool  # replace the OT-flagged patches of an unsafe image
    prefix: bool  # put the safety prefix in the chat
    calibrate: bool  # amplify instruction → prefix attention
    gate: str | None = None  # "precheck": the prefix only when ETA's global check says unsafe


DEFENCES: dict[str, Defence] = {
    "vanilla": Defence(False, False, False),
    "prefix": Defence(False, True, False),
    "eta-detect": Defence(False, True, False, gate="precheck"),
    "ot": Defence(True, False, False),
    "calibration": Defence(False, True, True),
    "guardalign": Defence(True, True, True),
}


def parse_defences(value: str | Iterable[str]) -> list[str]:
    """``"vanilla,guardalign"`` (or a list) → names in the given order; ConfigError for unknown or repeated ones."""
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if not names:
        raise ConfigError(f"--defences is empty: choose from {', '.join(DEFENCES)}")
    bad = [n for n in names if n not in DEFENCES]
    if bad:
        raise ConfigError(f"unknown defence {bad[0]!r}: choose from {', '.join(DEFENCES)}")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"defence {dup!r} is given twice")
    return names


def expand(items: Iterable[Item], defences: list[str]) -> Iterator[Item]:
    """One runner item per (item, defence), the defences of one item consecutive."""
    for it in items:
        for d in defences:
            yield replace(it, id=f"{it.id}@{d}", meta={**it.meta, "item_id": it.id, "defence": d})


@dataclass
class _ImageState:
    """What one image's defences share; replaced when the next image arrives."""

    item_id: str  # the benchmark item
    image: Any = None  # decoded PIL image, or None
    sha256: str | None = None  # of the stored bytes
    error: str | None = None  # why the image cannot be used
    ot: Any = None  # Detection (OT), computed on first need
    precheck: Any = None  # Detection (global, θ), computed on first need
    purified: Any = None  # the purified image, when OT says unsafe
    masked: list | None = None  # the filled boxes
    generations: dict = dataclasses.field(default_factory=dict)  # (variant, prefix, calibrated) → (tokens, text, defence)
    verdicts: dict = dataclasses.field(default_factory=dict)  # (judge, key) → judgement record


class EvalStage:
    """Runner stage for ``guardalign eval`` (decode is done here: ``run_job(..., decode=False)``)."""

    name = "eval"
    unit = "answer"
    batch_size = 1

    def __init__(self, lvlm: Any, spec: Any, *, prefix: str, prefix_at: str, max_new_tokens: int,
                 detector: Any = None, precheck: Any = None, judges: dict | None = None, matcher: Any = None,
                 anchors_sha256: str | None = None):
        self.lvlm = lvlm  # guardalign.models.lvlm.LVLM
        self.spec = spec  # CalibrationSpec of the calibrated defences
        self.off = dataclasses.replace(spec, mode="off")  # the uncalibrated defences
        self.prefix = prefix  # safety prefix text
        self.prefix_at = prefix_at  # "user" | "response"
        self.max_new_tokens = max_new_tokens  # generation budget
        self.detector = detector  # OT Detector (ot, guardalign), or None
        self.precheck = precheck  # global Detector at θ (eta-detect), or None
        self.judges = judges or {}  # label → judge
        self.matcher = matcher  # guardalign.models.judge.RefusalMatcher (anchors' phrases)
        self.anchors_sha256 = anchors_sha256  # anchor set behind detection, prefix and phrases
        self.layers = list(spec.resolve_layers(lvlm.n_layers)) if spec.active else None
        self._state: _ImageState | None = None
        self.detections = 0  # images detected (OT), for the benchmark and tests
        self.generations = 0  # model generations run

    def settings(self) -> dict[str, Any]:
        """Everything that shapes a record; a resumed run must match it (the defence list is per record)."""
        return {
            "model": self.lvlm.info.to_record(),
            "calibration": {"mode": self.spec.mode, "gamma": self.spec.gamma if self.layers else None,
                            "layers": self.layers},
            "prefix": self.prefix, "prefix_at": self.prefix_at, "max_new_tokens": self.max_new_tokens,
            "detector": self.detector.settings() if self.detector is not None else None,
            "precheck": self.precheck.settings() if self.precheck is not None else None,
            "judges": sorted(self.judges), "anchors_sha256": self.anchors_sha256,
        }

    def process(self, batch: list[Decoded]) -> list[dict[str, Any]]:
        return [self.one(d.item) for d in batch]

    # ------------------------------------------------------------------ one record
    def one(self, item: Item) -> dict[str, Any]:
        meta = item.meta
        defence = meta["defence"]
        rec = {"id": item.id, "item_id": meta["item_id"], "benchmark": meta.get("benchmark"), "defence": defence,
               "source": item.source, "category": meta.get("category"), "prompt": meta.get("prompt"),
               "reference": meta.get("reference") or {}, "status": "error", "error": None, "image_sha256": None,
               "detection": None, "applied": None, "response": None, "refused": None, "judges": {},
               "reused_from": None, "generation": {"max_new_tokens": self.max_new_tokens}}
        if meta.get("utility") is not None:
            rec["utility"] = {"answers": meta["utility"], "exact_match": None}
        if item.error:
            rec["error"] = item.error
            return rec
        state = self._image(item)
        rec["image_sha256"] = state.sha256
        if state.error:
            rec["error"] = state.error
            return rec
        try:
            self._answer(rec, state, DEFENCES[defence], defence)
        except (InputError, ConfigError) as e:
            rec["error"] = f"{item.source}: {e}"
        except Exception as e:  # a model failure on one item must not lose the others' records
            rec["error"] = f"{item.source}: {type(e).__name__}: {e}"
        return rec

    def _image(self, item: Item) -> _ImageState:
        from guardalign.io.images import ImageDecodeError, decode_image

        base = item.meta["item_id"]
        if self._state is None or self._state.item_id != base:
            self._state = state = _ImageState(base)
            try:
                image, info = decode_image(data=item.data) if item.data is not None else decode_image(path=item.path)
                state.image, state.sha256 = image, info.sha256
            except ImageDecodeError as e:
                state.error = f"{item.source}: image {item.path or '(inline bytes)'}: {e}"
        return self._state

    def _answer(self, rec: dict, state: _ImageState, d: Defence, name: str) -> None:
        detection: dict[str, Any] = {}
        image, variant, use_prefix = state.image, "original", d.prefix
        if d.purify:
            ot = self._ot(state)
            detection["ot"] = {"verdict": ot.verdict, "score": ot.score, "category": ot.category,
                               "boxes": ot.boxes, "masked_boxes": state.masked or []}
            if state.purified is not None:
                image, variant = state.purified, "purified"
        if d.gate == "precheck":
            pre = self._precheck(state)
            detection["precheck"] = {"verdict": pre.verdict, "score": pre.score, "category": pre.category,
                                     "threshold": pre.threshold}
            use_prefix = pre.verdict == "unsafe"
        prefix = self.prefix if use_prefix else ""
        calibrated = d.calibrate and self.spec.active
        rec["detection"] = detection or None
        rec["applied"] = {"purified": variant == "purified", "prefix": bool(prefix), "calibrated": calibrated}
        tokens, text, first = self._generate(state, rec["prompt"], image, variant, prefix, calibrated, name)
        rec["reused_from"] = None if first == name else first
        rec["response"] = text
        rec["generation"].update(new_tokens=len(tokens), finish="length" if len(tokens) >= self.max_new_tokens else "eos")
        rec["refused"] = self.matcher(text) if self.matcher is not None else None
        rec["judges"] = {label: self._judge(state, label, j, rec["prompt"], text, image, variant)
                         for label, j in self.judges.items()}
        if "utility" in rec:
            rec["utility"]["exact_match"] = exact_match(text, rec["utility"]["answers"])
        rec["status"] = "ok"

    def _ot(self, state: _ImageState):
        from guardalign.detection.purify import apply_fill, boxes_to_fill

        if state.ot is None:
            if self.detector is None:
                raise ConfigError("this defence needs the OT detector, which was not loaded")
            state.ot = self.detector.detect([state.image])[0]
            self.detections += 1
            if state.ot.verdict == "unsafe":
                state.masked = boxes_to_fill(state.ot.boxes, state.image.size)
                state.purified = apply_fill(state.image, state.masked, fill="mean", mean=self.detector.encoder.mean)
        return state.ot

    def _precheck(self, state: _ImageState):
        if state.precheck is None:
            if self.precheck is None:
                raise ConfigError("eta-detect needs the global pre-check detector, which was not loaded")
            state.precheck = self.precheck.detect([state.image])[0]
        return state.precheck

    def _generate(self, state: _ImageState, prompt: str, image, variant: str, prefix: str, calibrated: bool,
                  name: str):
        """(tokens, text, defence that generated it): one greedy generation per distinct request of an image."""
        from guardalign.models.lvlm import ChatRequest, generate, prepare

        key = (variant, prefix, calibrated)
        if key not in state.generations:
            request = ChatRequest(question=prompt, image=image, prefix=prefix, prefix_at=self.prefix_at)
            prepared = prepare(self.lvlm, [request], max_new_tokens=self.max_new_tokens)
            gen = generate(self.lvlm, prepared, self.spec if calibrated else self.off, max_new_tokens=self.max_new_tokens)
            self.generations += 1
            state.generations[key] = (gen.tokens[0], gen.texts[0], name)
        return state.generations[key]

    def _judge(self, state: _ImageState, label: str, judge: Any, prompt: str, response: str, image, variant: str) -> dict:
        key = (label, variant) if judge.target == "image" else (label, prompt, response)
        if key not in state.verdicts:
            try:
                state.verdicts[key] = judge.judge(prompt, response, image=image if judge.needs_image else None).to_record()
            except Exception as e:  # keep the answer; record why the judge failed
                state.verdicts[key] = {"model": getattr(judge, "name", label), "unsafe": None, "raw": None,
                                       "categories": [], "error": f"{type(e).__name__}: {e}"}
        return state.verdicts[key]


def exact_match(response: str | None, answers: list[str]) -> bool:
    """VQA-style exact match: the normalised response equals one normalised reference answer."""
    got = normalize_answer(response or "")
    return any(got == normalize_answer(a) for a in answers if isinstance(a, str))


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD/VQA normalisation)."""
    import string

    text = text.lower()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))
