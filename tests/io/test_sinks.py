"""guardalign.io.sinks: strict JSONL, Parquet via journal, no clobbering, crash safety and resume."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from guardalign.errors import ConfigError, InputError
from guardalign.io.sinks import (
    SCAN_FIELDS,
    WRITERS,
    existing_ids,
    open_sink,
    read_records,
    scan_schema,
)


def full_record(i: int, **extra) -> dict:
    """A record with every scan field set (plus any extra keys)."""
    return {
        "id": f"img{i}.png", "source": f"/data/img{i}.png", "status": "ok", "error": None,
        "verdict": "unsafe" if i % 2 else "safe", "score": 0.25 + i / 8, "category": "violence",
        "categories": {"violence": 0.25 + i / 8, "sexual": 0.9}, "unsafe_patches": [0, i],
        "grid": [3, 3], "boxes": [[0, 0, 10, 10], [5, 5, 20, 20]], "patch_scores": [0.5, 0.125, 1.0],
        "patch_boxes": [[0, 0, 10, 10]], "width": 640, "height": 480, "method": "ot",
        "patches": "grid", "model": "ViT-B-32/openai", "anchors_sha256": "ab" * 32, "threshold": 0.75,
        "box_categories": ["violence", "sexual"], "notes": ["EXIF orientation applied"], "elapsed_s": 0.5,
        "sha256": "cd" * 32, "image_column": "image", "encodes": 10, **extra,
    }


def strict_lines(path: Path) -> list[dict]:
    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") or text == ""
    return [json.loads(line, parse_constant=no_constants) for line in text.splitlines()]


def test_registry_and_schema():
    assert set(WRITERS) == {"jsonl", "parquet"}
    names = scan_schema().names
    assert names == [n for n, _ in SCAN_FIELDS] + ["extra"]
    assert str(scan_schema().field("boxes").type) == "list<item: list<item: int32>>"


def test_jsonl_is_strict_json(tmp_path):
    out = tmp_path / "scan.jsonl"
    with open_sink(str(out)) as sink:
        sink.write([{"id": "a", "score": float("nan"), "patch_scores": [1.0, float("inf"), -math.inf],
                     "np": np.float32(0.5), "arr": np.arange(3), "flag": np.bool_(True), "t": (1, 2),
                     "path": Path("x/y.png"), "text": "unicode ✓"}])
        sink.write([])
        sink.write([{"id": "b", "categories": {"x": np.float64("nan")}}])
    a, b = strict_lines(out)
    assert a == {"id": "a", "score": None, "patch_scores": [1.0, None, None], "np": 0.5, "arr": [0, 1, 2],
                 "flag": True, "t": [1, 2], "path": "x/y.png", "text": "unicode ✓"}
    assert b == {"id": "b", "categories": {"x": None}}
    assert list(read_records(out)) == [a, b]


def test_unserialisable_record_fails_before_writing(tmp_path):
    out = tmp_path / "scan.jsonl"
    sink = open_sink(str(out))
    sink.write([{"id": "ok"}])
    with pytest.raises(TypeError, match="record 'bad'"):
        sink.write([{"id": "fine"}, {"id": "bad", "obj": object()}])
    sink.close()
    assert strict_lines(out) == [{"id": "ok"}]


def test_existing_output_is_never_overwritten(tmp_path):
    out = tmp_path / "scan.jsonl"
    out.write_text('{"id": "mine"}\n')
    for fmt in ("jsonl", "parquet"):
        target = out if fmt == "jsonl" else tmp_path / "scan.parquet"
        if fmt == "parquet":
            target.write_bytes(b"PAR1 user data")
        with pytest.raises(ConfigError, match="exists; pass --resume"):
            open_sink(str(target), fmt)
    assert out.read_text() == '{"id": "mine"}\n'
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    with open_sink(str(empty)) as sink:  # an empty file holds nothing to lose
        sink.write([{"id": "x"}])
    assert strict_lines(empty) == [{"id": "x"}]


def test_nothing_is_created_until_the_first_write(tmp_path):
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / f"sub_{fmt}" / f"scan.{fmt}"
        with pytest.raises(RuntimeError):
            with open_sink(str(out), fmt):
                raise RuntimeError("model failed to load")
        assert not out.parent.exists()
        open_sink(str(out), fmt).close()  # a run with zero inputs still leaves a (valid, empty) output
        assert list(read_records(out)) == []


def test_bad_targets_and_options(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        open_sink(str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        open_sink(str(tmp_path / "file" / "scan.jsonl"))
    with pytest.raises(ConfigError, match="unknown --format"):
        open_sink(str(tmp_path / "a.csv"), "csv")
    with pytest.raises(ConfigError, match="only --format jsonl"):
        open_sink("-", "parquet")
    with pytest.raises(ConfigError, match="--resume needs an output file"):
        open_sink("-", resume=True)
    assert existing_ids("-", "jsonl") == set() and existing_ids(str(tmp_path / "none"), "jsonl") == set()


def test_stdout_sink(capsys):
    sink = open_sink("-")
    sink.write([{"id": "a", "score": float("nan")}, {"id": "b"}])
    sink.close()
    out = capsys.readouterr().out
    assert out == '{"id": "a", "score": null}\n{"id": "b"}\n'


def test_resume_cuts_a_torn_line_and_appends(tmp_path):
    out = tmp_path / "scan.jsonl"
    with open_sink(str(out)) as sink:
        sink.write([{"id": "a"}, {"id": "b"}])
    with open(out, "ab") as f:
        f.write(b'{"id": "c", "sco')  # a crash in the middle of a write
    assert existing_ids(str(out), "jsonl") == {"a", "b"}
    assert [r["id"] for r in read_records(out)] == ["a", "b"]  # readers skip the torn tail
    with pytest.raises(ConfigError, match="--resume"):
        open_sink(str(out))
    sink = open_sink(str(out), resume=True)
    assert sink.existing == {"a", "b"}
    sink.write([{"id": "c"}])
    sink.close()
    assert [r["id"] for r in strict_lines(out)] == ["a", "b", "c"]


def test_resume_refuses_corruption_in_the_middle(tmp_path):
    out = tmp_path / "scan.jsonl"
    out.write_text('{"id": "a"}\nGARBAGE\n{"id": "b"}\n')
    with pytest.raises(ConfigError, match=r"scan.jsonl:2: not a valid JSON record"):
        open_sink(str(out), resume=True)
    with pytest.raises(InputError, match=r"scan.jsonl:2: invalid JSON"):
        list(read_records(out))
    out.write_text('{"no_id": 1}\n')
    with pytest.raises(ConfigError, match="has no 'id'"):
        existing_ids(str(out), "jsonl")


def test_resume_never_truncates_a_file_that_is_not_ours(tmp_path):
    for content in (b"\x89PNG\r\n\x1a\n\x00\x00binary", b'{"id": "a"}\nnotes without newline', b"plain text\n"):
        out = tmp_path / "user.jsonl"
        out.write_bytes(content)
        with pytest.raises(ConfigError, match="user.jsonl:[12]: not a"):
            open_sink(str(out), resume=True)
        assert out.read_bytes() == content
    out.write_bytes(b'{"id": "a"}\n\x00\x00\x00\x00')  # zero-filled tail after a power loss
    with open_sink(str(out), resume=True) as sink:
        sink.write([{"id": "b"}])
    assert [r["id"] for r in strict_lines(out)] == ["a", "b"]


def test_second_writer_on_the_same_file_is_refused(tmp_path):
    out = tmp_path / "scan.jsonl"
    first = open_sink(str(out))
    first.write([{"id": "a"}])
    second = open_sink(str(out), resume=True)
    with pytest.raises(ConfigError, match="another running guardalign"):
        second.write([{"id": "b"}])
    first.close()
    assert strict_lines(out) == [{"id": "a"}]


def test_parquet_round_trip_equals_written(tmp_path):
    out = tmp_path / "scan.parquet"
    written = [full_record(0), full_record(1, timing_ms=12.5, nested={"a": [1, 2]}), full_record(2, extra="kept")]
    sink = open_sink(str(out), "parquet")
    sink.write(written[:2])
    journal = tmp_path / "scan.parquet.partial.jsonl"
    assert journal.exists() and not out.exists()  # records are durable before the Parquet exists
    sink.write(written[2:])
    sink.close()
    assert not journal.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["scan.parquet"]
    assert pq.read_schema(out).remove_metadata().equals(scan_schema())
    assert list(read_records(out)) == written


def test_parquet_missing_keys_become_nulls(tmp_path):
    out = tmp_path / "scan.parquet"
    with open_sink(str(out), "parquet") as sink:
        sink.write([{"id": "bad.jpg", "status": "error", "error": "zero-byte file", "score": float("nan")}])
    (rec,) = read_records(out)
    assert rec == {n: None for n, _ in SCAN_FIELDS} | {"id": "bad.jpg", "status": "error", "error": "zero-byte file"}


def test_parquet_record_that_does_not_fit_fails_at_write(tmp_path):
    out = tmp_path / "scan.parquet"
    sink = open_sink(str(out), "parquet")
    with pytest.raises(ValueError, match="record 'x' does not fit the scan schema"):
        sink.write([{"id": "x", "grid": "three by three"}])
    sink.close()
    assert list(read_records(out)) == []


def test_parquet_resume_merges_finished_rows_and_journal(tmp_path):
    out = tmp_path / "scan.parquet"
    with open_sink(str(out), "parquet") as sink:
        sink.write([full_record(0), full_record(1)])
    sink = open_sink(str(out), "parquet", resume=True)  # a second, interrupted run
    assert sink.existing == {"img0.png", "img1.png"}
    sink.write([full_record(2)])
    sink.abort()
    journal = tmp_path / "scan.parquet.partial.jsonl"
    assert journal.exists() and existing_ids(str(out), "parquet") == {"img0.png", "img1.png", "img2.png"}
    with pytest.raises(ConfigError, match="interrupted; pass --resume"):
        open_sink(str(tmp_path / "scan.parquet"), "parquet")
    sink = open_sink(str(out), "parquet", resume=True)
    sink.write([full_record(3)])
    sink.close()
    assert list(read_records(out)) == [full_record(i) for i in range(4)] and not journal.exists()


def test_parquet_crash_between_replace_and_journal_delete(tmp_path):
    out = tmp_path / "scan.parquet"
    journal = tmp_path / "scan.parquet.partial.jsonl"
    with open_sink(str(out), "parquet") as sink:
        sink.write([full_record(0), full_record(1)])
    journal.write_text(json.dumps(full_record(1)) + "\n")  # as if the journal unlink never happened
    sink = open_sink(str(out), "parquet", resume=True)
    sink.write([full_record(2)])
    sink.close()
    assert [r["id"] for r in read_records(out)] == ["img0.png", "img1.png", "img2.png"]


def test_read_records_of_an_interrupted_parquet_run_include_the_journal(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_records(tmp_path / "none.jsonl")  # raised at the call, not at the first next()
    out = tmp_path / "scan.parquet"
    sink = open_sink(str(out), "parquet")
    sink.write([{"id": "a", "score": 0.5}])
    sink.abort()  # killed before close: only the journal exists
    assert not out.exists()
    (rec,) = read_records(out)
    assert rec == {n: None for n, _ in SCAN_FIELDS} | {"id": "a", "score": 0.5}
    sink = open_sink(str(out), "parquet", resume=True)
    sink.write([{"id": "b", "note": "x"}])
    sink.close()
    sink = open_sink(str(out), "parquet", resume=True)
    sink.write([{"id": "c"}])  # finished rows + a journal
    assert [r["id"] for r in read_records(out)] == ["a", "b", "c"]
    assert list(read_records(out))[1]["note"] == "x"
    sink.close()


WRITER_SCRIPT = """
import sys, time
from guardalign.io.sinks import open_sink
out, fmt, n, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
sink = open_sink(out, fmt, resume=True)
todo = [i for i in range(n) if str(i) not in sink.existing]
for s in range(0, len(todo), 7):
    sink.write([{"id": str(i), "status": "ok", "score": i / 3, "patch_scores": [0.5] * 40} for i in todo[s:s + 7]])
    time.sleep(pause)
sink.close()
"""


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_kill_9_then_resume_gives_every_id_exactly_once(tmp_path, fmt):
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    out = tmp_path / f"scan.{fmt}"
    live = out if fmt == "jsonl" else tmp_path / f"scan.{fmt}.partial.jsonl"
    n = 400
    proc = subprocess.Popen([sys.executable, str(script), str(out), fmt, str(n), "0.05"])  # ~3 s run: the kill lands mid-run
    deadline = time.monotonic() + 30
    while count_lines(live) < 50 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = count_lines(live)
    assert 50 <= done < n  # killed mid-run, records so far are on disk
    assert not out.exists() or fmt == "jsonl"
    with open(live, "ab") as f:
        f.write(b'{"id": "torn", "st')  # also leave a torn line, as a crash inside write() would
    subprocess.run([sys.executable, str(script), str(out), fmt, str(n), "0"], check=True, timeout=60)
    got = [r["id"] for r in read_records(out)]
    assert sorted(got, key=int) == [str(i) for i in range(n)]  # each exactly once, none torn
    if fmt == "jsonl":
        assert len(strict_lines(out)) == n
    else:
        assert not live.exists()
