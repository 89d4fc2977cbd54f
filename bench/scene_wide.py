"""The wide split behind issue 13's shipped default: ``python -m bench.scene_wide`` (about 30 min on 2 cores).

The scene bench's development split (50 + 50 scenes per set) ranks layouts within a few hundredths of each
other differently from its test split. This run scores the close candidates on a third, larger split
(seed 3, 300 unsafe + 300 safe scenes per set) with the same cached CLIP, anchors and crop cache, and on the
tile world of issue 7, and prints the tables that bench/RESULTS.md quotes under the scene section.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.bench_scene import LAYOUTS, SET_NAMES, SETS, CropCache, _aucs, _splits, _tile_split
from bench.common import table

CANDIDATES = ["grid 3 (issue-7 default)", "grid 3 stride 0.5", "grid 4", "grid 5", "grid 5 + 2 (multi-scale)",
              "search grid 3 → top 2 (½-size), budget 28", "search grid 4 → top 1, budget 26",
              "grid 6 (37 encodes, over the 3× budget)"]
EXTRA = {"grid 6 (37 encodes, over the 3× budget)": dict(stride=1.0, scales=(), refine_scale=0.5, patches="grid", grid=6)}


def _rows(base, split, names) -> list[list[str]]:
    rows = []
    for name in names:
        det = base.with_config(**{**LAYOUTS, **EXTRA}[name])
        scores = np.array([d.score for d in det.detect([s.image for s in split.items])])
        aucs = _aucs(split, scores, "lower")
        rows.append([name, str(det.config.encodes())] + [f"{a:.3f}" for a in aucs] + [f"{min(aucs):.3f}"])
        print(f"[scene_wide] {name}: {rows[-1][2:]}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    from bench.toyworld.anchors_yaml import write_anchors
    from bench.toyworld.train import cached_model, load_trained, scene_settings_for, settings_for
    from guardalign.config import DetectConfig
    from guardalign.detection.anchors import load_anchors
    from guardalign.detection.detector import Detector

    with tempfile.TemporaryDirectory(prefix="guardalign-scene-") as tmp:
        anchors = load_anchors(write_anchors(Path(tmp) / "toy-anchors.yaml"))
    scene = Detector(CropCache(load_trained(cached_model(scene_settings_for(False)))), anchors, DetectConfig(batch_size=64))
    wide = _rows(scene, _splits(3, 300), CANDIDATES)
    tile = Detector(CropCache(load_trained(cached_model(settings_for(False)))), anchors, DetectConfig(batch_size=64))
    tiles = _rows(tile, _tile_split(1, 100), CANDIDATES)
    print("Scene world, seed 3, 300 + 300 per set (AUROC, OT):\n")
    print(table(["layout", "encodes"] + [SET_NAMES[s] for s in SETS] + ["worst set"], wide))
    print("\nTile world, test seed 1 (AUROC, OT):\n")
    print(table(["layout", "encodes", "1/9 on-grid", "1/9 off-grid", "1/4", "1/2", "worst"], tiles))


if __name__ == "__main__":
    main()
