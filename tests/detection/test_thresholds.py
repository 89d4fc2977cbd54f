"""ROC math: AUROC against a direct pairwise count, curves and thresholds on hand-worked cases."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from guardalign.detection.thresholds import (
    auroc,
    bootstrap_auroc,
    choose_joint_thresholds,
    choose_threshold,
    flags,
    flags_any,
    roc_curve,
    short_decimal,
    table_points,
)


def pairwise_auroc(scores, labels, direction):
    """Mann–Whitney by brute force: P(pos more unsafe than neg) + ½ P(tie)."""
    s = np.asarray(scores, float)
    u = -s if direction == "lower" else s
    y = np.asarray(labels, bool)
    total = 0.0
    for p, n in itertools.product(u[y], u[~y]):
        total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (y.sum() * (~y).sum())


def test_auroc_hand_case_with_ties():
    # costs: positives 0.1, 0.3, 0.3; negatives 0.3, 0.5. Pairs won: (0.1 vs both) 2, each 0.3 pos: ½ + 1.
    scores = [0.1, 0.3, 0.3, 0.3, 0.5]
    labels = [1, 1, 1, 0, 0]
    assert auroc(scores, labels, "lower") == pytest.approx(5 / 6)
    assert auroc(scores, labels, "higher") == pytest.approx(1 - 5 / 6)
    assert auroc([0.2, 0.2], [1, 0]) == pytest.approx(0.5)  # a pure tie counts one half


@pytest.mark.parametrize("direction", ["lower", "higher"])
@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_heavy_ties(direction, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40) / 5.0  # only 6 distinct values: many ties
    labels = rng.random(40) < 0.4
    labels[:2] = [True, False]
    assert auroc(scores, labels, direction) == pytest.approx(pairwise_auroc(scores, labels, direction), abs=1e-12)


def test_roc_curve_points_hand_case():
    curve = roc_curve([0.1, 0.3, 0.3, 0.5], [1, 1, 0, 0], "lower")
    np.testing.assert_array_equal(curve.scores, [0.1, 0.3, 0.5])
    np.testing.assert_array_equal(curve.tp, [0, 1, 2, 2])  # the tie group at 0.3 enters together
    np.testing.assert_array_equal(curve.fp, [0, 0, 1, 2])
    assert np.isnan(curve.precision[0]) and curve.precision[2] == pytest.approx(2 / 3)
    # the trapezoid area under these points equals the rank AUROC (ties give the diagonal segment)
    assert np.trapezoid(curve.tpr, curve.fpr) == pytest.approx(auroc([0.1, 0.3, 0.3, 0.5], [1, 1, 0, 0]))


def test_choose_threshold_known_answer_lower():
    pos, neg = [0.1, 0.2, 0.35], [0.3, 0.5, 0.6, 0.7, 0.8]
    scores, labels = pos + neg, [1] * 3 + [0] * 5
    p0 = choose_threshold(scores, labels, 0.0, "lower")
    # no false positive allowed: flag 0.1 and 0.2, τ in the middle of the gap [0.2, 0.3)
    assert (p0.tp, p0.fp) == (2, 0) and p0.threshold == pytest.approx(0.25)
    p1 = choose_threshold(scores, labels, 0.2, "lower")  # one false positive allowed (1/5)
    assert (p1.tp, p1.fp) == (3, 1) and p1.threshold == pytest.approx(0.4)
    assert p1.tpr == 1.0 and p1.fpr == pytest.approx(0.2) and p1.precision == pytest.approx(0.75)
    # applying the threshold reproduces the point
    f = flags(scores, p1.threshold, "lower")
    assert f.sum() == 4 and f[:3].all()


def test_choose_threshold_known_answer_higher():
    # cosines: unsafe when ≥ θ
    pos, neg = [0.31, 0.28, 0.12], [0.2, 0.1, 0.05, 0.0]
    p = choose_threshold(pos + neg, [1] * 3 + [0] * 4, 0.0, "higher")
    assert (p.tp, p.fp) == (2, 0)
    assert 0.2 < p.threshold <= 0.28 and p.threshold == pytest.approx(0.24)
    p = choose_threshold(pos + neg, [1] * 3 + [0] * 4, 0.25, "higher")
    assert (p.tp, p.fp) == (3, 1) and 0.1 < p.threshold <= 0.12


def test_choose_threshold_prefers_lowest_fpr_among_equal_tpr_and_can_flag_nothing():
    # the negative at 0.15 sits between the positives: going past it gains nothing until 0.4
    scores, labels = [0.1, 0.15, 0.2, 0.9, 0.4], [1, 0, 0, 0, 1]
    p = choose_threshold(scores, labels, 0.34, "lower")  # one FP of 3 allowed (0.333)
    assert (p.tp, p.fp) == (1, 0)
    p = choose_threshold([0.5, 0.1], [1, 0], 0.0, "lower")  # every positive costs more than the negative
    assert (p.tp, p.fp) == (0, 0) and p.threshold < 0.1


def test_threshold_at_ties_flags_the_whole_group():
    scores, labels = [0.2, 0.2, 0.1, 0.6], [1, 0, 1, 0]
    p = choose_threshold(scores, labels, 0.5, "lower")
    assert (p.tp, p.fp) == (2, 1) and 0.2 <= p.threshold < 0.6


def test_short_decimal_respects_float32_and_prefers_the_middle():
    assert short_decimal(0.2, 0.3) == pytest.approx(0.25)
    v = short_decimal(0.123456, 0.1234571, closed="left")
    assert 0.123456 <= v < 0.1234571 and 0.123456 <= float(np.float32(v)) < 0.1234571
    lo = float(np.float32(0.7))
    hi = float(np.nextafter(np.float32(lo), np.float32(1)))  # adjacent float32 values
    v = short_decimal(lo, hi)
    assert lo <= v < hi and lo <= float(np.float32(v)) < hi
    with pytest.raises(ValueError):
        short_decimal(0.3, 0.3)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0.4, 0.1, 60), rng.normal(0.6, 0.1, 80)]
    labels = np.r_[np.ones(60, bool), np.zeros(80, bool)]
    est = auroc(scores, labels)
    lo, hi = bootstrap_auroc(scores, labels, n_boot=300, seed=1)
    assert lo < est < hi and 0.05 < hi - lo < 0.3
    assert bootstrap_auroc(scores, labels, n_boot=300, seed=1) == (lo, hi)
    assert bootstrap_auroc(scores, labels, n_boot=300, seed=2) != (lo, hi)
    assert bootstrap_auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], n_boot=50) == (1.0, 1.0)


def test_flags_any_and_table_points():
    s = np.array([[0.5, 0.9], [0.9, 0.2], [0.9, 0.9]])
    np.testing.assert_array_equal(flags_any(s, [0.6, 0.3], "lower"), [True, True, False])
    np.testing.assert_array_equal(flags_any(s, [0.6, 0.3], "higher"), [True, True, True])
    curve = roc_curve([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0])
    idx = table_points(curve, fpr_levels=(0.0, 0.5, 1.0))
    assert idx == [1, 3]  # level 1.0 adds nothing: point 3 already has every positive at FPR 0.5


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="one unsafe and one safe"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="finite"):
        auroc([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="direction"):
        auroc([0.1, 0.2], [1, 0], "up")
    with pytest.raises(ValueError, match="target_fpr"):
        choose_threshold([0.1, 0.2], [1, 0], 1.5)


def test_joint_thresholds_find_the_largest_common_level_within_the_budget():
    # two columns; 10 negatives. Column 0's negatives sit at 0.30 and 0.31, column 1's at 0.40 and 0.41.
    neg = np.full((10, 2), 0.9)
    neg[0, 0], neg[1, 0], neg[2, 1], neg[3, 1] = 0.30, 0.31, 0.40, 0.41
    pos = np.array([[0.1, 0.9], [0.35, 0.9], [0.9, 0.2], [0.9, 0.45]])
    scores = np.r_[pos, neg]
    labels = np.r_[np.ones(4, bool), np.zeros(10, bool)]
    positives = np.zeros((14, 2), bool)
    positives[:2, 0] = positives[2:4, 1] = True
    # budget 0.2 (2 negatives): at α = 0.2 each column spends both of its negatives to reach its second
    # positive → 4 safe images flagged (0.4); at α = 0.1 one negative buys nothing, so none is spent
    points, taus, alpha = choose_joint_thresholds(scores, labels, positives, 0.2, "lower")
    assert alpha == pytest.approx(0.1)
    flagged = flags_any(scores, taus, "lower")
    assert flagged[~labels].sum() == 0 and flagged[labels].tolist() == [True, False, True, False]
    assert points[0].tp == 1 and points[1].tp == 1
    points, taus, alpha = choose_joint_thresholds(scores, labels, positives, 0.4, "lower")
    assert alpha == pytest.approx(0.4)  # a budget of 4 negatives: the full level is affordable
    assert points[0].tp == points[1].tp == 2 and flags_any(scores, taus, "lower")[~labels].sum() == 4
    # a column without positives keeps its fixed threshold; NaN means "never flags"
    positives[:, 1] = False
    points, taus, alpha = choose_joint_thresholds(scores, labels, positives, 0.2, "lower", fixed=[np.nan, 0.42])
    assert 1 not in points and taus[1] == 0.42  # column 1 alone already spends the whole budget (0.40, 0.41) ...
    assert alpha == pytest.approx(0.1) and (points[0].tp, points[0].fp) == (1, 0)  # ... so column 0 may spend none
    assert flags_any(scores, taus, "lower")[~labels].mean() == pytest.approx(0.2)


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 2), (3, 10), (50, 100), (7, 9), (0, 30), (1, 2000)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    from guardalign.detection.thresholds import wilson_interval

    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    assert 0 <= lo <= k / n <= hi <= 1


def test_wilson_interval_edges():
    from guardalign.detection.thresholds import wilson_interval

    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
