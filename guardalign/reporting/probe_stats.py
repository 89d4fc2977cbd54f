"""Probe records → summary numbers (no I/O): mean curves per layer with bootstrap intervals, the layer where
refusal starts, and the fraction refused at the last layer, per form and per category.

:func:`check_probe` turns one untrusted record into the validated per-layer arrays the summary needs (or raises
:class:`~guardalign.reporting.stats.Bad` naming the field); :class:`ProbePool` keeps them as compact arrays
(O(pairs × forms × layers) floats) and :meth:`ProbePool.summary` computes the numbers every format shows.

Ranks are averaged on a log scale: the curve is the geometric mean of the best refusal-token rank (1 = top-1),
so one pair with rank 30 000 does not drown a hundred with rank 2. Intervals are 95% percentile bootstraps
(:data:`BOOTSTRAP` resamples of the pairs, fixed seed, so a report is reproducible).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

from guardalign.reporting.stats import MAX_LISTED, MAX_TEXT, Bad, _common, _get, _short

BOOTSTRAP = 1000  # resamples per interval
FORM_ORDER = ("image", "text", "prefix", "calibration", "guardalign")
_SPANS = ("image", "caption", "text", "prefix")
MAX_CATEGORIES = 64  # categories summarised (largest first); the rest are counted


def _layer_list(v: Any, field: str, n: int, *, ints: bool = False, nullable: bool = False) -> list:
    if not isinstance(v, list) or len(v) != n:
        raise Bad(f"field '{field}' must be an array of {n} per-layer values, got {_short(v)}")
    for x in v:
        if x is None and nullable:
            continue
        ok = isinstance(x, int) and not isinstance(x, bool) and x >= 1 if ints else \
            isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) <= 1e6
        if not ok:
            raise Bad(f"field '{field}' holds {_short(x)}; expected {'ranks ≥ 1' if ints else 'numbers'}")
    return v


def _layer_index(v: Any, field: str, n: int) -> int | None:
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
        raise Bad(f"field '{field}' must be a layer index in [0, {n}) or null, got {_short(v)}")
    return v


def check_probe(rec: Any) -> dict[str, Any]:
    """Validated fields of a probe record (docs/records.md), or raise Bad."""
    out = _common(rec)
    cat = _get(rec, "category", "str?", optional=True)
    out["category"] = cat[:MAX_TEXT] if cat else "(none)"
    if out["status"] != "ok":
        return out
    n = _get(rec, "layers", "num")
    if not isinstance(n, int) or not 1 <= n <= 10_000:
        raise Bad(f"field 'layers' must be a layer count, got {_short(n)}")
    forms = _get(rec, "forms", "dict")
    if "image" not in forms or "text" not in forms:
        raise Bad("field 'forms' must hold the 'image' and 'text' forms")
    out.update(layers=n, forms={}, model=rec.get("model"), lens=rec.get("lens"), top_k=rec.get("top_k"),
               refusal_tokens=rec.get("refusal_tokens"))
    for name, f in forms.items():
        where = f"forms.{name}"
        if name not in FORM_ORDER or not isinstance(f, dict):
            raise Bad(f"field '{where}' is not a known form ({', '.join(FORM_ORDER)}) object")
        refused = f.get("refused")
        if not isinstance(refused, bool):
            raise Bad(f"field '{where}.refused' must be true or false, got {_short(refused)}")
        att = f.get("attention") or {}
        if not isinstance(att, dict) or not set(att) <= set(_SPANS):
            raise Bad(f"field '{where}.attention' must map spans ({', '.join(_SPANS)}) to per-layer arrays")
        out["forms"][name] = {
            "rank": _layer_list(f.get("rank"), f"{where}.rank", n, ints=True),
            "first_topk": _layer_index(f.get("first_topk"), f"{where}.first_topk", n),
            "first_top1": _layer_index(f.get("first_top1"), f"{where}.first_top1", n),
            "refused": refused,
            "attention": {s: _layer_list(v, f"{where}.attention.{s}", n, nullable=True) for s, v in att.items()},
            "cosine": None if f.get("cosine") is None else _layer_list(f["cosine"], f"{where}.cosine", n, nullable=True),
        }
    return out


def bootstrap_mean(x, resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[list, list, list]:
    """Mean over rows of ``x`` (N, L) ignoring NaN, with a 95% percentile bootstrap interval per column.

    Returns (mean, lo, hi), lists of L floats (None where a column has no value). Resamples are drawn as
    multinomial counts W (chunk, N), so a chunk of means is W @ x / W @ mask: memory O(chunk × (N + L)).
    """
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    valid = ~np.isnan(x)
    x0 = np.where(valid, x, 0.0)
    count = valid.sum(0)
    mean = np.where(count > 0, x0.sum(0) / np.maximum(count, 1), np.nan)
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    chunk = max(1, min(resamples, 4_000_000 // max(n, 1)))
    means = []
    for start in range(0, resamples, chunk):
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, resamples - start)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append((w @ x0) / (w @ valid))
    boot = np.concatenate(means)
    with warnings.catch_warnings():  # a column without any value (no self-attention there) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(boot, 2.5, axis=0), np.nanpercentile(boot, 97.5, axis=0)
    clean = lambda a: [None if np.isnan(v) else round(float(v), 6) for v in a]  # noqa: E731
    return clean(mean), clean(lo), clean(hi)


def _curve(rows: list, log: bool = False) -> dict | None:
    import numpy as np

    if not rows:
        return None
    x = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64)
    mean, lo, hi = bootstrap_mean(np.log10(x) if log else x)
    if log:
        mean, lo, hi = ([None if v is None else round(10 ** v, 4) for v in a] for a in (mean, lo, hi))
    return {"mean": mean, "lo": lo, "hi": hi}


def _median(values: list[int]) -> float | None:
    import numpy as np

    return float(np.median(values)) if values else None


class ProbePool:
    """All probe records of a report (or of a run), kept as per-layer arrays."""

    def __init__(self, max_rows: int = 1000) -> None:
        self.max_rows = max_rows  # kept for symmetry with the other pools (no row table here)
        self.records = self.ok = self.errors = 0
        self.errors_listed: list[dict[str, str]] = []
        self.rows: list[dict[str, Any]] = []  # validated ok records (per-layer arrays only)
        self.layers: int | None = None  # L of the first ok record
        self.meta: dict[str, Any] = {}  # model, lens, top_k, refusal tokens of the first ok record
        self.mixed: set[str] = set()  # provenance keys that differ between records

    def add(self, f: dict[str, Any], raw: Any = None) -> None:
        """Count one validated record (``f`` from :func:`check_probe`). Raises Bad for a layer count that differs."""
        if f["status"] == "ok" and self.layers is not None and f["layers"] != self.layers:
            raise Bad(f"record has {f['layers']} layers, the first record {self.layers}: one model per report")
        self.records += 1
        if f["status"] != "ok":
            self.errors += 1
            if len(self.errors_listed) < MAX_LISTED:
                self.errors_listed.append({"id": f["id"], "error": str(f.get("error"))[:500]})
            return
        self.ok += 1
        if self.layers is None:
            self.layers = f["layers"]
            self.meta = {k: f.get(k) for k in ("model", "lens", "top_k", "refusal_tokens")}
        self.mixed |= {k for k in self.meta if f.get(k) != self.meta[k]}
        self.rows.append({"category": f["category"], "forms": f["forms"]})

    def summary(self) -> dict[str, Any]:
        """The numbers every format shows (the JSON report writes exactly this under ``probe``)."""
        by_cat: dict[str, list] = defaultdict(list)
        for r in self.rows:
            by_cat[r["category"]].append(r)
        cats = sorted(by_cat, key=lambda c: (-len(by_cat[c]), c))
        forms = [f for f in FORM_ORDER if any(f in r["forms"] for r in self.rows)]
        return {
            "records": self.records, "ok": self.ok, "errors": self.errors,
            "error_items": {"count": self.errors, "items": self.errors_listed},
            "layers": self.layers, **self.meta, "mixed": sorted(self.mixed), "forms": forms,
            "all": self._group(self.rows, forms, attention=True),
            "by_category": {c: self._group(by_cat[c], forms) for c in cats[:MAX_CATEGORIES]},
            "categories_omitted": max(0, len(cats) - MAX_CATEGORIES),
        }

    def _group(self, rows: list, forms: list[str], attention: bool = False) -> dict[str, Any]:
        """Per form: rank curve (geometric mean), cosine curve, refusal start and last-layer refusal rate."""
        import numpy as np

        out: dict[str, Any] = {"n": len(rows), "forms": {}}
        for name in forms:
            fr = [r["forms"][name] for r in rows if name in r["forms"]]
            refused = np.array([[float(f["refused"])] for f in fr]) if fr else None
            rate = bootstrap_mean(refused) if fr else ([None], [None], [None])
            top1 = [f["first_top1"] for f in fr if f["first_top1"] is not None]
            topk = [f["first_topk"] for f in fr if f["first_topk"] is not None]
            entry = {
                "n": len(fr), "refused": rate[0][0], "refused_lo": rate[1][0], "refused_hi": rate[2][0],
                "first_top1_median": _median(top1), "first_top1_reached": len(top1),
                "first_topk_median": _median(topk), "first_topk_reached": len(topk),
                "rank": _curve([f["rank"] for f in fr], log=True),
                "cosine": _curve([f["cosine"] for f in fr if f["cosine"] is not None]),
            }
            if attention:
                spans = sorted({s for f in fr for s in f["attention"]}, key=_SPANS.index)
                entry["attention"] = {s: _curve([f["attention"][s] for f in fr if s in f["attention"]]) for s in spans}
            out["forms"][name] = entry
        return out
