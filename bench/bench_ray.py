"""Issue 15 bench: the Ray engine against the local one, on this machine.

- throughput: ``scan --engine ray`` ÷ local ``scan`` on the same 2,000-row Parquet (224×224 JPEGs, dense patches),
  tiny CLIP and random ViT-B-32, one local Ray cluster (started before the clock, as a cluster is). End to end
  (model loads included: Ray loads the model twice, once on the driver to check the options, once per actor) and
  steady state (first record to last). Target ≥ 0.85 for ViT-B-32.
- memory: peak RSS of the driver and of every Ray worker process (VmHWM), and object-store spilling, scanning a small
  and a 10× larger Parquet (tiny CLIP), each in a fresh process with its own Ray.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.bench_scan import write_parquet
from bench.common import machine, table, write_section

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny-clip.json"


def _tiny_checkpoint(folder: Path) -> Path:
    import torch

    from guardalign.models.clip import load_encoder, save_checkpoint

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_checkpoint(load_encoder(str(TINY), "none", device="cpu").model, folder / "tiny.safetensors")


def _vmhwm_mib(pid: int | str = "self") -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024


def _workers() -> dict[int, str]:
    """Ray worker processes (their titles start with ``ray::``) → title."""
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::"):
                out[int(pid)] = cmd
    return out


def _first_record_clock(box: dict):
    """Wrap ray_engine.results so the time of the first record reaching the driver is noted in ``box``."""
    from guardalign.pipeline import ray_engine

    original = ray_engine.results

    def timed(ds):
        for n, row in enumerate(original(ds)):
            if n == 0:
                box["first"] = time.perf_counter()
            yield row
        box["last"] = time.perf_counter()

    ray_engine.results = timed
    return original


def _timed_scan(parquet: str, out: str, model: tuple[str, str], engine: str, batch: int) -> dict:
    from guardalign.commands.scan import scan
    from guardalign.pipeline import ray_engine

    box: dict = {}
    original = _first_record_clock(box) if engine == "ray" else None
    t = time.perf_counter()
    try:
        s = scan([parquet], out=out, clip_model=model[0], pretrained=model[1], patches="dense", batch_size=batch,
                 device="cpu", progress=False, **({"engine": "ray", "format": "jsonl"} if engine == "ray" else {}))
    finally:
        if original is not None:
            ray_engine.results = original
    wall = time.perf_counter() - t
    first = (box["first"] - t) if engine == "ray" else wall - s.seconds  # Ray: call → first record; local: load
    return {"n": s.total, "wall": wall, "startup": first}


def child_throughput(rows: int, batch: int) -> dict:
    """In a fresh process: a local Ray (2 CPUs), then local and Ray scans of both models on one Parquet."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = str(write_parquet(tmp / "data.parquet", rows, 224))
        models = {"tiny CLIP": (str(TINY), str(_tiny_checkpoint(tmp))), "ViT-B-32 (random)": ("ViT-B-32", "none")}
        for name, model in models.items():
            local = _timed_scan(data, str(tmp / f"{name}.jsonl"), model, "local", batch)
            remote = _timed_scan(data, str(tmp / f"{name}-ray"), model, "ray", batch)
            assert local["n"] == remote["n"] == rows
            out[name] = {"local": local, "ray": remote}
    ray.shutdown()
    return out


def child_memory(rows: int) -> dict:
    """In a fresh process with its own Ray: scan ``rows`` on Ray; peak RSS of the driver and workers, spilling."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = str(write_parquet(tmp / "data.parquet", rows, 224))
        ckpt = _tiny_checkpoint(tmp)
        base = _vmhwm_mib()
        t = time.perf_counter()
        from guardalign.commands.scan import scan

        s = scan([data], out=str(tmp / "out"), engine="ray", clip_model=str(TINY), pretrained=str(ckpt),
                 patches="dense", batch_size=64, device="cpu", progress=False)
        wall = time.perf_counter() - t
        workers = {pid: (cmd, _vmhwm_mib(pid)) for pid, cmd in _workers().items()}
    summary = _spill_summary()
    ray.shutdown()
    return {"rows": rows, "records": s.total, "wall": wall, "driver_mib": _vmhwm_mib(), "driver_before_mib": base,
            "workers": sorted(workers.values(), key=lambda w: -w[1]), "spill": summary}


def _spill_summary() -> str:
    """The raylet's own spilling counters (its debug state, dumped every 10 s, so read after a wait)."""
    import ray

    time.sleep(12)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    text = (session / "logs" / "debug_state.txt").read_text()
    found = [re.search(rf"- {what}: (\d+)", text) for what in ("cumulative spill requests", "num bytes currently spilled")]
    if not all(found):
        return "unknown (no spill counters in the raylet's debug state)"
    return f"{found[0].group(1)} spill requests, {found[1].group(1)} bytes spilled"


def _child(kind: str, *args) -> dict:
    res = subprocess.run([sys.executable, "-m", "bench.bench_ray", kind, *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode:
        raise RuntimeError(f"bench child {kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    rows, batch = (200, 16) if quick else (2000, 32)
    tp = _child("throughput", rows, batch)
    small, big = (1_000, 10_000) if quick else (int(os.environ.get("BENCH_RAY_SMALL", 10_000)),
                                                 int(os.environ.get("BENCH_RAY_BIG", 100_000)))
    mem = {n: _child("memory", n) for n in (small, big)}
    trows = []
    for name, r in tp.items():
        lo, ra = r["local"], r["ray"]
        trows.append([name, f"{rows / lo['wall']:.1f}", f"{rows / ra['wall']:.1f}", f"**{lo['wall'] / ra['wall']:.3f}**",
                      f"{lo['startup']:.1f}", f"{ra['startup']:.1f}"])
    mrows = []
    for n, m in mem.items():
        top = m["workers"][:3]
        mrows.append([f"{n:,}", f"{m['wall']:.0f}", f"{m['driver_mib']:.0f}",
                      "; ".join(f"{cmd.split('(')[0].replace('ray::', '')} {mib:.0f}" for cmd, mib in top),
                      f"{sum(mib for _, mib in m['workers']):.0f}", m["spill"]])
    (s_n, s_m), (b_n, b_m) = sorted(mem.items())
    md = "\n".join([
        "## Ray engine (issue 15)",
        "",
        f"{machine()}; load average {os.getloadavg()[0]:.1f} when the bench ended (other jobs share these cores). "
        f"One local Ray cluster on this machine (`ray.init(num_cpus={os.cpu_count()})`, started before "
        "the clock); one model actor (`--concurrency 1`) with as many torch threads as a local run.",
        "",
        f"Throughput: the same {rows:,}-row HF-style Parquet (224×224 JPEGs), `--patches dense`, batch {batch}, "
        "records to JSONL (Ray: a folder of shards), each `scan(...)` call timed whole, model loading included. "
        "Startup: local = loading the model before the loop; Ray = from the call to the first record at the driver "
        "(the driver loads the model on CPU to check the options and get the settings, then the actor starts, loads "
        "it again and scores the first block). Target: Ray ÷ local ≥ 0.85 for ViT-B-32.",
        "",
        table(["model", "local img/s", "Ray img/s", "Ray ÷ local", "local startup (s)", "Ray startup (s)"], trows),
        "",
        "Peak memory on Ray (tiny CLIP, dense, batch 64, 224×224 JPEG rows, fresh process and cluster per size): "
        "VmHWM of the driver and of each Ray worker process (the largest three named; VmHWM also counts the pages "
        "of Ray's shared-memory object store that a process touched), and the raylet's spilling counters after "
        "the run.",
        "",
        table(["rows", "wall (s)", "driver peak MiB", "largest workers (MiB)", "all workers MiB", "object-store spilling"],
              mrows),
        "",
        f"Driver peak {b_n:,} ÷ {s_n:,} rows: **{b_m['driver_mib'] / s_m['driver_mib']:.3f}**; largest worker: "
        f"**{b_m['workers'][0][1] / s_m['workers'][0][1]:.3f}**.",
    ])
    write_section("ray", md)
    print(md)
    return {"throughput": tp, "memory": mem}


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    result = child_throughput(int(rest[0]), int(rest[1])) if kind == "throughput" else child_memory(int(rest[0]))
    print(json.dumps(result))
