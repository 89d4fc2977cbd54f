"""The probe section of ``guardalign report``: Markdown tables and an HTML section with inline SVG line charts
(per layer: refusal-token rank of each form, image–caption cosine, attention of the last position), from the
summary of :class:`guardalign.reporting.probe_stats.ProbePool`. Every string from a record is escaped.
"""
from __future__ import annotations

import html
import math
from typing import Any

from guardalign.reporting.stats import fmt_int, fmt_num, fmt_rate

COLOURS = {"image": "#d0453c", "text": "#4a7fc1", "prefix": "#7a7a7a", "calibration": "#e69f00",
           "guardalign": "#2d8a4e"}
DASH = {"text": "5 3", "caption": "5 3", "prefix": "2 3"}


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _md_cell(value: Any) -> str:
    s = " ".join(str(value).split())
    for ch in "\\`*_[]<>|#!":
        s = s.replace(ch, "\\" + ch)
    return s[:300]


def _dash(d: str) -> str:
    return f' stroke-dasharray="{d}"' if d else ""


def _layer(v: float | None) -> str:
    return "—" if v is None else (f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}")


def form_rows(p: dict[str, Any]) -> list[list[str]]:
    """(form, pairs, refused at last layer [95% CI], refusal starts: median first top-1 layer (reached),
    median first top-k layer (reached), geometric-mean rank at the last layer); shared by Markdown and HTML."""
    rows = []
    for name, f in p["all"]["forms"].items():
        ci = f"[{fmt_rate(f['refused_lo'])}, {fmt_rate(f['refused_hi'])}]" if f["n"] else ""
        last = f["rank"]["mean"][-1] if f["rank"] else None
        rows.append([name, fmt_int(f["n"]), f"{fmt_rate(f['refused'])} {ci}".strip(),
                     f"{_layer(f['first_top1_median'])} ({fmt_int(f['first_top1_reached'])} of {fmt_int(f['n'])})",
                     f"{_layer(f['first_topk_median'])} ({fmt_int(f['first_topk_reached'])} of {fmt_int(f['n'])})",
                     fmt_num(last, 1)])
    return rows


FORM_HEAD = ["form", "pairs", "refused at last layer [95% CI]", "first top-1 layer, median (reached)",
             "first top-k layer, median (reached)", "rank at last layer (geo. mean)"]


def category_rows(p: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per category: pairs, then per form "refused at the last layer · median first top-1 layer"."""
    forms = p["forms"]
    head = ["category", "pairs"] + [f"{f}: refused · top-1 at" for f in forms]
    rows = []
    for cat, g in p["by_category"].items():
        cells = [cat, fmt_int(g["n"])]
        for f in forms:
            e = g["forms"].get(f)
            cells.append(f"{fmt_rate(e['refused'])} · {_layer(e['first_top1_median'])}" if e and e["n"] else "—")
        rows.append(cells)
    return head, rows


def _tokens(p: dict[str, Any]) -> str:
    toks = p.get("refusal_tokens") or []
    return ", ".join(f"{t.get('token')!r} ({t.get('id')})" for t in toks if isinstance(t, dict))[:600]


def _provenance(p: dict[str, Any]) -> list[tuple[str, str]]:
    model = p.get("model") if isinstance(p.get("model"), dict) else {}
    pairs = [("records", fmt_int(p["records"])), ("ok", fmt_int(p["ok"])), ("errors", fmt_int(p["errors"])),
             ("model", f"{model.get('id', '—')} ({model.get('family', '?')}, {model.get('dtype', '?')})"),
             ("layers", str(p.get("layers") or "—")), ("lens", str(p.get("lens") or "—")),
             ("top-k", str(p.get("top_k") or "—")), ("refusal tokens", _tokens(p) or "—")]
    if p.get("mixed"):
        pairs.append(("mixed", "records differ in " + ", ".join(p["mixed"])))
    return pairs


def _md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""])


def probe_markdown(p: dict[str, Any]) -> list[str]:
    """Markdown lines of the probe section."""
    out = ["## Probe (TGA diagnosis)", ""]
    out += _md_table(["field", "value"], [[k, _md_cell(v)] for k, v in _provenance(p)])
    if not p["ok"]:
        return out
    out += ["### Per form", ""] + _md_table(FORM_HEAD, form_rows(p))
    head, rows = category_rows(p)
    out += ["### Per category", ""] + _md_table(head, [[_md_cell(r[0]), *r[1:]] for r in rows])
    forms = p["all"]["forms"]
    head = ["layer"] + [f"{f} rank" for f in forms] + [f"{f} cosine" for f in forms if forms[f]["cosine"]]
    rows = []
    for i in range(p["layers"]):
        rows.append([i] + [fmt_num(forms[f]["rank"]["mean"][i], 1) for f in forms]
                    + [fmt_num(forms[f]["cosine"]["mean"][i]) for f in forms if forms[f]["cosine"]])
    out += ["### Per layer (geometric-mean refusal rank; mean image–caption cosine)", ""] + _md_table(head, rows)
    errs = p["error_items"]
    if errs["count"]:
        out += [f"### Probe errors ({fmt_int(errs['count'])})", ""]
        out += [f"- {_md_cell(e['id'])}: {_md_cell(e['error'])}" for e in errs["items"][:20]] + [""]
    return out


def svg_curves(series: list[tuple[str, dict | None, str, str]], *, label: str, log: bool = False,
               w: int = 640, h: int = 260) -> str:
    """Per-layer lines (x = layer) with shaded 95% bands; ``series`` = (name, {mean, lo, hi}, colour, dash)."""
    L, R, T, B = (56, 14, 14, 50)
    pw, ph = w - L - R, h - T - B
    series = [s for s in series if s[1] is not None]
    f = (lambda v: math.log10(v)) if log else (lambda v: v)  # noqa: E731
    ys = [f(v) for _, c, _, _ in series for k in ("mean", "lo", "hi") for v in c[k] if v is not None and (v > 0 or not log)]
    lo_y, hi_y = (min(ys), max(ys)) if ys else (0.0, 1.0)
    lo_y, hi_y = (min(lo_y, 0.0), hi_y) if log else (min(lo_y, 0.0), max(hi_y, 0.0))
    hi_y = hi_y if hi_y > lo_y else lo_y + 1.0
    n = max((len(c["mean"]) for _, c, _, _ in series), default=1)
    sx = lambda i: L + (i / (n - 1) * pw if n > 1 else pw / 2)  # noqa: E731
    sy = lambda v: T + ph - (f(v) - lo_y) / (hi_y - lo_y) * ph  # noqa: E731
    top = f"{10 ** hi_y:.3g}" if log else f"{hi_y:.3f}"
    bottom = f"{10 ** lo_y:.3g}" if log else f"{lo_y:.3f}"
    p = [f'<svg class=plot width="{w}" height="{h}" viewBox="0 0 {w} {h}" role=img aria-label="{_esc(label)}">',
         f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="#888"/>'
         f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="#888"/>',
         f'<text x="{L - 6}" y="{T + 8}" font-size="11" text-anchor="end">{top}</text>'
         f'<text x="{L - 6}" y="{T + ph}" font-size="11" text-anchor="end">{bottom}</text>',
         f'<text x="{L + pw / 2:.1f}" y="{h - 22}" font-size="11" text-anchor="middle">layer</text>']
    if log:
        p.append(f'<text x="{L + 4}" y="{T + 8}" font-size="10" fill="#666">log scale</text>')
    for i in range(0, n, max(1, n // 16)):
        p.append(f'<text x="{sx(i):.1f}" y="{T + ph + 14}" font-size="10" text-anchor="middle">{i}</text>')
    for name, c, colour, dash in series:
        band = [(i, a, b) for i, (a, b) in enumerate(zip(c["lo"], c["hi"])) if a is not None and b is not None
                and (not log or (a > 0 and b > 0))]
        if len(band) > 1:
            pts = [f"{sx(i):.1f},{sy(b):.1f}" for i, _, b in band] + [f"{sx(i):.1f},{sy(a):.1f}" for i, a, _ in band[::-1]]
            p.append(f'<polygon points="{" ".join(pts)}" fill="{colour}" fill-opacity="0.12" stroke="none"/>')
        pts = [(i, v) for i, v in enumerate(c["mean"]) if v is not None and (not log or v > 0)]
        if len(pts) > 1:
            p.append(f'<polyline points="{" ".join(f"{sx(i):.1f},{sy(v):.1f}" for i, v in pts)}" fill="none" '
                     f'stroke="{colour}" stroke-width="2"{_dash(dash)}/>')
        for i, v in pts:
            p.append(f'<circle cx="{sx(i):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{colour}"><title>{_esc(name)} layer {i}: '
                     f'{v:.4g}</title></circle>')
    lx, ly = L, h - 12
    for name, _, colour, dash in series:
        p.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 14}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"'
                 f'{_dash(dash)}/><text x="{lx + 18}" y="{ly}" font-size="11">{_esc(name)}</text>')
        lx += 24 + 7 * len(name)
    return "".join(p) + "</svg>"


def _table(head: list[str], rows: list[list[str]]) -> str:
    ths = "".join(f"<th>{_esc(x)}</th>" for x in head)
    trs = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{ths}</tr></thead><tbody>{trs}</tbody></table>"


def probe_html(p: dict[str, Any]) -> str:
    """The HTML section (inline SVG, escaped text)."""
    kv = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in _provenance(p))
    out = ["<section id=probe><h2>Probe (TGA diagnosis)</h2>", f"<table class=kv><tbody>{kv}</tbody></table>"]
    if p["ok"]:
        forms = p["all"]["forms"]
        out += ["<h3>Refusal-token rank per layer</h3><p class=muted>Best rank of any refusal token under the logit "
                "lens at the last prompt position (1 = top-1: the bottom of the chart, log scale), geometric mean over pairs "
                "with a 95% bootstrap band. "
                "TGA's finding is the gap between the text and the image forms.</p>",
                svg_curves([(f, forms[f]["rank"], COLOURS[f], "") for f in forms], label="refusal rank per layer",
                           log=True)]
        cos = [(f, forms[f]["cosine"], COLOURS[f], "") for f in forms if forms[f]["cosine"]]
        if cos:
            out += ["<h3>Image–caption alignment per layer</h3><p class=muted>Cosine of the mean hidden state of the "
                    "image tokens and of the caption's tokens (caption fed alone), mean over pairs.</p>",
                    svg_curves(cos, label="cosine per layer")]
        att = [(f"{f}: {s}", c, COLOURS[f], DASH.get(s, "")) for f in ("image", "text") if f in forms
               for s, c in forms[f].get("attention", {}).items()]
        if att:
            out += ["<h3>Attention of the last position per layer</h3><p class=muted>Mass on the image tokens (image "
                    "form), the caption's tokens (text form) and the rest of the question (dashed).</p>",
                    svg_curves(att, label="attention mass per layer")]
        out += ["<h3>Per form</h3>", _table(FORM_HEAD, form_rows(p))]
        head, rows = category_rows(p)
        out += ["<h3>Per category</h3>", _table(head, rows)]
        if p["categories_omitted"]:
            out.append(f"<p class=note>{fmt_int(p['categories_omitted'])} more categories not shown.</p>")
    errs = p["error_items"]
    if errs["count"]:
        items = "".join(f"<li>{_esc(e['id'])}: <span class=err>{_esc(e['error'])}</span></li>" for e in errs["items"])
        out.append(f"<h3>Probe errors ({fmt_int(errs['count'])})</h3><ul>{items}</ul>")
    return "\n".join(out) + "</section>"
