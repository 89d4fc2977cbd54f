"""``guardalign mask`` as a library function: purified copies of images and Parquet datasets (DESIGN §1.1, Eq. 11).

Per item, using a reused scan (``from_scan``, matched by id) or an inline scan:

- unsafe: the unsafe patch boxes are filled at the original resolution (:func:`guardalign.detection.purify.apply_fill`)
  and the image is re-encoded in its original format where Pillow can write it (else PNG), upright (EXIF
  orientation baked in) and without metadata (EXIF/GPS, XMP, text chunks; the RGB ICC profile is kept);
- safe: copied byte-for-byte, or left out with ``only_unsafe``;
- unreadable (or missing from the scan): no output, ``status: error`` in the manifest, exit 3.

Layout under ``out_dir``: folder inputs are mirrored by relative path (the item id), files given directly
land at their base name (like ``cp``), and stdin list lines at their path as given, sanitised (``..``, the
root and drive letters dropped; recorded in the manifest). A Parquet input gives Parquet at the same place,
with the same schema, rows and row order (``only_unsafe``: just the unsafe rows), written row group by row
group. Its image column is replaced: ``struct``/``binary`` cells get the purified bytes; ``path`` cells keep
their relative path and the images are written beside the output Parquet at that path (a path that had to
be sanitised is rewritten in the cell). A row that could not be verified (unreadable, changed since the scan,
missing from it) stays in place with its image cell null, and is reported. A Parquet output is
written only when every row was handled: one that cannot be is abandoned (never half-purified). ``--overlay`` writes
``<output>.overlay.png`` beside each flagged file, or ``<parquet>.overlays/<row>.overlay.png``.
``manifest.jsonl`` has one line per item (fields in :func:`_entry`).

Safety: nothing is written outside ``out_dir`` (``..``, absolute paths and symlinked sub-folders are
refused or sanitised), an original is never overwritten, an existing output is replaced only with
``overwrite`` (an identical one counts as done), every file is written to a temp file and renamed, and a
rerun skips items the manifest records as complete, so a crashed run can simply be run again.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from guardalign.config import DetectConfig, EncoderConfig
from guardalign.errors import ConfigError, InputError
from guardalign.commands.mask_job import (  # noqa: F401 (names re-exported from here)
    DONE, MANIFEST, TMP_SUFFIX, MaskSummary, _arrow_error, _cell_rel, _entry, _parquet_base, _ParquetOut, _RunState,
    WITHHELD, atomic_write, print_summary, safe_relpath,
)

_SCAN_KEEP = ("status", "error", "verdict", "category", "boxes", "box_categories", "unsafe_patches",
              "patch_boxes", "patch_scores", "threshold", "width", "height", "method", "sha256")


def mask(
    inputs: Sequence[str],
    *,
    out_dir: str,
    from_scan: str | None = None,
    fill: str = "mean",
    dilate: int = 0,
    overlay: bool = False,
    only_unsafe: bool = False,
    overwrite: bool = False,
    force: bool = False,
    anchors: str | None = None,
    clip_model: str = EncoderConfig.model,
    pretrained: str = EncoderConfig.pretrained,
    method: str = DetectConfig.method,
    patches: str = DetectConfig.patches,
    grid: int = DetectConfig.grid,
    stride: float = DetectConfig.stride,
    scales: tuple[int, ...] = DetectConfig.scales,
    budget: int = DetectConfig.budget,
    dense_path: str = DetectConfig.dense_path,
    tau: float | None = None,
    theta: float = DetectConfig.theta,
    eps: float = DetectConfig.eps,
    image_column: str | None = None,
    id_column: str | None = None,
    batch_size: int = DetectConfig.batch_size,
    device: str = EncoderConfig.device,
    precision: str = EncoderConfig.precision,
    workers: int = 4,
    stdin: TextIO | None = None,
    progress: bool = True,
    detector: Any = None,
) -> MaskSummary:
    """Write purified copies of ``inputs`` under ``out_dir`` (module docstring) and a ``manifest.jsonl``.

    Raises a ``GuardalignError`` (exit 2) before writing anything for bad flags, an ``out_dir`` inside an
    input folder (unless ``force``), unusable inputs or model, or a ``from_scan`` file whose provenance
    (model, anchors sha256) differs from the detector these flags build. ``detector`` reuses a loaded one.
    """
    from guardalign.pipeline.progress import progress_bar
    from guardalign.detection.purify import FILLS
    from guardalign.io.sources import count_items, iter_items

    if fill not in FILLS:
        raise ConfigError(f"invalid --fill {fill!r}: expected one of {', '.join(FILLS)}")
    if dilate < 0:
        raise ConfigError(f"invalid --dilate {dilate}: expected pixels ≥ 0")
    if from_scan is not None and tau is not None:
        raise ConfigError("--tau cannot be combined with --from-scan: the scan's verdicts are reused "
                          "(rescan with --tau)")
    root = _check_out_dir(inputs, out_dir, force)
    cfg = DetectConfig(method=method, patches=patches, grid=grid, stride=stride, tau=tau, theta=theta, eps=eps,
                       batch_size=batch_size, scales=tuple(scales), budget=budget, dense_path=dense_path).validate()
    items = iter_items(list(inputs), image_column=image_column, id_column=id_column, stdin=stdin)
    if detector is None:
        from dataclasses import asdict

        from guardalign.detection.detector import Detector

        detector = Detector.from_options(clip_model=clip_model, pretrained=pretrained, anchors=anchors,
                                         device=device, precision=precision, **asdict(cfg))
    index = _load_scan(from_scan, detector.provenance) if from_scan is not None else None
    total = None if "-" in inputs else count_items(list(inputs), image_column=image_column, id_column=id_column)

    job = _Job(root, inputs, fill=fill, dilate=dilate, overlay=overlay, only_unsafe=only_unsafe,
               overwrite=overwrite, mean=tuple(detector.encoder.mean))
    start = time.perf_counter()
    with progress_bar("mask", total, enabled=progress) as advance:
        job.advance = advance
        try:
            for item, image, info, rec in _with_records(job.todo(items), detector, index, workers, batch_size):
                job.handle(item, image, info, rec)
                advance(1)
        except BaseException:
            job.abort()  # an interrupted Parquet output must not be completed with unprocessed rows
            raise
        job.close()
    job.summary.seconds = time.perf_counter() - start
    if progress:
        print_summary(job.summary, root)
    return job.summary


# ----------------------------------------------------------------------------- checks done before writing


def _check_out_dir(inputs: Sequence[str], out_dir: str, force: bool) -> Path:
    """Resolved out_dir; ConfigError when it is a file, or equal to / inside an input folder (unless force)."""
    if not str(out_dir).strip():
        raise ConfigError("--out-dir is required")
    root = Path(out_dir).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out-dir {out_dir} exists and is not a directory")
    for given in inputs:
        if given == "-" or not Path(given).is_dir():
            continue
        folder = Path(given).resolve()
        if (root == folder or folder in root.parents) and not force:
            where = "is" if root == folder else "is inside"
            raise ConfigError(f"--out-dir {out_dir} {where} the input folder {given}: purified files would mix "
                              "with the originals; choose another --out-dir (or pass --force)")
    return root


def _load_scan(path: str, provenance: dict[str, str]) -> dict[str, dict]:
    """Index a scan output by id, keeping the fields mask needs; provenance must match (ConfigError)."""
    from guardalign.io.sinks import read_records

    index: dict[str, dict] = {}
    for n, rec in enumerate(read_records(path), 1):
        if rec.get("id") is None:
            raise InputError(f"--from-scan {path}: record {n} has no 'id'")
        if rec.get("status") == "ok":
            for key, what in (("anchors_sha256", "anchors sha256"), ("model", "CLIP model")):
                if rec.get(key) != provenance[key]:
                    raise ConfigError(
                        f"--from-scan {path}: record {n} (id {rec['id']!r}) was scanned with {what} "
                        f"{rec.get(key)!r}, but these flags give {provenance[key]!r}. Pass the --anchors, "
                        "--clip-model and --pretrained the scan used, or mask without --from-scan to rescan.")
        index[str(rec["id"])] = {k: rec.get(k) for k in _SCAN_KEEP}
    return index


# ----------------------------------------------------------------------------- records (reused or inline)


def _with_records(items: Iterator, detector, index: dict | None, workers: int, batch_size: int) -> Iterator[tuple]:
    """Yield (item, image | None, info | None, scan record) in input order; images only where needed."""
    if index is not None:
        yield from _reused(items, index)
        return
    from guardalign.io.sources import decode_stream

    batch: list = []
    for decoded in decode_stream(items, workers=workers, prefetch=max(64, 2 * batch_size)):
        batch.append(decoded)
        if len(batch) >= batch_size:
            yield from _detect_batch(batch, detector)
            batch = []
    if batch:
        yield from _detect_batch(batch, detector)


def _detect_batch(batch: list, detector) -> Iterator[tuple]:
    good = [d for d in batch if d.image is not None and d.error is None]
    good_ids = {id(d) for d in good}  # identity: Decoded's dataclass __eq__ would compare pixels
    try:
        dets, failure = iter(detector.detect([d.image for d in good])), None
    except Exception as exc:  # one failed batch costs its items, not the run
        dets, failure = iter(()), f"detector failed on this batch: {type(exc).__name__}: {exc}"
    for d in batch:
        error = d.item.error or d.error or (failure if id(d) in good_ids else None)
        rec = {"status": "error", "error": error} if error else \
            {"status": "ok", **next(dets).to_record(), "sha256": d.info.sha256}
        yield d.item, d.image, d.info, rec


def _reused(items: Iterator, index: dict) -> Iterator[tuple]:
    """Pair items with their scan records; an image whose bytes differ from the scanned ones is an error."""
    for item in items:
        rec = index.get(item.id)
        if item.error:
            rec = {"status": "error", "error": item.error}
        elif rec is None:
            rec = {"status": "error", "error": "id not found in the --from-scan records"}
        image = info = None
        if rec.get("status") == "ok":
            item, image, info, error = _check_unchanged(item, rec)
            if error:
                rec = {"status": "error", "error": f"{error}: it changed since the scan; rescan it"}
        yield item, image, info, rec


def _check_unchanged(item, rec: dict) -> tuple:
    """(item with its bytes, image | None, info | None, error | None): the bytes are read once, compared with
    the record's ``sha256`` (and size), and decoded when the verdict is unsafe (decoding hashes them too)."""
    import hashlib
    from dataclasses import replace

    from guardalign.io.images import ImageDecodeError, decode_image, read_image_bytes

    image = info = None
    try:
        item = item if item.data is not None else replace(item, data=read_image_bytes(item.path))
        if rec.get("verdict") == "unsafe":
            image, info = decode_image(data=item.data)
        digest = info.sha256 if info is not None else hashlib.sha256(item.data).hexdigest()
    except ImageDecodeError as exc:
        return item, None, None, str(exc)
    if rec.get("sha256") and digest != rec["sha256"]:
        return item, None, None, f"content sha256 {digest[:12]}… differs from the scanned {rec['sha256'][:12]}…"
    if image is not None and [image.width, image.height] != [rec.get("width"), rec.get("height")]:
        return item, None, None, (f"image is {image.width}×{image.height} but was scanned as "
                                  f"{rec.get('width')}×{rec.get('height')}")
    return item, image, info, None


# ----------------------------------------------------------------------------- the job


class _Job(_RunState):
    """One run of ``mask``: what is written for each item, on top of the run state of :class:`_RunState`."""

    # -- one item
    def handle(self, item, image, info, rec: dict) -> None:
        entry = _entry(item, "error", rec=rec, fill=self.fill, dilate=self.dilate)
        pq_path = item.meta.get("parquet")
        if self.parquet is not None and self.parquet.src != pq_path:
            self._finish_parquet()
        try:
            if pq_path is not None and "cell_kind" not in item.meta:  # the Parquet file itself is unreadable
                if self.parquet is not None:
                    self._fail_parquet(str(rec.get("error") or item.error))
            elif pq_path is not None:
                self._parquet_row(item, image, info, rec, entry)
            elif rec.get("status") == "ok":
                self._file(item, image, info, rec, entry)
        except (OSError, ValueError, _arrow_error()) as exc:
            entry.update(status="error", error=f"cannot write output: {type(exc).__name__}: {exc}")
            if self.parquet is not None and pq_path == self.parquet.src:  # never pass an unpurified row on
                self._fail_parquet(f"row {item.meta.get('row')}: {type(exc).__name__}: {exc}")
        self._record(item, entry)
        if self.parquet is not None and entry["output"] == self.parquet.rel and entry["status"] in DONE:
            self.parquet.done.append(entry)  # corrected in the manifest if the output is abandoned later

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
        if self._put(rel, buf.getvalue(), item, out, "purified", key="overlay"):
            entry["overlay"] = rel
            self.summary.overlays += 1
        else:
            entry["notes"].append(f"overlay not written: {out['error']}")

    # -- Parquet rows
    def _parquet_row(self, item, image, info, rec: dict, entry: dict) -> None:
        """Struct/binary cells get the purified bytes; path cells point at files written beside the output."""
        src, row, kind = item.meta["parquet"], item.meta["row"], item.meta["cell_kind"]
        if self.parquet is None:
            rel = safe_relpath(_parquet_base(src, self.inputs))[0]
            self.parquet = _ParquetOut(src, rel, item.meta["column"], kind, self)
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

    def _path_cell(self, item, pq_out, entry: dict, data: bytes, ext: str | None, status: str) -> tuple[bool, Any]:
        """Write a path-kind image beside the output Parquet; (written, new cell text or None if unchanged)."""
        cell_rel = _cell_rel(item, Path(item.meta["parquet"]).parent)
        rel, changed = safe_relpath(cell_rel)
        rel = rel if ext is None else rel + ext
        base = pq_out.rel.rpartition("/")[0]
        if not self._put(f"{base}/{rel}" if base else rel, data, item, entry, status, key="image_file"):
            return False, None
        if changed:
            entry["sanitized"] = True
            entry["notes"].append(f"image path {cell_rel!r} sanitised to {rel!r}; the cell now holds {rel!r}")
        return True, (rel if (changed or ext is not None) else None)
