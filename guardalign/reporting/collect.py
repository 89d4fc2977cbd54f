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
from pathlib import Path
from typing import Any, Iterator, Sequence

from guardalign.errors import ConfigError, InputError
from guardalign.reporting.fields import answer_fields, rate_rows, scan_fields  # noqa: F401 (re-exported)
from guardalign.reporting.manifests import KEYS as _MASK_KEYS
from guardalign.reporting.manifests import MaskRun, check_mask
from guardalign.reporting.markdown import md_cell, render_markdown  # noqa: F401 (re-exported)
from guardalign.reporting.answers import AnswerPool, check_answer
from guardalign.reporting.stats import (  # noqa: F401 (fmt_* re-exported)
    MAX_LISTED, Bad, ScanRun, check_scan, fmt_int, fmt_num, fmt_rate,
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
        self.masks: list[MaskRun] = []  # one per mask manifest, in argument order
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
    blur: bool = True,
) -> dict[str, Any]:
    """Write a report over scan, answer and mask-manifest files and return its summary numbers.

    Parameters
    ----------
    records : JSONL or Parquet files of scan records, answer records or a mask ``manifest.jsonl``; the
        kind of each file is told from its records' fields. Several scan files give one section each
        (e.g. an ``ot`` and a ``global`` run side by side); answer files are pooled, each row naming its
        file; each mask manifest gives a mask-run section.
    out : output file, ``"-"`` for stdout. Default: ``report.html`` for HTML, stdout for md/json.
        Written atomically (temp file + rename); never one of the inputs.
    format : ``"html"`` (self-contained page, no network requests), ``"md"`` or ``"json"``.
    max_thumbnails, max_rows : caps per table (the most severe items are kept; the page says so).
    image_root : folders that thumbnails may be read from (records are untrusted, so a record cannot
        pull an arbitrary file into a report). Default: the current folder and the records' folders.
        A relative source is looked up under each root; a thumbnail is drawn only from bytes whose
        SHA-256 matches the record's, and source links only point inside the roots.
    title : page / document title.
    blur : HTML: blur the thumbnails of unsafe items until clicked (False: ``--no-blur``).

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
    for r in image_root:
        if not Path(r).is_dir():
            raise ConfigError(f"--image-root {r}: no such folder")
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
        text = render_html(summary, data, image_roots=roots, blur=blur)
    if out_s == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(Path(out_s), text)
    return summary


def _check_out(out: Path, inputs: list[Path]) -> None:
    from guardalign.io.durable import check_not_input, special_target

    if special_target(out):  # /dev/null, /dev/stdout: written directly
        return
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name")
    check_not_input(out, inputs, what="--out")
    if not out.resolve().parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.resolve().parent} does not exist")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`guardalign.io.durable.atomic_write`; OutputError, exit 5)."""
    from guardalign.io.durable import atomic_write

    atomic_write(path, text)


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
        from guardalign.io.jsonl import iter_lines

        for line in iter_lines(f):
            yield f"line {line.n}", line.value, line.error


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    from guardalign.io.sinks import read_records

    n = 0
    try:
        for n, rec in enumerate(read_records(str(path))):
            yield f"row {n}", rec, None
    except Exception as exc:  # a corrupt file part-way: list it, keep the rows read so far
        yield f"row {n}", None, f"unreadable Parquet: {type(exc).__name__}: {exc}"


def _kind(sample: list[Any]) -> str | None:
    """"scan", "answers" or "mask" (a mask manifest.jsonl), by which kind's own fields the records have most."""
    dicts = [r for r in sample if isinstance(r, dict)]
    score = {kind: sum(len(keys & r.keys()) for r in dicts)
             for kind, keys in (("scan", _SCAN_KEYS), ("answers", _ANSWER_KEYS), ("mask", _MASK_KEYS),
                                ("probe", _PROBE_KEYS))}
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
            data.bad(name, "file", "not used: cannot tell scan records, answer records, probe records and mask "
                     f"manifest entries apart (no known fields in the first {len(head)} records)")
            entry.update(read=len(head), malformed=data.malformed_count - before)
            continue
        if kind == "scan":
            sink: Any = ScanRun(name, path.resolve().parent, data.max_rows, data.max_thumbnails)
            data.scans.append(sink)
        elif kind == "mask":
            sink = MaskRun(name)
            data.masks.append(sink)
        elif kind == "probe":
            from guardalign.reporting.probe_stats import ProbePool, check_probe

            sink = data.probe = data.probe or ProbePool(data.max_rows)
        else:
            if data.answers is None:
                data.answers = AnswerPool(data.max_rows)
            sink = data.answers
        check = {"scan": check_scan, "mask": check_mask, "answers": check_answer}.get(kind) or check_probe
        for where, rec, err in _chain(head, it):
            entry["read"] += 1
            if err is None:
                try:
                    fields = check(rec)
                    if kind == "answers":
                        fields["file"] = name  # which run the row came from
                    sink.add(fields, rec)
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
        "mask": [run.summary() for run in data.masks],
        "probe": data.probe.summary() if data.probe is not None else None,
        "limits": {"max_rows": data.max_rows, "max_thumbnails": data.max_thumbnails, "max_listed": MAX_LISTED},
    }
