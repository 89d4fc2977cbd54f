"""``guardalign report`` as a library function: scan / answer records → one HTML, Markdown or JSON report.

Records are untrusted input. Each one is validated; a malformed one (bad JSON line, missing field,
wrong type) is listed as an error naming its file and line, never a crash. Statistics are gathered
in one streaming pass, so memory stays small for 100k-record runs; table rows and thumbnails are
capped (the most severe kept) and the page says so. The three formats render the same summary
numbers (:func:`build_summary`), formatted by the same helpers (:func:`fmt_int`, :func:`fmt_rate`,
:func:`fmt_num`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from guardalign.errors import ConfigError, InputError
from guardalign.reporting.stats import (
    MAX_LISTED, AnswerPool, Bad, ScanRun, check_answer, check_scan, fmt_int, fmt_num, fmt_rate,
)

__all__ = ["report", "collect", "build_summary", "render_markdown", "fmt_int", "fmt_rate", "fmt_num", "FORMATS"]

FORMATS = ("html", "md", "json")
REPORT_VERSION = 1  # bumped when the JSON summary's shape changes
_SNIFF = 20  # records looked at to tell a scan file from an answers file
_SNIFF_MAX = 1000  # lines read at most while looking for them
_SCAN_KEYS = frozenset({"source", "verdict", "unsafe_patches", "patch_scores", "patch_boxes", "threshold",
                        "categories", "grid", "boxes", "box_categories"})
_ANSWER_KEYS = frozenset({"response", "refused", "prefix_attention", "prompt", "judge", "generation",
                          "calibration", "detection", "image"})
_PROBE_KEYS = frozenset({"forms", "cosine", "refusal_tokens", "lens", "top_k", "text_prompt", "layers"})


class Collected:
    """Everything gathered from the inputs: per-file scan runs, the pooled answers, malformed records."""

    def __init__(self, max_rows: int, max_thumbnails: int) -> None:
        self.max_rows = max_rows  # flagged / response rows kept per table
        self.max_thumbnails = min(max_thumbnails, max_rows)  # thumbnails only go on shown rows
        self.inputs: list[dict[str, Any]] = []  # {"path", "kind", "read" (malformed included), "malformed"}
        self.scans: list[ScanRun] = []  # one per scan file, in argument order
        self.answers: AnswerPool | None = None  # all answer files pooled
        self.probe: Any = None  # all probe files pooled (reporting.probe_stats.ProbePool)
        self.malformed: list[dict[str, Any]] = []  # first MAX_LISTED {"path", "where", "error"}
        self.malformed_count = 0  # all malformed records and unusable files

    def bad(self, path: str, where: str, error: str) -> None:
        self.malformed_count += 1
        if len(self.malformed) < MAX_LISTED:
            self.malformed.append({"path": path, "where": where, "error": error[:500]})


def report(
    records: Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike | None = None,
    format: str = "html",
    max_thumbnails: int = 200,
    max_rows: int = 1000,
    image_root: Sequence[str | os.PathLike] = (),
    title: str | None = None,
) -> dict[str, Any]:
    """Write a report over scan and/or answer record files and return its summary numbers.

    Parameters
    ----------
    records : JSONL or Parquet files of scan records and/or answer records; the kind of each file
        is told from its records' fields. Several scan files give one section each (e.g. an ``ot``
        and a ``global`` run side by side); answer files are pooled.
    out : output file, ``"-"`` for stdout. Default: ``report.html`` for HTML, stdout for md/json.
        Written atomically (temp file + rename); never one of the inputs.
    format : ``"html"`` (self-contained page, no network requests), ``"md"`` or ``"json"``.
    max_thumbnails, max_rows : caps per table (the most severe items are kept; the page says so).
    image_root : folders that thumbnails may be read from (records are untrusted, so a record cannot
        pull an arbitrary file into a report). Default: the current folder and the records' folders.
    title : page / document title.

    Returns
    -------
    dict : the JSON summary (what ``format="json"`` writes).

    Raises
    ------
    ConfigError : bad format, caps or output path (nothing written).
    InputError : a records file is missing or unreadable (nothing written).
    """
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if max_thumbnails < 0 or max_rows < 0:
        raise ConfigError("--max-thumbnails and --max-rows must be ≥ 0")
    paths = [Path(p) for p in records]
    if not paths:
        raise ConfigError("no record files given")
    for p in paths:
        if not p.is_file():
            raise InputError(f"{p}: no such file" if not p.exists() else f"{p}: not a regular file")
    out_s = str(out) if out is not None else ("report.html" if format == "html" else "-")
    if out_s != "-":
        _check_out(Path(out_s), paths)
    data = collect(paths, max_rows=max_rows, max_thumbnails=max_thumbnails)
    summary = build_summary(data, title=title)
    if format == "json":
        text = json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    elif format == "md":
        text = render_markdown(summary, data)
    else:
        from guardalign.reporting.html import render_html

        roots = [Path(r) for r in image_root] or [Path.cwd(), *{p.resolve().parent for p in paths}]
        text = render_html(summary, data, image_roots=roots)
    if out_s == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(Path(out_s), text)
    return summary


def _check_out(out: Path, inputs: list[Path]) -> None:
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name")
    if out.exists() and any(os.path.samefile(out, p) for p in inputs):
        raise ConfigError(f"--out {out} is one of the inputs; refusing to overwrite it")
    if not out.resolve().parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.resolve().parent} does not exist")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- reading


def _iter_file(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (where, record or None, error or None) for each record of a JSONL or Parquet file."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with f:
        if f.read(4) == b"PAR1" or path.suffix.lower() in (".parquet", ".pq"):
            f.close()
            yield from _iter_parquet(path)
            return
        f.seek(0)
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield f"line {n}", json.loads(raw), None
            except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                yield f"line {n}", None, f"invalid JSON: {exc}"


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    from guardalign.io.sinks import read_records

    n = 0
    try:
        for n, rec in enumerate(read_records(str(path))):
            yield f"row {n}", rec, None
    except Exception as exc:  # a corrupt file part-way: list it, keep the rows read so far
        yield f"row {n}", None, f"unreadable Parquet: {type(exc).__name__}: {exc}"


def _kind(sample: list[Any]) -> str | None:
    dicts = [r for r in sample if isinstance(r, dict)]
    score = {kind: sum(len(keys & r.keys()) for r in dicts)
             for kind, keys in (("scan", _SCAN_KEYS), ("answers", _ANSWER_KEYS), ("probe", _PROBE_KEYS))}
    best = max(score.values())
    winners = [k for k, v in score.items() if v == best]
    return winners[0] if best and len(winners) == 1 else None


def collect(paths: Sequence[Path], *, max_rows: int = 1000, max_thumbnails: int = 200) -> Collected:
    """Read and validate every record of every file (one pass, bounded memory)."""
    data = Collected(max_rows, max_thumbnails)
    for path in paths:
        name, before = str(path), data.malformed_count
        it = _iter_file(path)
        head: list[tuple[str, Any, str | None]] = []
        dicts = 0
        for item in it:
            head.append(item)
            dicts += isinstance(item[1], dict)
            if dicts >= _SNIFF or len(head) >= _SNIFF_MAX:
                break
        kind = _kind([r for _, r, _ in head])
        entry = {"path": name, "kind": kind or "unknown", "read": 0, "malformed": 0}
        data.inputs.append(entry)
        if not head:
            entry["kind"] = "empty"
            continue
        if kind is None:  # list what was wrong with the first records, then give up on the file
            for where, _, err in head:
                if err is not None:
                    data.bad(name, where, err)
            data.bad(name, "file", "not used: cannot tell scan records from answer or probe records (no known fields"
                     f" in the first {len(head)} records)")
            entry.update(read=len(head), malformed=data.malformed_count - before)
            continue
        if kind == "scan":
            sink: Any = ScanRun(name, path.resolve().parent, data.max_rows, data.max_thumbnails)
            data.scans.append(sink)
        elif kind == "probe":
            from guardalign.reporting.probe_stats import ProbePool, check_probe

            sink = data.probe = data.probe or ProbePool(data.max_rows)
        else:
            if data.answers is None:
                data.answers = AnswerPool(data.max_rows)
            sink = data.answers
        check = {"scan": check_scan, "answers": check_answer}.get(kind) or check_probe
        for where, rec, err in _chain(head, it):
            entry["read"] += 1
            if err is None:
                try:
                    sink.add(check(rec), rec)
                    continue
                except Bad as exc:
                    err = str(exc)
            data.bad(name, where, err)
        entry["malformed"] = data.malformed_count - before
    return data


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


# --------------------------------------------------------------------------- summary


def build_summary(data: Collected, *, title: str | None = None) -> dict[str, Any]:
    """The summary numbers every format shows (the JSON format writes exactly this)."""
    return {
        "report_version": REPORT_VERSION,
        "title": title or "guardalign report",
        "generated_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "inputs": data.inputs,
        "malformed": {"count": data.malformed_count, "items": data.malformed},
        "scan": [run.summary() for run in data.scans],
        "answers": data.answers.summary() if data.answers is not None else None,
        "probe": data.probe.summary() if data.probe is not None else None,
        "limits": {"max_rows": data.max_rows, "max_thumbnails": data.max_thumbnails, "max_listed": MAX_LISTED},
    }


# --------------------------------------------------------------------------- markdown


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


def render_markdown(summary: dict[str, Any], data: Collected) -> str:
    """A Markdown summary for CI logs and pull-request comments (same numbers as HTML and JSON)."""
    out = [f"# {md_cell(summary['title'])}", "", f"Generated {summary['generated_at']}.", ""]
    out += _md_table(["input", "kind", "records read", "malformed"], [
        [md_cell(i["path"]), i["kind"], fmt_int(i["read"]), fmt_int(i["malformed"])] for i in summary["inputs"]])
    for run, coll in zip(summary["scan"], data.scans):
        out += _md_scan(run, coll.rows())
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
