"""The eval summary: unsafe / attack-success rates per benchmark × defence (and per category), with bootstrap
intervals, laid out like the GuardAlign paper's Table 1 (defences as rows, benchmarks as columns).

Counts are accumulated record by record (:meth:`EvalTable.add`), so a summary of any number of records needs
memory only for its cells. Metrics, one per judge: ``refusal`` gives ASR (the share of answers with no
refusal phrase, ETA's rule); a response judge gives USR (the share its verdict calls unsafe); an image judge
gives the share of images shown to the model that it calls unsafe; ``utility`` gives exact-match accuracy
on the utility set. A verdict the judge could not give (``unsafe: null``) is left out of its rate, as ETA
leaves out MD-Judge outputs without ``[RESULT]``.

Intervals: percentile bootstrap over items. Resampling n Bernoulli outcomes with k successes and taking the
mean is distributed as Binomial(n, k/n) / n, so the bootstrap draws binomials from the counts alone.
"""
from __future__ import annotations

import html
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

ALL = "all"  # the pooled column / category
UTILITY = "utility"  # metric name of the utility set


def bootstrap_ci(k: int, n: int, *, reps: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the rate k/n (each of the ``reps`` resamples of n items → its mean)."""
    import numpy as np

    if n <= 0:
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).binomial(n, k / n, size=reps) / n
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def metric_kind(label: str, target: str | None) -> str:
    """Column title of a metric: ASR, USR, unsafe-image rate or exact match."""
    if label == UTILITY:
        return "exact match"
    if label == "refusal":
        return "ASR"
    return "unsafe-image rate" if target == "image" else "USR"


@dataclass
class EvalTable:
    """Counts per (metric, benchmark, category, defence): [unsafe or correct, judged]."""

    defences: list[str] = field(default_factory=list)  # row order
    benchmarks: list[str] = field(default_factory=list)  # column order (first seen)
    cells: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # key → [k, n]
    targets: dict[str, str] = field(default_factory=dict)  # metric → "response" | "image"
    unjudged: dict = field(default_factory=lambda: defaultdict(int))  # (metric, defence) → verdicts left out
    errors: dict = field(default_factory=lambda: defaultdict(int))  # (benchmark, defence) → error records
    records: int = 0  # records seen

    def add(self, rec: dict[str, Any]) -> None:
        """Count one eval record (error records only count as errors)."""
        self.records += 1
        bench, defence = rec.get("benchmark") or "?", rec.get("defence") or "?"
        if bench not in self.benchmarks:
            self.benchmarks.append(bench)
        if defence not in self.defences:
            self.defences.append(defence)
        if rec.get("status") != "ok":
            self.errors[(bench, defence)] += 1
            return
        cat = rec.get("category") or "(none)"
        for label, verdict in (rec.get("judges") or {}).items():
            self.targets.setdefault(label, (verdict or {}).get("target", "response"))
            unsafe = (verdict or {}).get("unsafe")
            if unsafe is None:
                self.unjudged[(label, defence)] += 1
            else:
                self._count(label, bench, cat, defence, bool(unsafe))
        em = (rec.get("utility") or {}).get("exact_match")
        if em is not None:
            self._count(UTILITY, bench, cat, defence, bool(em))

    def _count(self, metric: str, bench: str, cat: str, defence: str, hit: bool) -> None:
        for b, c in ((bench, cat), (bench, ALL), (ALL, ALL)):
            cell = self.cells[(metric, b, c, defence)]
            cell[0] += hit
            cell[1] += 1

    @property
    def metrics(self) -> list[str]:
        seen = list(dict.fromkeys(k[0] for k in self.cells))
        return [m for m in seen if m != UTILITY] + ([UTILITY] if UTILITY in seen else [])

    def categories(self, metric: str, bench: str) -> list[str]:
        return sorted({k[2] for k in self.cells if k[0] == metric and k[1] == bench and k[2] != ALL})

    def cell(self, metric: str, bench: str, cat: str, defence: str, *, reps: int, seed: int) -> dict[str, Any] | None:
        k, n = self.cells.get((metric, bench, cat, defence), (0, 0))
        if not n:
            return None
        lo, hi = bootstrap_ci(k, n, reps=reps, seed=seed)
        return {"rate": k / n, "lo": lo, "hi": hi, "k": k, "n": n}

    # ------------------------------------------------------------------ outputs
    def to_json(self, *, reps: int = 1000, seed: int = 0) -> dict[str, Any]:
        """Every cell with its interval, per metric → benchmark (and ``all``) → defence, plus categories."""
        out: dict[str, Any] = {"defences": self.defences, "benchmarks": self.benchmarks, "records": self.records,
                               "bootstrap": {"reps": reps, "seed": seed, "level": 0.95, "method": "percentile"},
                               "metrics": {}, "errors": {}}
        for m in self.metrics:
            entry: dict[str, Any] = {"kind": metric_kind(m, self.targets.get(m)), "benchmarks": {}}
            for b in self._columns(m):
                entry["benchmarks"][b] = {d: self.cell(m, b, ALL, d, reps=reps, seed=seed) for d in self.defences}
                if b != ALL:
                    entry["benchmarks"][b]["categories"] = {
                        c: {d: self.cell(m, b, c, d, reps=reps, seed=seed) for d in self.defences}
                        for c in self.categories(m, b)}
            entry["unjudged"] = {d: self.unjudged.get((m, d), 0) for d in self.defences}
            out["metrics"][m] = entry
        for (b, d), n in self.errors.items():
            out["errors"].setdefault(b, {})[d] = n
        return out

    def _columns(self, metric: str) -> list[str]:
        cols = [b for b in self.benchmarks if any(k[0] == metric and k[1] == b for k in self.cells)]
        return cols + [ALL] if len(cols) > 1 else cols

    def main_rows(self, metric: str, *, reps: int, seed: int) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of the Table-1 layout for ``metric``: one row per defence, one column per benchmark."""
        cols = self._columns(metric)
        rows = [[d] + [fmt_cell(self.cell(metric, b, ALL, d, reps=reps, seed=seed)) for b in cols]
                for d in self.defences]
        return ["defence"] + cols, rows

    def category_rows(self, metric: str, bench: str, *, reps: int, seed: int) -> tuple[list[str], list[list[str]]]:
        """(header, rows) for one benchmark: one row per category, one column per defence."""
        rows = [[c] + [fmt_cell(self.cell(metric, bench, c, d, reps=reps, seed=seed)) for d in self.defences]
                for c in self.categories(metric, bench)]
        return ["category"] + self.defences, rows

    def to_markdown(self, *, reps: int = 1000, seed: int = 0) -> str:
        lines = ["# guardalign eval", "",
                 f"Rates in %, with 95% percentile-bootstrap intervals over items ({reps} resamples, seed {seed}); "
                 "n = judged answers.", ""]
        for m in self.metrics:
            title = f"{metric_kind(m, self.targets.get(m))} — {m}"
            lines += [f"## {title}", ""] + _md_table(*self.main_rows(m, reps=reps, seed=seed)) + [""]
            for b in self._columns(m):
                if b != ALL and self.categories(m, b):
                    lines += [f"### {b} by category ({m})", ""]
                    lines += _md_table(*self.category_rows(m, b, reps=reps, seed=seed)) + [""]
        if self.errors:
            lines += ["## Error records", ""] + _md_table(
                ["benchmark", "defence", "errors"], [[b, d, str(n)] for (b, d), n in sorted(self.errors.items())]) + [""]
        return "\n".join(lines)

    def to_html(self, *, reps: int = 1000, seed: int = 0) -> str:
        """A self-contained page with the same tables (every value escaped)."""
        parts = []
        for m in self.metrics:
            parts.append(f"<h2>{html.escape(metric_kind(m, self.targets.get(m)))} — {html.escape(m)}</h2>")
            parts.append(_html_table(*self.main_rows(m, reps=reps, seed=seed)))
            for b in self._columns(m):
                if b != ALL and self.categories(m, b):
                    parts.append(f"<h3>{html.escape(b)} by category</h3>")
                    parts.append(_html_table(*self.category_rows(m, b, reps=reps, seed=seed)))
        style = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        return ("<!doctype html><meta charset=utf-8><title>guardalign eval</title>"
                f"<style>{style}</style><h1>guardalign eval</h1>"
                f"<p>Rates in %, 95% percentile-bootstrap intervals ({reps} resamples, seed {seed}).</p>"
                + "".join(parts))


def fmt_cell(cell: dict[str, Any] | None) -> str:
    """``"12.5 [8.0, 17.0] n=200"`` (percent), or "–" for an empty cell."""
    if not cell:
        return "–"
    return f"{100 * cell['rate']:.1f} [{100 * cell['lo']:.1f}, {100 * cell['hi']:.1f}] n={cell['n']}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return (["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def dumps(summary: dict[str, Any]) -> str:
    """Strict JSON (NaN → null) of the summary."""
    return json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
