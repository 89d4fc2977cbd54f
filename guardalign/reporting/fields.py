"""Formatted (label, value) rows shared by the Markdown and HTML reports, so both show the same numbers."""
from __future__ import annotations

from typing import Any

from guardalign.reporting.manifests import mask_fields  # noqa: F401 (re-exported)
from guardalign.reporting.stats import fmt_int, fmt_num, fmt_rate


def scan_fields(run: dict[str, Any], esc) -> list[tuple[str, str]]:
    """(label, formatted value) rows of a scan run's summary table; shared by Markdown and HTML."""
    tp = run["throughput"]
    return [
        ("records", fmt_int(run["records"])),
        ("ok", fmt_int(run["ok"])),
        ("errors", fmt_int(run["errors"])),
        ("unsafe", f"{fmt_int(run['unsafe'])} ({fmt_rate(run['unsafe_rate'])} of ok)"),
        ("safe", fmt_int(run["safe"])),
        ("method", f"{esc(run['method'] or '—')} · patches {esc(run['patches'] or '—')}"),
        ("model", esc(run["model"] or "—")),
        ("anchors sha256", esc(run["anchors_sha256"] or "—")),
        ("τ" if run["method"] != "global" else "θ", fmt_num(run["threshold"])),
        ("throughput", f"{fmt_num(tp['per_second'], 2)} images/s over {fmt_num(tp['seconds'], 1)} s"
         if tp else "not recorded"),
    ] + [(f"mixed {k}", esc(", ".join(f"{v} ×{n}" for v, n in vals.items()))) for k, vals in run["mixed"].items()]


def answer_fields(a: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, formatted value) rows of the answers summary table; shared by Markdown and HTML."""
    tp = a["throughput"]
    return [
        ("records", fmt_int(a["records"])),
        ("ok", fmt_int(a["ok"])),
        ("errors", fmt_int(a["errors"])),
        ("refused", f"{fmt_int(a['refused'])} ({fmt_rate(a['refusal_rate'])} of ok)"),
        ("judged", fmt_int(a["judged"])),
        ("judge-unsafe", f"{fmt_int(a['judge_unsafe'])} ({fmt_rate(a['judge_unsafe_rate'])} of judged)"),
        ("purified", fmt_int(a["purified"])),
        ("throughput", f"{fmt_num(tp['per_second'], 2)} answers/s over {fmt_num(tp['seconds'], 1)} s"
         if tp else "not recorded"),
    ]


def rate_rows(a: dict[str, Any]) -> list[list[str]]:
    """Rows (category, purified, n, refused, refusal rate, judged, judge-unsafe rate) shared by md and HTML."""
    rows = []
    for cat, groups in a["by_category"].items():
        for key, label in (("purified", "yes"), ("not_purified", "no")):
            g = groups[key]
            if g["n"]:
                rows.append([cat, label, fmt_int(g["n"]), fmt_int(g["refused"]), fmt_rate(g["refusal_rate"]),
                             fmt_int(g["judged"]), fmt_rate(g["judge_unsafe_rate"])])
    return rows
