"""The mask stage: decoded items (with a scan record, reused or made inline) → purified outputs under --out-dir.

Per item: unsafe → patch boxes filled at the original resolution and re-encoded; safe → copied byte for byte
(or left out with ``only_unsafe``); unreadable → no output. Each item's manifest entry is its record
(``guardalign.records.MASK_ENTRY``); the runner writes the entries to ``manifest.jsonl``. A Parquet input is
rebuilt row group by row group (:class:`~guardalign.pipeline.mask_out.ParquetOut`), a webdataset shard sample by
sample (:class:`~guardalign.pipeline.tar_out.TarOut`); when one cannot be completed it is abandoned, and the entries
already recorded as written into it are corrected (:meth:`MaskStage.drain`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from guardalign.pipeline.mask_out import (
    DONE, WITHHELD, ParquetOut, arrow_error, atomic_write, cell_rel, entry as _entry, inside, parquet_base,
    safe_relpath,
)
from guardalign.pipeline.runner import RunSummary
from guardalign.records import Decoded

MASK_STATS = ("purified", "copied", "skipped", "exists", "sanitized", "overlays", "excluded")


class MaskSummary(RunSummary):
    """The runner's summary, with mask's counts (from the stage tally) as attributes."""

    purified = property(lambda self: self.tally["purified"])  # unsafe items masked and written
    copied = property(lambda self: self.tally["copied"])  # safe items copied (or Parquet rows kept)
    skipped = property(lambda self: self.tally["skipped"])  # safe items left out (only_unsafe)
    conflicts = property(lambda self: self.tally["exists"])  # outputs that exist with other content
    sanitized = property(lambda self: self.tally["sanitized"])  # paths sanitised to stay inside out_dir
    overlays = property(lambda self: self.tally["overlays"])  # reviewer images written
    excluded = property(lambda self: self.tally["excluded"])  # files inside out_dir not taken as inputs


class MaskStage:
    """One run of ``mask`` over ``root``: detection (or a reused scan), purification and the writing of outputs."""

    name = "mask"
    unit = "img"
    account_previous = False  # the counts say what this run wrote; earlier runs' items count as resumed

    def __init__(self, root: Path, inputs: Sequence[str], *, fill: str, dilate: int, overlay: Path | None,
                 only_unsafe: bool, overwrite: bool, mean: tuple[float, float, float], settings: dict,
                 detector: Any = None, index: dict | None = None, batch_size: int = 32):
        self.root, self.inputs, self.mean = root, list(inputs), mean
        self.fill, self.dilate, self.overlay = fill, dilate, overlay
        self.only_unsafe, self.overwrite = only_unsafe, overwrite
        self.detector, self.index, self.batch_size = detector, index, batch_size
        self._settings = settings
        # output path → (source, id) of the item that claimed it; the manifest is taken
        self.claims: dict[str, tuple[str, str]] = {str(root / "manifest.jsonl"): ("", "manifest")}
        self.originals = {os.path.realpath(g) for g in self.inputs if g != "-" and Path(g).is_file()}
        self.parquet: Any = None  # ParquetOut or TarOut being written (items of one file arrive together)
        self.kept: dict[str, bool] = {}  # Parquet/tar input → its output exists and is kept (no --overwrite)
        self.corrections: list[tuple[dict | None, dict]] = []  # (old, new) entries for the runner to apply

    # -- the runner's stage protocol
    def settings(self) -> dict:
        return self._settings

    def finished(self, prev: dict) -> bool:
        """A manifest entry from an earlier run is complete: finished status and every output still there."""
        if prev.get("status") not in DONE:
            return False
        if prev.get("row") is not None:  # a Parquet row: complete while its output Parquet is kept
            return bool(prev.get("output")) and (self.root / prev["output"]).is_file()
        return (not prev.get("output") or (self.root / prev["output"]).is_file()) and \
            (not prev.get("overlay") or (self.overlay is not None and (self.overlay / prev["overlay"]).is_file()))

    def process(self, batch: list[Decoded]) -> list[dict]:
        records = self._scan_records(batch)
        return [self.handle(d.item, d.image, d.info, rec) for d, rec in zip(batch, records)]

    def account(self, record: dict, tally, sign: int = 1) -> None:
        status = record.get("status")
        if status in ("purified", "copied", "skipped", "exists"):
            tally[status] += sign
        tally["sanitized"] += sign * bool(record.get("sanitized"))
        tally["overlays"] += sign * bool(record.get("overlay"))

    def _kept_output(self, src: str) -> bool:
        """The output of Parquet input ``src`` exists from an earlier run and is kept (no --overwrite)."""
        if src not in self.kept:
            target = self.root / safe_relpath(parquet_base(src, self.inputs))[0]
            self.kept[src] = target.exists() and not self.overwrite and (
                self.parquet is None or self.parquet.src != src)
        return self.kept[src]

    def drain(self) -> list[tuple[dict | None, dict]]:
        out, self.corrections = self.corrections, []
        return out

    def close(self) -> None:
        if self.parquet is not None:
            self._finish_parquet()

    def abort(self) -> None:
        if self.parquet is not None:
            self.parquet.abort()

    # -- scan records for a batch: reused (index) or detected now
    def _scan_records(self, batch: list[Decoded]) -> list[dict]:
        if self.index is not None:
            return [self._reused(d) for d in batch]
        from guardalign.pipeline.detect import usable

        good = [d for d in batch if usable(d)]
        dets = iter(self.detector.detect([d.image for d in good]))
        return [{"status": "ok", **next(dets).to_record(), "sha256": d.info.sha256} if usable(d) else
                {"status": "error", "error": d.item.error or d.error} for d in batch]

    def _reused(self, d: Decoded) -> dict:
        if d.item.error or d.error:
            return {"status": "error", "error": d.item.error or d.error}
        rec = self.index.get(d.item.id)
        return rec if rec is not None else {"status": "error", "error": "id not found in the --from-scan records"}

    def _finish_parquet(self) -> None:
        try:
            if not self.parquet.failed:
                self.parquet.finish()
        except (OSError, ValueError, arrow_error()) as exc:  # e.g. a truncated file: its rows were reported
            self._fail_parquet(f"{type(exc).__name__}: {exc}")
        self.parquet = None

    def _fail_parquet(self, reason: str) -> None:
        """Abandon the current Parquet output (temp file removed); later rows of the file are errors."""
        if not self.parquet.failed:
            self.parquet.abort()
            self.parquet.failed = reason
            what = getattr(self.parquet, "what", "Parquet")
            self.corrections.append((None, {"id": self.parquet.rel, "status": "error",
                                            "error": f"{what} output not written: {reason}"}))
            for e in self.parquet.done:  # rows recorded as written into it: the last manifest line per id wins
                self.corrections.append((e, {**e, "status": "error", "output": None,
                                             "error": f"the output {what} file is not written ({reason})"}))
            self.parquet.done = []

    def _put(self, rel: str, data: bytes, item, entry: dict, status: str, key: str = "output",
             root: Path | None = None) -> bool:
        """Write one output file under ``root`` (--out-dir by default); False (entry updated) when it must not or
        cannot be."""
        root = root or self.root
        target = root / rel
        source = os.path.realpath(item.path) if item.path is not None else item.source
        if not inside(str(target.parent), root):
            entry.update(status="error", error=f"output {rel} would leave --out-dir (a symlinked folder); not written")
            return False
        if os.path.realpath(target) in self.originals or (item.path is not None and
                                                         os.path.realpath(target) == os.path.realpath(item.path)):
            entry.update(status="error", error=f"output {rel} is an input file; originals are never overwritten")
            return False
        claim = self.claims.get(str(target))
        if claim is not None and claim[0] != source:
            entry.update(status="error", error=f"output {rel} is already taken by {claim[1]!r} (paths collide)")
            return False
        self.claims[str(target)] = (source, item.id)
        if os.path.lexists(target):
            if target.is_file() and not target.is_symlink() and target.read_bytes() == data:
                entry[key], entry["status"] = rel, status
                return True
            if not self.overwrite or target.is_dir():
                entry.update(status="exists", error=f"output {rel} already exists; pass --overwrite to replace it")
                return False
        atomic_write(target, data, inside=root)
        entry[key], entry["status"] = rel, status
        return True

    # -- one item
    def handle(self, item, image, info, rec: dict) -> dict:
        entry = _entry(item, "error", rec=rec, fill=self.fill, dilate=self.dilate)
        pq_path = item.meta.get("parquet") or item.meta.get("tar")
        if self.parquet is not None and self.parquet.src != pq_path:
            self._finish_parquet()
        try:
            if item.meta.get("tar") is not None:
                self._tar_sample(item, image, info, rec, entry)
            elif pq_path is not None and "cell_kind" not in item.meta:  # the Parquet file itself is unreadable
                if self.parquet is not None:
                    self._fail_parquet(str(rec.get("error") or item.error))
            elif pq_path is not None:
                self._parquet_row(item, image, info, rec, entry)
            elif rec.get("status") == "ok":
                self._file(item, image, info, rec, entry)
        except (OSError, ValueError, arrow_error()) as exc:
            entry.update(status="error", error=f"cannot write output: {type(exc).__name__}: {exc}")
            if self.parquet is not None and pq_path == self.parquet.src:  # never pass an unpurified row on
                self._fail_parquet(f"row {item.meta.get('row')}: {type(exc).__name__}: {exc}")
        if self.parquet is not None and entry["output"] == self.parquet.rel and entry["status"] in DONE:
            self.parquet.done.append(entry)  # corrected in the manifest if the output is abandoned later
        return entry

    def _file(self, item, image, info, rec: dict, entry: dict) -> None:
        given_file = item.id in self.inputs and item.id != "-" and not Path(item.id).is_dir()
        rel, changed = safe_relpath(Path(item.id).name if given_file else item.id)
        if changed:
            entry["sanitized"] = True
            entry["notes"].append(f"path {item.id!r} sanitised to {rel!r} to stay inside --out-dir")
        if rec["verdict"] == "safe":
            if self.only_unsafe:
                entry["status"] = "skipped"
                return
            self._put(rel, item.data, item, entry, "copied")
            return
        data, ext = self._purify(item, image, info, rec, entry)
        rel = rel if ext is None else rel + ext
        if self._put(rel, data, item, entry, "purified"):
            self._overlay(rel + ".overlay.png", image, rec, entry, item)

    def _purify(self, item, image, info, rec: dict, entry: dict) -> tuple[bytes, str | None]:
        """Masked, re-encoded bytes; ext is the suffix to append when the format could not be kept."""
        from guardalign.detection.purify import KEEP_FORMATS, apply_fill, boxes_to_fill, encode_image, pixel_box

        boxes = boxes_to_fill(rec.get("boxes") or [], image.size)
        if not rec.get("boxes"):
            entry["notes"].append("no patch boxes (method=global): the whole image is masked")
        entry["boxes"] = [list(b) for b in (pixel_box(x, image.size, self.dilate) for x in boxes) if b is not None]
        original = item.data
        masked = apply_fill(image, boxes, self.fill, self.mean, self.dilate)
        data, fmt, notes = encode_image(masked, info.format, original)
        entry["notes"].extend(notes)
        if info.frames > 1:
            entry["notes"].append(f"animated image: only the scanned first frame of {info.frames} is kept")
        return data, (None if fmt == info.format else KEEP_FORMATS[fmt])

    def _overlay(self, rel: str, image, rec: dict, entry: dict, item) -> None:
        if not self.overlay:
            return
        import io

        from guardalign.detection.purify import overlay

        if rec.get("patch_boxes"):
            args = (rec["patch_boxes"], rec["patch_scores"], rec.get("unsafe_patches") or [],
                    rec.get("box_categories") or [], rec.get("threshold"))
        else:  # global method: one whole-image box
            args = ([[0, 0, image.width, image.height]], [0.0], [0], [rec.get("category") or "unsafe"], None)
        buf = io.BytesIO()
        overlay(image, *args).save(buf, format="PNG")
        out: dict = {}
        if self._put(rel, buf.getvalue(), item, out, "purified", key="overlay", root=self.overlay):
            entry["overlay"] = rel
        else:
            entry["notes"].append(f"overlay not written: {out['error']}")

    # -- Parquet rows
    def _parquet_row(self, item, image, info, rec: dict, entry: dict) -> None:
        """Struct/binary cells get the purified bytes; path cells point at files written beside the output."""
        src, row, kind = item.meta["parquet"], item.meta["row"], item.meta["cell_kind"]
        if self._kept_output(src):
            entry.update(status="exists", error="the output Parquet file exists (from another run or other "
                                                "options); pass --overwrite to replace it")
            return
        if self.parquet is None:
            rel = safe_relpath(parquet_base(src, self.inputs))[0]
            self.parquet = ParquetOut(src, rel, item.meta["column"], kind, self)
        pq_out = self.parquet
        if pq_out.failed:
            entry["error"] = f"the output Parquet file is not written ({pq_out.failed})"
            return
        pq_out.flush_until(row)
        entry.update(output=pq_out.rel, row=row)
        if rec.get("status") != "ok" or (rec["verdict"] == "safe" and self.only_unsafe):
            if self.only_unsafe:
                entry["output"] = None
                entry["status"] = "error" if rec.get("status") != "ok" else "skipped"
            else:
                pq_out.keep(row, WITHHELD)  # never pass on bytes that were not verified
                entry["notes"].append("row kept in the output Parquet with its image cell null")
            return
        safe = rec["verdict"] == "safe"
        entry["status"] = "copied" if safe else "purified"
        data, ext = (item.data if kind == "path" else None, None) if safe else \
            self._purify(item, image, info, rec, entry)
        if kind == "path":
            ok, cell = self._path_cell(item, pq_out, entry, data, ext, entry["status"])
            if not ok:  # the row stays unprocessed, so this Parquet output is abandoned (never a stale path)
                return
        else:
            cell = None if safe else {"bytes": data} if kind == "struct" else data
        pq_out.keep(row, cell)
        if not safe:
            self._overlay(f"{pq_out.rel}.overlays/{row}.overlay.png", image, rec, entry, item)

    # -- webdataset samples
    def _tar_sample(self, item, image, info, rec: dict, entry: dict) -> None:
        """A sample goes into the purified shard (image replaced or copied, other members copied), or is left out."""
        from guardalign.pipeline.tar_out import TarOut

        src, key = item.meta["tar"], item.meta.get("key")
        if self._kept_output(src):
            entry.update(status="exists", error="the output tar shard exists (from another run or other options); "
                                                "pass --overwrite to replace it")
            return
        if self.parquet is None:
            self.parquet = TarOut(src, safe_relpath(parquet_base(src, self.inputs))[0], self)
        out = self.parquet
        if out.failed or key not in out.index:  # abandoned, or an error item for the shard itself
            entry["error"] = entry["error"] or f"the output tar shard is not written ({out.failed})"
            return
        if rec.get("status") != "ok":
            entry["notes"].append("sample left out of the output tar shard")
            return
        safe = rec["verdict"] == "safe"
        if safe and self.only_unsafe:
            entry["status"] = "skipped"
            return
        data, ext = (item.data, None) if safe else self._purify(item, image, info, rec, entry)
        out.put(key, data, None if ext is None else key + ext)
        entry.update(status="copied" if safe else "purified", output=out.rel, row=out.index[key])
        if not safe:
            self._overlay(f"{out.rel}.overlays/{safe_relpath(key)[0]}.overlay.png", image, rec, entry, item)

    def _path_cell(self, item, pq_out, entry: dict, data: bytes, ext: str | None, status: str) -> tuple[bool, Any]:
        """Write a path-kind image beside the output Parquet; (written, new cell text or None if unchanged)."""
        rel_in = cell_rel(item, Path(item.meta["parquet"]).parent)
        rel, changed = safe_relpath(rel_in)
        rel = rel if ext is None else rel + ext
        base = pq_out.rel.rpartition("/")[0]
        if not self._put(f"{base}/{rel}" if base else rel, data, item, entry, status, key="image_file"):
            return False, None
        if changed:
            entry["sanitized"] = True
            entry["notes"].append(f"image path {rel_in!r} sanitised to {rel!r}; the cell now holds {rel!r}")
        return True, (rel if (changed or ext is not None) else None)


# ----------------------------------------------------------------------------- reused scan records (--from-scan)


def decode_unchanged(index: dict):
    """The runner's decode step for --from-scan: read the bytes, check them against the scan, decode if unsafe."""
    from guardalign.records import Decoded

    def decode(item) -> Decoded:
        rec = index.get(item.id)
        if rec is None or rec.get("status") != "ok":
            return Decoded(item, None, None, None)  # the stage gives the record's error
        item, image, info, error = check_unchanged(item, rec)
        return Decoded(item, image, info, f"{error}: it changed since the scan; rescan it" if error else None)

    return decode


def check_unchanged(item, rec: dict) -> tuple:
    """(item with its bytes, image | None, info | None, error | None): the bytes are read once, compared with
    the record's ``sha256`` (and size), and decoded when the verdict is unsafe (decoding hashes them too)."""
    import hashlib
    from dataclasses import replace

    from guardalign.io.images import ImageDecodeError, decode_image, item_name, read_image_bytes

    image = info = None
    try:
        item = item if item.data is not None else replace(item, data=read_image_bytes(item.path))
        if rec.get("verdict") == "unsafe":
            image, info = decode_image(data=item.data, name=item_name(item))
        digest = info.sha256 if info is not None else hashlib.sha256(item.data).hexdigest()
    except ImageDecodeError as exc:
        return item, None, None, str(exc)
    if rec.get("sha256") and digest != rec["sha256"]:
        return item, None, None, f"content sha256 {digest[:12]}… differs from the scanned {rec['sha256'][:12]}…"
    if image is not None and [image.width, image.height] != [rec.get("width"), rec.get("height")]:
        return item, None, None, (f"image is {image.width}×{image.height} but was scanned as "
                                  f"{rec.get('width')}×{rec.get('height')}")
    return item, image, info, None
