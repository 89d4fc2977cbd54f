"""Answer records in ``guardalign report``: validation and the pooled statistics of all answer files (no I/O).

``check_answer`` turns one untrusted answer record into the validated fields the report needs, or raises
:class:`~guardalign.reporting.stats.Bad` naming the field. :class:`AnswerPool` accumulates every answers
file in one pass (each row remembers its file) and keeps only the top-k response rows.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from guardalign.reporting.stats import (
    MAX_CATEGORIES, MAX_LISTED, Bad, TopK, _common, _cut, _get, _short, _throughput, _top, _type_ok, rate,
)


def check_answer(rec: Any) -> dict[str, Any]:
    """Validated fields of an answer record (DESIGN §3), or raise Bad."""
    out = _common(rec)
    out["category"] = _cut(_get(rec, "category", "str?", optional=True))
    out["prompt"] = _get(rec, "prompt", "str?", optional=True)
    out["image"] = _cut(_get(rec, "image", "str?", optional=True))
    model = _get(rec, "model", "dict?", optional=True) or {}
    out["model"] = _cut(_get(model, "id", "str?", optional=True))
    out["calibration"] = _calibration(_get(rec, "calibration", "dict?", optional=True))
    out["anchors_sha256"] = _cut(_get(rec, "anchors_sha256", "str?", optional=True))
    out["image_sha256"] = _get(rec, "image_sha256", "str?", optional=True)
    det = _get(rec, "detection", "dict?", optional=True) or {}
    out["purified"] = bool(_get(det, "purified", "bool?", optional=True))
    out["verdict"] = _get(det, "verdict", "str?", optional=True)
    out["detected"] = _cut(_get(det, "category", "str?", optional=True))  # the detector's, shown apart
    boxes = _get(det, "masked_boxes", "list?", optional=True) or []
    if not all(isinstance(b, list) and len(b) == 4 and all(_type_ok(x, "num") for x in b) for b in boxes):
        raise Bad("field 'detection.masked_boxes' must be a list of [x0, y0, x1, y1] number boxes")
    out["masked_boxes"] = boxes[:1024]
    if out["status"] == "error":
        return out
    out["response"] = _get(rec, "response", "str")
    out["refused"] = _get(rec, "refused", "bool")
    judge = _get(rec, "judge", "dict?", optional=True)
    out["judge_unsafe"] = None if judge is None else _get(judge, "unsafe", "bool?", optional=True)
    out["prefix_attention"] = _attention(_get(rec, "prefix_attention", "dict?", optional=True))
    return out


def _calibration(cal: dict | None) -> tuple[str | None, list | None]:
    if not cal:
        return None, None
    layers = cal.get("layers")
    ok = isinstance(layers, list) and len(layers) == 2 and all(_type_ok(x, "num") for x in layers)
    desc = ", ".join(f"{k}={cal[k]}" for k in ("mode", "gamma", "layers", "prefix_at") if k in cal)
    return desc[:200], ([int(layers[0]), int(layers[1])] if ok else None)


def _attention(pa: dict | None) -> tuple[list, list] | None:
    if not pa:
        return None
    series = []
    for key in ("vanilla", "calibrated"):
        vals = _get(pa, key, "list?", optional=True) or []
        for v in vals:
            if v is not None and not _type_ok(v, "num"):
                raise Bad(f"field 'prefix_attention.{key}' must hold numbers or nulls, got {_short(v)}")
        series.append([None if v is None else float(v) for v in vals])
    if not series[0] and not series[1]:
        return None
    n = max(len(series[0]), len(series[1]))
    return tuple(s + [None] * (n - len(s)) for s in series)  # type: ignore[return-value]


def _group() -> dict[str, int]:
    return {"n": 0, "refused": 0, "judged": 0, "judge_unsafe": 0}


class AnswerPool:
    """Statistics of all answer files together."""

    def __init__(self, max_rows: int) -> None:
        self.n = self.ok = self.timed = self.purified = self.flagged = 0
        self.seconds = 0.0
        self.total = _group()
        self.groups: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: {"purified": _group(),
                                                                               "not_purified": _group()})
        self.att: dict[int, list] = {}  # n_layers → [sum_v, cnt_v, sum_c, cnt_c, records]
        self.models, self.calib, self.anchors, self.bands = Counter(), Counter(), Counter(), Counter()
        self.files: Counter = Counter()  # answers file → records read from it
        self.errors: list[dict[str, Any]] = []
        self.error_count = 0
        self._rows = TopK(max_rows)

    def add(self, f: dict[str, Any], raw: dict[str, Any]) -> None:
        """``f`` are :func:`check_answer`'s fields plus ``file``, the answers file the record came from."""
        self.n += 1
        if f.get("file") is not None:
            self.files[f["file"]] += 1
        for counter, key in ((self.models, f["model"]), (self.calib, f["calibration"][0]),
                             (self.anchors, f["anchors_sha256"])):
            if key is not None:
                counter[key] += 1
        if f["elapsed_s"] is not None:
            self.timed, self.seconds = self.timed + 1, self.seconds + f["elapsed_s"]
        if f["status"] == "error":
            self.error_count += 1
            if len(self.errors) < MAX_LISTED:
                self.errors.append({"id": f["id"], "source": f["image"], "error": f["error"][:500], "file": f.get("file")})
            return
        self.ok += 1
        self.purified += f["purified"]
        self.flagged += f["verdict"] == "unsafe"
        cat = f["category"] or "(none)"
        for g in (self.total, self.groups[cat]["purified" if f["purified"] else "not_purified"]):
            g["n"] += 1
            g["refused"] += f["refused"]
            g["judged"] += f["judge_unsafe"] is not None
            g["judge_unsafe"] += f["judge_unsafe"] is True
        if f["prefix_attention"] is not None:
            self._attention(*f["prefix_attention"])
            if f["calibration"][1] is not None:
                self.bands[tuple(f["calibration"][1])] += 1
        # Harmful answers first: judged unsafe and not refused, then judged unsafe, then not refused.
        prio = 2 * (f["judge_unsafe"] is True) + (not f["refused"])
        row = {k: f.get(k) for k in ("id", "category", "purified", "refused", "judge_unsafe", "verdict", "image",
                                     "detected", "image_sha256", "masked_boxes", "file")}
        row.update(prompt=(f["prompt"] or "")[:300], response=f["response"][:1000],
                   truncated=len(f["response"]) > 1000, seq=self.n)
        self._rows.push(prio, self.n, row)

    def _attention(self, vanilla: list, calibrated: list) -> None:
        acc = self.att.setdefault(len(vanilla), [[0.0] * len(vanilla), [0] * len(vanilla),
                                                 [0.0] * len(vanilla), [0] * len(vanilla), 0])
        acc[4] += 1
        for i, (v, c) in enumerate(zip(vanilla, calibrated)):
            if v is not None:
                acc[0][i] += v
                acc[1][i] += 1
            if c is not None:
                acc[2][i] += c
                acc[3][i] += 1

    def rows(self) -> list[dict[str, Any]]:
        """Kept response rows: harmful-looking answers first, then input order."""
        return self._rows.items()

    def _attention_summary(self) -> dict[str, Any] | None:
        if not self.att:
            return None
        n_layers, acc = max(self.att.items(), key=lambda kv: (kv[1][4], kv[0]))
        mean = lambda s, c: [round(a / b, 6) if b else None for a, b in zip(s, c)]  # noqa: E731
        band = _top(self.bands)
        return {"records": acc[4], "layers": n_layers, "vanilla": mean(acc[0], acc[1]),
                "calibrated": mean(acc[2], acc[3]), "calibrated_layers": list(band) if band else None,
                "other_layer_counts": sum(a[4] for k, a in self.att.items() if k != n_layers)}

    def summary(self) -> dict[str, Any]:
        def rates(g: dict[str, int]) -> dict[str, Any]:
            return {**g, "refusal_rate": rate(g["refused"], g["n"]), "judge_unsafe_rate": rate(g["judge_unsafe"], g["judged"])}

        t = self.total
        names = sorted(self.groups, key=lambda c: -sum(g["n"] for g in self.groups[c].values()))[:MAX_CATEGORIES]
        return {
            "records": self.n, "ok": self.ok, "errors": self.error_count,
            "refused": t["refused"], "refusal_rate": rate(t["refused"], self.ok),
            "judged": t["judged"], "judge_unsafe": t["judge_unsafe"],
            "judge_unsafe_rate": rate(t["judge_unsafe"], t["judged"]),
            "purified": self.purified, "flagged_by_detection": self.flagged,
            "by_category": {c: {k: rates(g) for k, g in self.groups[c].items()} for c in sorted(names)},
            "categories_omitted": len(self.groups) - len(names),
            "prefix_attention": self._attention_summary(),
            "files": dict(self.files), "models": dict(self.models.most_common()),
            "calibration": dict(self.calib.most_common()),
            "anchors_sha256": dict(self.anchors.most_common()),
            "throughput": _throughput(self.seconds, self.timed),
            "error_items": {"count": self.error_count, "items": self.errors},
            "responses_shown": min(self.ok, self._rows.k),
        }
