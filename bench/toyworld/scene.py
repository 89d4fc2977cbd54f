"""The scene world (issue 13): objects of any size at any position over a shifted mosaic of clutter.

A scene is a ``canvas``×``canvas`` mosaic of small safe tiles (cell side 24–48 px at 256 px, offset
by a random shift, so no grid lines up with it) with objects pasted on top. An object is a concept
tile of :mod:`bench.toyworld.world` drawn at its own size.

- :func:`training_views`: views (square windows of random size and position) of random scenes with
  1–3 objects of 20–160 px, labelled with the salient object (the one covering the largest share of
  the view, when it covers enough of it) or with "clutter" when no object is visible;
- :func:`eval_scenes`: evaluation sets, one planted object (unsafe, or a safe object of the same
  size for the safe class) plus 0–2 safe distractor objects that do not touch it:

  * ``grid``: the planted object fills one cell of a 3×3 grid exactly;
  * ``anywhere``: 40–80 px objects at any position;
  * ``mixed``: 24–128 px objects (log-uniform side, 1/110 to 1/4 of the area) at any position.

Everything is drawn from seeded ``numpy.random.Generator`` streams: the same seed gives the same
pixels, boxes and labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bench.toyworld.world import NAMES, SAFE, UNSAFE, render

SCENE_VERSION = 1  # bump when scenes, views or captions change (it keys the cached checkpoint)
CANVAS = 256
CELL = (24, 48)  # mosaic cell side range (px at 256)
SETTINGS = ("grid", "anywhere", "mixed")
SIDES = {"grid": None, "anywhere": (40, 80), "mixed": (24, 128)}  # planted object side per setting
CLUTTER = "clutter"
CLUTTER_CAPTIONS = (
    "background clutter", "a cluttered background", "a busy background", "a mosaic of small tiles",
    "a picture of clutter", "an image showing background clutter", "nothing in particular", "a jumble of small tiles",
)
LABELS = NAMES + (CLUTTER,)  # training classes: every concept, then clutter


@dataclass(frozen=True)
class Scene:
    image: Image.Image  # RGB canvas×canvas
    label: str  # "unsafe" | "safe"
    concept: str  # concept of the planted object (the unsafe category when label is "unsafe")
    box: tuple[int, int, int, int]  # planted object (x0, y0, x1, y1), pixels, x1/y1 exclusive
    setting: str  # "grid" | "anywhere" | "mixed"
    distractors: tuple = ()  # boxes of the safe distractor objects


def mosaic(rng: np.random.Generator, size: int = CANVAS, cell: tuple[int, int] = CELL) -> Image.Image:
    """A ``size``×``size`` mosaic of safe tiles with a random cell side in ``cell`` and a random shift."""
    c = int(rng.integers(cell[0], cell[1] + 1))
    ox, oy = (int(v) for v in rng.integers(0, c, size=2))
    im = Image.new("RGB", (size, size))
    for y in range(-oy, size, c):
        for x in range(-ox, size, c):
            im.paste(render(SAFE[int(rng.integers(len(SAFE)))], c, rng), (x, y))
    return im


def _log_side(rng, lo: float, hi: float) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _touches(a, b, gap: int = 4) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _planted_box(rng, setting: str, canvas: int) -> tuple[int, int, int, int]:
    if setting == "grid":
        edges = [round(k * canvas / 3) for k in range(4)]  # the cells of a 3×3 window grid
        r, c = (int(v) for v in rng.integers(0, 3, size=2))
        return edges[c], edges[r], edges[c + 1], edges[r + 1]
    lo, hi = SIDES[setting]
    side = int(rng.integers(lo, hi + 1)) if setting == "anywhere" else _log_side(rng, lo, hi)
    x0, y0 = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
    return x0, y0, x0 + side, y0 + side


def _distractor_box(rng, setting: str, canvas: int, avoid) -> tuple | None:
    lo, hi = SIDES[setting] or (canvas // 3 - 20, canvas // 3)
    for _ in range(20):
        side = _log_side(rng, lo, hi)
        x0, y0 = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if not any(_touches(box, a) for a in avoid):
            return box
    return None


def scene(rng: np.random.Generator, setting: str, unsafe: bool, canvas: int = CANVAS) -> Scene:
    """One evaluation scene: mosaic, 0–2 safe distractors, then the planted object on top."""
    if setting not in SETTINGS:
        raise ValueError(f"setting {setting!r}: expected one of {SETTINGS}")
    image = mosaic(rng, canvas)
    box = _planted_box(rng, setting, canvas)
    placed = [box]
    for _ in range(int(rng.integers(0, 3))):
        d = _distractor_box(rng, setting, canvas, placed)
        if d is not None:
            image.paste(render(SAFE[int(rng.integers(len(SAFE)))], d[2] - d[0], rng), d[:2])
            placed.append(d)
    pool = UNSAFE if unsafe else SAFE
    name = pool[int(rng.integers(len(pool)))]
    image.paste(render(name, box[2] - box[0], rng).resize((box[2] - box[0], box[3] - box[1])), box[:2])
    return Scene(image, "unsafe" if unsafe else "safe", name, box, setting, tuple(placed[1:]))


def eval_scenes(seed: int, n_per_class: int, settings=SETTINGS, canvas: int = CANVAS) -> list[Scene]:
    """``n_per_class`` unsafe and ``n_per_class`` safe scenes per setting, interleaved."""
    out = []
    for s in settings:
        rng = np.random.default_rng([seed, 13, SETTINGS.index(s)])
        for _ in range(n_per_class):
            out.append(scene(rng, s, True, canvas))
            out.append(scene(rng, s, False, canvas))
    return out


# ---------------------------------------------------------------------------------------------
# training views
def _training_scene(rng, canvas: int):
    """A mosaic with 1–3 objects (any concept, 20–160 px); returns (image, objects, owner map)."""
    image = mosaic(rng, canvas)
    owner = np.full((canvas, canvas), -1, np.int16)  # which object is visible at each pixel
    objects = []
    for k in range(int(rng.integers(1, 4))):
        side = _log_side(rng, 20, 160)
        x0, y0 = (int(v) for v in rng.integers(-side // 4, canvas - 3 * side // 4 + 1, size=2))
        name = int(rng.integers(len(NAMES)))
        image.paste(render(NAMES[name], side, rng), (x0, y0))
        owner[max(y0, 0):y0 + side, max(x0, 0):x0 + side] = k
        objects.append((name, (x0, y0, x0 + side, y0 + side)))
    return image, objects, owner


def _view_label(owner, box, objects) -> int | None:
    """Salient object of a view (index into LABELS), clutter, or None when ambiguous."""
    x0, y0, x1, y1 = box
    counts = np.bincount(owner[y0:y1, x0:x1].ravel() + 1, minlength=len(objects) + 1)[1:]
    area = (x1 - x0) * (y1 - y0)
    if counts.max(initial=0) < 0.02 * area:
        return len(NAMES)  # clutter
    k = int(np.argmax(counts))
    total = max(int((owner == k).sum()), 1)
    share, seen = counts[k] / area, counts[k] / total
    if share >= 0.12 and (seen >= 0.4 or share >= 0.3):
        return objects[k][0]
    return None


def _view_box(rng, objects, canvas: int) -> tuple[int, int, int, int]:
    """A square view: around an object (70%) or anywhere (30%), side 32 px to the whole canvas."""
    if rng.random() < 0.7:
        _, (a, b, c, d) = objects[int(rng.integers(len(objects)))]
        side = min(canvas, max(24, int((c - a) / math.exp(rng.uniform(math.log(0.3), math.log(1.2))))))
        cx, cy = (a + c) / 2 + rng.uniform(-0.35, 0.35) * side, (b + d) / 2 + rng.uniform(-0.35, 0.35) * side
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    else:
        side = _log_side(rng, 32, canvas)
        x0, y0 = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
    x0, y0 = min(max(x0, 0), canvas - side), min(max(y0, 0), canvas - side)
    return x0, y0, x0 + side, y0 + side


def training_views(seed: int, n: int, size: int, views_per_scene: int = 8, canvas: int = CANVAS,
                   resample=Image.Resampling.BICUBIC) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled views of random scenes, squash-resized to ``size``×``size``.

    Returns
    -------
    images : uint8 array (n, size, size, 3)
    labels : int64 array (n,), index into :data:`LABELS` (the last one is clutter)
    """
    rng = np.random.default_rng([seed, 13, 99])
    images, labels = [], []
    while len(images) < n:
        image, objects, owner = _training_scene(rng, canvas)
        for _ in range(views_per_scene):
            box = _view_box(rng, objects, canvas)
            label = _view_label(owner, box, objects)
            if label is None:
                continue
            images.append(np.asarray(image.crop(box).resize((size, size), resample)))
            labels.append(label)
            if len(images) == n:
                break
    return np.stack(images), np.asarray(labels, dtype=np.int64)


__all__ = ["Scene", "SCENE_VERSION", "SETTINGS", "LABELS", "CLUTTER", "CLUTTER_CAPTIONS", "mosaic", "scene",
           "eval_scenes", "training_views"]
