"""Issue 2 bench: dense-mode detector throughput ÷ bare encode_image, and the share of time in transport.

Random-weight ViT-B-32 on whatever device is there (CPU here); same model, same batch, one run.
"""
from __future__ import annotations

import time

import numpy as np

from bench.common import best_of, machine, patched_timer, table, write_section


def _images(n: int, size: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def run(quick: bool = False) -> dict:
    import warnings

    import torch

    import guardalign.transport as transport
    from guardalign.anchors import load_anchors
    from guardalign.config import DetectConfig
    from guardalign.detect import Detector
    from guardalign.encoder import load_encoder

    batch = 8 if quick else 32
    repeats = 1 if quick else 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = load_encoder("ViT-B-32", "none", device="auto")
    anchors = load_anchors()
    images = _images(batch, 224)
    pixels = encoder.preprocess(images)

    def sync():
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()

    def bare():
        encoder.encode_images(pixels)
        sync()

    rows, results = [], {}
    t_bare = best_of(bare, repeats)
    for mode, cfg in {
        "dense": DetectConfig(patches="dense", batch_size=batch),
        "grid 3x3": DetectConfig(patches="grid", grid=3, batch_size=batch),
    }.items():
        det = Detector(encoder, anchors, cfg)
        spent: list[float] = []

        def full():
            det.detect(images)
            sync()

        t_full = best_of(full, repeats)
        with patched_timer(transport, "ot_patch_scores", spent):
            t0 = time.perf_counter()
            full()
            t_timed = time.perf_counter() - t0
        share = sum(spent) / t_timed
        ratio = t_bare / t_full  # throughput ratio = (B/t_full) / (B/t_bare)
        results[mode] = {"ratio": ratio, "transport_share": share, "img_s": batch / t_full}
        rows.append([mode, f"{batch / t_bare:.1f}", f"{batch / t_full:.1f}", f"{ratio:.3f}", f"{share:.2%}"])

    md = "\n".join(
        [
            "## Detector (issue 2)",
            "",
            f"Random-init ViT-B-32 (`--pretrained none`), batch {batch} of 224×224 images, best of {repeats}; {machine()}.",
            "Throughput ratio = detector images/s (PIL in, records out) ÷ bare `encode_image` images/s on the same "
            "pre-processed batch. Targets: dense ratio ≥ 0.90; transport share ≤ 3%.",
            "",
            table(["mode", "bare encode img/s", "detector img/s", "ratio", "transport share"], rows),
        ]
    )
    write_section("detector", md)
    print(md)
    return results
