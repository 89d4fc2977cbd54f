"""The one runner under every command and engine: items → decode → stage → sink.

:func:`run_job` owns what every batch job needs, so no command writes its own loop:

- **resume with provenance**: records already in the output are counted and skipped, and every one of them
  must carry the same ``settings`` as this run (:func:`check_settings` names each differing setting, exit 2);
- **dedupe**: an id seen twice in one run gets an error record under ``<id>#<k>`` instead of vanishing;
- **bounded prefetch**: items are decoded in worker threads at most ``prefetch`` ahead of the stage;
- **batching**: ``stage.batch_size`` decoded items per :meth:`Stage.process` call;
- **per-item errors**: a stage that fails on a batch is retried item by item, and an item that still fails
  gets an error record naming the exception; the batch goes on;
- **progress** on stderr with speed and ETA, counting resumed items as done;
- **summary, gates and exit codes** (:class:`RunSummary`, :class:`Gates`).

A stage (:class:`Stage`) only turns decoded items into records; a sink only writes them. The Ray engine runs
the same stage objects (``process`` on a batch of :class:`~guardalign.records.Decoded`), so results never depend
on the engine.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Protocol

from guardalign.errors import EXIT_EMPTY, EXIT_GATE, EXIT_OK, EXIT_UNREADABLE, ConfigError
from guardalign.records import Decoded, Item


class Stage(Protocol):
    """What differs between commands: records from a batch of decoded items."""

    name: str  # command name: progress label and summary title
    unit: str  # progress unit ("img", "prompt", "pair")
    batch_size: int  # decoded items per process() call

    def settings(self) -> dict[str, Any]:
        """JSON-able settings every record carries; a resume must match them exactly."""

    def process(self, batch: list[Decoded]) -> list[dict[str, Any]]:
        """One record per decoded item, in order; items with ``error`` set become error records."""


class Sink(Protocol):
    def write(self, records: list[dict[str, Any]]) -> None: ...


@dataclass(frozen=True)
class Gates:
    fail_on_unsafe: bool = False  # a gate fails when any record is unsafe
    max_unsafe_rate: float | None = None  # a gate fails when unsafe / readable exceeds this fraction

    @property
    def active(self) -> bool:
        return self.fail_on_unsafe or self.max_unsafe_rate is not None

    def validate(self) -> "Gates":
        if self.max_unsafe_rate is not None and not 0 <= self.max_unsafe_rate <= 1:
            raise ConfigError(f"invalid --max-unsafe-rate {self.max_unsafe_rate}: expected a fraction in [0, 1]")
        return self


@dataclass
class RunSummary:
    """Counts over every record in the output (an earlier run's records included when resuming)."""

    name: str = "run"  # the stage's name
    total: int = 0  # records in the output
    ok: int = 0  # records whose status is not "error"
    errors: int = 0  # error records
    unsafe: int = 0  # ok records with verdict "unsafe"
    by_category: Counter = field(default_factory=Counter)  # unsafe records per winning category
    tally: Counter = field(default_factory=Counter)  # stage-specific counts (Stage.account)
    error_list: list[tuple[str, str]] = field(default_factory=list)  # (id, error) of this run's errors
    resumed: int = 0  # items skipped because the output already had them
    processed: int = 0  # records produced by this run
    seconds: float = 0.0  # wall time of this run
    gate_failed: bool = False  # a gate tripped
    gate_reason: str = ""  # why the gate failed (or why nothing could be vouched for)
    empty_under_gate: bool = False  # a gate was set but no item was readable
    not_inputs: Any = None  # the source's SkipLog: files that are not images (no record), counted by reason

    @property
    def nothing_scanned(self) -> bool:  # the fault suite's name for an empty gated run
        return self.empty_under_gate

    @property
    def skipped(self) -> int:  # wave-1 name of ``resumed``
        return self.resumed

    @property
    def unsafe_rate(self) -> float:
        return self.unsafe / self.ok if self.ok else 0.0

    @property
    def throughput(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """A failed gate (1) outranks an empty gated run (4), which outranks unreadable inputs (3)."""
        if self.gate_failed:
            return EXIT_GATE
        if self.empty_under_gate:
            return EXIT_EMPTY
        return EXIT_UNREADABLE if self.errors else EXIT_OK

    def add(self, record: dict[str, Any], *, this_run: bool = True, sign: int = 1) -> None:
        """Count ``record`` (``sign=-1`` takes back a record that a stage has corrected)."""
        self.total += sign
        if failed(record):
            self.errors += sign
            if this_run and sign > 0:
                self.error_list.append((str(record.get("id")), str(record.get("error"))))
            return
        self.ok += sign
        if record.get("verdict") == "unsafe":
            self.unsafe += sign
            self.by_category[record.get("category") or "?"] += sign

    def apply_gates(self, gates: Gates) -> None:
        if gates.fail_on_unsafe and self.unsafe:
            self.gate_failed = True
            self.gate_reason = f"{self.unsafe} unsafe image(s) and --fail-on-unsafe is set"
        elif gates.max_unsafe_rate is not None and self.unsafe_rate > gates.max_unsafe_rate:
            self.gate_failed = True
            self.gate_reason = (f"unsafe rate {self.unsafe_rate:.2%} exceeds --max-unsafe-rate "
                                f"{gates.max_unsafe_rate:.2%}")
        elif gates.active and self.ok == 0:
            self.empty_under_gate = True
            self.gate_reason = ("no image was scanned, so the gate cannot pass (check the inputs and the skipped "
                                "files)")


def failed(record: dict[str, Any]) -> bool:
    """An error record, or any record that says why it has no output (e.g. mask's ``exists``)."""
    return record.get("status") == "error" or bool(record.get("error"))


def settings_diff(previous: Any, current: dict[str, Any]) -> list[str]:
    """``["tau: 0.75 → 0.5", ...]`` for every setting that differs (all of them when none were recorded)."""
    if not isinstance(previous, dict):
        return ["settings: not recorded (written by another tool or an older guardalign)"]
    keys = sorted(set(previous) | set(current))
    show = lambda v: "(unset)" if v is _MISSING else json.dumps(v, ensure_ascii=False)  # noqa: E731
    return [f"{k}: {show(previous.get(k, _MISSING))} → {show(current.get(k, _MISSING))}"
            for k in keys if previous.get(k, _MISSING) != current.get(k, _MISSING)]


_MISSING = object()


def check_settings(record: dict[str, Any], settings: dict[str, Any], out: str) -> None:
    """ConfigError (exit 2) naming every setting in which ``record`` differs from this run's."""
    diff = settings_diff(record.get("settings"), settings)
    if diff:
        raise ConfigError(
            f"cannot resume {out}: record {record.get('id')!r} was made with other settings ("
            + "; ".join(diff) + "). Resume with the same settings, or write to another --out.")


def run_job(
    items: Iterable[Item],
    stage: Stage,
    sink: Sink,
    *,
    previous: Iterable[dict[str, Any]] = (),
    done_if: Callable[[dict[str, Any]], bool] | None = None,
    out: str = "the output",
    total: int | None = None,
    workers: int = 4,
    prefetch: int | None = None,
    progress: bool = True,
    gates: Gates = Gates(),
    decode: Callable[[Item], Decoded] | bool = True,
    summary: RunSummary | None = None,
    skipped: Any = None,
) -> RunSummary:
    """Run ``stage`` over ``items`` into ``sink``; return the summary with gates applied.

    ``previous`` are the records already in the output (resume): each must carry this run's settings, and
    those for which ``done_if`` holds (all, by default) are counted and not redone. ``decode`` is True (full
    image decode in threads), False (the stage reads what it needs), or a function ``Item -> Decoded``.
    ``total`` (items, resumed ones included) sizes the progress bar. Optional stage hooks: ``account(record,
    tally, sign)`` for stage counts, ``drain()`` for (old, new) corrections of records already written,
    ``close()`` at the end and ``abort()`` on an exception. An exception from the sink (an output that cannot
    be written) ends the run. ``skipped`` is the source's log of inputs that are not images (see
    ``guardalign.io.sources.iter_items``), reported in the summary.
    """
    from guardalign.pipeline.progress import progress_bar

    settings = stage.settings()
    summary = summary if summary is not None else RunSummary()
    summary.name = stage.name
    done: set[str] = set()
    for rec in previous:
        check_settings(rec, settings, out)
        if done_if is None or done_if(rec):
            done.add(str(rec.get("id")))
            summary.add(rec, this_run=False)
            if getattr(stage, "account_previous", True):
                _account(stage, rec, summary)
    start = time.perf_counter()
    with progress_bar(stage.name, total, enabled=progress, unit=stage.unit) as advance:
        try:
            todo = _dedupe(items, done, summary, advance)
            for records in _record_batches(todo, stage, workers, prefetch, decode):
                _emit(records, stage, sink, summary, settings)
                advance(len(records))
            if hasattr(stage, "close"):
                stage.close()
            _emit([], stage, sink, summary, settings)
        except BaseException:
            if hasattr(stage, "abort"):
                stage.abort()
            raise
    summary.seconds = time.perf_counter() - start
    summary.not_inputs = skipped  # complete now that the items are exhausted
    summary.apply_gates(gates)
    return summary


def _emit(records: list[dict[str, Any]], stage: Stage, sink: Sink, summary: RunSummary,
          settings: dict[str, Any]) -> None:
    """Write a batch's records and any corrections the stage made to earlier ones; count them."""
    corrections = stage.drain() if hasattr(stage, "drain") else []
    for rec in records:
        rec["settings"] = settings
    rewritten = [new for old, new in corrections if old is not None]
    for rec in rewritten:
        rec["settings"] = settings
    if records or rewritten:
        sink.write(records + rewritten)
    for rec in records:
        summary.add(rec)
        _account(stage, rec, summary)
    summary.processed += len(records)
    for old, new in corrections:
        if old is not None:  # the entry is replaced; a correction without one is a run-level error
            summary.add(old, sign=-1)
            _account(stage, old, summary, -1)
            _account(stage, new, summary)
        summary.add(new)


def _account(stage: Stage, record: dict[str, Any], summary: RunSummary, sign: int = 1) -> None:
    account = getattr(stage, "account", None)
    if account is not None:
        account(record, summary.tally, sign) if sign != 1 else account(record, summary.tally)


def _dedupe(items: Iterable[Item], done: set[str], summary: RunSummary, advance) -> Iterator[Item]:
    """Skip ids already done; an id seen again in this run becomes an error item ``<id>#<k>``."""
    seen: dict[str, tuple[int, str]] = {}
    for item in items:
        count, first = seen.get(item.id, (0, item.source))
        seen[item.id] = (count + 1, first)
        if count:
            dup_id = f"{item.id}#{count + 1}"
            item = replace(item, id=dup_id, error=f"duplicate id {item.id!r} (first seen at {first}); "
                                                   "every input needs its own id")
        if item.id in done:
            summary.resumed += 1
            advance(1)
            continue
        yield item


def _record_batches(items: Iterator[Item], stage: Stage, workers: int, prefetch: int | None,
                    decode) -> Iterator[list[dict[str, Any]]]:
    """Yield one list of records per stage batch, in input order."""
    from guardalign.io.images import decode_stream

    size = max(1, int(stage.batch_size))
    if decode is False:
        stream: Iterable[Decoded] = (Decoded(it, None, None, it.error) for it in items)
    else:
        stream = decode_stream(items, workers=workers, prefetch=prefetch or max(8, 2 * size),
                               decode=None if decode is True else decode)
    pending: list[Decoded] = []
    for decoded in stream:
        pending.append(decoded)
        if len(pending) >= size:
            yield _process(stage, pending)
            pending = []
    if pending:
        yield _process(stage, pending)


def _process(stage: Stage, batch: list[Decoded]) -> list[dict[str, Any]]:
    """``stage.process(batch)``; on a failure, each item alone, so only the items that fail lose their record."""
    try:
        records = stage.process(batch)
    except Exception as exc:  # noqa: BLE001 - one bad batch must not cost the run
        if len(batch) == 1:
            return [failure_record(batch[0], exc, stage.name)]
        return [rec for d in batch for rec in _process(stage, [d])]
    if len(records) != len(batch):
        raise RuntimeError(f"stage {stage.name} returned {len(records)} records for {len(batch)} items")
    return records


def failure_record(decoded: Decoded, exc: BaseException, what: str) -> dict[str, Any]:
    """The error record of an item its stage failed on."""
    item = decoded.item
    return {"id": item.id, "source": item.source, "status": "error",
            "error": f"{what} failed on this item: {type(exc).__name__}: {exc}"}
