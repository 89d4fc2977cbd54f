"""The self-contained HTML page of ``guardalign report``: inline CSS/JS, SVG plots, data-URI thumbnails.

The page makes no network request: no external URL anywhere, and a Content-Security-Policy that
only allows inline style/script and ``data:`` images, so even a bug cannot fetch. Every string
from a record goes through :func:`esc`. Numbers use the formatters shared with Markdown and JSON.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from guardalign.reporting.images import thumb_img  # noqa: F401 (re-exported)
from guardalign.reporting.fields import answer_fields, mask_fields, rate_rows, scan_fields
from guardalign.reporting.plots import esc, svg_histogram, svg_lines  # noqa: F401 (esc, svg_histogram re-exported)
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
.reveal{position:relative;display:inline-block;cursor:pointer;overflow:hidden;line-height:0}
.reveal input{position:absolute;opacity:0;width:1px;height:1px;margin:0}
.reveal img{filter:blur(14px) grayscale(.6)}
.reveal input:checked~img{filter:none}
.reveal .hint{position:absolute;left:0;right:0;top:42%;text-align:center;line-height:1.2;color:#fff;font-weight:600;
text-shadow:0 0 3px #000,0 0 6px #000}
.reveal input:checked~.hint{display:none}
.reveal input:focus-visible~img{outline:2px solid #1a5fb4}
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


def render_html(summary: dict[str, Any], data: Any, *, image_roots: list[Path], blur: bool = True) -> str:
    """The whole page. ``data`` is the ``Collected`` the summary was built from (rows, thumbnails).

    ``blur``: thumbnails of unsafe items are blurred until clicked (a moderator chooses what to look at)."""
    roots = [r.resolve() for r in image_roots]
    body = [f"<h1>{esc(summary['title'])}</h1>",
            f"<p class=muted>Generated {esc(summary['generated_at'])} by guardalign. Self-contained: "
            "this file makes no network requests.</p>", _inputs(summary)]
    for i, (run, coll) in enumerate(zip(summary["scan"], data.scans)):
        body.append(_scan_section(i, run, coll, roots, summary["limits"], blur))
    for i, run in enumerate(summary.get("mask", [])):
        body.append(_mask_section(i, run))
    if summary["answers"] is not None:
        body.append(_answers_section(summary["answers"], data.answers.rows(), summary["limits"], roots, blur))
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


def _scan_section(i: int, run: dict[str, Any], coll: Any, roots: list[Path], limits: dict[str, int],
                  blur: bool = True) -> str:
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
    out.append(_flagged(i, run, coll, roots, limits, blur))
    errs = run["error_items"]
    if errs["count"]:
        rows = [f"<tr><td class=mono>{esc(e['id'])}</td><td class=mono>{esc(e['source'] or '')}</td>"
                f"<td class=err>{esc(e['error'])}</td></tr>" for e in errs["items"]]
        more = _capped_note(len(errs["items"]), errs["count"], "error records")
        out.append(f"<h3>Scan errors ({fmt_int(errs['count'])})</h3>{more}" + _table(["id", "source", "error"], rows))
    return "\n".join(out) + "</section>"


def _capped_note(shown: int, total: int, what: str) -> str:
    return f"<p class=note>Listing the first {fmt_int(shown)} of {fmt_int(total)} {what}.</p>" if shown < total else ""


def thumb_html(uri: tuple[str, int, int] | None, alt: str, note: str, blur: bool) -> str:
    """A thumbnail cell: the image (blurred behind a click-to-reveal checkbox when ``blur``) and its note."""
    if not uri:
        return f"<span class=muted>{esc(note)}</span>"
    img = f'<img class=thumb src="{uri[0]}" width="{uri[1]}" height="{uri[2]}" alt="{esc(alt)}">'
    if blur:  # CSS only: works with scripts off; the checkbox keeps it keyboard-reachable
        img = (f'<label class=reveal title="unsafe image: click to reveal"><input type=checkbox '
               f'aria-label="reveal {esc(alt)}">{img}<span class=hint>click to reveal</span></label>')
    return img + (f"<div class=muted>{esc(note)}</div>" if note else "")


def _source_link(src: str, base_dir: Path, roots: list[Path]) -> str:
    """The source as text, linked only when it names a file inside the allowed roots."""
    from guardalign.reporting.images import link_target

    path = link_target(src, base_dir, roots)
    return f'<a href="{esc(path.as_uri())}">{esc(src)}</a>' if path else esc(src)


def _flagged(i: int, run: dict[str, Any], coll: Any, roots: list[Path], limits: dict[str, int], blur: bool) -> str:
    from guardalign.reporting.images import thumbnails

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
               f"severe rows (cap --max-thumbnails {fmt_int(limits['max_thumbnails'])}); {fmt_int(made)} could be drawn "
               "from bytes matching the record's sha256." + (" Blurred: click one to reveal it (--no-blur turns this "
               "off)." if blur else "") + "</p>")
    tid = f"flagged-{i}"
    cats = sorted({r["category"] or "(none)" for r in rows})
    out.append(_filters(tid, [("data-cat", "categories", cats)]))
    body = []
    for r in rows:
        uri, note = thumbs.get(r["seq"], (None, "not drawn (beyond --max-thumbnails)"))
        img = thumb_html(uri, f"heatmap of {r['id']}", note, blur)
        link = _source_link(r["source"] or "", coll.base_dir, roots)
        body.append(f'<tr data-cat="{esc(r["category"] or "(none)")}"><td>{img}</td><td class=mono>{esc(r["id"])}</td>'
                    f'<td>{esc(r["category"] or "(none)")}</td><td class=n data-v="{r["score"]!r}">{fmt_num(r["score"])}</td>'
                    f'<td class=n data-v="{r["threshold"]!r}">{fmt_num(r["threshold"])}</td>'
                    f'<td class=n data-v="{r["margin"]!r}">{fmt_num(r["margin"])}</td><td class=mono>{link}</td></tr>')
    out.append(_table(["thumbnail", "id", "category", "#score", "#threshold", "#past threshold", "source"], body,
                      cls="sortable", tid=tid))
    return "\n".join(out)


def _answers_section(a: dict[str, Any], rows: list[dict[str, Any]], limits: dict[str, int], roots: list[Path],
                     blur: bool = True) -> str:
    out = ["<section id=answers><h2>Answers</h2>", _kv(answer_fields(a))]
    extra = [("files", a.get("files", {})), ("model", a["models"]), ("calibration", a["calibration"]),
             ("anchors sha256", a["anchors_sha256"])]
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
    out.append(_responses(a, rows, limits, roots, blur))
    errs = a["error_items"]
    if errs["count"]:
        body = [f"<tr><td class=mono>{esc(e['id'])}</td><td class=mono>{esc(e['source'] or '')}</td>"
                f"<td class=err>{esc(e['error'])}</td></tr>" for e in errs["items"]]
        out.append(f"<h3>Answer errors ({fmt_int(errs['count'])})</h3>"
                   + _capped_note(len(errs["items"]), errs["count"], "error records") + _table(["id", "image", "error"], body))
    return "\n".join(out) + "</section>"


def _responses(a: dict[str, Any], rows: list[dict[str, Any]], limits: dict[str, int], roots: list[Path],
               blur: bool = True) -> str:
    from guardalign.reporting.images import answer_thumbnail

    out = [f"<h3>Responses ({fmt_int(a['ok'])})</h3>"]
    if len(rows) < a["ok"]:
        out.append(f"<p class=note>Showing {fmt_int(len(rows))} of {fmt_int(a['ok'])} responses: judged unsafe and "
                   f"not refused first, then in input order (cap --max-rows {fmt_int(limits['max_rows'])}).</p>")
    if not rows:
        return "".join(out)
    out.append("<p class=muted>Image: what the model was shown (the prompt's image, verified against the record's "
               "image_sha256, with the purified boxes filled), for the first "
               f"{fmt_int(min(len(rows), limits['max_thumbnails']))} rows. Category: the prompt's own; detected: the "
               "detector's. Run: the answers file the row came from.</p>")
    yn = {True: "yes", False: "no", None: "—"}
    body, cache = [], {}
    for k, r in enumerate(rows):
        judge = {True: "<span class=bad>unsafe</span>", False: "<span class=good>safe</span>", None: "—"}[r["judge_unsafe"]]
        refused = "<span class=good>yes</span>" if r["refused"] else "<span class=bad>no</span>"
        cat = r["category"] or "(none)"
        base = Path(r["file"]).resolve().parent if r.get("file") else Path.cwd()
        if k < limits["max_thumbnails"]:
            uri, note = answer_thumbnail(r, base, roots, cache)
        else:
            uri, note = None, "not drawn (beyond --max-thumbnails)"
        img = thumb_html(uri, f"image of {r['id']}", note, blur and r.get("verdict") == "unsafe")
        body.append(f'<tr data-cat="{esc(cat)}" data-refused="{yn[r["refused"]]}"><td>{img}</td>'
                    f'<td class=mono>{esc(r["id"])}</td><td class=mono>{esc(r.get("file") or "—")}</td>'
                    f'<td>{esc(cat)}</td><td>{esc(r.get("detected") or "—")}</td><td>{yn[r["purified"]]}</td>'
                    f'<td>{refused}</td><td>{judge}</td><td class=resp>{esc(r["prompt"])}</td><td class=resp>'
                    f'{esc(r["response"])}{"<span class=muted> … (truncated)</span>" if r["truncated"] else ""}</td></tr>')
    cats = sorted({r["category"] or "(none)" for r in rows})
    out.append(_filters("responses", [("data-cat", "categories", cats), ("data-refused", "refused", ["yes", "no"])]))
    out.append(_table(["image", "id", "run", "category", "detected", "purified", "refused", "judge", "prompt",
                       "response"], body, cls="sortable", tid="responses"))
    return "\n".join(out)


def _mask_section(i: int, run: dict[str, Any]) -> str:
    """A mask manifest: entries by status, fill and dilation, purified items per category, error entries."""
    out = [f"<section id=mask-{i}><h2>Mask run: <span class=mono>{esc(run['path'])}</span></h2>",
           _kv(mask_fields(run, esc))]
    cats = run["purified_by_category"]
    if cats:
        out.append("<h3>Purified per category</h3>" + _table(
            ["category", "#purified"], [f"<tr><td>{esc(c)}</td><td class=n>{fmt_int(n)}</td></tr>" for c, n in cats.items()]))
    errs = run["error_items"]
    if errs["count"]:
        rows = [f"<tr><td class=mono>{esc(e['id'])}</td><td class=mono>{esc(e['source'] or '')}</td>"
                f"<td class=err>{esc(e['error'])}</td></tr>" for e in errs["items"]]
        out.append(f"<h3>Mask errors ({fmt_int(errs['count'])})</h3>"
                   + _capped_note(len(errs["items"]), errs["count"], "error entries") + _table(["id", "source", "error"], rows))
    return "\n".join(out) + "</section>"


def _malformed(mal: dict[str, Any], limits: dict[str, int]) -> str:
    if not mal["count"]:
        return "<section><h2>Malformed records</h2><p class=good>None: every record was readable.</p></section>"
    rows = [f"<tr><td class=mono>{esc(m['path'])}</td><td>{esc(m['where'])}</td><td class=err>{esc(m['error'])}</td></tr>"
            for m in mal["items"]]
    return (f"<section id=malformed><h2>Malformed records ({fmt_int(mal['count'])})</h2>"
            + _capped_note(len(mal["items"]), mal["count"], "malformed records")
            + _table(["file", "where", "error"], rows) + "</section>")
