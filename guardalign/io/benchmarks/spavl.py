"""SPA-VL test split (Zhang et al., 2024), as published on the Hugging Face hub (``sqrtizhang/SPA-VL``).

Published layout: Parquet files ``test/harm-00000-of-00001.parquet`` (and ``test/help-...``) with columns
``image`` (HF Image: ``struct<bytes, path>``), ``question``, ``class1``, ``class2``, ``class3``.
ETA evaluates USR on ``harm`` and helpfulness on ``help``.

``NAME:DIR`` takes the Parquet file itself or a folder searched recursively for ``{subset}-*.parquet``.
Options: ``subset=harm`` (default) | ``help``; ``category=class1`` (default) | ``class2`` | ``class3``.
Rows are read batch by batch; the image bytes stay in the item (``Item.data``). Ids: ``<label>/<subset>/<row>``
(the file name joins the row when several files match).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from guardalign.io.benchmarks.common import (
    Option, bad_item, find_parquet, image_cell, item, parquet_columns, parquet_rows, text,
)
from guardalign.io.sources import Item

NAME = "spavl"
SUMMARY = "SPA-VL test: Parquet with image, question, class1, class2, class3"
COLUMNS = ("image", "question", "class1", "class2", "class3")
OPTIONS = {
    "subset": Option("harm", ("harm", "help"), "harm | help"),
    "category": Option("class1", ("class1", "class2", "class3"), "class1 | class2 | class3 (the category level)"),
}


def read(root: Path, options: dict[str, str], label: str) -> Iterator[Item]:
    """Check every file's columns now (InputError), then stream the rows."""
    files = find_parquet(root, f"{options['subset']}-*.parquet", "SPA-VL")
    for f in files:
        parquet_columns(f, COLUMNS)
    return _items(files, options, label)


def _items(files: list[Path], options: dict[str, str], label: str) -> Iterator[Item]:
    subset, level = options["subset"], options["category"]
    for f in files:
        prefix = f"{subset}/" if len(files) == 1 else f"{subset}/{f.stem}/"
        for row, rec, error in parquet_rows(f, COLUMNS):
            native, source = f"{prefix}{row}", f"{f}#{row}"
            if error:
                yield bad_item(label, native, source, error)
                continue
            reference = {"subset": subset, **{c: rec[c] for c in ("class1", "class2", "class3")}}
            category = text(rec[level]) or "(none)"
            data, path, err = image_cell(rec["image"], f.parent, source)
            question = text(rec["question"])
            if question is None:
                err = err or f"{source}: empty question"
            if err:
                yield bad_item(label, native, source, err, category=category, reference=reference)
                continue
            yield item(label, native, source, prompt=question, category=category, reference=reference, path=path, data=data)
