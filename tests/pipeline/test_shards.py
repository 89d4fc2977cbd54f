"""guardalign.pipeline.shards and the engine flags: ordered exactly-once shards, resume checks, merge, gates."""
from __future__ import annotations

import json

import pytest

from guardalign.errors import ConfigError
from guardalign.io.sinks import read_records
from guardalign.pipeline.fragments import Fragment
from guardalign.pipeline.ray_engine import engine_config
from guardalign.pipeline.runner import Gates, RunSummary
from guardalign.pipeline.merge import merge
from guardalign.pipeline.shards import SUMMARY_FIELDS, OutDir, ShardWriter, add_counts, encode, prepare

SETTINGS = {"tau": None, "model": "m"}


def rec(i, verdict="safe"):
    return {"id": f"f#{i}", "source": "f", "status": "ok", "error": None, "verdict": verdict,
            "category": "violence" if verdict == "unsafe" else None}


def add(w, pos, record):
    return w.add(pos, {k: record.get(k) for k in SUMMARY_FIELDS}, encode(record, SETTINGS, w.fmt))


def finished(outdir, key, n, fmt="jsonl", order=None):
    frag = Fragment(key, "files", files=tuple((f"f#{i}", "x", None) for i in range(n)), size=n, stamp="s")
    w = ShardWriter(outdir, frag, fmt, SETTINGS, group=2)
    for i in order or range(n):
        add(w, i, rec(i, "unsafe" if i == 0 else "safe"))
    w.set_end(n)
    return frag, w.finish()


def test_records_land_in_order_once_whatever_order_they_arrive_in(tmp_path):
    outdir = OutDir(str(tmp_path / "out"))
    outdir.claim()
    frag = Fragment("k", "files", size=5, stamp="s")
    w = ShardWriter(outdir, frag, "jsonl", SETTINGS)
    got = []
    for pos in (2, 0, 0, 1, 4, 2, 3):  # out of order, with repeats (a re-run block)
        got += [r["id"] for r in add(w, pos, rec(pos))]
    assert got == [f"f#{i}" for i in range(5)] and not w.complete
    w.set_end(5)
    assert w.complete
    entry = w.finish()
    assert [r["id"] for r in read_records(tmp_path / "out" / entry["shard"])] == [f"f#{i}" for i in range(5)]
    assert list(read_records(tmp_path / "out" / entry["shard"])) == [{**rec(i), "settings": SETTINGS} for i in range(5)]
    assert (entry["records"], entry["ok"], entry["unsafe"]) == (5, 5, 0)
    assert json.loads((tmp_path / "out" / "_fragments" / (entry["shard"][7:-6] + ".json")).read_text()) == entry
    outdir.release()


def test_prepare_refuses_and_resumes(tmp_path):
    outdir = OutDir(str(tmp_path / "out"))
    outdir.claim()
    done, entry = finished(outdir, "a", 3)
    other = Fragment("b", "files", size=1, stamp="s")
    with pytest.raises(ConfigError, match="--resume"):
        prepare(outdir, [done, other], SETTINGS, resume=False, overwrite=False)
    with pytest.raises(ConfigError, match=r"tau: null → 0\.5"):
        prepare(outdir, [done, other], {**SETTINGS, "tau": 0.5}, resume=True, overwrite=False)
    todo, prev = prepare(outdir, [done, other], SETTINGS, resume=True, overwrite=False)
    assert [f.key for f in todo] == ["b"] and prev == [entry]
    changed = Fragment("a", "files", size=3, stamp="input changed")
    assert [f.key for f in prepare(outdir, [changed], SETTINGS, resume=True, overwrite=False)[0]] == ["a"]
    todo, prev = prepare(outdir, [done, other], {**SETTINGS, "tau": 0.5}, resume=False, overwrite=True)
    assert len(todo) == 2 and prev == [] and not (tmp_path / "out" / entry["shard"]).exists()
    outdir.release()


def test_merge_and_gates_from_the_entries(tmp_path):
    outdir = OutDir(str(tmp_path / "out"))
    outdir.claim()
    _, e1 = finished(outdir, "a", 3, fmt="parquet", order=[2, 1, 0])
    _, e2 = finished(outdir, "b", 2, fmt="jsonl")
    for target in ("all.jsonl", "all.parquet"):  # each kind of shard into each kind of file
        assert merge(outdir, [e1, e2], str(tmp_path / target), overwrite=False) == 5
        assert [r["id"] for r in read_records(tmp_path / target)] == ["f#0", "f#1", "f#2", "f#0", "f#1"]
    assert list(read_records(tmp_path / "all.parquet"))[0]["settings"] == SETTINGS
    with pytest.raises(ConfigError, match="exists"):
        merge(outdir, [e1], str(tmp_path / "all.jsonl"), overwrite=False)
    s = RunSummary()
    for e in (e1, e2):
        add_counts(s, e)
    s.apply_gates(Gates(max_unsafe_rate=0.3))
    assert (s.total, s.unsafe, s.resumed, s.gate_failed, s.exit_code) == (5, 2, 5, True, 1)
    outdir.release()


def test_engine_flags():
    assert engine_config("local", ray_address=None, concurrency=None, gpus_per_worker=None) is None
    with pytest.raises(ConfigError, match="--concurrency, --merge only apply with --engine ray"):
        engine_config("local", ray_address=None, concurrency=2, gpus_per_worker=None, merge="x.parquet")
    with pytest.raises(ConfigError, match="invalid --engine"):
        engine_config("spark", ray_address=None, concurrency=None, gpus_per_worker=None)
    with pytest.raises(ConfigError, match="--concurrency 0"):
        engine_config("ray", ray_address=None, concurrency=0, gpus_per_worker=None)
    cfg = engine_config("ray", ray_address="auto", concurrency=3, gpus_per_worker=0.5)
    assert (cfg.address, cfg.concurrency, cfg.gpus_per_worker) == ("auto", 3, 0.5)


def test_cli_refuses_ray_flags_without_the_ray_engine(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    (tmp_path / "in").mkdir()
    res = CliRunner().invoke(app, ["scan", str(tmp_path / "in"), "--concurrency", "2", "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "--concurrency only apply with --engine ray" in res.output
    res = CliRunner().invoke(app, ["mask", str(tmp_path / "in"), "--out-dir", str(tmp_path / "o"), "--engine", "spark"])
    assert res.exit_code == 2 and "invalid --engine 'spark'" in res.output
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o").exists()
