"""The eval summary: counting, the binomial bootstrap against an item-level bootstrap, the table layouts."""
from __future__ import annotations

import json

import numpy as np
import pytest

from guardalign.reporting.evaltable import ALL, EvalTable, bootstrap_ci, dumps, fmt_cell, metric_kind


@pytest.mark.parametrize("k, n", [(7, 20), (1, 50), (30, 30), (0, 12)])
def test_binomial_bootstrap_equals_resampling_the_items(k, n):
    """Resampling n 0/1 outcomes and averaging is Binomial(n, k/n)/n: same percentiles up to Monte-Carlo noise."""
    reps = 40_000
    lo, hi = bootstrap_ci(k, n, reps=reps, seed=1)
    items = np.array([1] * k + [0] * (n - k), dtype=float)
    rng = np.random.default_rng(2)
    means = items[rng.integers(0, n, size=(reps, n))].mean(axis=1)
    ilo, ihi = np.percentile(means, [2.5, 97.5])
    assert lo == pytest.approx(ilo, abs=1.5 / n + 1e-9) and hi == pytest.approx(ihi, abs=1.5 / n + 1e-9)
    assert lo <= k / n <= hi
    assert bootstrap_ci(k, n, reps=500, seed=3) == bootstrap_ci(k, n, reps=500, seed=3)  # deterministic


def test_bootstrap_degenerate_and_empty():
    assert bootstrap_ci(0, 10) == (0.0, 0.0) and bootstrap_ci(10, 10) == (1.0, 1.0)
    assert all(np.isnan(bootstrap_ci(0, 0)))


def rec(bench, defence, cat, unsafe, *, status="ok", image=None, em=None):
    judges = {"refusal": {"unsafe": unsafe}}
    if image is not None:
        judges["shieldgemma2:x"] = {"unsafe": image, "target": "image"}
    out = {"benchmark": bench, "defence": defence, "category": cat, "status": status, "judges": judges}
    if em is not None:
        out["utility"] = {"answers": ["a"], "exact_match": em}
    return out


@pytest.fixture
def table():
    t = EvalTable(defences=["vanilla", "guardalign"])
    rows = [("fs", "vanilla", "A", True), ("fs", "vanilla", "A", True), ("fs", "vanilla", "B", False),
            ("fs", "guardalign", "A", False), ("fs", "guardalign", "A", None), ("fs", "guardalign", "B", False),
            ("mm", "vanilla", "S1", True), ("mm", "guardalign", "S1", True)]
    for b, d, c, u in rows:
        t.add(rec(b, d, c, u, image=(d == "vanilla")))
    t.add(rec("fs", "vanilla", "A", True, status="error"))
    t.add(rec("utility", "vanilla", "(none)", False, em=True))
    t.add(rec("utility", "guardalign", "(none)", False, em=False))
    return t


def test_counts_per_benchmark_category_and_pooled(table):
    s = table.to_json(reps=100)
    r = s["metrics"]["refusal"]["benchmarks"]
    assert (r["fs"]["vanilla"]["k"], r["fs"]["vanilla"]["n"]) == (2, 3)
    assert (r["fs"]["guardalign"]["k"], r["fs"]["guardalign"]["n"]) == (0, 2)  # the null verdict is left out
    assert r["fs"]["categories"]["A"]["vanilla"] == {**r["fs"]["categories"]["A"]["vanilla"], "k": 2, "n": 2}
    assert r[ALL]["vanilla"]["n"] == 5 and r[ALL]["vanilla"]["k"] == 3  # fs 3 + mm 1 + utility 1
    assert s["metrics"]["refusal"]["unjudged"] == {"vanilla": 0, "guardalign": 1}
    assert s["metrics"]["refusal"]["kind"] == "ASR" and s["metrics"]["shieldgemma2:x"]["kind"] == "unsafe-image rate"
    assert s["metrics"]["utility"]["benchmarks"]["utility"]["vanilla"]["rate"] == 1.0
    assert s["errors"] == {"fs": {"vanilla": 1}} and s["records"] == 11
    assert list(s["metrics"]) == ["refusal", "shieldgemma2:x", "utility"]  # utility last
    json.loads(dumps(s))  # strict JSON


def test_table_one_layout(table):
    header, rows = table.main_rows("refusal", reps=100, seed=0)
    assert header == ["defence", "fs", "mm", "utility", ALL] and [r[0] for r in rows] == ["vanilla", "guardalign"]
    assert rows[0][1].startswith("66.7 [") and rows[0][1].endswith("n=3")
    cat_header, cat_rows = table.category_rows("refusal", "fs", reps=100, seed=0)
    assert cat_header == ["category", "vanilla", "guardalign"] and [r[0] for r in cat_rows] == ["A", "B"]
    md = table.to_markdown(reps=100)
    assert "## ASR — refusal" in md and "### fs by category (refusal)" in md and "| fs | vanilla | 1 |" in md
    assert fmt_cell(None) == "–" and metric_kind("md-judge:x", "response") == "USR"


def test_html_escapes_everything():
    t = EvalTable()
    t.add(rec("<script>x</script>", "vanilla", "<b>", True))
    page = t.to_html(reps=10)
    assert "<script>x" not in page and "&lt;script&gt;" in page and "&lt;b&gt;" in page
