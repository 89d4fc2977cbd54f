"""What flows through the pipeline and what it writes, defined once.

- :class:`Item` (a source's unit of work) and :class:`Decoded` (an item with its pixels);
- the record schemas: :data:`SCAN_RECORD` (``scan``), :data:`ANSWER_RECORD` (``answer``), :data:`EVAL_RECORD` (``eval``),
  :data:`MASK_ENTRY` (``mask``'s ``manifest.jsonl``) and :data:`PROBE_RECORD` (``probe``), each a tuple of
  :class:`Field` with its type and meaning.

The Parquet schema of scan records (:func:`arrow_schema`), the fields ``mask --from-scan`` keeps, the report's
provenance columns and the reference in ``docs/records.md`` (:func:`render_reference`, checked by a test)
are all derived from these tuples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Item:
    id: str  # stable record id (folder-relative path, "file.parquet#row", --id-column value, prompt id)
    source: str  # where it came from: a file path, or "<parquet path>#<row>"
    path: Path | None = None  # image file to read (folders, lists, single files, Parquet path cells)
    data: bytes | None = None  # inline image bytes (Parquet binary or struct-bytes cells)
    error: str | None = None  # set when known bad before decoding (null cell, broken symlink, bad prompt line)
    meta: dict = field(default_factory=dict)  # folder {root, rel}; Parquet {parquet, row, column, ...}; prompt {...}


@dataclass
class Decoded:
    item: Item  # the item this came from
    image: Any  # PIL.Image.Image: RGB, EXIF-upright, first frame; None on error (or when not needed)
    info: Any  # guardalign.io.images.DecodeInfo: size, mode, format, frames, sha256; None on error
    error: str | None  # the cause when the item could not be used, else None


@dataclass(frozen=True)
class Field:
    name: str  # key in the JSON record / Parquet column name
    type: str  # arrow-style type: string, double, int32, bool, list<...>, map<string,double>, json
    doc: str  # one line: what the value means


SCAN_RECORD: tuple[Field, ...] = (
    Field("id", "string", "stable id: path relative to the input folder, `file.parquet#row`, or the --id-column value"),
    Field("source", "string", "where the image came from: its file path, or `file.parquet#row`"),
    Field("status", "string", "`ok`, or `error` when the image could not be used"),
    Field("error", "string", "the cause of an error record (names the file, row or field); null when ok"),
    Field("verdict", "string", "`safe` or `unsafe`; null for an error record"),
    Field("score", "double", "ot: lowest patch transport cost d (unsafe when ≤ τ); global: highest cosine (unsafe when ≥ θ)"),
    Field("category", "string", "the winning (most violating, or nearest) category"),
    Field("categories", "map<string,double>", "per-category image score (ot: min over patches of d_i; global: cosine)"),
    Field("unsafe_patches", "list<int32>", "indices into `patch_boxes` of the unsafe patches"),
    Field("grid", "list<int32>", "[rows, cols] of the primary patch grid"),
    Field("boxes", "list<list<int32>>", "pixel boxes [x0, y0, x1, y1] of the unsafe patches in the original image"),
    Field("patch_scores", "list<double>", "every patch's score min_i d_i(m)"),
    Field("patch_boxes", "list<list<int32>>", "every patch's pixel box"),
    Field("width", "int32", "image width after EXIF orientation"),
    Field("height", "int32", "image height after EXIF orientation"),
    Field("method", "string", "`ot` or `global`"),
    Field("patches", "string", "patch source that ran: `search`, `grid`, `dense`, or `none` (global method)"),
    Field("encodes", "int32", "image-tower forwards spent on this image (the layout's encode budget actually used)"),
    Field("model", "string", "CLIP provenance: model name and pretrained weights"),
    Field("anchors_sha256", "string", "SHA-256 of the anchor set's content (comments and layout do not count)"),
    Field("threshold", "double", "τ (ot) or θ (global) of the winning category"),
    Field("box_categories", "list<string>", "category of each unsafe patch"),
    Field("notes", "list<string>", "remarks: animated image (first frame used), EXIF rotation applied"),
    Field("elapsed_s", "double", "amortised model seconds for this image"),
    Field("sha256", "string", "SHA-256 of the image's stored bytes; `mask --from-scan` refuses an image that changed"),
    Field("image_column", "string", "Parquet inputs: the column the image was read from (`report` reads the same one); null for files"),
    Field("settings", "json", "every setting that shaped the verdict; `--resume` refuses a run whose settings differ"),
)

ANSWER_RECORD: tuple[Field, ...] = (
    Field("id", "string", "the prompt's id"),
    Field("prompt", "string", "the question as given"),
    Field("image", "string", "the image path as written in the prompt line"),
    Field("image_sha256", "string", "SHA-256 of the image bytes the model was shown (before purification)"),
    Field("category", "string", "the prompt's own category (from the prompts file)"),
    Field("status", "string", "`ok`, or `error` (bad line, unreadable image, model failure)"),
    Field("error", "string", "the cause of an error record, naming the file and line"),
    Field("response", "string", "the model's answer"),
    Field("refused", "bool", "the refusal matcher found a refusal phrase"),
    Field("judge", "json", "the judge's verdict {model, unsafe, raw, categories}, or null without --judge"),
    Field("detection", "json", "{verdict, score, category, boxes, masked_boxes, purified} of the image"),
    Field("prefix_attention", "json", "{vanilla: [...], calibrated: [...]}: mean attention mass instruction → prefix per layer"),
    Field("model", "json", "the LVLM's provenance {id, family, revision, dtype, ...}"),
    Field("generation", "json", "{max_new_tokens, new_tokens, finish, do_sample}"),
    Field("calibration", "json", "what ran: {mode, gamma, layers, prefix_at, prefix}; gamma/layers null when mode is off"),
    Field("anchors_sha256", "string", "SHA-256 of the anchor set used for detection and the prefix"),
    Field("settings", "json", "every setting that shaped the answer; `--resume` refuses a run whose settings differ"),
)

EVAL_RECORD: tuple[Field, ...] = (
    Field("id", "string", "`<item id>@<defence>`: one record per benchmark item and defence"),
    Field("item_id", "string", "the benchmark item: `<benchmark label>/<the benchmark's own id>`"),
    Field("benchmark", "string", "the benchmark label (figstep, mmsafety, ..., or the spec's label=)"),
    Field("defence", "string", "vanilla, prefix, eta-detect, ot, calibration or guardalign"),
    Field("source", "string", "where the item came from: `<annotation file>#<row or key>`"),
    Field("category", "string", "the benchmark's category of the item (scenario, policy, class1, ...)"),
    Field("prompt", "string", "the text asked with the image"),
    Field("reference", "json", "the benchmark's own fields for the item (original question, key phrase, subset, ...)"),
    Field("status", "string", "`ok`, or `error` (bad row, unreadable image, model failure)"),
    Field("error", "string", "the cause of an error record, naming the file and row"),
    Field("image_sha256", "string", "SHA-256 of the image bytes as stored (before purification)"),
    Field("detection", "json", "{ot: {verdict, score, category, boxes, masked_boxes}, precheck: {verdict, score, "
                               "category, threshold}} for the defences that detect; null otherwise"),
    Field("applied", "json", "what this defence did to this item: {purified, prefix, calibrated}"),
    Field("response", "string", "the model's answer"),
    Field("refused", "bool", "the anchors' refusal phrases matched (as `answer`'s `refused`)"),
    Field("judges", "json", "{judge label: {model, unsafe, raw, categories, score?, details?, target?}}"),
    Field("reused_from", "string", "the defence whose identical generation (same image, prefix, calibration) this reuses"),
    Field("generation", "json", "{max_new_tokens, new_tokens, finish}"),
    Field("utility", "json", "utility items only: {answers, exact_match}"),
    Field("settings", "json", "every setting that shaped the answer; `--resume` refuses a run whose settings differ"),
)

MASK_ENTRY: tuple[Field, ...] = (
    Field("id", "string", "the item's id (as in the scan records)"),
    Field("source", "string", "where the original came from"),
    Field("status", "string", "`purified`, `copied`, `skipped` (safe, with --only-unsafe), `exists` or `error`"),
    Field("error", "string", "why the item has no output"),
    Field("verdict", "string", "the scan verdict used"),
    Field("category", "string", "winning category of an unsafe item"),
    Field("output", "string", "the written file (or Parquet) relative to --out-dir"),
    Field("row", "int32", "row in the output Parquet, or sample number in the output tar shard"),
    Field("overlay", "string", "the reviewer overlay relative to --out-dir, with --overlay"),
    Field("image_file", "string", "for Parquet path cells: the image file written beside the output"),
    Field("boxes", "list<list<int32>>", "the filled pixel boxes (after --dilate)"),
    Field("box_categories", "list<string>", "category of each unsafe patch"),
    Field("sha256", "string", "SHA-256 of the original's bytes"),
    Field("fill", "string", "the fill used"),
    Field("dilate", "int32", "pixels added around each box"),
    Field("sanitized", "bool", "the path had to be sanitised to stay inside --out-dir"),
    Field("notes", "list<string>", "remarks (re-encoded format, animated image, sanitised path)"),
    Field("settings", "json", "the settings of the mask run (fill, dilate, detection settings)"),
)

PROBE_RECORD: tuple[Field, ...] = (
    Field("id", "string", "the pair's id (JSONL `id`; FigStep `dataset_categoryid_taskid`)"),
    Field("image", "string", "the image path as written in the pairs file (FigStep: relative to the folder)"),
    Field("image_sha256", "string", "SHA-256 of the image bytes the model was shown (before any purification)"),
    Field("category", "string", "the pair's category (JSONL `category`; FigStep `category_name`)"),
    Field("text", "string", "the equivalent text: a caption, or the text the image shows"),
    Field("prompt", "string", "the question of the image forms"),
    Field("text_prompt", "string", "the question of the text form: the template with the text in it"),
    Field("status", "string", "`ok`, or `error` (bad line or row, unreadable image, model failure)"),
    Field("error", "string", "the cause of an error record, naming the file and line"),
    Field("layers", "int32", "L, the number of decoder layers; every per-layer array has L entries (layer 0 first)"),
    Field("forms", "json", "per form (`image`, `text`, and the defences `prefix`, `calibration`, `guardalign`): "
          "{rank: best refusal-token rank per layer (1 = top-1), ranks: per refusal token (as in `refusal_tokens`) "
          "its rank per layer, top1: the lens's top token id per layer, next_token: the last layer's top token, "
          "first_topk / first_top1: first layer where a refusal token is in the top-k / top-1 (null: never), "
          "refused: a refusal token is top-1 at the last layer, attention: {span: mass per layer} of the last "
          "position on `image` / `caption` / `text` / `prefix` tokens (null on layers without self-attention), "
          "cosine (`image`, `guardalign`): as the record's `cosine`, for that form's image}"),
    Field("cosine", "list<double>", "per layer: cosine of the mean hidden state of the image tokens (image form) "
          "and of the caption's tokens with the caption fed alone"),
    Field("detection", "json", "the `guardalign` defence's detection {verdict, score, category, boxes, masked_boxes, "
          "purified}; null without it"),
    Field("model", "json", "the LVLM's provenance {id, family, revision, dtype}"),
    Field("anchors_sha256", "string", "SHA-256 of the anchor set (refusal words, prefix, detector categories)"),
    Field("lens", "string", "`standard` (final norm, then LM head) or `raw` (LM head on un-normed states below "
          "the last layer, as the TGA authors' code)"),
    Field("top_k", "int32", "k of `first_topk`"),
    Field("refusal_tokens", "json", "the token ids ranked: [{word, text, id, token}], each the first token of a "
          "refusal word tokenised with or without a leading space"),
    Field("settings", "json", "every setting that shaped the record; `--resume` refuses a run whose settings differ"),
)

# Scan fields that ``mask --from-scan`` needs from a record.
MASK_NEEDS = ("status", "error", "verdict", "category", "boxes", "box_categories", "unsafe_patches", "patch_boxes",
              "patch_scores", "threshold", "width", "height", "method", "sha256", "settings", "model",
              "anchors_sha256")
# Fields that tell which detector produced a scan record (shown per run in reports).
PROVENANCE = ("method", "patches", "model", "anchors_sha256")
RECORD_KINDS = {"scan": SCAN_RECORD, "answer": ANSWER_RECORD, "eval": EVAL_RECORD, "mask manifest": MASK_ENTRY,
                "probe": PROBE_RECORD}


def names(fields: tuple[Field, ...]) -> tuple[str, ...]:
    """The field names, in order."""
    return tuple(f.name for f in fields)


def arrow_type(spelling: str):
    """The pyarrow type of a :class:`Field` type spelling (``json`` values are stored as JSON text)."""
    import pyarrow as pa

    i32 = pa.int32()
    return {
        "string": pa.string(), "double": pa.float64(), "int32": i32, "bool": pa.bool_(), "json": pa.string(),
        "map<string,double>": pa.map_(pa.string(), pa.float64()), "list<int32>": pa.list_(i32),
        "list<list<int32>>": pa.list_(pa.list_(i32)), "list<double>": pa.list_(pa.float64()),
        "list<string>": pa.list_(pa.string()),
    }[spelling]


def render_reference() -> str:
    """``docs/records.md``: one table per record kind (a test checks the file is current)."""
    lines = ["# Records reference", "",
             "Generated from `guardalign/records.py` by `python -m guardalign.records` (a test fails when it is",
             "stale). JSONL lines are strict JSON; in Parquet, `json` fields are JSON text columns.", ""]
    titles = {"scan": "`scan` records", "answer": "`answer` records", "eval": "`eval` records (records.jsonl in --out)",
              "mask manifest": "`mask` manifest (`manifest.jsonl` in --out-dir)", "probe": "`probe` records"}
    for kind, fields in RECORD_KINDS.items():
        lines += [f"## {titles[kind]}", "", "| field | type | meaning |", "|---|---|---|"]
        lines += [f"| `{f.name}` | {f.type} | {f.doc} |" for f in fields]
        lines.append("")
    return "\n".join(lines)


REFERENCE_PATH = Path(__file__).resolve().parents[1] / "docs" / "records.md"

if __name__ == "__main__":  # pragma: no cover - regenerates docs/records.md
    REFERENCE_PATH.parent.mkdir(exist_ok=True)
    REFERENCE_PATH.write_text(render_reference(), encoding="utf-8")
    print(f"wrote {REFERENCE_PATH}")
