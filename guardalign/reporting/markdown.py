"""The Markdown report (CI logs, pull-request comments): the same numbers as the HTML and JSON reports."""
from __future__ import annotations

from typing import Any

from guardalign.reporting.fields import answer_fields, mask_fields, rate_rows, scan_fields
from guardalign.reporting.stats import fmt_int, fmt_num, fmt_rate


def md_cell(value: Any) -> str:
    """Escape untrusted text for a Markdown table cell: no HTML, links, emphasis or broken pipes."""
    s = " ".join(str(value).split())
    for ch in "\\`*_[]<>|#!":
        s = s.replace(ch, "\\" + ch)
    return s[:300]


def _md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _md_scan(run: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    out = [f"## Scan: {md_cell(run['path'])}", ""]
    out += _md_table(["field", "value"], [[k, v] for k, v in scan_fields(run, md_cell)])
    cats = run["categories"]
    if cats:
        out += ["### Per category", ""]
        out += _md_table(
            ["category", "flagged", "% of ok", "τ", "min score", "mean score"],
            [[md_cell(c), fmt_int(s["flagged"]), fmt_rate(s["flagged_rate"]), fmt_num(s["tau"]),
              fmt_num(s["min"]), fmt_num(s["mean"])] for c, s in cats.items()],
        )
        if run["categories_omitted"]:
            out += [f"{fmt_int(run['categories_omitted'])} more categories not shown.", ""]
    if rows:
        top = rows[:20]
        out += [f"### Most severe flagged ({len(top)} of {fmt_int(run['unsafe'])})", ""]
        out += _md_table(["id", "category", "score", "τ"], [
            [md_cell(r["id"]), md_cell(r["category"] or "—"), fmt_num(r["score"]), fmt_num(r["threshold"])]
            for r in top])
    errs = run["error_items"]
    if errs["count"]:
        out += [f"### Scan errors ({fmt_int(errs['count'])})", ""]
        out += [f"- {md_cell(e['id'])}: {md_cell(e['error'])}" for e in errs["items"][:20]] + [""]
    return out


def render_markdown(summary: dict[str, Any], data: Any) -> str:
    """A Markdown summary for CI logs and pull-request comments (same numbers as HTML and JSON)."""
    out = [f"# {md_cell(summary['title'])}", "", f"Generated {summary['generated_at']}.", ""]
    out += _md_table(["input", "kind", "records read", "malformed"], [
        [md_cell(i["path"]), i["kind"], fmt_int(i["read"]), fmt_int(i["malformed"])] for i in summary["inputs"]])
    for run, coll in zip(summary["scan"], data.scans):
        out += _md_scan(run, coll.rows())
    for run in summary.get("mask", []):
        out += [f"## Mask run: {md_cell(run['path'])}", ""]
        out += _md_table(["field", "value"], [list(r) for r in mask_fields(run, md_cell)])
        errs = run["error_items"]
        out += [f"- {md_cell(e['id'])}: {md_cell(e['error'])}" for e in errs["items"][:20]] + ([""] if errs["count"] else [])
    a = summary["answers"]
    if a is not None:
        out += ["## Answers", ""] + _md_table(["field", "value"], [list(r) for r in answer_fields(a)])
        rows = rate_rows(a)
        if rows:
            out += ["### Refusal and judge-unsafe rates by category", ""]
            out += _md_table(["category", "purified", "n", "refused", "refusal rate", "judged", "judge-unsafe rate"],
                             [[md_cell(r[0]), *r[1:]] for r in rows])
            if a["categories_omitted"]:
                out += [f"{fmt_int(a['categories_omitted'])} more categories not shown.", ""]
        pa = a["prefix_attention"]
        if pa:
            out += [f"### Prefix attention per layer (mean over {fmt_int(pa['records'])} answers)", ""]
            out += _md_table(["layer", "vanilla", "calibrated"], [
                [i, fmt_num(v), fmt_num(c)] for i, (v, c) in enumerate(zip(pa["vanilla"], pa["calibrated"]))])
    if summary.get("probe") is not None:
        from guardalign.reporting.probe import probe_markdown

        out += probe_markdown(summary["probe"])
    mal = summary["malformed"]
    if mal["count"]:
        out += [f"## Malformed records ({fmt_int(mal['count'])})", ""]
        out += [f"- {md_cell(m['path'])} {m['where']}: {md_cell(m['error'])}" for m in mal["items"][:50]]
        if mal["count"] > 50:
            out += [f"- … {fmt_int(mal['count'] - 50)} more (see the HTML or JSON report)"]
        out += [""]
    return "\n".join(out)
