"""JailBreakV-28K (Luo et al., 2024), as published on the Hugging Face hub (``JailbreakV-28K/JailBreakV-28k``).

Published layout::

    JailBreakV_28K/JailBreakV_28K.csv        id, jailbreak_query, redteam_query, format, policy, image_path,
    JailBreakV_28K/mini_JailBreakV_28K.csv   from, selected_mini, transfer_from_llm
    JailBreakV_28K/<image_path>              images, paths relative to the CSV's folder

``NAME:DIR`` takes the CSV itself, the ``JailBreakV_28K`` folder, or the dataset root. The prompt is
``jailbreak_query``; the category is ``policy``; the reference keeps ``redteam_query``, ``format`` and
``from``. Options: ``subset=full`` (default) | ``mini``; ``format=`` one attack format, or ``all`` (default).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from guardalign.io.benchmarks.common import (
    Option, bad_item, csv_rows, first_existing, image_file, item, safe_join, text,
)
from guardalign.io.sources import Item

NAME = "jailbreakv"
SUMMARY = "JailBreakV-28K: JailBreakV_28K.csv + images relative to it"
COLUMNS = ("id", "jailbreak_query", "redteam_query", "format", "policy", "image_path")
OPTIONS = {
    "subset": Option("full", ("full", "mini"), "full (JailBreakV_28K.csv) | mini (mini_JailBreakV_28K.csv)"),
    "format": Option("all", None, "all, or one attack format (e.g. figstep, query_related, template)",
                     check=lambda v: bool(v.strip())),
}


def read(root: Path, options: dict[str, str], label: str) -> Iterator[Item]:
    """Open the CSV and check its header now (InputError), then stream the rows."""
    name = "JailBreakV_28K.csv" if options["subset"] == "full" else "mini_JailBreakV_28K.csv"
    table = root if root.is_file() else first_existing(root, [name, f"JailBreakV_28K/{name}"], "JailBreakV-28K CSV")
    rows = csv_rows(table, COLUMNS)
    return _items(rows, table, options["format"], label)


def _items(rows, table: Path, fmt: str, label: str) -> Iterator[Item]:
    for line, row, error in rows:
        source, where = f"{table}#{line}", f"{table}:{line}"
        if error:
            yield bad_item(label, f"line{line}", source, error)
            continue
        if fmt != "all" and row["format"] != fmt:
            continue
        native = row["id"].strip() or f"line{line}"
        reference = {"redteam_query": row["redteam_query"], "format": row["format"], "from": row.get("from"),
                     "image_path": row["image_path"]}
        category = row["policy"].strip() or "(none)"
        prompt = text(row["jailbreak_query"])
        if prompt is None:
            yield bad_item(label, native, source, f"{where}: empty jailbreak_query", category=category, reference=reference)
            continue
        path, err = safe_join(table.parent, row["image_path"].strip(), where)
        err = err or image_file(path, where)
        if err:
            yield bad_item(label, native, source, err, category=category, reference=reference)
            continue
        yield item(label, native, source, prompt=prompt, category=category, reference=reference, path=path)
