"""Image–text pairs for ``guardalign probe``: a JSONL file, or a FigStep SafeBench folder.

- JSONL: one ``{"id", "image", "text", "prompt"?, "category"?}`` object per line; ``image`` is a path relative
  to the file's folder (stdin: the current folder), ``text`` the equivalent text (a caption, or the text a
  typographic image shows), ``prompt`` the question asked with the image (default: the run's ``--prompt``).
- FigStep (``--format figstep DIR``): ``DIR/data/question/safebench.csv`` with the columns ``dataset,
  category_id, task_id, category_name, question, instruction``; each row's image is
  ``DIR/data/images/SafeBench/query_{dataset}_{category_id}_{task_id}_6.png`` and its text the ``instruction``
  that the image renders.

A bad line or row becomes a :class:`Pair` with ``error`` set (naming the file and line), never an exception;
only a file that cannot be read at all raises InputError (exit 2).
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from guardalign.errors import InputError

INPUT_FORMATS = ("jsonl", "figstep")
FIGSTEP_CSV = Path("data") / "question" / "safebench.csv"
FIGSTEP_IMAGES = Path("data") / "images" / "SafeBench"
FIGSTEP_COLUMNS = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")
_FIGSTEP_PART = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # a file-name part: no separators, no traversal
MAX_TEXT_CHARS = 20000  # per text / prompt


@dataclass(frozen=True)
class Pair:
    id: str  # the pair's id ("<file>#<line>" when the line has none)
    where: str  # "<file>:<line>" for messages
    image: str | None  # the image path as written (JSONL) or as built (FigStep)
    path: Path | None  # the image path resolved against the input's folder
    text: str | None  # the equivalent text (caption / the text the image shows)
    prompt: str | None  # the question asked with the image; None = the run's default
    category: str | None  # optional category
    error: str | None = None  # why the pair cannot be probed (names file and line)


def read_pairs(source: str | Path, *, format: str = "jsonl", stdin: TextIO | None = None) -> list[Pair]:
    """Read the pairs of a JSONL file (``"-"``: stdin) or of a FigStep folder (``format="figstep"``)."""
    if format == "figstep":
        return read_figstep(source)
    if format != "jsonl":
        raise InputError(f"unknown input --format {format!r}: expected one of {', '.join(INPUT_FORMATS)}")
    if str(source) == "-":
        data = (stdin or sys.stdin).read()
        raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        return _parse_jsonl(raw, "<stdin>", Path.cwd())
    path = Path(source)
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass a JSONL file, or --format figstep for a FigStep checkout")
    if not path.is_file():
        raise InputError(f"pairs file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read pairs file {path}: {e.strerror or e}") from None
    return _parse_jsonl(raw, str(path), path.parent)


def _parse_jsonl(raw: bytes, name: str, base: Path) -> list[Pair]:
    pairs: list[Pair] = []
    first: dict[str, int] = {}
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        pair = _parse_line(line, n, name, base)
        if pair.error is None and pair.id in first:
            pair = _bad(f"{name}#{n}", f"{name}:{n}", f"duplicate id {pair.id!r} (first used on line {first[pair.id]})")
        elif pair.error is None:
            first[pair.id] = n
        pairs.append(pair)
    return pairs


def _bad(pid: str, where: str, error: str, category: str | None = None) -> Pair:
    return Pair(pid, where, None, None, None, None, category, f"{where}: {error}")


def _text(obj: dict, key: str) -> str | None:
    v = obj.get(key)
    return v if isinstance(v, str) and v.strip() else None


def _parse_line(raw: bytes, n: int, name: str, base: Path) -> Pair:
    where, fallback = f"{name}:{n}", f"{name}#{n}"
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except RecursionError:
        return _bad(fallback, where, "JSON nested too deeply")
    except UnicodeDecodeError as e:
        return _bad(fallback, where, f"not UTF-8 ({e})")
    except ValueError as e:
        return _bad(fallback, where, f"malformed JSON ({e})")
    if not isinstance(obj, dict):
        return _bad(fallback, where, f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) else None
    category = obj.get("category") if isinstance(obj.get("category"), str) else None
    image, text, prompt = _text(obj, "image"), _text(obj, "text"), _text(obj, "prompt")
    missing = [k for k, v in (("id", rid), ("image", image), ("text", text)) if v is None]
    if "prompt" in obj and obj["prompt"] is not None and prompt is None:
        missing.append("prompt")
    if missing:
        detail = ", ".join(f"'{k}'" + ("" if k not in obj else " (empty or not a string)") for k in missing)
        return _bad(rid or fallback, where, f"missing field {detail}", category)
    for key, value in (("text", text), ("prompt", prompt)):
        if value is not None and len(value) > MAX_TEXT_CHARS:
            return _bad(rid, where, f"field '{key}' has {len(value)} characters; at most {MAX_TEXT_CHARS}", category)
    if "\0" in image:
        return _bad(rid, where, "field 'image' contains a NUL byte", category)
    path = Path(image)
    return Pair(rid, where, image, path if path.is_absolute() else base / path, text, prompt, category)


def read_figstep(folder: str | Path) -> list[Pair]:
    """The pairs of a FigStep checkout: every row of ``data/question/safebench.csv`` with its image.

    Raises InputError when the folder or the CSV is missing, unreadable, or lacks a column.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"--format figstep expects the FigStep folder (holding {FIGSTEP_CSV}); {root} is not a folder")
    csv_path = root / FIGSTEP_CSV
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: not found; --format figstep expects the FigStep repository layout")
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise InputError(f"cannot read {csv_path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{csv_path}: not UTF-8 ({e})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in FIGSTEP_COLUMNS if c not in header]
    if missing:
        raise InputError(f"{csv_path}:1: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                         f"(expected {', '.join(FIGSTEP_COLUMNS)})")
    reader.fieldnames = header
    pairs: list[Pair] = []
    try:
        for row in reader:
            pairs.append(_figstep_row(row, reader.line_num, str(csv_path), root))
    except csv.Error as e:
        pairs.append(_bad(f"{csv_path}#{reader.line_num}", f"{csv_path}:{reader.line_num}", f"malformed CSV ({e})"))
    return pairs


def _figstep_row(row: dict, line: int, name: str, root: Path) -> Pair:
    where = f"{name}:{line}"
    values = {c: (row.get(c) or "").strip() for c in FIGSTEP_COLUMNS}
    category = values["category_name"] or None
    if None in row or None in row.values():
        return _bad(f"{name}#{line}", where, "wrong number of columns", category)
    parts = [values[c] for c in ("dataset", "category_id", "task_id")]
    empty = [c for c in ("dataset", "category_id", "task_id", "instruction") if not values[c]]
    if empty:
        return _bad(f"{name}#{line}", where, f"empty column {', '.join(empty)}", category)
    bad = [p for p in parts if not _FIGSTEP_PART.match(p)]
    if bad:
        return _bad(f"{name}#{line}", where, f"dataset/category_id/task_id {bad[0]!r} cannot name an image file",
                    category)
    rel = FIGSTEP_IMAGES / f"query_{parts[0]}_{parts[1]}_{parts[2]}_6.png"
    return Pair("_".join(parts), where, rel.as_posix(), root / rel, values["instruction"], None, category)
