"""``guardalign calibrate``: fit τ on labelled images and write a tuned copy of the anchors YAML.

Flow: labelled JSONL → scores (score the images, reuse a scan with ``from_scan``, or take the
scan fields already on each line) → ROC (guardalign/roc.py) → τ with the highest TPR whose FPR on
the labelled safe images is ≤ the target (globally; with ``per_category`` also one τ per category,
from its own labelled positives against every safe image, all at the common FPR level that keeps
the combined FPR ≤ the target) → a copy of the anchors YAML in which only ``tau`` keys change and a
``fitted_for`` mapping records the settings the scores were made with, written atomically. ``calibrate(...)``'s keyword arguments mirror the
CLI flags.

Labelled lines: ``{"image": "path", "label": "safe"|"unsafe", "category": "name"?, "id": "..."?}``,
image paths relative to the JSONL file. A line may instead be a scan record with a ``label`` added.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardalign.config import DetectConfig, EncoderConfig
from guardalign.commands.anchors_out import write_tuned_anchors  # noqa: F401 (re-exported)
from guardalign.commands.calibrate_report import (  # noqa: F401 (re-exported)
    MAX_SHOWN_ISSUES, MIN_PER_LABEL, check_method, fitted_for, print_report, small_sample_warnings,
)
from guardalign.detection.anchors_edit import tuned_yaml  # noqa: F401 (re-exported)
from guardalign.errors import EXIT_OK, EXIT_UNREADABLE, ConfigError, InputError

@dataclass(frozen=True)
class LabelledItem:
    line: int  # 1-based line number in the labelled JSONL
    label: bool  # True = unsafe
    category: str | None  # unsafe category of a positive (None if not given, or for safe lines)
    image: str | None  # the "image" field as written
    path: Path | None  # image resolved against the JSONL's folder
    id: str | None  # optional "id" field (joins with scan records)
    record: dict | None  # scan fields carried on the line itself (a scan output joined with labels)


@dataclass(frozen=True)
class CategoryFit:
    name: str  # category
    n_pos: int  # labelled positives of this category
    auroc: float | None  # per-category score vs every safe image (None without positives)
    ci: tuple[float, float] | None  # bootstrap interval of that AUROC
    point: Any  # roc.OperatingPoint at the target FPR, or None without positives
    tau: float  # τ this category ends up with in the written file


@dataclass
class CalibrationResult:
    method: str  # "ot" (τ, unsafe when score ≤ τ) or "global" (θ, unsafe when score ≥ θ)
    target_fpr: float  # the FPR asked for
    n_pos: int  # unsafe images used
    n_neg: int  # safe images used
    auroc: float  # image-level AUROC of the record score
    auroc_ci: tuple[float, float]  # percentile bootstrap interval
    chosen: Any  # roc.OperatingPoint of the global threshold
    curve: Any = field(repr=False)  # roc.RocCurve
    per_category: list[CategoryFit] = field(default_factory=list)  # with per_category=True
    achieved: tuple[float, float] = (0.0, 0.0)  # (TPR, FPR) of the written thresholds on these images
    category_fpr: float | None = None  # per_category: the common FPR level α every category was fitted at
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) of unusable lines
    out: str | None = None  # the tuned anchors file written, if any
    fitted_for: dict = field(default_factory=dict)  # settings the scores were made with (written as fitted_for)
    warnings: list[str] = field(default_factory=list)  # e.g. too few labelled images of a class, with intervals

    @property
    def tpr_ci(self) -> tuple[float, float]:
        """95% Wilson interval of the chosen threshold's TPR."""
        from guardalign.detection.thresholds import wilson_interval

        return wilson_interval(self.chosen.tp, self.n_pos)

    @property
    def fpr_ci(self) -> tuple[float, float]:
        """95% Wilson interval of the chosen threshold's FPR."""
        from guardalign.detection.thresholds import wilson_interval

        return wilson_interval(self.chosen.fp, self.n_neg)

    @property
    def exit_code(self) -> int:
        """0, or 3 when some lines could not be used (DESIGN §3)."""
        return EXIT_UNREADABLE if self.skipped else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (printed on stdout by the CLI)."""
        key = "tau" if self.method == "ot" else "theta"
        return {
            "method": self.method, key: self.chosen.threshold, "target_fpr": self.target_fpr,
            "tpr": self.chosen.tpr, "fpr": self.chosen.fpr, "n_unsafe": self.n_pos, "n_safe": self.n_neg,
            "auroc": self.auroc, "auroc_ci": list(self.auroc_ci),
            "per_category": {c.name: {key: c.tau, "n_unsafe": c.n_pos, "auroc": c.auroc,
                                      "tpr": c.point.tpr if c.point else None,
                                      "fpr": c.point.fpr if c.point else None} for c in self.per_category},
            "achieved": {"tpr": self.achieved[0], "fpr": self.achieved[1]}, "category_fpr": self.category_fpr,
            "tpr_ci": list(self.tpr_ci), "fpr_ci": list(self.fpr_ci),
            "skipped": [{"line": n, "reason": r} for n, r in self.skipped], "out": self.out,
            "fitted_for": self.fitted_for, "warnings": self.warnings,
        }


def calibrate(
    labelled: str | Path,
    *,
    anchors: str | Path | None = None,
    target_fpr: float = 0.05,
    per_category: bool = False,
    out: str | Path | None = None,
    overwrite: bool = False,
    from_scan: str | Path | None = None,
    clip_model: str = EncoderConfig.model,
    pretrained: str = EncoderConfig.pretrained,
    method: str = DetectConfig.method,
    patches: str = DetectConfig.patches,
    grid: int | None = DetectConfig.grid,
    stride: float = DetectConfig.stride,
    scales: tuple[int, ...] | None = DetectConfig.scales,
    budget: int = DetectConfig.budget,
    dense_path: str = DetectConfig.dense_path,
    batch_size: int = DetectConfig.batch_size,
    device: str = EncoderConfig.device,
    bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = True,
    detector: Any = None,
) -> CalibrationResult:
    """Fit τ (OT) or θ (global) at ``target_fpr`` on labelled images; write a tuned anchors copy to ``out``.

    Raises ConfigError/InputError (exit 2, nothing written) for bad flags, an unusable anchors file,
    an output that would overwrite something, or labelled data without both classes.
    """
    from guardalign.detection.anchors import default_anchors_path, load_anchors

    if not 0 <= target_fpr < 1:
        raise ConfigError(f"invalid --target-fpr {target_fpr}: expected a fraction in [0, 1)")
    if bootstrap < 1:
        raise ConfigError(f"invalid --bootstrap {bootstrap}: expected a positive number of resamples")
    anchors_path = Path(anchors) if anchors is not None else default_anchors_path()
    anchor_set = load_anchors(anchors_path)
    out_path = _check_out(out, anchors_path, overwrite)
    if from_scan is None:
        DetectConfig(method=method, patches=patches, grid=grid, stride=stride, batch_size=batch_size,
                     scales=scales, budget=budget, dense_path=dense_path).validate()
        check_method(method, out_path, per_category)  # fail before loading any model
    items, skipped = read_labelled(labelled, anchor_set.names)
    scored, method, fitted_for = _scores(items, skipped, anchor_set, from_scan, method, detector, progress,
                             dict(clip_model=clip_model, pretrained=pretrained, patches=patches, grid=grid,
                                  stride=stride, scales=scales, budget=budget, dense_path=dense_path,
                                  batch_size=batch_size, device=device))
    check_method(method, out_path, per_category)  # the method may come from --from-scan's records
    if not scored:
        shown = "; ".join(r for _, r in sorted(skipped)[:5])
        raise ConfigError(f"{labelled}: no usable labelled line ({len(skipped)} skipped): {shown}")
    result = _fit(scored, anchor_set, method, target_fpr, per_category, bootstrap, seed)
    result.skipped = sorted(skipped)
    result.fitted_for = fitted_for
    result.warnings = small_sample_warnings(result)
    if out_path is not None:
        taus = {c.name: c.tau for c in result.per_category if c.point is not None} if per_category else {}
        write_tuned_anchors(anchors_path, out_path, result.chosen.threshold, taus, overwrite=overwrite,
                            reset_overrides=not per_category, inputs=(labelled, from_scan), fitted_for=fitted_for)
        result.out = str(out_path)
    if progress:
        print_report(result)
    else:
        from guardalign.errors import warn

        for line in result.warnings:  # a warning is not a table: --quiet keeps it
            warn(line)
    return result


def _check_out(out, anchors_path: Path, overwrite: bool) -> Path | None:
    if out is None:
        return None
    p = Path(out)
    if p.exists() and p.resolve() == anchors_path.resolve():
        raise ConfigError(f"-o {p} is the input anchors file; calibrate writes a copy and never overwrites "
                          "its input: choose another output path")
    if p.is_dir():
        raise ConfigError(f"-o {p} is a directory; expected a file path such as tuned.yaml")
    if p.exists() and not overwrite:
        raise ConfigError(f"-o {p} already exists; pass --overwrite to replace it")
    return p


# ---------------------------------------------------------------------------------------------- reading
def read_labelled(path: str | Path, categories: tuple[str, ...] = ()) -> tuple[list[LabelledItem], list]:
    """Parse a labelled JSONL file; return (items, [(line, reason)]) for the lines that cannot be used.

    Raises InputError if the file cannot be read at all.
    """
    from guardalign.io.jsonl import iter_lines

    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{p}: labelled file not found") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read labelled file ({exc})") from None
    items, issues = [], []
    for line in iter_lines(data):  # the shared reader: BOM dropped, a bad line is an issue, never a crash
        n = line.n
        if line.error is not None:
            issues.append((n, f"{p}:{n}: {line.error}"))
            continue
        try:
            items.append(_parse_line(line.value, n, p.parent, categories))
        except ValueError as exc:
            issues.append((n, f"{p}:{n}: {exc}"))
    return items, issues


def _parse_line(obj, n: int, base: Path, categories: tuple[str, ...]) -> LabelledItem:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    label = obj.get("label")
    if not isinstance(label, str) or label.strip().lower() not in ("safe", "unsafe"):
        raise ValueError(f'label: expected "safe" or "unsafe", got {label!r}')
    unsafe = label.strip().lower() == "unsafe"
    category = obj.get("category") if unsafe else None
    if category is not None and (not isinstance(category, str) or category not in categories):
        known = ", ".join(categories)
        raise ValueError(f"category: {category!r} is not a category of the anchors (known: {known})")
    record = obj if "score" in obj and "status" in obj else None
    image = obj.get("image")
    if record is None and (not isinstance(image, str) or not image.strip()):
        raise ValueError('image: expected a path string (relative to the labelled file), e.g. "imgs/a.png"')
    if isinstance(image, str) and "\x00" in image:
        raise ValueError("image: the path contains a NUL byte")
    ident = obj.get("id")
    path = (base / image) if isinstance(image, str) and image.strip() else None
    return LabelledItem(n, unsafe, category, image if isinstance(image, str) else None, path,
                        str(ident) if ident is not None else None, record)


# ---------------------------------------------------------------------------------------------- scores
def _scores(items, skipped, anchor_set, from_scan, method, detector, progress, opts):
    """[(item, score, {category: score})], the method that made the scores, and the settings they share
    (:func:`fitted_for`)."""
    carried = [it for it in items if it.record is not None]
    rest = [it for it in items if it.record is None]
    pairs = [(it, it.record) for it in carried]
    if rest and from_scan is not None:
        pairs += _join(rest, Path(from_scan), skipped)
    elif rest:
        pairs += _score_images(rest, skipped, anchor_set, method, detector, progress, opts)
    methods = {rec.get("method", method) for _, rec in pairs if rec.get("status", "ok") == "ok"}
    if len(methods) > 1:
        raise ConfigError(f"the scores mix methods {sorted(methods)}; calibrate one method at a time")
    method = methods.pop() if methods else method
    scored, used = [], []
    for it, rec in pairs:
        if rec.get("status", "ok") != "ok":
            skipped.append((it.line, f"line {it.line}: the image was not scored: {rec.get('error')}"))
            continue
        cats = rec.get("categories") or {}
        missing = [c for c in anchor_set.names if not isinstance(cats.get(c), (int, float))]
        if not isinstance(rec.get("score"), (int, float)) or missing:
            skipped.append((it.line, f"line {it.line}: scan record lacks score/categories for {missing or 'score'} "
                                     "(scanned with other anchors?)"))
            continue
        scored.append((it, float(rec["score"]), {c: float(cats[c]) for c in anchor_set.names}))
        used.append(rec)
    return scored, method, fitted_for(used)


def _join(items, scan_path: Path, skipped) -> list:
    """Match labelled items to scan records by id, resolved path, path as written, or unique path suffix."""
    from guardalign.io.sinks import read_records

    records = [r for r in read_records(scan_path) if isinstance(r, dict)]
    by_id = {str(r.get("id")): r for r in records if r.get("id") is not None}
    by_path: dict[str, dict] = {}
    for r in records:
        src = str(r.get("source") or "")
        for base in (Path.cwd(), scan_path.parent):
            if src:
                by_path.setdefault(os.path.normpath(base / src), r)
    pairs = []
    for it in items:
        rec = by_id.get(it.id) if it.id is not None else None
        if rec is None and it.path is not None:
            rec = by_path.get(os.path.normpath(Path.cwd() / it.path)) or by_id.get(it.image)
        if rec is None and it.path is not None:
            parts = Path(os.path.normpath(it.path)).parts
            hits = [r for k, r in by_id.items() if k and parts[-len(Path(k).parts):] == Path(k).parts]
            rec = hits[0] if len(hits) == 1 else None
        if rec is None:
            skipped.append((it.line, f"line {it.line}: no record in {scan_path} matches image {it.image!r}"
                                     + (f" / id {it.id!r}" if it.id else "")))
        else:
            pairs.append((it, rec))
    return pairs


def _score_images(items, skipped, anchor_set, method, detector, progress, opts) -> list:
    """Score the labelled images on the runner (threaded decoding, batching, per-item errors)."""
    from guardalign.pipeline.detect import DetectStage
    from guardalign.pipeline.runner import run_job
    from guardalign.records import Item

    if detector is None:
        from guardalign.detection.detector import Detector

        detector = Detector.from_options(anchors=anchor_set, method=method, **opts)
    by_key = {f"line {it.line}": it for it in items}
    records: list[dict] = []
    sources = (Item(id=key, source=str(it.path), path=it.path) for key, it in by_key.items())
    run_job(sources, DetectStage(detector, name="calibrate"), _Collect(records), total=len(items), progress=progress)
    pairs = []
    for rec in records:
        it = by_key[rec["id"]]
        if rec["status"] != "ok":
            skipped.append((it.line, f"line {it.line}: image {it.image!r}: {rec.get('error')}"))
        else:
            pairs.append((it, rec))
    return pairs


class _Collect:
    """A sink that keeps records in memory (calibration needs every score at once)."""

    def __init__(self, into: list):
        self.into = into

    def write(self, records: list[dict]) -> None:
        self.into.extend(records)


# ---------------------------------------------------------------------------------------------- fitting
def _fit(scored, anchor_set, method, target_fpr, per_category, n_boot, seed) -> CalibrationResult:
    import numpy as np

    from guardalign.detection import thresholds as roc
    direction = "lower" if method == "ot" else "higher"
    labels = np.array([it.label for it, _, _ in scored], dtype=bool)
    if labels.all() or not labels.any():
        raise ConfigError(f"calibration needs labelled unsafe and safe images; usable lines have "
                          f"{int(labels.sum())} unsafe and {int((~labels).sum())} safe")
    scores = np.array([s for _, s, _ in scored])
    chosen = roc.choose_threshold(scores, labels, target_fpr, direction)
    if method == "ot" and not 0 < chosen.threshold <= 2:
        chosen = _clamped(chosen)
    res = CalibrationResult(method, target_fpr, int(labels.sum()), int((~labels).sum()),
                            roc.auroc(scores, labels, direction),
                            roc.bootstrap_auroc(scores, labels, direction, n_boot, seed), chosen,
                            roc.roc_curve(scores, labels, direction))
    cat_scores = np.array([[c[n] for n in anchor_set.names] for _, _, c in scored])  # (N, C)
    if per_category:
        res.per_category, final, res.category_fpr = _per_category(scored, labels, cat_scores, anchor_set, chosen,
                                                                   method, target_fpr, n_boot, seed)
        flagged = roc.flags_any(cat_scores, final, direction)
    else:
        flagged = roc.flags(scores, chosen.threshold, direction)
    res.achieved = (float(flagged[labels].mean()), float(flagged[~labels].mean()))
    return res


def _per_category(scored, labels, cat_scores, anchor_set, chosen, method, target_fpr, n_boot, seed):
    """One τ per category with labelled positives, all at a common FPR level α chosen so that the
    combined FPR (any category flags) stays ≤ the target (roc.choose_joint_thresholds). Categories
    without positives keep their τ, or take the global one. Returns (fits, final τ per category, α)."""
    import numpy as np

    from guardalign.detection import thresholds as roc
    direction = "lower" if method == "ot" else "higher"
    fixed = [cat.tau if cat.tau is not None else chosen.threshold for cat in anchor_set.categories]
    positives = np.array([[it.label and it.category == c for c in anchor_set.names] for it, _, _ in scored])
    points, taus, alpha = roc.choose_joint_thresholds(cat_scores, labels, positives, target_fpr, direction,
                                                      fixed, clip=(1e-6, 2.0) if method == "ot" else None)
    fits = []
    for j, cat in enumerate(anchor_set.categories):
        if j not in points:
            fits.append(CategoryFit(cat.name, 0, None, None, None, taus[j]))
            continue
        keep = positives[:, j] | ~labels
        s, y = cat_scores[keep, j], labels[keep]
        fits.append(CategoryFit(cat.name, int(positives[:, j].sum()), roc.auroc(s, y, direction),
                                roc.bootstrap_auroc(s, y, direction, n_boot, seed), points[j], taus[j]))
    return fits, taus, alpha


def _clamped(point):
    """Keep τ inside the anchors' range (0, 2]; costs 1 − cos lie in [0, 2], so this only bites at the ends."""
    from dataclasses import replace

    return replace(point, threshold=min(max(point.threshold, 1e-6), 2.0))
