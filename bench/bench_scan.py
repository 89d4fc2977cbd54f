"""Issue 3 bench: end-to-end `scan` from Parquet vs bare encode_image, flat memory, dense vs grid.

- throughput of scan --patches dense (Parquet → records on disk) ÷ bare encode_image on pre-decoded
  tensors: same random ViT-B-32, same batch size, one run. Target ≥ 0.85.
- peak RSS scanning a 100k-row synthetic Parquet ÷ a 10k-row one (tiny CLIP, each in a fresh process).
  Target ≤ 1.15.
- dense ÷ grid (3×3) scan throughput. Expect ≥ 8×.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench.common import interleaved, machine, table, write_section

ROOT = Path(__file__).resolve().parents[1]


def write_parquet(path: Path, rows: int, size: int, seed: int = 0, chunk: int = 2048) -> Path:
    """A synthetic HF-style Parquet (struct<bytes, path>) of ``rows`` JPEG images, written chunk by chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(16)]
    blobs = []
    for arr in base:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=80)
        blobs.append(buf.getvalue())
    struct_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", struct_t), ("n", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            cells = [{"bytes": blobs[(start + i) % 16], "path": f"{start + i}.jpg"} for i in range(n)]
            writer.write_table(pa.table({"image": pa.array(cells, struct_t), "n": np.arange(start, start + n)}, schema=schema))
    return path


def _fresh(tmp: str, name: str) -> Path:
    """An output path that does not exist yet (scan never clobbers an existing output)."""
    out = Path(tmp) / f"{name}.jsonl"
    out.unlink(missing_ok=True)
    return out


def _scan(parquet: Path, out: Path, detector, patches: str, batch: int) -> float:
    from guardalign.commands.scan import scan

    t = time.perf_counter()
    scan([str(parquet)], out=str(out), detector=detector.with_config(patches=patches, batch_size=batch),
         batch_size=batch, progress=False)
    return time.perf_counter() - t


def throughput(quick: bool) -> tuple[list, dict]:
    import torch

    from guardalign.detection.anchors import load_anchors
    from guardalign.config import DetectConfig
    from guardalign.detection.detector import Detector
    from guardalign.models.clip import load_encoder
    from guardalign.io.images import decode_image

    n, batch = (64, 16) if quick else (256, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = load_encoder("ViT-B-32", "none", device="auto")
    det = Detector(encoder, load_anchors(), DetectConfig(patches="dense", batch_size=batch))
    with tempfile.TemporaryDirectory() as tmp:
        pq_path = write_parquet(Path(tmp) / "data.parquet", n, 256)
        import pyarrow.parquet as pq

        imgs = [decode_image(data=c["bytes"])[0] for c in pq.read_table(pq_path).column("image").to_pylist()]
        pixels = [encoder.preprocess(imgs[i : i + batch]) for i in range(0, n, batch)]  # pre-decoded tensors

        def bare():
            for p in pixels:
                encoder.encode_images(p)
            if encoder.device.type == "cuda":
                torch.cuda.synchronize()

        runs = {
            "bare": bare,
            "dense": lambda: _scan(pq_path, _fresh(tmp, "dense"), det, "dense", batch),
            "grid": lambda: _scan(pq_path, _fresh(tmp, "grid"), det, "grid", batch),
        }
        best = interleaved(runs, rounds=1 if quick else 2)
        t_bare, t_dense, t_grid = best["bare"], best["dense"], best["grid"]
        n_out = sum(1 for _ in open(Path(tmp) / "dense.jsonl"))
    assert n_out == n
    res = {"dense_vs_bare": t_bare / t_dense, "dense_vs_grid": t_grid / t_dense,
           "bare_img_s": n / t_bare, "dense_img_s": n / t_dense, "grid_img_s": n / t_grid}
    rows = [
        ["bare encode_image (pre-decoded)", f"{n / t_bare:.1f}", "1.000"],
        ["scan --patches dense (Parquet → JSONL)", f"{n / t_dense:.1f}", f"{t_bare / t_dense:.3f}"],
        ["scan --patches grid --grid 3", f"{n / t_grid:.1f}", f"{t_bare / t_grid:.3f}"],
    ]
    return rows, {**res, "n": n, "batch": batch}


# Peak RSS from /proc/self/status VmHWM: getrusage's ru_maxrss survives exec, so a child started by a
# big parent would report the parent's peak instead of its own.
RSS_SCRIPT = r"""
import re, sys, json
from guardalign.commands.scan import scan
scan([sys.argv[1]], out=sys.argv[2], clip_model=sys.argv[3], pretrained=sys.argv[4], patches="dense",
     batch_size=256, device="cpu", progress=False)
hwm = re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)
print(json.dumps({"maxrss_kb": int(hwm)}))
"""


def peak_rss(quick: bool) -> dict:
    """Peak RSS of a fresh process scanning N rows, for N = small and 10× small (tiny CLIP: memory, not speed)."""
    import torch

    from guardalign.models.clip import load_encoder, save_checkpoint

    small = 1_000 if quick else 10_000
    cfg = ROOT / "tests" / "fixtures" / "tiny-clip.json"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = save_checkpoint(load_encoder(str(cfg), "none", device="cpu").model, Path(tmp) / "tiny.safetensors")
        for rows in (small, 10 * small):
            data = write_parquet(Path(tmp) / f"{rows}.parquet", rows, 32)
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(data), str(Path(tmp) / f"{rows}.jsonl"),
                                  str(cfg), str(ckpt)], capture_output=True, text=True, cwd=ROOT, check=True)
            out[rows] = (json.loads(res.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024, time.perf_counter() - t)
            data.unlink()
    return out


def run(quick: bool = False) -> dict:
    rows, res = throughput(quick)
    rss = peak_rss(quick)
    (small, (rs, ts)), (big, (rb, tb)) = sorted(rss.items())
    res["rss_ratio"] = rb / rs
    md = "\n".join([
        "## Scan (issue 3)",
        "",
        f"{machine()}.",
        "",
        f"Throughput: random-init ViT-B-32, {res['n']} JPEG rows (256×256) in one HF-style Parquet, batch {res['batch']}, "
        "records written to JSONL. Ratios are against bare `encode_image` on the same images pre-decoded and "
        "pre-processed into tensors (target ≥ 0.85 for dense; dense ÷ grid expected ≥ 8×).",
        "",
        table(["pipeline", "img/s", "÷ bare encode"], rows),
        "",
        f"dense ÷ grid(3×3) throughput: **{res['dense_vs_grid']:.2f}×**",
        "",
        "Peak RSS (fresh process, tiny CLIP, dense, batch 256, 32×32 JPEG rows):",
        "",
        table(["rows", "peak RSS (MiB)", "wall (s)"], [[f"{small:,}", f"{rs:.0f}", f"{ts:.0f}"], [f"{big:,}", f"{rb:.0f}", f"{tb:.0f}"]]),
        "",
        f"peak RSS {big:,} ÷ {small:,} rows: **{res['rss_ratio']:.3f}** (target ≤ 1.15)",
    ])
    write_section("scan", md)
    print(md)
    return res
