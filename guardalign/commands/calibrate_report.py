"""Output side of ``guardalign calibrate``: what the fit was made for, small-sample warnings, the report.

``res`` arguments are ``guardalign.commands.calibrate.CalibrationResult`` objects.

Kept apart from calibrate.py (reading, scoring, fitting) so that each stays a screenful of functions.
"""
from __future__ import annotations

from typing import Any

from guardalign.errors import ConfigError

MAX_SHOWN_ISSUES = 20


def fitted_for(records: list[dict]) -> dict:
    """The settings every scored record agrees on ({model, pretrained, method, patches, grid, stride}), from
    the ``settings`` each record carries (else its own ``model``/``method``/``patches``); a key on which the
    records differ, or that none records, is left out."""
    from guardalign.detection.anchor_schema import fitted_settings

    seen: dict[str, set] = {}
    for rec in records:
        settings = rec.get("settings") if isinstance(rec.get("settings"), dict) else {
            k: rec.get(k) for k in ("model", "method", "patches")}
        for key, value in fitted_settings(settings).items():
            seen.setdefault(key, set()).add(value)
    return {k: next(iter(v)) for k, v in seen.items() if len(v) == 1 and len(records) > 0}


MIN_PER_LABEL = 30  # fewer labelled images of a class than this: the fitted threshold gets a warning


def small_sample_warnings(res: Any) -> list[str]:
    """One line per problem: too few unsafe or safe images (with the 95% intervals of the chosen TPR and FPR),
    a target FPR finer than the safe images can measure, categories fitted on too few positives."""
    out = []
    sym = "τ" if res.method == "ot" else "θ"
    if res.n_pos < MIN_PER_LABEL or res.n_neg < MIN_PER_LABEL:
        (tlo, thi), (flo, fhi) = res.tpr_ci, res.fpr_ci
        out.append(f"{sym} = {res.chosen.threshold:.4g} was fitted on only {res.n_pos} unsafe and {res.n_neg} safe "
                   f"images (fewer than {MIN_PER_LABEL} of each): its TPR {res.chosen.tp}/{res.n_pos} has a 95% "
                   f"interval of {tlo:.2f}–{thi:.2f} and its FPR {res.chosen.fp}/{res.n_neg} one of "
                   f"{flo:.2f}–{fhi:.2f}; label more images before relying on it")
    if 0 < res.target_fpr < 1 and res.n_neg * res.target_fpr < 1:
        out.append(f"--target-fpr {res.target_fpr:g} is finer than {res.n_neg} safe images can measure (one false "
                   f"positive is an FPR of {1 / max(res.n_neg, 1):.3g}): the fit can only reach FPR 0")
    few = [f"{c.name} ({c.n_pos})" for c in res.per_category if c.point is not None and c.n_pos < MIN_PER_LABEL]
    if few:
        out.append(f"per-category {sym} fitted on fewer than {MIN_PER_LABEL} positives: {', '.join(few)}")
    return out


# ---------------------------------------------------------------------------------------------- report
def print_report(res: Any) -> None:
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
    (tlo, thi), (flo, fhi) = res.tpr_ci, res.fpr_ci
    console.print(f"chosen {sym} = {res.chosen.threshold:.4g}: TPR {res.chosen.tpr:.3f} (95% CI {tlo:.3f}–{thi:.3f}), "
                  f"FPR {res.chosen.fpr:.3f} (95% CI {flo:.3f}–{fhi:.3f})", highlight=False)
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
    for line in res.warnings:
        console.print(f"warning: {line}", style="yellow", markup=False, highlight=False)
    if res.out:
        console.print(f"wrote {res.out}", markup=False, highlight=False)
    elif res.method == "global":
        console.print(f"use it with: guardalign scan --method global --theta {res.chosen.threshold:.4g}",
                      markup=False, highlight=False)


_GLOBAL_NO_YAML = ("the global method's θ is a scan flag, not an anchors field: drop -o and pass the printed θ "
                   "to `guardalign scan --method global --theta X`")


def check_method(method: str, out_path, per_category: bool) -> None:
    """ConfigError when the global method is asked for what only the ot method gives (a YAML, per-category τ)."""
    if method == "global" and out_path is not None:
        raise ConfigError(_GLOBAL_NO_YAML)
    if method == "global" and per_category:
        raise ConfigError("--per-category needs the ot method: the global method applies one --theta to every category")
