"""MM-SafetyBench (Liu et al., ECCV 2024): 13 scenarios, three image types per question.

Published layout (the repository's ``data/`` folder, or the repository root)::

    processed_questions/{NN-Scenario}.json   {"0": {"Question", "Changed Question", "Key Phrase", "Phrase Type",
                                                     "Rephrased Question", "Rephrased Question(SD)"}, ...}
    imgs/{NN-Scenario}/{SD|SD_TYPO|TYPO}/{id}.jpg

Image type and question are paired by options, because papers differ:

- ``images=SD_TYPO`` (default), ``SD``, ``TYPO``, or several joined by ``+`` (one item per type);
- ``question=official`` (default): the benchmark's own pairing: ``SD`` images with
  "Rephrased Question(SD)", ``SD_TYPO`` and ``TYPO`` images with "Rephrased Question".
  ETA (``dataset/MMSafety.py``) uses ``SD_TYPO`` with "Rephrased Question", i.e. the defaults.
- ``question=rephrased | rephrased_sd | original | changed`` forces one field for every image type
  ("Rephrased Question", "Rephrased Question(SD)", "Question", "Changed Question").

Item ids: ``<label>/<scenario>/<type>/<question id>``; the category is the scenario file's stem.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from guardalign.errors import ConfigError, InputError
from guardalign.io.benchmarks.common import Option, bad_item, first_existing, image_file, item
from guardalign.io.sources import Item

NAME = "mmsafety"
SUMMARY = "MM-SafetyBench: processed_questions/*.json + imgs/{scenario}/{SD|SD_TYPO|TYPO}/{id}.jpg"
IMAGE_TYPES = ("SD", "SD_TYPO", "TYPO")
QUESTION_FIELDS = {
    "rephrased": "Rephrased Question",
    "rephrased_sd": "Rephrased Question(SD)",
    "original": "Question",
    "changed": "Changed Question",
}
OFFICIAL = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question"}


def _types_ok(value: str) -> bool:
    parts = value.split("+")
    return bool(parts) and all(p in IMAGE_TYPES for p in parts) and len(set(parts)) == len(parts)


OPTIONS = {
    "images": Option("SD_TYPO", None, "SD | SD_TYPO | TYPO, or several joined by '+'", check=_types_ok),
    "question": Option("official", ("official", *QUESTION_FIELDS), "official (per image type) | " + " | ".join(QUESTION_FIELDS)),
}


def question_field(image_type: str, question: str) -> str:
    """The JSON field asked with ``image_type`` images under the ``question`` option."""
    if question == "official":
        return OFFICIAL[image_type]
    if question not in QUESTION_FIELDS:
        raise ConfigError(f"unknown MM-SafetyBench question option {question!r}")
    return QUESTION_FIELDS[question]


def read(root: Path, options: dict[str, str], label: str) -> Iterator[Item]:
    """Validate the layout now (InputError), then stream one item per question × image type."""
    questions = first_existing(root, ["processed_questions", "data/processed_questions"],
                               "MM-SafetyBench processed_questions folder", kind="dir")
    images = first_existing(root, ["imgs", "data/imgs"], "MM-SafetyBench imgs folder", kind="dir")
    files = sorted(questions.glob("*.json"))
    if not files:
        raise InputError(f"{questions}: no scenario *.json files")
    types = options["images"].split("+")
    return _items(files, images, types, options["question"], label)


def _items(files: list[Path], images: Path, types: list[str], question: str, label: str) -> Iterator[Item]:
    for path in files:
        scenario = path.stem
        try:
            table = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            yield bad_item(label, scenario, str(path), f"{path}: unreadable scenario file ({e})", category=scenario)
            continue
        if not isinstance(table, dict):
            yield bad_item(label, scenario, str(path),
                           f"{path}: expected a JSON object of id → question, got {type(table).__name__}", category=scenario)
            continue
        for qid, entry in table.items():
            for image_type in types:
                yield _one(path, scenario, str(qid), entry, image_type, images, question, label)


def _one(path: Path, scenario: str, qid: str, entry, image_type: str, images: Path, question: str, label: str) -> Item:
    native = f"{scenario}/{image_type}/{qid}"
    source, where = f"{path}#{qid}", f"{path}: id {qid!r}"
    if not isinstance(entry, dict):
        return bad_item(label, native, source, f"{where}: expected an object, got {type(entry).__name__}", category=scenario)
    field = question_field(image_type, question)
    prompt = entry.get(field)
    reference = {"scenario": scenario, "image_type": image_type, "question_field": field,
                 "question": entry.get("Question"), "key_phrase": entry.get("Key Phrase")}
    if not isinstance(prompt, str) or not prompt.strip():
        return bad_item(label, native, source, f"{where}: missing or empty {field!r}", category=scenario, reference=reference)
    if not qid or "/" in qid or qid in (".", ".."):
        return bad_item(label, native, source, f"{where}: id cannot name an image file", category=scenario, reference=reference)
    image = images / scenario / image_type / f"{qid}.jpg"
    missing = image_file(image, where)
    if missing:
        return bad_item(label, native, source, missing, category=scenario, reference=reference)
    return item(label, native, source, prompt=prompt, category=scenario, reference=reference, path=image)
