"""Blur and pixelate leave nothing of the box's content a detector could read (issue 12).

Properties of the fills themselves (fast), and one end-to-end run on the toy world (slow): flagged images
masked through ``guardalign.mask`` and rescanned with the same detector and τ come back safe.
The full measurement, on the quality bench's model, is ``python -m bench --only fills`` (bench/RESULTS.md).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from guardalign.detection.purify import BLUR_SIGMA, PIXELATE_BLOCKS, PIXELATE_CONTRAST, apply_fill

SHAPES = [(96, 96), (120, 50), (61, 97), (7, 5)]  # square, wide, tall and odd, tiny


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def grey(a: np.ndarray) -> Image.Image:
    """An RGB image of the (H, W) array ``a`` (values in [0, 255]) in every channel."""
    return Image.fromarray(np.repeat(np.clip(np.round(a), 0, 255).astype(np.uint8)[..., None], 3, axis=2))


def detail_energy(a: np.ndarray) -> float:
    """Energy of an (H, W, 3) region around its per-channel mean: what is left once its average tone is removed."""
    a = np.asarray(a, dtype=np.float64)
    return float(((a - a.mean(axis=(0, 1))) ** 2).sum())


def shapes_smaller_than(w: int, h: int) -> dict[str, np.ndarray]:
    """Binary patterns on a (h, w) box whose features are smaller than the box: stripes and checkers with
    periods of 1/12 to 1/3 of the long side, discs and rings of radius 1/8 to 1/4 of it at several places."""
    yy, xx = np.mgrid[0:h, 0:w]
    side = max(w, h)
    out = {}
    for period in (side // 12, side // 6, side // 3):
        half = max(1, period // 2)
        out[f"stripes {period}"] = (xx // half) % 2
        out[f"bars {period}"] = (yy // half) % 2
        out[f"checker {period}"] = (xx // half + yy // half) % 2
    for r in (side / 8, side / 6, side / 4):
        for cx, cy in ((w / 4, h / 4), (w / 2, h / 2), (3 * w / 4, h / 3), (w / 3, 3 * h / 4)):
            dist = np.hypot(xx - cx, yy - cy)
            out[f"disc r{r:.0f} at ({cx:.0f}, {cy:.0f})"] = dist < r
            out[f"ring r{r:.0f} at ({cx:.0f}, {cy:.0f})"] = np.abs(dist - r) < r / 4
    return {k: 20 + 200 * v.astype(np.float64) for k, v in out.items()}


def whole(img: Image.Image, fill: str) -> np.ndarray:
    return np.asarray(apply_fill(img, [[0, 0, img.width, img.height]], fill=fill), dtype=np.float64)


@pytest.mark.parametrize("w,h", SHAPES)
def test_pixelate_is_a_mosaic_of_a_few_blocks_at_reduced_contrast(w, h):
    img = noise(w, h)
    a = np.asarray(img, dtype=np.float64)
    out = whole(img, "pixelate")
    block = math.ceil(max(w, h) / PIXELATE_BLOCKS)
    cells = [(y, x) for y in range(0, h, block) for x in range(0, w, block)]
    assert len(cells) <= PIXELATE_BLOCKS ** 2
    mean = a.mean(axis=(0, 1))
    for y, x in cells:  # every block one colour: the box mean plus a damped share of the block's own difference
        got = out[y:y + block, x:x + block].reshape(-1, 3)
        assert (got == got[0]).all(), f"block at ({x}, {y}) is not one colour"
        want = mean + PIXELATE_CONTRAST * (a[y:y + block, x:x + block].mean(axis=(0, 1)) - mean)
        assert np.abs(got[0] - want).max() <= 0.5 + 1e-9  # rounded to the nearest 8-bit value
    assert len(np.unique(out.reshape(-1, 3), axis=0)) <= PIXELATE_BLOCKS ** 2


@pytest.mark.parametrize("w,h", SHAPES[:3])
def test_pixelate_keeps_at_most_contrast_squared_of_any_detail(w, h):
    # Block means are a projection (they cannot add energy), then scaled by the contrast around the same mean:
    # at most PIXELATE_CONTRAST² of the detail energy survives, whatever the content.
    bound = 0.25  # PIXELATE_CONTRAST² at the measured default (0.5); a weaker default must be measured again
    regions = {"noise": np.asarray(noise(w, h, seed=3))}
    regions.update({k: np.asarray(grey(v)) for k, v in shapes_smaller_than(w, h).items()})
    for name, a in regions.items():
        kept = detail_energy(whole(Image.fromarray(a), "pixelate")) / detail_energy(a)
        assert kept <= bound + 0.01, f"{name}: pixelate kept {kept:.3f} of the detail energy"


@pytest.mark.parametrize("w,h", SHAPES[:3])
def test_blur_flattens_every_pattern_of_one_cycle_or_finer_across_the_box(w, h):
    # A Gaussian of σ = BLUR_SIGMA × long side damps a cosine of k cycles across a side of n px to
    # exp(−2π²σ²k²/n²) of its amplitude (< 1 % for k ≥ 1, n ≤ the long side); edge handling adds a little.
    assert BLUR_SIGMA >= 0.5
    for axis, n in ((1, w), (0, h)):
        for cycles in (1, 2, 3, 6):
            t = np.cos(2 * np.pi * cycles * (np.arange(n) + 0.5) / n)
            wave = np.broadcast_to(t[None, :] if axis == 1 else t[:, None], (h, w))
            out = whole(grey(128 + 100 * wave), "blur")[..., 0]
            left = np.abs(out - out.mean()).max() / 100
            assert left < 0.05, f"{cycles} cycles along {'x' if axis == 1 else 'y'}: {left:.3f} of the contrast left"


@pytest.mark.parametrize("w,h", SHAPES[:3])
def test_blur_leaves_a_tenth_of_the_detail_of_shapes_smaller_than_the_box(w, h):
    for name, v in shapes_smaller_than(w, h).items():
        a = np.asarray(grey(v), dtype=np.float64)
        kept = detail_energy(whole(grey(v), "blur")) / detail_energy(a)
        assert kept < 0.1, f"{name}: blur kept {kept:.3f} of the detail energy"


# Small enough to train in CI (the toy-world smoke settings); the quality bench's model is far stronger.
SMOKE = dict(per_concept=24, steps=120, batch_size=64, lr=3e-3, warmup=20, vision_width=64, vision_layers=2,
             text_layers=1)


@pytest.mark.slow
def test_purified_toy_images_rescan_safe_through_scan_and_mask(tmp_path):
    """scan → mask --from-scan --fill F → scan, with one detector and τ, on the toy world's unsafe composites."""
    import json

    from bench.toyworld import composites as comp
    from bench.toyworld.anchors_yaml import write_anchors
    from bench.toyworld.train import TrainSettings, cached_model, load_trained
    from guardalign.commands.mask import mask
    from guardalign.commands.scan import scan
    from guardalign.config import DetectConfig
    from guardalign.detection.anchors import load_anchors
    from guardalign.detection.detector import Detector
    from guardalign.detection.purify import FILLS
    from guardalign.detection.thresholds import choose_threshold

    encoder = load_trained(cached_model(TrainSettings(**SMOKE), root=tmp_path / "model"))
    det = Detector(encoder, load_anchors(write_anchors(tmp_path / "toy.yaml")),
                   DetectConfig(patches="grid", grid=3, batch_size=64))
    conditions = [("1/9", "aligned"), ("1/4", "random"), ("1/2", "random")]
    calib = comp.eval_set(2, 20, conditions)
    scores = np.array([d.score for d in det.detect([c.image for c in calib])])
    tau = choose_threshold(scores, np.array([c.label == "unsafe" for c in calib]), 0.05, "lower").threshold
    det = det.with_config(tau=tau)
    folder = tmp_path / "unsafe"
    folder.mkdir()
    originals = {}
    for i, c in enumerate(x for x in comp.eval_set(1, 20, conditions) if x.label == "unsafe"):
        c.image.save(folder / f"{i:03d}.png")
        originals[f"{i:03d}.png"] = np.asarray(c.image)
    scan([str(folder)], out=str(tmp_path / "scan.jsonl"), detector=det, progress=False)
    before = {r["id"]: r for r in map(json.loads, (tmp_path / "scan.jsonl").open())}
    flagged = sorted(k for k, r in before.items() if r["verdict"] == "unsafe")
    assert len(flagged) >= 30, f"only {len(flagged)} of {len(before)} unsafe composites flagged at τ {tau}"

    minimum = {"mean": 0.95, "black": 0.95, "blur": 0.8, "pixelate": 0.8}
    for fill in FILLS:
        out = tmp_path / fill
        mask([str(folder)], out_dir=str(out), from_scan=str(tmp_path / "scan.jsonl"), fill=fill, only_unsafe=True,
             progress=False)
        entries = {e["id"]: e for e in map(json.loads, (out / "manifest.jsonl").open())}
        assert all(entries[k]["status"] == "purified" for k in flagged)
        scan([str(out)], out=str(tmp_path / f"{fill}.jsonl"), detector=det, progress=False)
        after = {r["id"]: r for r in map(json.loads, (tmp_path / f"{fill}.jsonl").open()) if r["id"].endswith(".png")}
        assert sorted(after) == flagged
        rises = []
        for k in flagged:
            got = np.asarray(Image.open(out / k).convert("RGB"))
            outside = np.ones(got.shape[:2], bool)
            for x0, y0, x1, y1 in entries[k]["boxes"]:
                outside[y0:y1, x0:x1] = False
            assert np.array_equal(got[outside], originals[k][outside]), f"{fill}: {k} changed outside its boxes"
            assert not np.array_equal(got[~outside], originals[k][~outside])
            rises += [after[k]["patch_scores"][p] - before[k]["patch_scores"][p] for p in before[k]["unsafe_patches"]]
        safe = np.mean([after[k]["verdict"] == "safe" for k in flagged])
        assert np.mean(rises) > 0.2, f"{fill}: the filled patches' cost rose by only {np.mean(rises):.3f}"
        assert safe >= minimum[fill], f"{fill}: {safe:.2f} of the purified images came back safe at τ {tau}"
