"""scan --engine ray on a real local Ray cluster: same records as local, resume, settings, a killed worker."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from badinputs import make_good_images
from guardalign.commands.scan import scan
from guardalign.errors import ConfigError
from guardalign.io.sinks import read_records
from guardalign.io.sources import iter_items
from shards import good_shard, image_bytes, image_parquet, write_tar

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flags(tiny_clip_config, tiny_clip_checkpoint):
    # batch 1: each image is encoded alone on both engines, so even the last float bit must agree
    return {"clip_model": str(tiny_clip_config), "pretrained": str(tiny_clip_checkpoint), "device": "cpu",
            "batch_size": 1, "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-data")
    make_good_images(d / "imgs", n=3)
    (d / "imgs" / "bad.png").write_bytes(b"not an image")
    image_parquet(d / "p.parquet", 5, group=2)
    good_shard(d / "shards" / "a.tar", n=3)
    write_tar(d / "shards" / "b.tar", [("x.png", image_bytes(7)), ("y.png", image_bytes(8)), ("x.json", b"{}"),
                                       ("z.tga", image_bytes(9, "TGA", size=(40, 30)))])  # TGA: told by its name
    return d


def plain(records, uri_prefix=""):
    """Records without the timing field, URI sources written as the local path they name."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "elapsed_s"}
        if uri_prefix and str(r.get("source", "")).startswith(uri_prefix):
            r["source"] = r["source"][len(uri_prefix):]
        out.append(r)
    return out


@pytest.fixture(scope="module")
def runs(ray_cluster, data, flags, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-out")
    local_inputs = [str(data / "imgs"), str(data / "p.parquet"), str(data / "shards")]
    ray_inputs = [str(data / "imgs"), f"file://{data}/p.parquet", str(data / "shards")]
    local = scan(local_inputs, out=str(tmp / "local.parquet"), **flags)
    remote = scan(ray_inputs, out=str(tmp / "out"), engine="ray", merge=str(tmp / "merged.parquet"), **flags)
    return {"tmp": tmp, "local": local, "ray": remote, "inputs": ray_inputs}


def test_ray_and_local_records_are_identical(runs):
    tmp = runs["tmp"]
    local = list(read_records(tmp / "local.parquet"))
    merged = list(read_records(tmp / "merged.parquet"))
    assert plain(merged, "file://") == plain(local)  # same ids, order, verdicts, scores, errors and settings
    assert any(r["status"] == "error" and "not grouped by key" in r["error"] for r in merged)
    tga = next(r for r in merged if r["id"].endswith("b.tar#z"))  # no magic bytes (its header reads as CUR)
    assert (tga["status"], tga["width"], tga["height"]) == ("ok", 40, 30)
    assert sum(r["source"].startswith("file://") for r in merged) == 5  # the URI input was read through pyarrow
    a, b = runs["local"], runs["ray"]
    assert (b.total, b.ok, b.errors, b.unsafe, dict(b.by_category)) == (a.total, a.ok, a.errors, a.unsafe,
                                                                          dict(a.by_category))
    assert b.exit_code == a.exit_code == 3  # unreadable inputs: the same exit code as a local run


def test_manifest_maps_inputs_to_shards_with_counts(runs):
    out = runs["tmp"] / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    frags = manifest["fragments"]
    assert [f["kind"] for f in frags] == ["files", "parquet", "tar", "tar"]
    assert frags[1]["input"].startswith("file://") and frags[2]["input"].endswith("a.tar")
    assert manifest["engine"] == "ray" and manifest["inputs"] == runs["inputs"]
    assert manifest["totals"]["records"] == runs["local"].total == sum(f["records"] for f in frags)
    for f in frags:
        assert len(list(read_records(out / f["shard"]))) == f["records"] and f["format"] == "parquet"
        assert (out / "_fragments" / (Path(f["shard"]).stem + ".json")).is_file()
    assert manifest["settings"] == list(read_records(runs["tmp"] / "local.parquet"))[0]["settings"]
    assert not (out / ".staging").exists() and not (out / ".lock").exists()


def test_resume_redoes_only_unfinished_fragments(runs, flags, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(runs["tmp"] / "out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    lost = manifest["fragments"][2]  # a.tar: as if the run died while writing it
    (out / lost["shard"]).unlink()
    (out / "_fragments" / (Path(lost["shard"]).stem + ".json")).unlink()
    (out / ".staging").mkdir()
    (out / ".staging" / Path(lost["shard"]).name).write_text('{"id": "half-written"')
    kept = {f["shard"]: (out / f["shard"]).stat().st_mtime_ns for f in manifest["fragments"] if f is not lost}
    with pytest.raises(ConfigError, match="--resume"):
        scan(runs["inputs"], out=str(out), engine="ray", **flags)
    s = scan(runs["inputs"], out=str(out), engine="ray", resume=True, merge=str(tmp_path / "merged.jsonl"), **flags)
    assert (s.resumed, s.processed, s.total) == (runs["ray"].total - lost["records"], lost["records"], runs["ray"].total)
    assert {k: (out / k).stat().st_mtime_ns for k in kept} == kept  # finished shards were not rewritten
    assert plain(read_records(tmp_path / "merged.jsonl")) == plain(read_records(runs["tmp"] / "merged.parquet"))
    # a resume with other settings is refused before anything runs, naming each setting
    with pytest.raises(ConfigError, match=r"tau: null → 2\.0"):
        scan(runs["inputs"], out=str(out), engine="ray", resume=True, tau=2.0, **flags)
    # every fragment done: nothing runs, and the gates see the aggregated counts
    again = scan(runs["inputs"], out=str(out), engine="ray", resume=True, fail_on_unsafe=True, **flags)
    assert (again.resumed, again.processed, again.errors) == (s.total, 0, runs["local"].errors)
    assert again.exit_code == runs["local"].exit_code


def _processes(word: str) -> list[tuple[int, str]]:
    """(pid, command line) of the Ray worker processes whose title names ``word``."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::") and word in cmd:
                pids.append((int(pid), cmd))
    return pids


def test_a_killed_worker_still_gives_every_id_exactly_once(ray_cluster, flags, tmp_path):
    # enough work after the first fragment for the kill to land mid-run even on a fast machine: 8 shards of 12
    # images, 26 windows each (--stride 0.5)
    shards = [good_shard(tmp_path / "in" / f"s{k}.tar", n=12, start=20 * k, sidecars=False) for k in range(8)]
    inputs = [str(p) for p in shards]
    out = tmp_path / "out"
    killed: list[tuple[str, int]] = []  # (process title, fragments finished when it was killed)

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            done = list((out / "_fragments").glob("*.json")) if (out / "_fragments").is_dir() else []
            if done:
                for pid, cmd in _processes("DetectActor") + _processes("read_decode"):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append((cmd, len(done)))
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    flags = {**flags, "stride": 0.5}
    s = scan(inputs, out=str(out), engine="ray", format="jsonl", merge=str(tmp_path / "all.jsonl"), **flags)
    thread.join(timeout=5)
    assert killed and killed[0][1] < len(shards), f"no worker was killed mid-run: {killed}"
    # the model actor was killed, and it only runs the model: decoding is in separate CPU tasks
    assert any("DetectActor" in cmd and "read_decode" not in cmd for cmd, _ in killed), killed
    ids = [r["id"] for r in read_records(tmp_path / "all.jsonl")]
    want = [i.id for i in iter_items(inputs)]
    assert ids == want and len(set(ids)) == len(ids) == 96  # every id once, in input order
    assert (s.total, s.errors, s.exit_code) == (96, 0, 0)
    local = scan(inputs, out=str(tmp_path / "local.jsonl"), **flags)  # and JSONL shards match a local run too
    assert plain(read_records(tmp_path / "all.jsonl")) == plain(read_records(tmp_path / "local.jsonl"))
    assert local.total == 96
