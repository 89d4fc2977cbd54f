"""``guardalign calibrate``: fit τ on labelled images and write a tuned copy of the anchors YAML.

Flow: labelled JSONL → scores (score the images, reuse a scan with ``from_scan``, or take the
scan fields already on each line) → ROC (guardalign/roc.py) → τ with the highest TPR whose FPR on
the labelled safe images is ≤ the target (globally; with ``per_category`` also one τ per category,
from its own labelled positives against every safe image, all at the common FPR level that keeps
the combined FPR ≤ the target) → a copy of the anchors YAML in which only ``tau`` keys change,
written atomically. ``calibrate(...)``'s keyword arguments mirror the
CLI flags.

Labelled lines: ``{"image": "path", "label": "safe"|"unsafe", "category": "name"?, "id": "..."?}``,
image paths relative to the JSONL file. A line may instead be a scan record with a ``label`` added.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardalign.config import DetectConfig, EncoderConfig
from guardalign.detection.anchors_edit import tuned_yaml, write_tuned_anchors  # noqa: F401 (re-exported)
from guardalign.errors import ConfigError, InputError

MAX_SHOWN_ISSUES = 20
_GLOBAL_NO_YAML = ("the global method's θ is a scan flag, not an anchors field: drop -o and pass the printed θ "
                   "to `guardalign scan --method global --theta X`")


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

    @property
    def exit_code(self) -> int:
        """0, or 3 when some lines could not be used (DESIGN §3)."""
        return 3 if self.skipped else 0

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
            "skipped": [{"line": n, "reason": r} for n, r in self.skipped], "out": self.out,
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
    grid: int = DetectConfig.grid,
    stride: float = DetectConfig.stride,
    scales: tuple[int, ...] = DetectConfig.scales,
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
                     scales=tuple(scales), budget=budget, dense_path=dense_path).validate()
        if method == "global" and out_path is not None:
            raise ConfigError(_GLOBAL_NO_YAML)
        if method == "global" and per_category:
            raise ConfigError("--per-category needs the ot method: the global method applies one --theta to every "
                              "category")
    items, skipped = read_labelled(labelled, anchor_set.names)
    scored, method = _scores(items, skipped, anchor_set, from_scan, method, detector, progress,
                             dict(clip_model=clip_model, pretrained=pretrained, patches=patches, grid=grid,
                                  stride=stride, scales=tuple(scales), budget=budget, dense_path=dense_path,
                                  batch_size=batch_size, device=device))
    if method == "global" and out_path is not None:
        raise ConfigError(_GLOBAL_NO_YAML)
    if method == "global" and per_category:
        raise ConfigError("--per-category needs the ot method: the global method applies one --theta to every category")
    if not scored:
        shown = "; ".join(r for _, r in sorted(skipped)[:5])
        raise ConfigError(f"{labelled}: no usable labelled line ({len(skipped)} skipped): {shown}")
    result = _fit(scored, anchor_set, method, target_fpr, per_category, bootstrap, seed)
    result.skipped = sorted(skipped)
    if out_path is not None:
        taus = {c.name: c.tau for c in result.per_category if c.point is not None} if per_category else {}
        write_tuned_anchors(anchors_path, out_path, result.chosen.threshold, taus, overwrite=overwrite,
                            reset_overrides=not per_category)
        result.out = str(out_path)
    if progress:
        print_report(result)
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
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{p}: labelled file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read labelled file ({exc})") from None
    items, issues = [], []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            items.append(_parse_line(json.loads(raw), n, p.parent, categories))
        except json.JSONDecodeError as exc:
            issues.append((n, f"{p}:{n}: not valid JSON ({exc.msg} at column {exc.colno})"))
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
    ident = obj.get("id")
    path = (base / image) if isinstance(image, str) and image.strip() else None
    return LabelledItem(n, unsafe, category, image if isinstance(image, str) else None, path,
                        str(ident) if ident is not None else None, record)


# ---------------------------------------------------------------------------------------------- scores
def _scores(items, skipped, anchor_set, from_scan, method, detector, progress, opts):
    """[(item, score, {category: score})] and the method that made the scores."""
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
    scored = []
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
    return scored, method


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
    from guardalign.io.images import ImageDecodeError, decode_image
    from guardalign.pipeline.progress import progress_bar

    if detector is None:
        from guardalign.detection.detector import Detector

        detector = Detector.from_options(anchors=anchor_set, method=method, **opts)
    bs = detector.config.batch_size
    pairs = []
    with progress_bar("calibrate", len(items), enabled=progress) as advance:
        for start in range(0, len(items), bs):
            batch, images = [], []
            for it in items[start:start + bs]:
                try:
                    images.append(decode_image(path=it.path)[0])
                    batch.append(it)
                except ImageDecodeError as exc:
                    skipped.append((it.line, f"line {it.line}: image {it.image!r}: {exc}"))
            for it, det in zip(batch, detector.detect(images) if images else []):
                pairs.append((it, {"status": "ok", **det.to_record()}))
            advance(len(items[start:start + bs]))
    return pairs


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


# ---------------------------------------------------------------------------------------------- report
def print_report(res: CalibrationResult) -> None:
    """ROC table, AUROC with its interval, per-category fits and skipped lines, on stderr (rich)."""
    from rich.table import Table

    from guardalign.detection import thresholds as roc
    from guardalign.pipeline.progress import stderr_console

    console = stderr_console()
    sym, rule = ("τ", "score ≤ τ") if res.method == "ot" else ("θ", "score ≥ θ")
    table = Table(title=f"ROC of the image score ({res.method}: unsafe when {rule})", header_style="bold")
    for col in (sym, "TPR", "FPR", "precision", "flagged", ""):
        table.add_column(col, justify="right")
    curve = res.curve
    rows = sorted(set(roc.table_points(curve)) | {res.chosen.index})
    for i in rows:
        pt = roc.point(curve, i)
        mark = f"◀ chosen (FPR ≤ {res.target_fpr:g})" if i == res.chosen.index else ""
        prec = "—" if pt.tp + pt.fp == 0 else f"{pt.precision:.3f}"
        table.add_row(f"{pt.threshold:.4g}", f"{pt.tpr:.3f}", f"{pt.fpr:.3f}", prec, str(pt.tp + pt.fp), mark,
                      style="bold" if mark else None)
    console.print(table)
    lo, hi = res.auroc_ci
    console.print(f"AUROC {res.auroc:.3f} (95% bootstrap CI {lo:.3f}–{hi:.3f}) on {res.n_pos} unsafe and "
                  f"{res.n_neg} safe images", highlight=False)
    if res.per_category:
        cats = Table(title=f"per category (its positives vs every safe image), each fitted at FPR ≤ "
                           f"{res.category_fpr:.4g} so that the combined FPR ≤ {res.target_fpr:g}", header_style="bold")
        for col in ("category", "unsafe", "AUROC (95% CI)", sym, "TPR", "FPR"):
            cats.add_column(col, justify="right")
        for c in res.per_category:
            if c.point is None:
                cats.add_row(c.name, "0", "—", f"{c.tau:.4g} (kept)", "—", "—")
            else:
                cats.add_row(c.name, str(c.n_pos), f"{c.auroc:.3f} ({c.ci[0]:.3f}–{c.ci[1]:.3f})",
                             f"{c.tau:.4g}", f"{c.point.tpr:.3f}", f"{c.point.fpr:.3f}")
        console.print(cats)
    tpr, fpr = res.achieved
    console.print(f"written thresholds on these images: TPR {tpr:.3f}, FPR {fpr:.3f} (target {res.target_fpr:g})",
                  highlight=False)
    if fpr > res.target_fpr + 1e-12:
        console.print("note: the combined FPR exceeds the target: categories without labelled positives keep "
                      "their τ, and they alone flag too many safe images", style="yellow")
    for _, reason in res.skipped[:MAX_SHOWN_ISSUES]:
        console.print(f"skipped {reason}", style="red", markup=False, highlight=False)
    if len(res.skipped) > MAX_SHOWN_ISSUES:
        console.print(f"… and {len(res.skipped) - MAX_SHOWN_ISSUES} more skipped lines", style="red")
    if res.out:
        console.print(f"wrote {res.out}", markup=False, highlight=False)
    elif res.method == "global":
        console.print(f"use it with: guardalign scan --method global --theta {res.chosen.threshold:.4g}",
                      markup=False, highlight=False)
