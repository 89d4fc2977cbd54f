"""Record validation and streaming statistics behind ``guardalign report`` (no I/O).

``check_scan`` turns one untrusted scan record into the few validated fields the report needs, or raises
:class:`Bad` naming the field; :class:`ScanRun` (one scan file) accumulates counts in one pass and keeps
only the top-k rows. The answer side (``check_answer``, :class:`AnswerPool`) is in
:mod:`guardalign.reporting.answers`, mask manifests in :mod:`guardalign.reporting.manifests`.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

HIST_BINS = 30  # bins of every score histogram
MAX_LISTED = 200  # error records listed individually per section (all are counted)
MAX_CATEGORIES = 64  # categories shown per section (most flagged first); the rest are counted
MAX_TEXT = 300  # characters kept of an id, source or category name (records are untrusted)
from guardalign.records import PROVENANCE as _PROVENANCE


class Bad(ValueError):
    """A malformed record; the message names the field."""


# --------------------------------------------------------------------------- formatting


def fmt_int(n: int) -> str:
    """Counts as ``12,345`` in every format."""
    return f"{n:,}"


def fmt_rate(x: float | None) -> str:
    """Rates as ``12.5%`` in every format; ``—`` when undefined (no denominator)."""
    return "—" if x is None else f"{100 * x:.1f}%"


def fmt_num(x: float | None, digits: int = 4) -> str:
    """Scores, thresholds and attention masses, ``—`` when missing."""
    return "—" if x is None else f"{x:.{digits}f}"


def rate(num: int, den: int) -> float | None:
    return round(num / den, 6) if den else None


# --------------------------------------------------------------------------- validation

_WHAT = {"str": "a string", "num": "a finite number (|x| ≤ 1e15)", "bool": "true or false", "dict": "an object",
         "list": "an array"}


def _type_ok(v: Any, base: str) -> bool:
    if base == "num":  # the bound keeps sums finite, so the JSON summary never holds inf
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= 1e15
    return isinstance(v, {"str": str, "bool": bool, "dict": dict, "list": list}[base])


def _get(rec: dict, key: str, kind: str, optional: bool = False) -> Any:
    """``rec[key]`` checked against ``kind`` ("str", "num?", …; "?" allows null); missing → Bad unless optional."""
    if key not in rec:
        if optional:
            return None
        raise Bad(f"missing field '{key}'")
    v, base = rec[key], kind.rstrip("?")
    if v is None and kind.endswith("?"):
        return None
    if not _type_ok(v, base):
        null = " or null" if kind.endswith("?") else ""
        raise Bad(f"field '{key}' must be {_WHAT[base]}{null}, got {_short(v)}")
    return v


def _cut(s: str | None, n: int = MAX_TEXT) -> str | None:
    return None if s is None else s[:n]


def _short(v: Any) -> str:
    s = repr(v)
    return f"{type(v).__name__} {s[:60]}{'…' if len(s) > 60 else ''}"


def _common_id(rec: Any) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise Bad(f"record must be a JSON object, got {_short(rec)}")
    return {"id": _get(rec, "id", "str")[:MAX_TEXT]}


def _common(rec: Any) -> dict[str, Any]:
    out = {**_common_id(rec), "status": _get(rec, "status", "str")}
    if out["status"] not in ("ok", "error"):
        raise Bad(f"field 'status' must be 'ok' or 'error', got {_short(out['status'])}")
    out["elapsed_s"] = _get(rec, "elapsed_s", "num?", optional=True)
    if out["status"] == "error":
        out["error"] = _get(rec, "error", "str?", optional=True) or "(no message)"
    return out


def check_scan(rec: Any) -> dict[str, Any]:
    """Validated fields of a scan record (RECORDS.md), or raise Bad."""
    out = _common(rec)
    out["source"] = _cut(_get(rec, "source", "str?", optional=True), 1024)
    for key in _PROVENANCE:
        out[key] = _cut(_get(rec, key, "str?", optional=True))
    if out["status"] == "error":
        return out
    out["verdict"] = _get(rec, "verdict", "str")
    if out["verdict"] not in ("safe", "unsafe"):
        raise Bad(f"field 'verdict' must be 'safe' or 'unsafe', got {_short(out['verdict'])}")
    out["score"] = float(_get(rec, "score", "num"))
    out["threshold"] = float(_get(rec, "threshold", "num"))
    out["category"] = _cut(_get(rec, "category", "str?", optional=True))
    cats = _get(rec, "categories", "dict?", optional=True) or {}
    for name, v in cats.items():
        if not _type_ok(v, "num"):
            raise Bad(f"field 'categories' entry {name[:60]!r} must be a finite number, got {_short(v)}")
    out["categories"] = {name[:MAX_TEXT]: float(v) for name, v in cats.items()}
    return out


# --------------------------------------------------------------------------- accumulators


class TopK:
    """Keep the ``k`` items with the largest (key, earliest seq); memory O(k)."""

    def __init__(self, k: int) -> None:
        self.k, self.heap = k, []

    def push(self, key: float, seq: int, item: Any) -> None:
        if self.k <= 0:
            return
        entry = (key, -seq, item)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, entry)
        elif entry[:2] > self.heap[0][:2]:
            heapq.heapreplace(self.heap, entry)

    def items(self) -> list[Any]:
        return [e[2] for e in sorted(self.heap, key=lambda e: e[:2], reverse=True)]


def _top(counter: Counter) -> Any:
    return counter.most_common(1)[0][0] if counter else None


def _throughput(seconds: float, timed: int) -> dict[str, Any] | None:
    if not timed or seconds <= 0:
        return None
    return {"records_timed": timed, "seconds": round(seconds, 6), "per_second": round(timed / seconds, 6)}


def histogram(values: list[float], lo: float, hi: float, bins: int = HIST_BINS) -> list[int]:
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi] (last bin closed, as numpy)."""
    import numpy as np

    return np.histogram(np.asarray(values, dtype=float), bins=bins, range=(lo, hi))[0].astype(int).tolist()


class ScanRun:
    """Statistics of one scan file."""

    def __init__(self, path: str, base_dir: Path, max_rows: int, max_thumbnails: int) -> None:
        self.path, self.base_dir = path, base_dir  # base_dir resolves relative image sources
        self.n = self.ok = self.unsafe = self.timed = 0
        self.seconds = 0.0
        self.prov = {k: Counter() for k in _PROVENANCE}
        self.thresholds: Counter = Counter()
        self.scores = {"safe": [], "unsafe": []}  # image scores of ok records by verdict
        self.cat_scores: dict[str, list[float]] = defaultdict(list)
        self.cat_flagged: Counter = Counter()  # unsafe records per winning category
        self.cat_tau: dict[str, Counter] = defaultdict(Counter)
        self.errors: list[dict[str, Any]] = []
        self.error_count = 0
        self._rows, self._thumbs = TopK(max_rows), TopK(max_thumbnails)

    def add(self, f: dict[str, Any], raw: dict[str, Any]) -> None:
        self.n += 1
        for k in _PROVENANCE:
            if f[k] is not None:
                self.prov[k][f[k]] += 1
        if f["elapsed_s"] is not None:
            self.timed, self.seconds = self.timed + 1, self.seconds + f["elapsed_s"]
        if f["status"] == "error":
            self.error_count += 1
            if len(self.errors) < MAX_LISTED:
                self.errors.append({"id": f["id"], "source": f["source"], "error": f["error"][:500]})
            return
        self.ok += 1
        self.thresholds[f["threshold"]] += 1
        self.scores[f["verdict"]].append(f["score"])
        for name, v in f["categories"].items():
            self.cat_scores[name].append(v)
        if f["category"] is not None:
            self.cat_tau[f["category"]][f["threshold"]] += 1
        if f["verdict"] == "unsafe":
            self.unsafe += 1
            self.cat_flagged[f["category"] or "(none)"] += 1
            margin = f["score"] - f["threshold"] if f["method"] == "global" else f["threshold"] - f["score"]
            row = {k: f[k] for k in ("id", "source", "category", "score", "threshold", "method")}
            row.update(margin=margin, seq=self.n)
            self._rows.push(margin, self.n, row)
            self._thumbs.push(margin, self.n, (self.n, raw))

    def rows(self) -> list[dict[str, Any]]:
        """Kept flagged rows, most severe (furthest past the threshold) first."""
        return self._rows.items()

    def thumb_records(self) -> dict[int, dict[str, Any]]:
        """seq → raw record of the flagged items that get a thumbnail."""
        return dict(self._thumbs.items())

    def summary(self) -> dict[str, Any]:
        method = _top(self.prov["method"])
        tau = _top(self.thresholds)
        allv = self.scores["safe"] + self.scores["unsafe"]
        everything = allv + [v for vs in self.cat_scores.values() for v in vs] + ([tau] if tau is not None else [])
        lo, hi = (min(everything), max(everything)) if everything else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.05, hi + 0.05
        cats = {}
        names = sorted(set(self.cat_scores) | set(self.cat_flagged), key=lambda c: (-self.cat_flagged.get(c, 0), c))
        for name in sorted(names[:MAX_CATEGORIES]):
            vs = self.cat_scores.get(name, [])
            cats[name] = {
                "flagged": self.cat_flagged.get(name, 0),
                "flagged_rate": rate(self.cat_flagged.get(name, 0), self.ok),
                "tau": _top(self.cat_tau[name]) if name in self.cat_tau else tau,
                "scored": len(vs),
                "min": round(min(vs), 6) if vs else None,
                "mean": round(sum(vs) / len(vs), 6) if vs else None,
                "max": round(max(vs), 6) if vs else None,
                "histogram": histogram(vs, lo, hi),
            }
        mixed = {k: dict(c.most_common()) for k, c in self.prov.items() if len(c) > 1}
        if len(self.thresholds) > 1:
            mixed["threshold"] = {str(k): v for k, v in self.thresholds.most_common()}
        return {
            "path": self.path, "records": self.n, "ok": self.ok, "errors": self.error_count,
            "unsafe": self.unsafe, "safe": self.ok - self.unsafe, "unsafe_rate": rate(self.unsafe, self.ok),
            "method": method, "patches": _top(self.prov["patches"]), "model": _top(self.prov["model"]),
            "anchors_sha256": _top(self.prov["anchors_sha256"]), "threshold": tau,
            "unsafe_when": "score >= threshold" if method == "global" else "score <= threshold",
            "mixed": mixed, "throughput": _throughput(self.seconds, self.timed),
            "score_histogram": {"lo": lo, "hi": hi, "bins": HIST_BINS,
                                "safe": histogram(self.scores["safe"], lo, hi),
                                "unsafe": histogram(self.scores["unsafe"], lo, hi)},
            "categories": cats, "categories_omitted": max(0, len(names) - MAX_CATEGORIES),
            "error_items": {"count": self.error_count, "items": self.errors},
            "flagged_shown": min(self.unsafe, self._rows.k),
        }
