"""The self-contained HTML page of ``guardalign report``: inline CSS/JS, SVG plots, data-URI thumbnails.

The page makes no network request: no external URL anywhere, and a Content-Security-Policy that
only allows inline style/script and ``data:`` images, so even a bug cannot fetch. Every string
from a record goes through :func:`esc`. Numbers use the formatters shared with Markdown and JSON.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from guardalign.reporting.collect import answer_fields, rate_rows, scan_fields
from guardalign.reporting.stats import fmt_int, fmt_num, fmt_rate

SAFE, UNSAFE, VANILLA, CALIBRATED = "#4a7fc1", "#d0453c", "#7a7a7a", "#d0453c"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; form-action 'none'; base-uri 'none'"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f6f4}
main{max-width:1240px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:24px;margin:8px 0}h2{font-size:19px;margin:28px 0 8px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
section{background:#fff;border:1px solid #e2e2e0;border-radius:8px;padding:8px 18px 16px;margin:18px 0}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border-bottom:1px solid #e6e6e6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0ee;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.n,th.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv td:first-child{color:#555;white-space:nowrap}
.note{color:#6a5d00;background:#fff8d6;border:1px solid #eadf9a;border-radius:4px;padding:4px 8px;margin:6px 0}
.muted{color:#777}.err{color:#a3261d}
.bad{background:#fdecea;color:#a3261d;border-radius:3px;padding:0 4px}.good{color:#2d6a2d}
.filters{margin:8px 0;display:flex;gap:8px;align-items:center}
.filters input{padding:4px 8px;min-width:260px}
.resp{max-width:560px;white-space:pre-wrap;word-break:break-word}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.thumb{display:block;border:1px solid #ccc}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;word-break:break-all}
svg.plot{background:#fff;display:block}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
"""

JS = """
(function () {
  function val(td) { var v = td.getAttribute("data-v"); return v === null ? td.textContent.trim() : v; }
  function num(s) { var x = parseFloat(s); return isNaN(x) ? -1e308 : x; }
  var each = function (list, fn) { Array.prototype.forEach.call(list, fn); };
  each(document.querySelectorAll("table.sortable"), function (t) {
    var ths = t.tHead.rows[0].cells;
    each(ths, function (th, i) {
      th.addEventListener("click", function () {
        var asc = th.getAttribute("aria-sort") !== "ascending", isNum = th.classList.contains("num");
        each(ths, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = val(a.cells[i]), y = val(b.cells[i]);
          var c = isNum ? num(x) - num(y) : x.localeCompare(y);
          return asc ? c : -c;
        });
        each(rows, function (r) { body.appendChild(r); });
      });
    });
  });
  each(document.querySelectorAll("div.filters"), function (box) {
    var t = document.getElementById(box.getAttribute("data-table"));
    var q = box.querySelector("input"), sels = box.querySelectorAll("select"), out = box.querySelector(".shown");
    function apply() {
      var needle = q.value.toLowerCase(), rows = t.tBodies[0].rows, shown = 0;
      for (var r = 0; r < rows.length; r++) {
        var ok = !needle || rows[r].textContent.toLowerCase().indexOf(needle) >= 0;
        for (var s = 0; s < sels.length; s++) {
          var v = sels[s].value;
          if (v && rows[r].getAttribute(sels[s].getAttribute("data-attr")) !== v) { ok = false; }
        }
        rows[r].style.display = ok ? "" : "none";
        if (ok) { shown++; }
      }
      out.textContent = shown + " of " + rows.length + " rows shown";
    }
    q.addEventListener("input", apply);
    each(sels, function (s) { s.addEventListener("change", apply); });
    apply();
  });
})();
"""


def esc(value: Any) -> str:
    """HTML-escape anything (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def render_html(summary: dict[str, Any], data: Any, *, image_roots: list[Path]) -> str:
    """The whole page. ``data`` is the ``Collected`` the summary was built from (rows, thumbnails)."""
    roots = [r.resolve() for r in image_roots]
    body = [f"<h1>{esc(summary['title'])}</h1>",
            f"<p class=muted>Generated {esc(summary['generated_at'])} by guardalign. Self-contained: "
            "this file makes no network requests.</p>", _inputs(summary)]
    for i, (run, coll) in enumerate(zip(summary["scan"], data.scans)):
        body.append(_scan_section(i, run, coll, roots, summary["limits"]))
    if summary["answers"] is not None:
        body.append(_answers_section(summary["answers"], data.answers.rows(), summary["limits"]))
    if summary.get("probe") is not None:
        from guardalign.reporting.probe import probe_html

        body.append(probe_html(summary["probe"]))
    body.append(_malformed(summary["malformed"], summary["limits"]))
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name=referrer content=no-referrer><meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{esc(summary['title'])}</title><style>{CSS}</style></head>\n<body><main>\n"
        + "\n".join(body) + f"\n</main><script>{JS}</script></body></html>\n"
    )


def _table(head: list[str], rows: list[str], *, cls: str = "", tid: str = "") -> str:
    ths = "".join(f"<th{' class=num' if h.startswith('#') else ''}>{esc(h.lstrip('#'))}</th>" for h in head)
    attrs = (f' class="{cls}"' if cls else "") + (f' id="{tid}"' if tid else "")
    return f"<table{attrs}><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _kv(pairs: list[tuple[str, str]]) -> str:
    """Two-column table; values are already escaped/formatted."""
    return "<table class=kv><tbody>" + "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in pairs) + "</tbody></table>"


def _inputs(summary: dict[str, Any]) -> str:
    rows = [f"<tr><td class=mono>{esc(i['path'])}</td><td>{esc(i['kind'])}</td><td class=n>{fmt_int(i['read'])}</td>"
            f"<td class=n>{fmt_int(i['malformed'])}</td></tr>" for i in summary["inputs"]]
    mal = summary["malformed"]["count"]
    warn = f"<p class=note>{fmt_int(mal)} malformed records or unusable files; listed at the end.</p>" if mal else ""
    return "<section><h2>Inputs</h2>" + _table(["file", "kind", "#records read", "#malformed"], rows) + warn + "</section>"


def _filters(tid: str, selects: list[tuple[str, str, list[str]]]) -> str:
    sel = "".join(
        f'<select data-attr="{a}" aria-label="{esc(label)}"><option value="">all {esc(label)}</option>'
        + "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values) + "</select>"
        for a, label, values in selects)
    return (f'<div class=filters data-table="{tid}"><input type=search placeholder="filter rows…" '
            f'aria-label="filter rows">{sel}<span class="shown muted"></span></div>')


def _scan_section(i: int, run: dict[str, Any], coll: Any, roots: list[Path], limits: dict[str, int]) -> str:
    word = "θ" if run["method"] == "global" else "τ"
    le = run["method"] != "global"
    out = [f"<section id=scan-{i}><h2>Scan: <span class=mono>{esc(run['path'])}</span></h2>",
           _kv(scan_fields(run, esc))]
    h = run["score_histogram"]
    out.append(f"<h3>Image scores ({esc(run['unsafe_when'])} is unsafe; {word} marked)</h3>")
    out.append(svg_histogram([("safe", h["safe"], SAFE), ("unsafe", h["unsafe"], UNSAFE)], h["lo"], h["hi"],
                             run["threshold"], unsafe_le=le, label=f"histogram of image scores, {word} marked", word=word))
    out.append(f'<p class=legend><span style="background:{SAFE}"></span>safe<span style="background:{UNSAFE}"></span>'
               f'unsafe<span style="background:#fbe3e1"></span>unsafe side of {word}</p>')
    if run["categories"]:
        rows = []
        for name, c in run["categories"].items():
            plot = svg_histogram([(name, c["histogram"], UNSAFE if c["flagged"] else SAFE)], h["lo"], h["hi"], c["tau"],
                                 unsafe_le=le, w=240, h=56, small=True, label=f"{name} score histogram", word=word)
            rows.append(f"<tr><td>{esc(name)}</td><td class=n>{fmt_int(c['flagged'])}</td><td class=n>"
                        f"{fmt_rate(c['flagged_rate'])}</td><td class=n>{fmt_num(c['tau'])}</td><td class=n>{fmt_num(c['min'])}"
                        f"</td><td class=n>{fmt_num(c['mean'])}</td><td class=n>{fmt_num(c['max'])}</td><td>{plot}</td></tr>")
        out.append("<h3>Per category</h3><p class=muted>Flagged = unsafe images whose winning category this is. "
                   f"Histograms: this category's score over all ok images, same axis as above, {word} marked.</p>")
        out.append(_table(["category", "#flagged", "#% of ok", f"#{word}", "#min", "#mean", "#max", "score histogram"], rows))
        if run["categories_omitted"]:
            out.append(f"<p class=note>{fmt_int(run['categories_omitted'])} more categories not shown (the "
                       f"{len(run['categories'])} with the most flagged images are).</p>")
    out.append(_flagged(i, run, coll, roots, limits))
    errs = run["error_items"]
    if errs["count"]:
        rows = [f"<tr><td class=mono>{esc(e['id'])}</td><td class=mono>{esc(e['source'] or '')}</td>"
                f"<td class=err>{esc(e['error'])}</td></tr>" for e in errs["items"]]
        more = _capped_note(len(errs["items"]), errs["count"], "error records")
        out.append(f"<h3>Scan errors ({fmt_int(errs['count'])})</h3>{more}" + _table(["id", "source", "error"], rows))
    return "\n".join(out) + "</section>"


def _capped_note(shown: int, total: int, what: str) -> str:
    return f"<p class=note>Listing the first {fmt_int(shown)} of {fmt_int(total)} {what}.</p>" if shown < total else ""


def _flagged(i: int, run: dict[str, Any], coll: Any, roots: list[Path], limits: dict[str, int]) -> str:
    from guardalign.reporting.images import locate, thumbnails

    rows = coll.rows()
    thumbs = thumbnails(coll.thumb_records(), coll.base_dir, roots)
    out = [f"<h3>Flagged items ({fmt_int(run['unsafe'])})</h3>"]
    if not rows:
        return out[0] + "<p class=muted>No image was flagged.</p>"
    if len(rows) < run["unsafe"]:
        out.append(f"<p class=note>Showing the {fmt_int(len(rows))} of {fmt_int(run['unsafe'])} flagged items furthest "
                   f"past the threshold (cap --max-rows {fmt_int(limits['max_rows'])}).</p>")
    made = sum(1 for uri, _ in thumbs.values() if uri)
    out.append(f"<p class=muted>Thumbnails (patch heatmap, unsafe boxes outlined) for the {fmt_int(len(thumbs))} most "
               f"severe rows (cap --max-thumbnails {fmt_int(limits['max_thumbnails'])}); {fmt_int(made)} could be drawn.</p>")
    tid = f"flagged-{i}"
    cats = sorted({r["category"] or "(none)" for r in rows})
    out.append(_filters(tid, [("data-cat", "categories", cats)]))
    body = []
    for r in rows:
        uri, note = thumbs.get(r["seq"], (None, "not drawn (beyond --max-thumbnails)"))
        img = (f'<img class=thumb src="{uri[0]}" width="{uri[1]}" height="{uri[2]}" alt="heatmap of {esc(r["id"])}">'
               + (f"<div class=muted>{esc(note)}</div>" if note else "")) if uri else f"<span class=muted>{esc(note)}</span>"
        src = r["source"] or ""
        path = locate(src, coll.base_dir)
        link = f'<a href="{esc(path.as_uri())}">{esc(src)}</a>' if path else esc(src)
        body.append(f'<tr data-cat="{esc(r["category"] or "(none)")}"><td>{img}</td><td class=mono>{esc(r["id"])}</td>'
                    f'<td>{esc(r["category"] or "(none)")}</td><td class=n data-v="{r["score"]!r}">{fmt_num(r["score"])}</td>'
                    f'<td class=n data-v="{r["threshold"]!r}">{fmt_num(r["threshold"])}</td>'
                    f'<td class=n data-v="{r["margin"]!r}">{fmt_num(r["margin"])}</td><td class=mono>{link}</td></tr>')
    out.append(_table(["thumbnail", "id", "category", "#score", "#threshold", "#past threshold", "source"], body,
                      cls="sortable", tid=tid))
    return "\n".join(out)


def _answers_section(a: dict[str, Any], rows: list[dict[str, Any]], limits: dict[str, int]) -> str:
    out = ["<section id=answers><h2>Answers</h2>", _kv(answer_fields(a))]
    extra = [("model", a["models"]), ("calibration", a["calibration"]), ("anchors sha256", a["anchors_sha256"])]
    out.append(_kv([(k, esc(", ".join(f"{v} ×{fmt_int(n)}" for v, n in d.items())) or "—") for k, d in extra]))
    rr = rate_rows(a)
    if rr:
        out.append("<h3>Refusal and judge-unsafe rates by category, purified vs not</h3>")
        body = [f"<tr><td>{esc(r[0])}</td>" + "".join(f"<td class=n>{c}</td>" for c in r[1:]) + "</tr>" for r in rr]
        out.append(_table(["category", "purified", "#n", "#refused", "#refusal rate", "#judged", "#judge-unsafe rate"], body,
                          cls="sortable", tid="rates"))
        if a["categories_omitted"]:
            out.append(f"<p class=note>{fmt_int(a['categories_omitted'])} more categories not shown (the "
                       f"{len(a['by_category'])} with the most answers are).</p>")
    pa = a["prefix_attention"]
    if pa:
        out.append(f"<h3>Prefix attention per layer, vanilla vs calibrated (mean over {fmt_int(pa['records'])} answers)</h3>")
        out.append("<p class=muted>Mean attention mass from the question and generated tokens to the safety prefix. "
                   "Its decay with depth is what GuardAlign's calibration counters.</p>")
        out.append(svg_lines([("calibrated", pa["calibrated"], CALIBRATED), ("vanilla", pa["vanilla"], VANILLA)],
                             band=pa["calibrated_layers"]))
        if pa["other_layer_counts"]:
            out.append(f"<p class=note>{fmt_int(pa['other_layer_counts'])} answers from models with another layer count "
                       "are left out of this plot.</p>")
    out.append(_responses(a, rows, limits))
    errs = a["error_items"]
    if errs["count"]:
        body = [f"<tr><td class=mono>{esc(e['id'])}</td><td class=mono>{esc(e['source'] or '')}</td>"
                f"<td class=err>{esc(e['error'])}</td></tr>" for e in errs["items"]]
        out.append(f"<h3>Answer errors ({fmt_int(errs['count'])})</h3>"
                   + _capped_note(len(errs["items"]), errs["count"], "error records") + _table(["id", "image", "error"], body))
    return "\n".join(out) + "</section>"


def _responses(a: dict[str, Any], rows: list[dict[str, Any]], limits: dict[str, int]) -> str:
    out = [f"<h3>Responses ({fmt_int(a['ok'])})</h3>"]
    if len(rows) < a["ok"]:
        out.append(f"<p class=note>Showing {fmt_int(len(rows))} of {fmt_int(a['ok'])} responses: judged unsafe and "
                   f"not refused first, then in input order (cap --max-rows {fmt_int(limits['max_rows'])}).</p>")
    if not rows:
        return "".join(out)
    yn = {True: "yes", False: "no", None: "—"}
    body = []
    for r in rows:
        judge = {True: "<span class=bad>unsafe</span>", False: "<span class=good>safe</span>", None: "—"}[r["judge_unsafe"]]
        refused = "<span class=good>yes</span>" if r["refused"] else "<span class=bad>no</span>"
        cat = r["category"] or "(none)"
        body.append(f'<tr data-cat="{esc(cat)}" data-refused="{yn[r["refused"]]}"><td class=mono>{esc(r["id"])}</td>'
                    f'<td>{esc(cat)}</td><td>{yn[r["purified"]]}</td><td>{refused}</td><td>{judge}</td>'
                    f'<td class=resp>{esc(r["prompt"])}</td><td class=resp>{esc(r["response"])}'
                    f'{"<span class=muted> … (truncated)</span>" if r["truncated"] else ""}</td></tr>')
    cats = sorted({r["category"] or "(none)" for r in rows})
    out.append(_filters("responses", [("data-cat", "categories", cats), ("data-refused", "refused", ["yes", "no"])]))
    out.append(_table(["id", "category", "purified", "refused", "judge", "prompt", "response"], body,
                      cls="sortable", tid="responses"))
    return "\n".join(out)


def _malformed(mal: dict[str, Any], limits: dict[str, int]) -> str:
    if not mal["count"]:
        return "<section><h2>Malformed records</h2><p class=good>None: every record was readable.</p></section>"
    rows = [f"<tr><td class=mono>{esc(m['path'])}</td><td>{esc(m['where'])}</td><td class=err>{esc(m['error'])}</td></tr>"
            for m in mal["items"]]
    return (f"<section id=malformed><h2>Malformed records ({fmt_int(mal['count'])})</h2>"
            + _capped_note(len(mal["items"]), mal["count"], "malformed records")
            + _table(["file", "where", "error"], rows) + "</section>")


# --------------------------------------------------------------------------- SVG


def svg_histogram(stacks: list[tuple[str, list[int], str]], lo: float, hi: float, tau: float | None, *,
                  unsafe_le: bool, w: int = 640, h: int = 180, small: bool = False, label: str = "", word: str = "τ") -> str:
    """Stacked bar histogram over [lo, hi] with the threshold line and the unsafe side shaded."""
    L, R, T, B = (4, 4, 4, 4) if small else (48, 14, 20, 30)
    pw, ph, n = w - L - R, h - T - B, len(stacks[0][1])
    tot = [sum(s[1][k] for s in stacks) for k in range(n)]
    ymax = max(tot) or 1
    sx = lambda v: L + (v - lo) / (hi - lo) * pw  # noqa: E731
    p = [f'<svg class=plot width="{w}" height="{h}" viewBox="0 0 {w} {h}" role=img aria-label="{esc(label)}">']
    if tau is not None and lo <= tau <= hi:
        x0, x1 = (L, sx(tau)) if unsafe_le else (sx(tau), L + pw)
        p.append(f'<rect x="{x0:.1f}" y="{T}" width="{x1 - x0:.1f}" height="{ph}" fill="#fbe3e1"/>')
    bw, step = pw / n, (hi - lo) / n
    for k in range(n):
        y = T + ph
        for name, counts, colour in stacks:
            if counts[k]:
                bh = counts[k] / ymax * ph
                y -= bh
                p.append(f'<rect x="{L + k * bw + 0.5:.1f}" y="{y:.1f}" width="{max(bw - 1, 0.8):.1f}" height="{bh:.1f}" '
                         f'fill="{colour}"><title>{esc(name)} {lo + k * step:.4f} to {lo + (k + 1) * step:.4f}: '
                         f'{counts[k]}</title></rect>')
    p.append(f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="#888"/>')
    if not small:
        p.append(f'<text x="{L - 6}" y="{T + 8}" font-size="11" text-anchor="end">{ymax}</text>'
                 f'<text x="{L - 6}" y="{T + ph}" font-size="11" text-anchor="end">0</text>'
                 f'<text x="{L}" y="{h - 10}" font-size="11">{lo:.3f}</text>'
                 f'<text x="{L + pw}" y="{h - 10}" font-size="11" text-anchor="end">{hi:.3f}</text>')
    if tau is not None and lo <= tau <= hi:
        x = sx(tau)
        p.append(f'<line x1="{x:.1f}" y1="{T - (0 if small else 6)}" x2="{x:.1f}" y2="{T + ph}" stroke="#b00" '
                 f'stroke-width="{1.5 if small else 2}" stroke-dasharray="4 3"/>')
        if not small:
            p.append(f'<text x="{x + 4:.1f}" y="{T + 2}" font-size="12" fill="#b00">{word} = {tau:.4f}</text>')
    return "".join(p) + "</svg>"


def svg_lines(series: list[tuple[str, list[float | None], str]], *, band: list[int] | None = None,
              w: int = 640, h: int = 240) -> str:
    """Per-layer line plot (x = layer index); ``band`` [a, b) shades the calibrated layers."""
    L, R, T, B = (52, 14, 14, 46)
    pw, ph = w - L - R, h - T - B
    n = max(len(v) for _, v, _ in series)
    ys = [y for _, v, _ in series for y in v if y is not None]
    ymax = (max(ys) if ys else 1.0) * 1.1 or 1.0
    ymin = min(0.0, min(ys) if ys else 0.0)
    sx = lambda i: L + (i / (n - 1) * pw if n > 1 else pw / 2)  # noqa: E731
    sy = lambda v: T + ph - (v - ymin) / (ymax - ymin) * ph  # noqa: E731
    p = [f'<svg class=plot width="{w}" height="{h}" viewBox="0 0 {w} {h}" role=img aria-label="prefix attention per layer">']
    if band and n > 1:
        a, b = max(band[0], 0), min(band[1], n)
        x0, x1 = sx(a) - pw / (n - 1) / 2, sx(b - 1) + pw / (n - 1) / 2
        p.append(f'<rect x="{max(x0, L):.1f}" y="{T}" width="{min(x1, L + pw) - max(x0, L):.1f}" height="{ph}" fill="#fdf0d8">'
                 f'<title>calibrated layers [{a}, {b})</title></rect>')
    p.append(f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="#888"/>'
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="#888"/>')
    p.append(f'<text x="{L - 6}" y="{T + 8}" font-size="11" text-anchor="end">{ymax:.3f}</text>'
             f'<text x="{L - 6}" y="{T + ph}" font-size="11" text-anchor="end">{ymin:.3f}</text>')
    tick = max(1, n // 16)
    for i in range(0, n, tick):
        p.append(f'<text x="{sx(i):.1f}" y="{T + ph + 14}" font-size="10" text-anchor="middle">{i}</text>')
    p.append(f'<text x="{L + pw / 2:.1f}" y="{h - 18}" font-size="11" text-anchor="middle">layer</text>')
    for name, vals, colour in series:
        seg: list[str] = []
        for i, v in enumerate(vals + [None]):
            if v is None:
                if len(seg) > 1:
                    p.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{colour}" stroke-width="2"/>')
                seg = []
                continue
            seg.append(f"{sx(i):.1f},{sy(v):.1f}")
            p.append(f'<circle cx="{sx(i):.1f}" cy="{sy(v):.1f}" r="3" fill="{colour}"><title>{esc(name)} layer {i}: '
                     f'{v:.4f}</title></circle>')
    lx = L
    for name, _, colour in series:
        p.append(f'<rect x="{lx}" y="{h - 12}" width="12" height="10" fill="{colour}"/>'
                 f'<text x="{lx + 16}" y="{h - 3}" font-size="11">{esc(name)}</text>')
        lx += 110
    if band:
        p.append(f'<rect x="{lx}" y="{h - 12}" width="12" height="10" fill="#fdf0d8" stroke="#e0c890"/>'
                 f'<text x="{lx + 16}" y="{h - 3}" font-size="11">calibrated layers [{band[0]}, {band[1]})</text>')
    return "".join(p) + "</svg>"


def thumb_img(image: Any) -> tuple[str, int, int]:
    """(JPEG data URI, width, height) of a PIL image."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=72, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), image.width, image.height
