r"""ROC analysis of detector scores: curves, AUROC, bootstrap intervals, threshold choice.

Pure numpy: no I/O, no logging. Scores come in two directions:

- ``"lower"``: unsafe when ``score ≤ τ`` (the OT method's cost :math:`d_i(m)`);
- ``"higher"``: unsafe when ``score ≥ θ`` (the global method's cosine).

Internally everything works on the *unsafety* ``u`` (``-score`` for ``"lower"``, ``score`` for
``"higher"``), which flags an image when ``u ≥ t``.

AUROC is the Mann–Whitney statistic :math:`P(u_+ > u_-) + \tfrac12 P(u_+ = u_-)`, computed from
average ranks, so ties count one half.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIRECTIONS = ("lower", "higher")


@dataclass(frozen=True)
class RocCurve:
    scores: np.ndarray  # (K,) distinct scores in flagging order; point k ≥ 1 flags every image up to scores[k-1]
    tp: np.ndarray  # (K+1,) true positives at each point; point 0 flags nothing
    fp: np.ndarray  # (K+1,) false positives at each point
    n_pos: int  # unsafe images
    n_neg: int  # safe images
    direction: str  # "lower" (unsafe when score ≤ τ) or "higher" (unsafe when score ≥ θ)

    @property
    def tpr(self) -> np.ndarray:
        """(K+1,) true-positive rate (recall) at each point."""
        return self.tp / self.n_pos

    @property
    def fpr(self) -> np.ndarray:
        """(K+1,) false-positive rate at each point."""
        return self.fp / self.n_neg

    @property
    def precision(self) -> np.ndarray:
        """(K+1,) TP / (TP + FP); NaN where nothing is flagged."""
        flagged = self.tp + self.fp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(flagged > 0, self.tp / np.maximum(flagged, 1), np.nan)


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float  # τ (lower) or θ (higher) that reproduces this point on the given scores
    index: int  # point of the RocCurve (0 = flag nothing)
    tp: int  # true positives
    fp: int  # false positives
    n_pos: int  # unsafe images
    n_neg: int  # safe images

    @property
    def tpr(self) -> float:
        return self.tp / self.n_pos if self.n_pos else float("nan")

    @property
    def fpr(self) -> float:
        return self.fp / self.n_neg if self.n_neg else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")


def _check(scores, labels, need_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be booleans or 0/1 (1 = unsafe)")
        y = y.astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    if need_both and (y.all() or not y.any()):
        raise ValueError("need at least one unsafe and one safe example")
    return s, y


def _unsafety(s: np.ndarray, direction: str) -> np.ndarray:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return -s if direction == "lower" else s


def flags(scores, threshold: float, direction: str = "lower") -> np.ndarray:
    """Boolean (N,): ``score ≤ threshold`` (lower) or ``score ≥ threshold`` (higher)."""
    s = np.asarray(scores, dtype=np.float64)
    _unsafety(s, direction)  # validates direction
    return s <= threshold if direction == "lower" else s >= threshold


def flags_any(scores, thresholds, direction: str = "lower") -> np.ndarray:
    """Boolean (N,): flagged by any column. ``scores`` (N, C) per-category scores, ``thresholds`` (C,)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    return flags(s, t[None, :], direction).any(axis=1)


def roc_curve(scores, labels, direction: str = "lower") -> RocCurve:
    """Every distinct operating point of a score, from "flag nothing" to "flag everything".

    Parameters
    ----------
    scores : (N,) float
    labels : (N,) bool or 0/1, True = unsafe
    direction : "lower" or "higher"
    """
    s, y = _check(scores, labels)
    u = _unsafety(s, direction)
    order = np.argsort(-u, kind="mergesort")
    u_sorted, y_sorted = u[order], y[order]
    last = np.r_[u_sorted[1:] != u_sorted[:-1], True]  # last member of each tie group
    tp = np.r_[0, np.cumsum(y_sorted)[last]]
    fp = np.r_[0, np.cumsum(~y_sorted)[last]]
    distinct = s[order][last]
    return RocCurve(distinct, tp.astype(np.int64), fp.astype(np.int64), int(y.sum()), int((~y).sum()), direction)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(starts) - 1
    bounds = np.r_[np.nonzero(starts)[0], len(x)]
    avg = (bounds[:-1] + bounds[1:] + 1) / 2.0  # mean of ranks bounds[g]+1 .. bounds[g+1]
    ranks = np.empty(len(x))
    ranks[order] = avg[group]
    return ranks


def auroc(scores, labels, direction: str = "lower") -> float:
    """Area under the ROC curve, ``P(u+ > u-) + P(u+ = u-)/2`` (Mann–Whitney U / (n+ · n-))."""
    s, y = _check(scores, labels)
    return _auroc(_unsafety(s, direction), y)


def _auroc(u: np.ndarray, y: np.ndarray) -> float:
    n1, n0 = int(y.sum()), int((~y).sum())
    r = _average_ranks(u)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def bootstrap_auroc(scores, labels, direction: str = "lower", n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC.

    Unsafe and safe examples are resampled separately (stratified), so every replicate has both
    classes. ``seed`` makes the interval reproducible.

    Returns
    -------
    (low, high) : the ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of ``n_boot`` replicates.
    """
    s, y = _check(scores, labels)
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError("need n_boot ≥ 1 and 0 < level < 1")
    u = _unsafety(s, direction)
    pos, neg = u[y], u[~y]
    rng = np.random.default_rng(seed)
    lab = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    reps = np.empty(n_boot)
    for b in range(n_boot):
        sample = np.r_[pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]]
        reps[b] = _auroc(sample, lab)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    r"""Wilson score interval of a binomial proportion k/n (95% for the default z).

    :math:`\frac{\hat p + z^2/2n}{1 + z^2/n} \pm \frac{z}{1 + z^2/n}\sqrt{\frac{\hat p(1-\hat p)}{n} + \frac{z^2}{4n^2}}`,
    clipped to [0, 1]; (0, 1) when n = 0. Unlike the normal approximation it stays informative at k = 0 or k = n,
    which is where small calibration sets live.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def short_decimal(lo: float, hi: float, closed: str = "left") -> float:
    """The decimal with fewest digits in the middle half of ``[lo, hi)`` (closed="left") or ``(lo, hi]``.

    Membership is checked both in float64 and after rounding to float32 (the detector compares
    float32 costs), so the value splits the two scores the same way on either side. Falls back to
    the midpoint when no short decimal fits.
    """
    if not lo < hi:
        raise ValueError(f"empty interval [{lo}, {hi}]")

    def inside(v: float) -> bool:
        ok = True
        for w in (float(v), float(np.float32(v))):
            ok &= (lo <= w < hi) if closed == "left" else (lo < w <= hi)
        return bool(ok)

    mid, quarter = (lo + hi) / 2.0, (hi - lo) / 4.0
    for digits in range(0, 16):
        v = round(mid, digits)
        if abs(v - mid) <= quarter and inside(v):  # short, and in the middle half of the gap
            return float(v)
    return float(mid) if inside(mid) else float(lo if closed == "left" else hi)


def threshold_for(curve: RocCurve, index: int) -> float:
    """A threshold (τ or θ) reproducing point ``index`` of ``curve``: a short decimal strictly
    between the last flagged score and the next unflagged one (ends padded by 5 % of the range)."""
    s = curve.scores
    pad = max(0.05 * float(s.max() - s.min()), 1e-3)
    if curve.direction == "lower":  # flag s ≤ τ: τ ∈ [s_k, s_{k+1})
        lo = s[index - 1] if index > 0 else s[0] - pad
        hi = s[index] if index < len(s) else s[-1] + pad
        return short_decimal(float(lo), float(hi), closed="left")
    # higher: flag s ≥ θ, scores in decreasing order: θ ∈ (s_k, s_{k-1}]
    hi = s[index - 1] if index > 0 else s[0] + pad
    lo = s[index] if index < len(s) else s[-1] - pad
    return short_decimal(float(lo), float(hi), closed="right")


def choose_threshold(scores, labels, target_fpr: float, direction: str = "lower") -> OperatingPoint:
    """The operating point with the highest TPR whose FPR ≤ ``target_fpr`` (ties: the lowest FPR).

    The returned threshold lies strictly between the last flagged and the first unflagged score,
    so applying it to the same scores reproduces the point exactly.
    """
    if not 0 <= target_fpr <= 1:
        raise ValueError(f"target_fpr must lie in [0, 1], got {target_fpr}")
    curve = roc_curve(scores, labels, direction)
    ok = curve.fpr <= target_fpr + 1e-12
    best_tp = curve.tp[ok].max()
    index = int(np.nonzero(ok & (curve.tp == best_tp))[0][0])
    return point(curve, index)


def point(curve: RocCurve, index: int) -> OperatingPoint:
    """Operating point ``index`` of ``curve`` with its threshold."""
    return OperatingPoint(threshold_for(curve, index), index, int(curve.tp[index]), int(curve.fp[index]),
                          curve.n_pos, curve.n_neg)


def table_points(curve: RocCurve, fpr_levels=(0.0, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)) -> list[int]:
    """Indices of a short ROC table: for each FPR level the highest-TPR point within it, deduplicated."""
    idx = []
    for level in fpr_levels:
        ok = curve.fpr <= level + 1e-12
        i = int(np.nonzero(ok & (curve.tp == curve.tp[ok].max()))[0][0])
        if i not in idx:
            idx.append(i)
    return sorted(idx)


def choose_joint_thresholds(scores, labels, positives, target_fpr: float, direction: str = "lower",
                            fixed=None, clip: tuple[float, float] | None = None):
    """One threshold per column, all fitted at a common FPR level α, so that flagging by ANY column
    keeps the combined FPR ≤ ``target_fpr``.

    Column j is fitted like :func:`choose_threshold` on its positives (``positives[:, j]``) against
    every negative, at FPR ≤ α. α is the largest multiple of 1/n_neg, at most the target, whose
    combined FPR (any column flags) stays ≤ the target; the combined FPR grows with α, so a binary
    search finds it. Columns without positives keep ``fixed[j]``.

    Parameters
    ----------
    scores : (N, C) per-column scores; labels : (N,) bool, True = unsafe
    positives : (N, C) bool, which unsafe rows count as positives of each column
    fixed : (C,) thresholds of the columns without positives (NaN: never flags)
    clip : optional (low, high) range the thresholds are clipped into

    Returns
    -------
    points : dict column → OperatingPoint; thresholds : list (C,); alpha : float
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos = np.asarray(positives, dtype=bool)
    n_cols = s.shape[1]
    base = np.full(n_cols, np.nan) if fixed is None else np.asarray(fixed, dtype=np.float64)
    cols = [j for j in range(n_cols) if (pos[:, j] & y).any()]

    def fit(alpha: float):
        points, taus = {}, base.copy()
        for j in cols:
            keep = (pos[:, j] & y) | ~y
            pt = choose_threshold(s[keep, j], y[keep], alpha, direction)
            if clip is not None and not clip[0] <= pt.threshold <= clip[1]:
                pt = OperatingPoint(float(np.clip(pt.threshold, *clip)), pt.index, pt.tp, pt.fp, pt.n_pos, pt.n_neg)
            points[j], taus[j] = pt, pt.threshold
        flagged = flags(s[~y], np.where(np.isnan(taus), -np.inf if direction == "lower" else np.inf, taus)[None, :],
                        direction).any(axis=1)
        return points, taus, float(flagged.mean())

    n_neg = int((~y).sum())
    k = int(np.floor(target_fpr * n_neg + 1e-9))  # the largest level that could meet the target
    best = fit(k / n_neg)
    if best[2] > target_fpr + 1e-12:
        lo, hi, best, k = 0, k, fit(0.0), 0  # level lo meets the target (or is 0, best effort); hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = fit(mid / n_neg)
            if trial[2] <= target_fpr + 1e-12:
                lo, k, best = mid, mid, trial
            else:
                hi = mid
    return best[0], best[1].tolist(), k / n_neg
