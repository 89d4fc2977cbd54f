"""Issue 11 bench: ``mask --from-scan`` setup and run time are linear in a Parquet file's row groups.

The wave-1 writer summed row counts from the start for every row group (quadratic: 10k one-row groups
took 18 s, 40k took 125 s). Measured side by side in one run, each size in a fresh process (best of two):
time at 40k one-row groups ÷ time at 10k. Target ≤ 4.4 (linear is 4.0).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, table, write_section

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from guardalign.commands.mask import mask
src, scan_file, out = sys.argv[2:5]
t0 = time.perf_counter()
s = mask([src], out_dir=out, from_scan=scan_file, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "copied": s.copied, "errors": s.errors}))
"""


def _inputs(folder: Path, groups: int) -> tuple[Path, Path]:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, format="PNG")
    cell = buf.getvalue()
    src = folder / f"rg{groups}.parquet"
    pq.write_table(pa.table({"image": pa.array([cell] * groups, pa.binary())}), src, row_group_size=1)
    settings = {"image_mean": [0.48, 0.46, 0.41]}
    digest = hashlib.sha256(cell).hexdigest()
    scan_file = folder / f"scan{groups}.jsonl"
    with open(scan_file, "w") as f:
        for i in range(groups):
            f.write(json.dumps({"id": f"{src.name}#{i}", "status": "ok", "verdict": "safe", "sha256": digest,
                                "model": "bench", "anchors_sha256": "bench", "settings": settings}) + "\n")
    return src, scan_file


def _seconds(src: Path, scan_file: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(src), str(scan_file), str(out)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    sizes = (2_500, 10_000) if quick else (10_000, 40_000)
    rows, times = [], {}
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        made = {g: _inputs(folder, g) for g in sizes}
        for rnd in range(2):  # interleaved: both sizes see the same machine load
            for g in sizes:
                r = _seconds(*made[g], folder / f"out{g}_{rnd}")
                assert r["copied"] == g and r["errors"] == 0, r
                times[g] = min(times.get(g, float("inf")), r["seconds"])
    small, large = sizes
    ratio = times[large] / times[small]
    for g in sizes:
        rows.append([f"{g:,}", f"{times[g]:.2f}", f"{times[g] / g * 1e6:.0f}"])
    md = "\n".join([
        "## mask on Parquet with many row groups (issue 11)", "",
        f"Machine: {machine()}. `mask --from-scan` (all rows safe, so every row group is rebuilt byte for byte), "
        "one-row row groups, each size in a fresh process, best of two interleaved rounds.", "",
        table(["row groups", "seconds", "µs per row group"], rows), "",
        f"**time at {large:,} ÷ time at {small:,} = {ratio:.2f}** (target ≤ 4.4; linear is 4.0). "
        "Before the fix the row-group offsets were recomputed from the start for every group (quadratic).",
    ])
    if not quick:
        write_section("mask_rowgroups", md)
    print(md)
    return {"ratio": ratio, "times": times}


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
