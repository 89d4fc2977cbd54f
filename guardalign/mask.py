"""``guardalign mask`` as a library function: purified copies of images and Parquet datasets (DESIGN §1.1, Eq. 11).

Per item, using a reused scan (``from_scan``, matched by id) or an inline scan:

- unsafe: the unsafe patch boxes are filled at the original resolution (:func:`guardalign.purify.apply_fill`)
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
be sanitised is rewritten in the cell). Unreadable rows are kept unchanged and reported. A Parquet output is
written only when every row was handled: one that cannot be is abandoned (never half-purified). ``--overlay`` writes
``<output>.overlay.png`` beside each flagged file, or ``<parquet>.overlays/<row>.overlay.png``.
``manifest.jsonl`` has one line per item (fields in :func:`_entry`).

Safety: nothing is written outside ``out_dir`` (``..``, absolute paths and symlinked sub-folders are
refused or sanitised), an original is never overwritten, an existing output is replaced only with
``overwrite`` (an identical one counts as done), every file is written to a temp file and renamed, and a
rerun skips items the manifest records as complete, so a crashed run can simply be run again.
"""
from __future__ import annotations

import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from guardalign.config import DetectConfig, EncoderConfig
from guardalign.errors import ConfigError, InputError

MANIFEST = "manifest.jsonl"
TMP_SUFFIX = ".guardalign-tmp"  # temp files are ".<name>.<pid>.guardalign-tmp"; stale ones are removed on start
DONE = ("purified", "copied", "skipped")  # manifest statuses of a finished item
_SCAN_KEEP = ("status", "error", "verdict", "category", "boxes", "box_categories", "unsafe_patches",
              "patch_boxes", "patch_scores", "threshold", "width", "height", "method")


@dataclass
class MaskSummary:
    """Counts of one ``mask`` run (items found complete from an earlier run count as ``resumed``)."""

    total: int = 0  # items seen
    purified: int = 0  # unsafe items masked and written
    copied: int = 0  # safe items copied byte-for-byte (or Parquet rows kept unchanged)
    skipped: int = 0  # safe items left out (only_unsafe)
    resumed: int = 0  # items already complete in out_dir
    errors: int = 0  # unreadable, not in the scan, or not writable
    conflicts: int = 0  # outputs that exist with other content (pass overwrite)
    sanitized: int = 0  # items whose path had to be sanitised to stay inside out_dir
    overlays: int = 0  # reviewer images written
    excluded: int = 0  # files inside out_dir that were not treated as inputs, and repeated ids
    by_category: Counter = field(default_factory=Counter)  # purified items per winning category
    error_list: list[tuple[str, str]] = field(default_factory=list)  # (id, error) of errors and conflicts
    seconds: float = 0.0  # wall time

    @property
    def exit_code(self) -> int:
        """0 done; 3 finished but some items have no output (unreadable, missing from the scan, conflicts)."""
        return 3 if self.errors or self.conflicts else 0


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
    from guardalign.progress import progress_bar
    from guardalign.purify import FILLS
    from guardalign.sources import count_items, iter_items

    if fill not in FILLS:
        raise ConfigError(f"invalid --fill {fill!r}: expected one of {', '.join(FILLS)}")
    if dilate < 0:
        raise ConfigError(f"invalid --dilate {dilate}: expected pixels ≥ 0")
    if from_scan is not None and tau is not None:
        raise ConfigError("--tau cannot be combined with --from-scan: the scan's verdicts are reused "
                          "(rescan with --tau)")
    root = _check_out_dir(inputs, out_dir, force)
    cfg = DetectConfig(method=method, patches=patches, grid=grid, stride=stride, tau=tau, theta=theta, eps=eps,
                       batch_size=batch_size).validate()
    items = iter_items(list(inputs), image_column=image_column, id_column=id_column, stdin=stdin)
    if detector is None:
        from dataclasses import asdict

        from guardalign.detect import Detector

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
    from guardalign.sinks import read_records

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
    from guardalign.sources import decode_stream

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
        rec = {"status": "error", "error": error} if error else {"status": "ok", **next(dets).to_record()}
        yield d.item, d.image, d.info, rec


def _reused(items: Iterator, index: dict) -> Iterator[tuple]:
    from guardalign.imageio import ImageDecodeError, decode_image

    for item in items:
        rec = index.get(item.id)
        if item.error:
            rec = {"status": "error", "error": item.error}
        elif rec is None:
            rec = {"status": "error", "error": "id not found in the --from-scan records"}
        image = info = None
        if rec.get("status") == "ok" and rec.get("verdict") == "unsafe":
            try:
                image, info = decode_image(data=item.data) if item.data is not None else decode_image(path=item.path)
            except ImageDecodeError as exc:
                rec = {"status": "error", "error": str(exc)}
            else:
                if [image.width, image.height] != [rec.get("width"), rec.get("height")]:
                    rec = {"status": "error", "error": f"image is {image.width}×{image.height} but was scanned as "
                           f"{rec.get('width')}×{rec.get('height')}: it changed since the scan; rescan it"}
        yield item, image, info, rec


# ----------------------------------------------------------------------------- paths


def safe_relpath(name: str) -> tuple[str, bool]:
    """A relative posix path that cannot leave its folder, and whether ``name`` had to change.

    Backslashes count as separators; the root, drive letters, ``..`` and ``.`` parts and control
    characters are dropped. ``"../../x"`` → ``("x", True)``; ``"/etc/passwd"`` → ``("etc/passwd", True)``.
    """
    text = str(name).replace("\\", "/")
    changed = text.startswith("/") or bool(re.match(r"^[A-Za-z]:", text))
    parts = []
    for i, part in enumerate(text.split("/")):
        clean = re.sub(r"[\x00-\x1f\x7f]", "", part)
        changed |= clean != part
        if i == 0 and re.fullmatch(r"[A-Za-z]:", clean):
            continue
        if clean == "..":
            changed = True
        if clean not in ("", ".", ".."):
            parts.append(clean)
    if not parts:
        return "_", True
    return "/".join(parts), changed


def _inside(path: str, root: Path) -> bool:
    real = os.path.realpath(path)
    return real == str(root) or real.startswith(str(root).rstrip(os.sep) + os.sep)


def _parquet_base(parquet: str, inputs: Sequence[str]) -> str:
    """Output path of a Parquet file: as ``sources`` names it inside its input folder, else its base name."""
    given = list(dict.fromkeys(str(x) for x in inputs))
    for g in given:
        if g != "-" and Path(g).is_dir():
            try:
                rel = Path(parquet).relative_to(Path(g)).as_posix()
            except ValueError:
                continue
            norm = os.path.normpath(g).replace(os.sep, "/")
            return (f"{norm}/" if len(given) > 1 and norm != "." else "") + rel
    return Path(parquet).name


def _cell_rel(item, parquet_dir: Path) -> str:
    """The path cell's image path relative to its Parquet file (absolute cells keep their full path)."""
    try:
        return item.path.relative_to(parquet_dir).as_posix()
    except ValueError:
        return item.path.as_posix()


def atomic_write(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temp file in the same folder and ``os.replace``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale_tmp(root: Path) -> None:
    if root.is_dir():
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name.startswith(".") and name.endswith(TMP_SUFFIX):
                    Path(dirpath, name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the job


class _Job:
    """Per-run state: options, manifest, output claims, the open Parquet output, counts."""

    def __init__(self, root: Path, inputs: Sequence[str], *, fill: str, dilate: int, overlay: bool,
                 only_unsafe: bool, overwrite: bool, mean: tuple[float, float, float]):
        from guardalign.sinks import open_sink, read_records

        self.root, self.inputs, self.mean = root, list(inputs), mean
        self.fill, self.dilate, self.overlay = fill, dilate, overlay
        self.only_unsafe, self.overwrite = only_unsafe, overwrite
        self.summary = MaskSummary()
        self.advance = lambda n=1: None
        manifest = root / MANIFEST
        self.previous = {str(e.get("id")): e for e in read_records(manifest)} if manifest.is_file() else {}
        self.manifest = open_sink(str(manifest), "jsonl", resume=True)  # locked: one run per out_dir at a time
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        self.claims: dict[str, tuple[str, str]] = {MANIFEST: ("", "manifest")}  # rel output → (source key, id)
        self.originals = {os.path.realpath(g) for g in self.inputs if g != "-" and Path(g).is_file()}
        # With --force, out_dir may lie inside an input folder: files there are outputs, not inputs.
        self.exclude = any(g != "-" and Path(g).is_dir() and _inside(str(root), Path(g).resolve()) for g in self.inputs)
        self.seen: set[str] = set()
        self.pending: list[dict] = []  # manifest lines not yet appended
        self.parquet: _ParquetOut | None = None  # output being written (items of one file arrive together)
        self.parquet_existing: tuple[str, bool] | None = None  # (parquet, output exists and kept) for skipping

    # -- filtering before any decoding or detection
    def todo(self, items: Iterator) -> Iterator:
        for item in items:
            repeated = "cell_kind" not in item.meta and item.id in self.seen  # Parquet rows are never dropped
            if repeated or (self.exclude and self._in_out_dir(item)):
                self.summary.excluded += 1
                self.advance(1)
                continue
            self.seen.add(item.id)
            if self._finished_before(item):
                continue
            yield item

    def _in_out_dir(self, item) -> bool:
        src = item.meta.get("parquet") or (str(item.path) if item.path is not None else None)
        return src is not None and _inside(src, self.root)

    def _finished_before(self, item) -> bool:
        """Rows of a kept Parquet output, and files the manifest records as complete, are not redone."""
        prev = self.previous.get(item.id)
        if "parquet" in item.meta:
            pq_path = item.meta["parquet"]
            if self.parquet_existing is None or self.parquet_existing[0] != pq_path:
                target = self.root / safe_relpath(_parquet_base(pq_path, self.inputs))[0]
                self.parquet_existing = (pq_path, target.exists() and not self.overwrite)
            if not self.parquet_existing[1]:
                return False
            if not self._matches(prev):
                self._record(item, _entry(item, "exists", error="the output Parquet file exists (from another run or "
                                                           "other options); pass --overwrite to replace it"))
                return True
        elif not (self._matches(prev) and all((self.root / p).is_file() for p in
                                               (prev.get("output"), prev.get("overlay")) if p)):
            return False
        self.summary.total += 1
        self.summary.resumed += 1
        self.advance(1)
        return True

    def _matches(self, prev: dict | None) -> bool:
        if not prev or prev.get("status") not in DONE:
            return False
        if (prev.get("fill"), prev.get("dilate")) != (self.fill, self.dilate):
            return False
        if prev["status"] == "skipped" and not self.only_unsafe:
            return False
        return not (self.overlay and prev.get("verdict") == "unsafe" and not prev.get("overlay"))

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
            data = item.data if item.data is not None else Path(item.path).read_bytes()
            self._put(rel, data, item, entry, "copied")
            return
        data, ext = self._purify(item, image, info, rec, entry)
        rel = rel if ext is None else rel + ext
        if self._put(rel, data, item, entry, "purified"):
            self._overlay(rel + ".overlay.png", image, rec, entry, item)

    def _purify(self, item, image, info, rec: dict, entry: dict) -> tuple[bytes, str | None]:
        """Masked, re-encoded bytes; ext is the suffix to append when the format could not be kept."""
        from guardalign.purify import KEEP_FORMATS, apply_fill, encode_image, pixel_box

        boxes = rec.get("boxes") or []
        if not boxes:
            boxes = [[0, 0, image.width, image.height]]
            entry["notes"].append("no patch boxes (method=global): the whole image is masked")
        entry["boxes"] = [list(b) for b in (pixel_box(x, image.size, self.dilate) for x in boxes) if b is not None]
        original = item.data if item.data is not None else Path(item.path).read_bytes()
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

        from guardalign.purify import overlay

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
                pq_out.keep(row, None)  # the original cell stays; an error is reported for it
                entry["notes"].append("row kept unchanged in the output Parquet")
            return
        safe = rec["verdict"] == "safe"
        entry["status"] = "copied" if safe else "purified"
        data, ext = (item.path.read_bytes() if kind == "path" else None, None) if safe else \
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

    def _finish_parquet(self) -> None:
        try:
            if not self.parquet.failed:
                self.parquet.finish()
        except (OSError, ValueError, _arrow_error()) as exc:  # e.g. a truncated file: its rows were reported
            self._fail_parquet(f"{type(exc).__name__}: {exc}")
        self.parquet = None

    def _fail_parquet(self, reason: str) -> None:
        """Abandon the current Parquet output (temp file removed); later rows of the file are errors."""
        if not self.parquet.failed:
            self.parquet.abort()
            self.parquet.failed = reason
            self.summary.errors += 1
            self.summary.error_list.append((self.parquet.rel, f"Parquet output not written: {reason}"))

    # -- writing
    def _put(self, rel: str, data: bytes, item, entry: dict, status: str, key: str = "output") -> bool:
        """Write one output file under root; False (entry updated) when it must not or cannot be."""
        target = self.root / rel
        source = os.path.realpath(item.path) if item.path is not None else item.source
        if not _inside(str(target.parent), self.root):
            entry.update(status="error", error=f"output {rel} would leave --out-dir (a symlinked folder); not written")
            return False
        if os.path.realpath(target) in self.originals or (item.path is not None and
                                                         os.path.realpath(target) == os.path.realpath(item.path)):
            entry.update(status="error", error=f"output {rel} is an input file; originals are never overwritten")
            return False
        claim = self.claims.get(rel)
        if claim is not None and claim[0] != source:
            entry.update(status="error", error=f"output {rel} is already taken by {claim[1]!r} (paths collide)")
            return False
        self.claims[rel] = (source, item.id)
        if os.path.lexists(target):
            if target.is_file() and not target.is_symlink() and target.read_bytes() == data:
                entry[key], entry["status"] = rel, status
                return True
            if not self.overwrite or target.is_dir():
                entry.update(status="exists", error=f"output {rel} already exists; pass --overwrite to replace it")
                return False
        atomic_write(target, data)
        entry[key], entry["status"] = rel, status
        return True

    def _record(self, item, entry: dict) -> None:
        s = self.summary
        s.total += 1
        status = entry["status"]
        if status in ("purified", "copied", "skipped"):
            setattr(s, status, getattr(s, status) + 1)
        if status == "purified":
            s.by_category[entry.get("category") or "?"] += 1
        elif status in ("error", "exists"):
            s.errors += status == "error"
            s.conflicts += status == "exists"
            s.error_list.append((item.id, str(entry.get("error"))))
        s.sanitized += bool(entry.get("sanitized"))
        self.pending.append(entry)
        if len(self.pending) >= 64:  # one append + fsync per 64 items; a crash loses at most these lines
            self._flush_manifest()

    def _flush_manifest(self) -> None:
        self.manifest.write(self.pending)
        self.pending = []

    def close(self) -> None:
        try:
            if self.parquet is not None:
                self._finish_parquet()
        finally:
            self._flush_manifest()
            self.manifest.close()
        _compact_manifest(self.root / MANIFEST)

    def abort(self) -> None:
        if self.parquet is not None:
            self.parquet.abort()
        self._flush_manifest()  # what was written is recorded; a rerun finds it complete
        self.manifest.close()


def _arrow_error() -> type:
    from pyarrow import ArrowException

    return ArrowException


def _entry(item, status: str, *, rec: dict | None = None, error: str | None = None, fill=None, dilate=None) -> dict:
    """One manifest line. ``output``/``overlay``/``image_file`` are paths relative to out_dir; ``row`` for Parquet."""
    rec = rec or {}
    return {"id": item.id, "source": item.source, "status": status,
            "error": error if error is not None else rec.get("error"), "verdict": rec.get("verdict"),
            "category": rec.get("category") if rec.get("verdict") == "unsafe" else None,
            "output": None, "overlay": None, "boxes": [], "box_categories": list(rec.get("box_categories") or []),
            "fill": fill, "dilate": dilate, "sanitized": False, "notes": []}


def _compact_manifest(path: Path) -> None:
    """Keep the last line per id (a rerun's result replaces the crashed run's), in first-seen order."""
    from guardalign.sinks import dumps, read_records

    if not path.is_file():
        return
    entries: dict[str, dict] = {}
    n = 0
    for n, e in enumerate(read_records(path), 1):
        entries[str(e.get("id"))] = e
    if len(entries) != n:
        atomic_write(path, "".join(dumps(e) + "\n" for e in entries.values()).encode("utf-8"))


class _ParquetOut:
    """Writes one Parquet output row group by row group as its rows are processed (same schema and order)."""

    def __init__(self, src: str, rel: str, column: str, kind: str, job: _Job):
        import pyarrow.parquet as pq

        self.src, self.rel, self.column, self.kind, self.job = src, rel, column, kind, job
        self.target = job.root / rel
        if not _inside(str(self.target.parent), job.root):
            raise ValueError(f"Parquet output {rel} would leave --out-dir")
        self.pf = pq.ParquetFile(src)
        md = self.pf.metadata
        self.ends = [sum(md.row_group(i).num_rows for i in range(k + 1)) for k in range(md.num_row_groups)]
        self.next_group = 0
        self.failed: str | None = None  # why the output was abandoned
        self.cells: dict[int, Any] = {}  # processed row → replacement cell (None: unchanged); absent: not processed
        self.tmp = self.target.with_name(f".{self.target.name}.{os.getpid()}{TMP_SUFFIX}")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        codec = md.row_group(0).column(0).compression.lower() if md.num_row_groups and md.num_columns else "snappy"
        codec = {"uncompressed": "none"}.get(codec, codec)  # keep the input's codec where pyarrow writes it
        codec = codec if codec in ("snappy", "gzip", "zstd", "lz4", "brotli", "none") else "snappy"
        self.writer = pq.ParquetWriter(self.tmp, self.pf.schema_arrow, compression=codec)

    def keep(self, row: int, cell) -> None:
        self.cells[row] = cell

    def flush_until(self, row: int) -> None:
        """Write every row group that ends at or before ``row`` (all of their rows have been processed)."""
        while self.next_group < len(self.ends) and self.ends[self.next_group] <= row:
            self._write_group(self.next_group)
            self.next_group += 1

    def _write_group(self, g: int) -> None:
        import pyarrow as pa

        start = self.ends[g - 1] if g else 0
        missing = [r for r in range(start, self.ends[g]) if r not in self.cells]
        if missing and not self.job.only_unsafe:  # e.g. an unsafe row whose purification failed: never pass it on
            raise ValueError(f"row {missing[0]} was not processed, so the output would not be purified")
        table = self.pf.read_row_group(g)
        idx = table.schema.get_field_index(self.column)
        values = table.column(idx).to_pylist()
        for r in range(start, self.ends[g]):
            cell = self.cells.get(r)
            if cell is not None:
                values[r - start] = {**(values[r - start] or {}), **cell} if self.kind == "struct" else cell
        table = table.set_column(idx, table.schema.field(idx), pa.array(values, type=table.schema.field(idx).type))
        if self.job.only_unsafe:
            table = table.take(pa.array([r - start for r in range(start, self.ends[g]) if r in self.cells], pa.int64()))
        if table.num_rows or not self.job.only_unsafe:
            self.writer.write_table(table, row_group_size=max(1, table.num_rows))
        for r in range(start, self.ends[g]):
            self.cells.pop(r, None)

    def finish(self) -> None:
        self.flush_until(self.ends[-1] if self.ends else 0)
        self.writer.close()
        self.pf.close()
        if os.path.lexists(self.target) and not self.job.overwrite:
            raise FileExistsError(f"{self.rel} appeared during the run; not overwritten")
        os.replace(self.tmp, self.target)

    def abort(self) -> None:
        for close in (self.writer.close, self.pf.close):
            try:
                close()
            except Exception:
                pass
        self.tmp.unlink(missing_ok=True)


def print_summary(summary: MaskSummary, root: Path) -> None:
    """A rich table on stderr: what was purified, copied, skipped, resumed, and what failed."""
    from rich.table import Table

    from guardalign.progress import stderr_console

    console = stderr_console()
    table = Table(title=f"guardalign mask → {root}", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows = [("items", summary.total), ("purified (unsafe)", summary.purified), ("copied (safe)", summary.copied),
            ("skipped (--only-unsafe)", summary.skipped), ("already done (earlier run)", summary.resumed),
            ("overlays", summary.overlays), ("paths sanitised", summary.sanitized),
            ("errors", summary.errors), ("not overwritten (exists)", summary.conflicts),
            ("excluded (inside --out-dir or repeated)", summary.excluded)]
    for i, (what, n) in enumerate(rows):
        if n or i < 3 or what == "errors":
            table.add_row(what, str(n))
        if i == 1:
            for cat, k in summary.by_category.most_common():
                table.add_row(f"  purified · {cat}", str(k))
    table.add_row("time", f"{summary.seconds:.1f} s")
    console.print(table)
    for rid, err in summary.error_list[:20]:
        console.print(f"{rid}: {err}", style="red", markup=False, highlight=False)
    if len(summary.error_list) > 20:
        console.print(f"… and {len(summary.error_list) - 20} more (see {root / MANIFEST})", style="red")
