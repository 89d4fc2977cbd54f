"""Mask runs in ``guardalign report``: the ``manifest.jsonl`` that ``guardalign mask`` writes in its --out-dir.

A manifest is told from scan and answer records by its own fields (``output``, ``fill``, ``dilate`` …,
see ``guardalign.records.MASK_ENTRY``). :func:`check_mask` validates one untrusted entry; :class:`MaskRun`
counts entries by status, fill and category in one pass, and keeps the first error entries.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from guardalign.reporting.stats import MAX_LISTED, Bad, _common_id, _cut, _get, rate

STATUSES = ("purified", "copied", "skipped", "exists", "error")  # guardalign.records.MASK_ENTRY
KEYS = frozenset({"output", "fill", "dilate", "sanitized", "overlay", "image_file", "row"})  # only manifests have these


def check_mask(rec: Any) -> dict[str, Any]:
    """Validated fields of a mask manifest entry, or raise Bad naming the field."""
    out = _common_id(rec)
    status = _get(rec, "status", "str")
    if status not in STATUSES:
        raise Bad(f"field 'status' must be one of {', '.join(STATUSES)}, got {status!r}"[:200])
    out["status"] = status
    out["source"] = _cut(_get(rec, "source", "str?", optional=True), 1024)
    out["error"] = _cut(_get(rec, "error", "str?", optional=True), 500)
    out["verdict"] = _cut(_get(rec, "verdict", "str?", optional=True))
    out["category"] = _cut(_get(rec, "category", "str?", optional=True))
    out["output"] = _cut(_get(rec, "output", "str?", optional=True), 1024)
    out["fill"] = _cut(_get(rec, "fill", "str?", optional=True))
    dilate = _get(rec, "dilate", "num?", optional=True)
    out["dilate"] = None if dilate is None else int(dilate)
    boxes = _get(rec, "boxes", "list?", optional=True) or []
    out["boxes"] = len(boxes)
    return out


class MaskRun:
    """Statistics of one mask manifest."""

    def __init__(self, path: str) -> None:
        self.path = path  # the manifest file
        self.n = 0  # entries read (valid ones)
        self.status: Counter = Counter()  # status → entries
        self.fills: Counter = Counter()  # fill → entries that name one
        self.dilates: Counter = Counter()  # dilate → entries that name one
        self.purified_by_category: Counter = Counter()  # category → purified entries
        self.boxes = 0  # masked boxes over all purified entries
        self.errors: list[dict[str, Any]] = []  # first MAX_LISTED error entries
        self.error_count = 0  # all error entries

    def add(self, f: dict[str, Any], raw: dict[str, Any]) -> None:
        self.n += 1
        self.status[f["status"]] += 1
        if f["fill"] is not None:
            self.fills[f["fill"]] += 1
        if f["dilate"] is not None:
            self.dilates[f["dilate"]] += 1
        if f["status"] == "purified":
            self.purified_by_category[f["category"] or "(none)"] += 1
            self.boxes += f["boxes"]
        if f["status"] == "error":
            self.error_count += 1
            if len(self.errors) < MAX_LISTED:
                self.errors.append({"id": f["id"], "source": f["source"], "error": f["error"] or "(no message)"})

    def summary(self) -> dict[str, Any]:
        with_output = self.status["purified"] + self.status["copied"]
        return {
            "path": self.path, "records": self.n, "by_status": {s: self.status.get(s, 0) for s in STATUSES},
            "written": with_output, "written_rate": rate(with_output, self.n),
            "fills": dict(self.fills.most_common()), "dilate": {str(k): v for k, v in self.dilates.most_common()},
            "boxes_filled": self.boxes, "purified_by_category": dict(sorted(self.purified_by_category.items())),
            "error_items": {"count": self.error_count, "items": self.errors},
        }


def mask_fields(run: dict[str, Any], esc) -> list[tuple[str, str]]:
    """(label, formatted value) rows of a mask run's summary table; shared by Markdown and HTML."""
    from guardalign.reporting.stats import fmt_int, fmt_rate

    by = run["by_status"]
    return [
        ("entries", fmt_int(run["records"])),
        ("written", f"{fmt_int(run['written'])} ({fmt_rate(run['written_rate'])}): {fmt_int(by['purified'])} purified, "
                    f"{fmt_int(by['copied'])} copied unchanged"),
        ("skipped", f"{fmt_int(by['skipped'])} (safe, with --only-unsafe)"),
        ("exists", f"{fmt_int(by['exists'])} (an existing output was kept)"),
        ("errors", fmt_int(by["error"])),
        ("boxes filled", fmt_int(run["boxes_filled"])),
        ("fill", esc(", ".join(f"{k} ×{fmt_int(v)}" for k, v in run["fills"].items()) or "—")),
        ("dilate", esc(", ".join(f"{k} px ×{fmt_int(v)}" for k, v in run["dilate"].items()) or "—")),
    ]
