"""``guardalign scan`` as a library function: source → decode → detector → sink, with CI gates.

``scan(...)``'s keyword arguments mirror the CLI flags one for one.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, TextIO

from guardalign.config import DetectConfig, EncoderConfig
from guardalign.errors import ConfigError

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_UNREADABLE = 0, 1, 2, 3
FORMATS = ("jsonl", "parquet")


@dataclass
class ScanSummary:
    """Counts over every record in the output (previous records included when resuming)."""

    total: int = 0  # records in the output
    ok: int = 0  # records with status ok
    errors: int = 0  # records with status error
    unsafe: int = 0  # ok records judged unsafe
    by_category: Counter = field(default_factory=Counter)  # unsafe records per winning category
    error_list: list[tuple[str, str]] = field(default_factory=list)  # (id, error) of this run's errors
    skipped: int = 0  # ids skipped because --resume found them already done
    seconds: float = 0.0  # wall time of this run
    processed: int = 0  # records produced by this run
    gate_failed: bool = False  # --fail-on-unsafe / --max-unsafe-rate tripped
    gate_reason: str = ""  # why the gate failed

    @property
    def unsafe_rate(self) -> float:
        return self.unsafe / self.ok if self.ok else 0.0

    @property
    def throughput(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """DESIGN §3: a failed gate (1) outranks unreadable inputs (3)."""
        if self.gate_failed:
            return EXIT_GATE
        return EXIT_UNREADABLE if self.errors else EXIT_OK

    def add(self, record: dict[str, Any], *, this_run: bool = True) -> None:
        self.total += 1
        if record.get("status") == "ok":
            self.ok += 1
            if record.get("verdict") == "unsafe":
                self.unsafe += 1
                self.by_category[record.get("category") or "?"] += 1
        else:
            self.errors += 1
            if this_run:
                self.error_list.append((str(record.get("id")), str(record.get("error"))))


def scan(
    inputs: Sequence[str],
    *,
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
    out: str = "-",
    format: str = "jsonl",
    image_column: str | None = None,
    id_column: str | None = None,
    batch_size: int = DetectConfig.batch_size,
    device: str = EncoderConfig.device,
    precision: str = EncoderConfig.precision,
    workers: int = 4,
    resume: bool = False,
    fail_on_unsafe: bool = False,
    max_unsafe_rate: float | None = None,
    stdin: TextIO | None = None,
    progress: bool = True,
    detector: Any = None,
) -> ScanSummary:
    """Scan images and write one record per input (fields: DESIGN §3).

    Raises a ``GuardalignError`` (exit 2) before writing anything when flags, the anchors YAML, the
    model or an input is unusable. Unreadable images become ``status: error`` records and the run goes on.
    ``detector`` lets a caller reuse an already-loaded ``Detector`` (the other detection flags are then ignored).
    """
    from guardalign.io.sinks import existing_ids, open_sink, read_records
    from guardalign.io.sources import count_items, iter_items

    _check_output(format, out, max_unsafe_rate)
    cfg = DetectConfig(
        method=method, patches=patches, grid=grid, stride=stride, tau=tau, theta=theta, eps=eps, batch_size=batch_size,
        scales=tuple(scales), budget=budget, dense_path=dense_path,
    ).validate()
    # iter_items validates every input and Parquet schema now, before anything is written.
    items = iter_items(list(inputs), image_column=image_column, id_column=id_column, stdin=stdin)
    if detector is None:
        from guardalign.detection.detector import Detector

        detector = Detector.from_options(
            clip_model=clip_model, pretrained=pretrained, anchors=anchors, device=device, precision=precision,
            **_config_kwargs(cfg),
        )

    summary = ScanSummary()
    done: set[str] = set()
    if resume and out != "-":
        done = existing_ids(out, format)
        for rec in read_records(out) if done else ():
            summary.add(rec, this_run=False)
    total = None if "-" in inputs else count_items(list(inputs), image_column=image_column, id_column=id_column)

    from guardalign.pipeline.progress import progress_bar

    start = time.perf_counter()
    # The sink creates its file on the first write and aborts cleanly (nothing new) on an exception.
    with open_sink(out, format, resume=resume) as sink, progress_bar("scan", total, enabled=progress) as advance:
        for records in _score_stream(items, detector, done, summary, workers, cfg.batch_size):
            sink.write(records)
            for rec in records:
                summary.add(rec)
            summary.processed += len(records)
            advance(len(records))
    summary.seconds = time.perf_counter() - start
    _apply_gates(summary, fail_on_unsafe, max_unsafe_rate)
    if progress:
        print_summary(summary)
    return summary


def _check_output(format: str, out: str, max_unsafe_rate: float | None) -> None:
    if format not in FORMATS:
        raise ConfigError(f"invalid --format {format!r}: expected one of {', '.join(FORMATS)}")
    if format == "parquet" and out == "-":
        raise ConfigError("--format parquet needs a file: pass --out results.parquet (stdout is JSONL only)")
    if max_unsafe_rate is not None and not 0 <= max_unsafe_rate <= 1:
        raise ConfigError(f"invalid --max-unsafe-rate {max_unsafe_rate}: expected a fraction in [0, 1]")


def _config_kwargs(cfg: DetectConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def _score_stream(items, detector, done: set[str], summary: ScanSummary, workers: int, batch_size: int):
    """Yield lists of records in input order, one list per detector batch."""
    from guardalign.io.sources import decode_stream

    def todo() -> Iterable:
        for item in items:
            if item.id in done:
                summary.skipped += 1
                continue
            done.add(item.id)  # duplicate ids within one run are scanned once
            yield item

    pending: list = []
    for decoded in decode_stream(todo(), workers=workers, prefetch=max(8, 2 * batch_size)):
        pending.append(decoded)
        if len(pending) >= batch_size:
            yield _score_batch(pending, detector)
            pending = []
    if pending:
        yield _score_batch(pending, detector)


def _score_batch(batch: list, detector) -> list[dict[str, Any]]:
    """Detect the decodable images of a batch; keep input order, error records for the rest."""
    good = [d for d in batch if d.image is not None and d.error is None and d.item.error is None]
    good_ids = {id(d) for d in good}  # identity: Decoded's dataclass __eq__ would compare pixels
    t0 = time.perf_counter()
    try:
        dets = iter(detector.detect([d.image for d in good]))
        failure = None
    except Exception as exc:  # a model failure on one batch must not lose the others' records
        dets, failure = iter(()), f"detector failed on this batch: {type(exc).__name__}: {exc}"
    per_image = (time.perf_counter() - t0) / max(1, len(good))  # amortised model time, for reports
    records = []
    for d in batch:
        base = {"id": d.item.id, "source": d.item.source}
        error = d.item.error or d.error or (failure if id(d) in good_ids else None)
        if error:
            records.append({**base, "status": "error", "error": error, "verdict": None})
            continue
        rec = {**base, "status": "ok", "error": None, **next(dets).to_record()}
        rec["sha256"] = d.info.sha256  # of the stored bytes: mask --from-scan refuses an image that changed
        rec["notes"] = _notes(d.info)
        rec["elapsed_s"] = round(per_image, 6)
        records.append(rec)
    return records


def _notes(info) -> list[str]:
    notes = []
    if info is not None and getattr(info, "frames", 1) > 1:
        notes.append(f"animated image: first of {info.frames} frames used")
    if info is not None and getattr(info, "exif_rotated", False):
        notes.append("EXIF orientation applied")
    return notes


def _apply_gates(summary: ScanSummary, fail_on_unsafe: bool, max_unsafe_rate: float | None) -> None:
    if fail_on_unsafe and summary.unsafe:
        summary.gate_failed, summary.gate_reason = True, f"{summary.unsafe} unsafe image(s) and --fail-on-unsafe is set"
    elif max_unsafe_rate is not None and summary.unsafe_rate > max_unsafe_rate:
        summary.gate_failed = True
        summary.gate_reason = f"unsafe rate {summary.unsafe_rate:.2%} exceeds --max-unsafe-rate {max_unsafe_rate:.2%}"


def print_summary(summary: ScanSummary) -> None:
    """A rich table on stderr: counts by verdict and category, errors, throughput, gate."""
    from rich.table import Table

    from guardalign.pipeline.progress import print_errors, stderr_console

    console = stderr_console()
    table = Table(title="guardalign scan", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("records", str(summary.total))
    table.add_row("safe", str(summary.ok - summary.unsafe))
    table.add_row("unsafe", f"{summary.unsafe} ({summary.unsafe_rate:.1%} of readable)")
    for cat, n in summary.by_category.most_common():
        table.add_row(f"  unsafe · {cat}", str(n))
    table.add_row("errors", str(summary.errors))
    if summary.skipped:
        table.add_row("skipped (resume)", str(summary.skipped))
    table.add_row("throughput", f"{summary.throughput:.1f} img/s over {summary.seconds:.1f} s")
    console.print(table)
    print_errors(console, summary.error_list, see="the records")
    if summary.gate_failed:
        console.print(f"GATE FAILED: {summary.gate_reason}", style="bold red", markup=False)
