"""VLGuard test set (Zong et al., ICML 2024).

Published layout (``ys-zong/VLGuard`` on GitHub or the Hugging Face dataset)::

    test.json    [{"id", "image": "bad_ads/....png", "safe": bool, "harmful_category", "harmful_subcategory",
                   "instr-resp": [{"safe_instruction"|"unsafe_instruction"|"instruction": str, "response": str}, ...]}]
    test/        the images (``test.zip`` unpacked), ``image`` paths are relative to it

Subsets, as ``VLGuard_eval.py --dataset`` defines them:

- ``unsafes`` (default): unsafe images (``safe: false``) with their ``instruction``;
- ``safe_unsafes``: safe images with their ``unsafe_instruction``;
- ``safe_safes``: safe images with their ``safe_instruction`` (a helpfulness check; no ASR);
- ``all``: the three, one item per (image, subset).

The category is ``harmful_category`` for unsafe images and the subset name for safe ones; the
reference keeps the subset, the subcategory and VLGuard's reference response.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from guardalign.errors import InputError
from guardalign.io.benchmarks.common import Option, bad_item, first_existing, image_file, item, safe_join
from guardalign.io.sources import Item

NAME = "vlguard"
SUMMARY = "VLGuard: test.json + test/<image>"
SUBSETS = ("unsafes", "safe_unsafes", "safe_safes")
OPTIONS = {"subset": Option("unsafes", (*SUBSETS, "all"), "unsafes | safe_unsafes | safe_safes | all")}
_KEY = {"unsafes": "instruction", "safe_unsafes": "unsafe_instruction", "safe_safes": "safe_instruction"}


def read(root: Path, options: dict[str, str], label: str) -> Iterator[Item]:
    """Parse ``test.json`` now (InputError if it is missing or not a JSON list), then stream the items."""
    if root.is_file():
        meta, base = root, root.parent
    else:
        meta = first_existing(root, ["test.json", "data/test.json"], "VLGuard test.json")
        base = meta.parent
    images = first_existing(base, ["test", "VLGuard/test", ""], "VLGuard image folder", kind="dir")
    try:
        records = json.loads(meta.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"cannot read {meta}: {e}") from None
    if not isinstance(records, list):
        raise InputError(f"{meta}: expected a JSON list of records, got {type(records).__name__}")
    subsets = SUBSETS if options["subset"] == "all" else (options["subset"],)
    return _items(records, meta, images, subsets, label)


def _items(records: list, meta: Path, images: Path, subsets: tuple[str, ...], label: str) -> Iterator[Item]:
    for index, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("safe"), bool):  # one error, whatever the subsets
            yield _malformed(rec, index, subsets[0], meta, label)
            continue
        for subset in subsets:
            if rec["safe"] != (subset == "unsafes"):  # the image belongs to this subset
                yield _one(rec, index, subset, meta, images, label)


def _malformed(rec, index: int, subset: str, meta: Path, label: str) -> Item:
    where, source = f"{meta}: record {index}", f"{meta}#{index}"
    if not isinstance(rec, dict):
        return bad_item(label, f"{subset}/#{index}", source, f"{where}: expected an object, got {type(rec).__name__}")
    rid = _rid(rec, index)
    return bad_item(label, f"{subset}/{rid}", source, f"{where} ({rid}): 'safe' must be true or false, got {rec.get('safe')!r}")


def _rid(rec: dict, index: int) -> str:
    rid = rec.get("id")
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) else f"#{index}"


def _one(rec: dict, index: int, subset: str, meta: Path, images: Path, label: str) -> Item:
    where, source = f"{meta}: record {index}", f"{meta}#{index}"
    rid = _rid(rec, index)
    native, safe = f"{subset}/{rid}", rec["safe"]
    key = _KEY[subset]
    pairs = rec.get("instr-resp")
    pair = next((p for p in pairs if isinstance(p, dict) and key in p), {}) if isinstance(pairs, list) else {}
    prompt, response = pair.get(key), pair.get("response")
    category = rec.get("harmful_category") if subset == "unsafes" else subset
    category = category if isinstance(category, str) and category else "(none)"
    reference = {"subset": subset, "safe": safe, "harmful_subcategory": rec.get("harmful_subcategory"),
                 "image": rec.get("image"), "reference_response": response}
    if not isinstance(prompt, str) or not prompt.strip():
        return bad_item(label, native, source, f"{where} ({rid}): no {key!r} in 'instr-resp'",
                        category=category, reference=reference)
    path, err = safe_join(images, rec.get("image"), f"{where} ({rid})")
    err = err or image_file(path, f"{where} ({rid})")
    if err:
        return bad_item(label, native, source, err, category=category, reference=reference)
    return item(label, native, source, prompt=prompt, category=category, reference=reference, path=path)
