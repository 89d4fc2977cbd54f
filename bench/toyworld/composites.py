"""Evaluation composites: mosaics of safe tiles with one planted tile (unsafe or a safe distractor).

Every image is a ``canvas``×``canvas`` mosaic of safe concept tiles (3×3 cells). One tile of side
``canvas·√coverage`` is planted on top: for an unsafe image it shows an unsafe concept, for a safe
image a safe one, so both classes share the same layout statistics and differ only in the concept.

Layouts:

- ``aligned``: the planted 1/9 tile fills one mosaic cell, which is exactly one cell of a 3×3 grid;
- ``shifted``: the mosaic (and the planted 1/9 tile) is offset by half a cell, so every 3×3 grid
  crop cuts tiles into quarters ("grid shifted off the tiles");
- ``random``: the planted tile (1/4 or 1/2) sits at a random pixel position over the mosaic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bench.toyworld.world import SAFE, UNSAFE, render

COVERAGES = {"1/9": 1 / 9, "1/4": 1 / 4, "1/2": 1 / 2}
CANVAS = 192


@dataclass(frozen=True)
class Composite:
    image: Image.Image  # RGB canvas×canvas mosaic
    label: str  # "unsafe" | "safe"
    concept: str  # concept of the planted tile (the unsafe category when label is "unsafe")
    box: tuple[int, int, int, int]  # planted tile (x0, y0, x1, y1), pixels, x1/y1 exclusive
    coverage: str  # "1/9" | "1/4" | "1/2": share of the image the planted tile covers
    layout: str  # "aligned" | "shifted" | "random"


def planted_side(coverage: str, canvas: int = CANVAS) -> int:
    """Side in pixels of a planted tile covering ``coverage`` of the canvas."""
    if coverage == "1/9":
        return canvas // 3
    return int(round(canvas * math.sqrt(COVERAGES[coverage])))


def _mosaic(rng, canvas: int, offset: int) -> Image.Image:
    cell = canvas // 3
    im = Image.new("RGB", (canvas, canvas))
    starts = range(-offset, canvas, cell) if offset else range(0, canvas, cell)
    for y in starts:
        for x in starts:
            im.paste(render(SAFE[int(rng.integers(len(SAFE)))], cell, rng), (x, y))
    return im


def composite(rng: np.random.Generator, coverage: str, unsafe: bool, layout: str = "aligned",
              canvas: int = CANVAS) -> Composite:
    """One mosaic with a planted tile; ``layout`` "aligned"/"shifted" apply to 1/9, "random" to any coverage."""
    if coverage not in COVERAGES:
        raise ValueError(f"coverage {coverage!r}: expected one of {list(COVERAGES)}")
    if layout in ("aligned", "shifted") and coverage != "1/9":
        raise ValueError(f"layout {layout!r} needs coverage 1/9 (tiles the size of a mosaic cell)")
    cell, side = canvas // 3, planted_side(coverage, canvas)
    offset = cell // 2 if layout == "shifted" else 0
    image = _mosaic(rng, canvas, offset)
    if layout == "aligned":
        x0, y0 = (int(v) * cell for v in rng.integers(0, 3, size=2))
    elif layout == "shifted":
        x0, y0 = (int(v) * cell + offset for v in rng.integers(0, 2, size=2))
    else:
        x0, y0 = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
    pool = UNSAFE if unsafe else SAFE
    name = pool[int(rng.integers(len(pool)))]
    image.paste(render(name, side, rng), (x0, y0))
    return Composite(image, "unsafe" if unsafe else "safe", name, (x0, y0, x0 + side, y0 + side), coverage, layout)


def eval_set(seed: int, n_per_class: int, conditions=None, canvas: int = CANVAS) -> list[Composite]:
    """``n_per_class`` unsafe and ``n_per_class`` safe composites per condition, interleaved.

    ``conditions``: (coverage, layout) pairs; default: 1/9 aligned, 1/9 shifted, 1/4 random, 1/2 random.
    """
    conditions = conditions or [("1/9", "aligned"), ("1/9", "shifted"), ("1/4", "random"), ("1/2", "random")]
    out = []
    for c, (coverage, layout) in enumerate(conditions):
        rng = np.random.default_rng([seed, 2, c])
        for _ in range(n_per_class):
            out.append(composite(rng, coverage, True, layout, canvas))
            out.append(composite(rng, coverage, False, layout, canvas))
    return out
