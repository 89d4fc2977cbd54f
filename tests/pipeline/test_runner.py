"""The one runner: resume with provenance, dedupe, batching, per-item errors, corrections, gates."""
from __future__ import annotations

import json

import pytest

from guardalign.errors import EXIT_EMPTY, EXIT_GATE, EXIT_OK, EXIT_UNREADABLE, ConfigError
from guardalign.pipeline.runner import Gates, RunSummary, check_settings, run_job, settings_diff
from guardalign.records import Item


class Listing:
    def __init__(self):
        self.records = []

    def write(self, records):
        self.records.extend(json.loads(json.dumps(r)) for r in records)


class Parity:
    """Unsafe when the item's number is odd; raises on items named in ``boom``; records batch sizes."""

    name, unit = "parity", "img"

    def __init__(self, batch_size=2, boom=(), settings=None):
        self.batch_size, self.boom, self.batches = batch_size, set(boom), []
        self._settings = settings or {"tau": 0.5, "model": "m"}

    def settings(self):
        return self._settings

    def process(self, batch):
        self.batches.append([d.item.id for d in batch])
        if any(d.item.id in self.boom for d in batch):
            raise RuntimeError("kaput")
        return [{"id": d.item.id, "status": "error", "error": d.item.error} if d.item.error else
                {"id": d.item.id, "status": "ok", "verdict": "unsafe" if int(d.item.id[-1]) % 2 else "safe",
                 "category": "c"} for d in batch]


def items(ids):
    return [Item(id=i, source=f"src/{i}") for i in ids]


def run(ids, stage=None, **kw):
    sink = Listing()
    stage = stage or Parity()
    summary = run_job(items(ids), stage, sink, decode=False, progress=False, **kw)
    return summary, sink.records, stage


def test_batches_records_in_order_with_settings():
    s, recs, stage = run(["a0", "a1", "a2", "a3", "a4"])
    assert [r["id"] for r in recs] == ["a0", "a1", "a2", "a3", "a4"]
    assert stage.batches == [["a0", "a1"], ["a2", "a3"], ["a4"]]
    assert all(r["settings"] == {"tau": 0.5, "model": "m"} for r in recs)
    assert (s.total, s.ok, s.unsafe, s.errors, s.processed, s.exit_code) == (5, 5, 2, 0, 5, EXIT_OK)


def test_a_failing_item_costs_only_its_record():
    s, recs, _ = run(["a0", "a1", "a2", "a3"], Parity(batch_size=4, boom={"a2"}))
    assert [r["status"] for r in recs] == ["ok", "ok", "error", "ok"]
    assert "RuntimeError: kaput" in recs[2]["error"] and recs[2]["id"] == "a2"
    assert (s.errors, s.exit_code, s.error_list[0][0]) == (1, EXIT_UNREADABLE, "a2")


def test_repeated_ids_get_their_own_error_record():
    s, recs, _ = run(["a0", "a1", "a0", "a0"])
    assert [r["id"] for r in recs] == ["a0", "a1", "a0#2", "a0#3"]
    assert "duplicate id 'a0' (first seen at src/a0)" in recs[2]["error"]


def test_resume_skips_done_ids_and_counts_them():
    previous = [{"id": "a0", "status": "ok", "verdict": "unsafe", "category": "c", "settings": {"tau": 0.5, "model": "m"}}]
    s, recs, _ = run(["a0", "a1", "a2"], previous=previous)
    assert [r["id"] for r in recs] == ["a1", "a2"]
    assert (s.resumed, s.total, s.unsafe, s.processed) == (1, 3, 2, 2)


def test_resume_with_other_settings_names_each_one():
    previous = [{"id": "a0", "status": "ok", "settings": {"tau": 0.75, "model": "m", "grid": 3}}]
    with pytest.raises(ConfigError) as e:
        run(["a0", "a1"], previous=previous, out="scan.jsonl")
    msg = str(e.value)
    assert "cannot resume scan.jsonl" in msg and "tau: 0.75 → 0.5" in msg and "grid: 3 → (unset)" in msg
    assert "model" not in msg.split("settings (")[1]
    assert settings_diff(None, {"a": 1}) == ["settings: not recorded (written by another tool or an older guardalign)"]
    check_settings({"id": "x", "settings": {"a": 1}}, {"a": 1}, "o")  # equal settings pass


def test_gates_and_exit_codes():
    s, _, _ = run(["a0", "a1"], gates=Gates(fail_on_unsafe=True))
    assert s.gate_failed and s.exit_code == EXIT_GATE
    s, _, _ = run(["a0", "a2"], gates=Gates(max_unsafe_rate=0.0))
    assert not s.gate_failed and s.exit_code == EXIT_OK
    s, _, _ = run([], gates=Gates(fail_on_unsafe=True))
    assert s.exit_code == EXIT_EMPTY and "no image was scanned" in s.gate_reason
    with pytest.raises(ConfigError):
        Gates(max_unsafe_rate=1.5).validate()


class Revising(Parity):
    """Corrects its first record to an error once the third item arrives (like an abandoned Parquet output)."""

    def __init__(self):
        super().__init__(batch_size=1)
        self.first, self.corrections, self.closed = None, [], False

    def process(self, batch):
        recs = super().process(batch)
        if self.first is None:
            self.first = recs[0]
        elif batch[0].item.id == "a3":
            self.corrections.append((self.first, {**self.first, "status": "error", "error": "revoked"}))
        return recs

    def drain(self):
        out, self.corrections = self.corrections, []
        return out

    def close(self):
        self.closed = True


def test_corrections_are_written_and_recounted():
    stage = Revising()
    s, recs, _ = run(["a1", "a2", "a3"], stage)
    assert [r["id"] for r in recs] == ["a1", "a2", "a3", "a1"] and recs[-1]["error"] == "revoked"
    assert (s.total, s.ok, s.errors, s.unsafe, stage.closed) == (3, 2, 1, 1, True)


def test_summary_add_and_take_back():
    s = RunSummary()
    rec = {"id": "x", "status": "ok", "verdict": "unsafe", "category": "c"}
    s.add(rec)
    s.add(rec, sign=-1)
    assert (s.total, s.ok, s.unsafe, s.by_category["c"]) == (0, 0, 0, 0)
