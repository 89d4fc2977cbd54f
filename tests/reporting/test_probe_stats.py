"""Probe summary numbers: bootstrap intervals against a plain resampling loop, geometric-mean ranks, record
validation, and escaping in the HTML section."""
from __future__ import annotations

import re

import numpy as np
import pytest

from guardalign.reporting.probe import probe_html, probe_markdown, svg_curves
from guardalign.reporting.probe_stats import ProbePool, bootstrap_mean, check_probe
from guardalign.reporting.stats import Bad

L = 3


def _form(rank, refused=None, cosine=None, attention=None):
    first = lambda k: next((i for i, r in enumerate(rank) if r <= k), None)  # noqa: E731
    return {"rank": rank, "ranks": [rank], "top1": [0] * len(rank), "first_topk": first(10), "first_top1": first(1),
            "refused": rank[-1] == 1 if refused is None else refused, "attention": attention or {},
            **({"cosine": cosine} if cosine is not None else {})}


def _rec(i, image_rank, text_rank, category="c", cosine=(0.1, 0.2, 0.3)):
    n = len(image_rank)
    cosine, att = list(cosine) + [0.0] * (n - len(cosine)), [0.5, None, 0.25] + [0.1] * (n - 3)
    return {"id": f"p{i}", "status": "ok", "category": category, "layers": n, "lens": "standard", "top_k": 10,
            "model": {"id": "m", "family": "llava", "dtype": "float32"}, "refusal_tokens": [{"id": 5, "token": "S"}],
            "forms": {"image": _form(image_rank, cosine=cosine, attention={"image": att}),
                      "text": _form(text_rank)}}


def test_bootstrap_against_a_resampling_loop():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 1.0, size=(60, 2))
    x[5, 1] = np.nan  # a missing value is ignored, not zero
    mean, lo, hi = bootstrap_mean(x, resamples=4000)
    assert mean == pytest.approx([x[:, 0].mean(), np.nanmean(x[:, 1])], abs=1e-6)
    ref = np.array([np.nanmean(x[rng.integers(0, 60, 60)], axis=0) for _ in range(4000)])
    assert lo == pytest.approx(np.percentile(ref, 2.5, axis=0), abs=0.05)
    assert hi == pytest.approx(np.percentile(ref, 97.5, axis=0), abs=0.05)
    assert lo[0] < mean[0] < hi[0]
    same = bootstrap_mean(np.ones((4, 1)))
    assert same == ([1.0], [1.0], [1.0])
    assert bootstrap_mean(np.full((3, 1), np.nan)) == ([None], [None], [None])


def test_pool_summary_geometric_ranks_refusal_and_categories():
    pool = ProbePool()
    pool.add(check_probe(_rec(0, [100, 10, 1], [50, 1, 1], "a")))
    pool.add(check_probe(_rec(1, [1, 1000, 100], [2, 1, 1], "b", cosine=(0.3, 0.4, 0.5))))
    pool.add(check_probe({"id": "bad", "status": "error", "error": "x.jsonl:3: boom", "category": None}))
    s = pool.summary()
    assert (s["records"], s["ok"], s["errors"]) == (3, 2, 1) and s["error_items"]["items"][0]["id"] == "bad"
    img, txt = s["all"]["forms"]["image"], s["all"]["forms"]["text"]
    assert img["rank"]["mean"] == pytest.approx([10.0, 100.0, 10.0])  # geometric means: √(100·1), √(10·1000), √(1·100)
    assert txt["rank"]["mean"] == pytest.approx([10.0, 1.0, 1.0])
    assert img["refused"] == 0.5 and txt["refused"] == 1.0 and txt["refused_lo"] == 1.0
    assert img["first_top1_median"] == 1.0 and img["first_top1_reached"] == 2  # layers 2 and 0
    assert txt["first_top1_median"] == 1.0 and txt["first_topk_median"] == 0.5
    assert img["cosine"]["mean"] == pytest.approx([0.2, 0.3, 0.4]) and txt["cosine"] is None
    assert img["attention"]["image"]["mean"] == [0.5, None, 0.25]  # null (no self-attention) stays null
    assert set(s["by_category"]) == {"a", "b"} and s["by_category"]["a"]["forms"]["image"]["refused"] == 1.0
    with pytest.raises(Bad, match="layers"):
        pool.add(check_probe(_rec(2, [1, 1, 1, 1], [1, 1, 1, 1])))


@pytest.mark.parametrize("change, match", [
    (lambda r: r.pop("forms"), "missing field 'forms'"),
    (lambda r: r["forms"].pop("text"), "'image' and 'text'"),
    (lambda r: r["forms"]["image"].update(rank=[1, 2]), r"forms.image.rank' must be an array of 3"),
    (lambda r: r["forms"]["image"].update(rank=[0, 2, 3]), "ranks ≥ 1"),
    (lambda r: r["forms"]["image"].update(refused="yes"), "refused' must be true or false"),
    (lambda r: r["forms"]["image"].update(first_top1=7), "first_top1' must be a layer index"),
    (lambda r: r["forms"]["image"]["attention"].update(other=[1, 1, 1]), "attention' must map spans"),
    (lambda r: r["forms"].update(weird={}), "not a known form"),
    (lambda r: r.update(layers="3"), "layers"),
])
def test_check_probe_rejects_malformed(change, match):
    rec = _rec(0, [3, 2, 1], [1, 1, 1])
    change(rec)
    with pytest.raises(Bad, match=match):
        check_probe(rec)


def test_html_and_markdown_escape_record_text():
    pool = ProbePool()
    pool.add(check_probe(_rec(0, [5, 2, 1], [1, 1, 1], "<img src=x onerror=alert(1)>|*")))
    s = pool.summary()
    page = probe_html(s)
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<svg") == 3
    md = "\n".join(probe_markdown(s))
    assert re.search(r"(?<!\\)<img", md) is None and "\\<img" in md and "\\|\\*" in md


def test_svg_log_scale_places_ranks():
    svg = svg_curves([("image", {"mean": [1, 10, 100], "lo": [1, 5, 50], "hi": [2, 20, 200]}, "#f00", "")],
                     label="t", log=True, w=200, h=100)
    ys = [float(p.split(",")[1]) for p in svg.split('<polyline points="')[1].split('"')[0].split()]
    assert ys[0] - ys[1] == pytest.approx(ys[1] - ys[2], abs=0.2)  # equal steps per decade
    assert ">log scale<" in svg
