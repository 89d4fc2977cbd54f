"""Generic prompts JSONL: the file ``guardalign answer`` reads (DESIGN §3), as a benchmark.

One JSON object per line: ``{"id", "image" (path relative to the JSONL file), "prompt", optional
"category"}``; any other keys go to the item's reference. Blank lines are skipped; a malformed line,
a missing field, a duplicate id or a missing image becomes an error item naming the file and the line.
Lines are read one at a time. ``NAME:FILE`` takes the JSONL file (or a folder holding ``prompts.jsonl``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from guardalign.errors import InputError
from guardalign.io.benchmarks.common import bad_item, first_existing, image_file, item
from guardalign.io.sources import Item

NAME = "prompts"
SUMMARY = "generic prompts JSONL: {id, image, prompt, category?} per line, as `answer` reads"
OPTIONS: dict = {}
NO_CATEGORY = "(none)"


def read(root: Path, options: dict[str, str], label: str) -> Iterator[Item]:
    """Open the file now (InputError if it cannot be read), then stream one item per non-blank line."""
    path = root if root.is_file() else first_existing(root, ["prompts.jsonl"], "prompts JSONL")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read prompts file {path}: {e}") from None
    return _items(f, path, label)


def _items(f, path: Path, label: str) -> Iterator[Item]:
    from guardalign.io.jsonl import iter_lines

    first: dict[str, int] = {}
    with f:
        for line in iter_lines(f):  # the shared JSONL reader: BOM dropped, blank lines skipped, bad lines as values
            yield _line(line, path, label, first)


def _line(line, path: Path, label: str, first: dict[str, int]) -> Item:
    n = line.n
    where, source, fallback = f"{path}:{n}", f"{path}#{n}", f"line{n}"
    if line.error is not None:
        return bad_item(label, fallback, source, f"{where}: {line.error}")
    obj = line.value
    if not isinstance(obj, dict):
        return bad_item(label, fallback, source, f"{where}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) else None
    category = obj.get("category") if isinstance(obj.get("category"), str) and obj.get("category") else NO_CATEGORY
    reference = {k: v for k, v in obj.items() if k not in ("id", "prompt", "image", "category")}
    fields = {"id": rid, "prompt": obj.get("prompt"), "image": obj.get("image")}
    missing = [k for k, v in fields.items() if not isinstance(v, str) or not v]
    if missing:
        detail = ", ".join(f"'{k}'" + ("" if k not in obj else " (empty or not a string)") for k in missing)
        return bad_item(label, rid or fallback, source, f"{where}: missing field {detail}", category=category, reference=reference)
    if rid in first:
        return bad_item(label, fallback, source, f"{where}: duplicate id {rid!r} (first used on line {first[rid]})",
                        category=category, reference=reference)
    first[rid] = n
    image = Path(obj["image"])
    image = image if image.is_absolute() else path.parent / image
    missing_image = image_file(image, where)
    if missing_image:
        return bad_item(label, rid, source, missing_image, category=category, reference=reference)
    return item(label, rid, source, prompt=obj["prompt"], category=category, reference=reference, path=image)
