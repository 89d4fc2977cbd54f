"""The toy world: 17 procedurally drawn visual concepts, 3 of them designated "unsafe".

Every concept is drawn with PIL + numpy from a ``numpy.random.Generator`` at any tile size, so the
same seed gives the same pixels (byte for byte, on one Pillow version). Concepts come in four kinds:

- shapes:   circle, square, triangle, ring, plus, star, and the unsafe ``flame``
- glyphs:   arrow, hash, spiral, and the unsafe ``skull``
- textures: stripes, checker, dots, and the unsafe ``hazard`` (yellow/black diagonal stripes)
- colours:  blue field, green field

The unsafe concepts each have a safe look-alike (skull ↔ circle/ring, hazard ↔ stripes,
flame ↔ triangle), so a detector has to do better than "bright blob" or "stripy".
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

WORLD_VERSION = 1  # bump when drawings or captions change (it keys the cached checkpoint)

TEMPLATES = (
    "{x}",
    "a picture of {x}",
    "an image showing {x}",
    "a drawing of {x}",
    "a tile with {x}",
    "a small icon of {x}",
)


@dataclass(frozen=True)
class Concept:
    name: str  # short id; unsafe ones become anchor categories
    kind: str  # "shape" | "glyph" | "texture" | "colour"
    unsafe: bool  # designated unsafe in the toy world
    phrases: tuple[str, ...]  # noun phrases ("a skull", "a death's head") that fill the caption templates
    description: str  # one line for the anchors YAML


# ---------------------------------------------------------------------------------------------
# colours and backgrounds
def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _bright(rng) -> tuple[int, int, int]:
    return _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.7, 1.0))


def _background(n: int, rng) -> Image.Image:
    """A muted, slightly noisy backdrop (low saturation, any brightness from dark to mid)."""
    base = np.array(_hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.08, 0.5)), dtype=np.float32)
    noise = rng.normal(0.0, 6.0, size=(n, n, 1)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _frame(n: int, rng, lo: float = 0.45, hi: float = 0.9) -> tuple[float, float, float]:
    """Centre (cx, cy) and radius of an object occupying a random share of the tile."""
    r = rng.uniform(lo, hi) * n / 2
    cx = n / 2 + rng.uniform(-0.15, 0.15) * n
    cy = n / 2 + rng.uniform(-0.15, 0.15) * n
    return cx, cy, r


def _rot(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


# ---------------------------------------------------------------------------------------------
# shapes
def _circle(n, rng):
    im = _background(n, rng)
    cx, cy, r = _frame(n, rng)
    ImageDraw.Draw(im).ellipse([cx - r, cy - r, cx + r, cy + r], fill=_bright(rng))
    return im


def _square(n, rng):
    im = _background(n, rng)
    cx, cy, r = _frame(n, rng, 0.4, 0.75)
    pts = _rot([(-r, -r), (r, -r), (r, r), (-r, r)], cx, cy, rng.uniform(0, math.pi / 2))
    ImageDraw.Draw(im).polygon(pts, fill=_bright(rng))
    return im


def _triangle(n, rng):
    im = _background(n, rng)
    cx, cy, r = _frame(n, rng)
    pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    ImageDraw.Draw(im).polygon(_rot(pts, cx, cy, rng.uniform(-0.4, 0.4)), fill=_bright(rng))
    return im


def _ring(n, rng):
    im = _background(n, rng)
    cx, cy, r = _frame(n, rng)
    ImageDraw.Draw(im).ellipse([cx - r, cy - r, cx + r, cy + r], outline=_bright(rng),
                               width=max(2, int(r * rng.uniform(0.15, 0.35))))
    return im


def _plus(n, rng):
    im = _background(n, rng)
    cx, cy, r = _frame(n, rng)
    w = r * rng.uniform(0.25, 0.4)
    arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    ImageDraw.Draw(im).polygon(_rot(arm, cx, cy, rng.uniform(-0.3, 0.3)), fill=_bright(rng))
    return im


def _star(n, rng):
    im = _background(n, rng)
    cx, cy, r = _frame(n, rng)
    pts = [((r if k % 2 == 0 else r * 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
            (r if k % 2 == 0 else r * 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    ImageDraw.Draw(im).polygon(_rot(pts, cx, cy, rng.uniform(-0.3, 0.3)), fill=_bright(rng))
    return im


def _flame(n, rng):
    """Unsafe: a flickering teardrop in red, orange and yellow layers."""
    im = _background(n, rng)
    cx, cy, r = _frame(n, rng)
    d = ImageDraw.Draw(im)
    wobble = rng.uniform(0.0, 2 * math.pi)
    for scale, colour in ((1.0, (220, 40, 20)), (0.7, (250, 140, 20)), (0.4, (255, 230, 80))):
        pts = []
        for k in range(24):
            t = 2 * math.pi * k / 24
            rad = r * scale * (0.7 + 0.08 * math.sin(5 * t + wobble))
            x = rad * math.cos(t)
            y = rad * math.sin(t) + r * scale * 0.3
            if math.sin(t) < 0:  # upper half tapers into a tongue
                x *= 1 + math.sin(t) * 0.85
                y = r * scale * 0.3 + (y - r * scale * 0.3) * 1.8
            pts.append((cx + x, cy + y))
        d.polygon(pts, fill=colour)
    return im


# ---------------------------------------------------------------------------------------------
# glyphs
def _arrow(n, rng):
    im = _background(n, rng)
    cx, cy, r = _frame(n, rng, 0.6, 0.95)
    w = max(2, r * 0.16)
    shaft = [(-r, -w), (r * 0.3, -w), (r * 0.3, -2.8 * w), (r, 0), (r * 0.3, 2.8 * w), (r * 0.3, w), (-r, w)]
    ImageDraw.Draw(im).polygon(_rot(shaft, cx, cy, rng.uniform(0, 2 * math.pi)), fill=_bright(rng))
    return im


def _hash(n, rng):
    im = _background(n, rng)
    cx, cy, r = _frame(n, rng, 0.55, 0.9)
    d, col, w = ImageDraw.Draw(im), _bright(rng), max(2, int(r * 0.14))
    a = rng.uniform(-0.25, 0.25)
    for off in (-r / 3, r / 3):
        for seg in (((off, -r), (off, r)), ((-r, off), (r, off))):
            d.line(_rot(seg, cx, cy, a), fill=col, width=w)
    return im


def _spiral(n, rng):
    im = _background(n, rng)
    cx, cy, r = _frame(n, rng, 0.6, 0.95)
    turns, phase = rng.uniform(2.2, 3.2), rng.uniform(0, 2 * math.pi)
    pts = [(cx + r * t * math.cos(phase + 2 * math.pi * turns * t), cy + r * t * math.sin(phase + 2 * math.pi * turns * t))
           for t in np.linspace(0.02, 1.0, 160)]
    ImageDraw.Draw(im).line(pts, fill=_bright(rng), width=max(2, int(r * 0.1)))
    return im


def _skull(n, rng):
    """Unsafe: a pale cranium with dark eye sockets, a nose hole and a toothed jaw."""
    im = _background(n, rng)
    cx, cy, r = _frame(n, rng, 0.55, 0.9)
    d = ImageDraw.Draw(im)
    bone = _hsv(rng.uniform(0.08, 0.15), rng.uniform(0.0, 0.25), rng.uniform(0.85, 1.0))
    dark = (int(rng.uniform(0, 40)),) * 3
    cy -= r * 0.15
    d.ellipse([cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.65], fill=bone)
    d.rectangle([cx - r * 0.45, cy + r * 0.3, cx + r * 0.45, cy + r * 1.05], fill=bone)
    for sx in (-1, 1):
        ex = cx + sx * r * 0.33
        d.ellipse([ex - r * 0.22, cy - r * 0.2, ex + r * 0.22, cy + r * 0.22], fill=dark)
    d.polygon([(cx, cy + r * 0.28), (cx - r * 0.1, cy + r * 0.48), (cx + r * 0.1, cy + r * 0.48)], fill=dark)
    for k in range(-2, 3):
        x = cx + k * r * 0.16
        d.line([(x, cy + r * 0.7), (x, cy + r * 1.05)], fill=dark, width=max(1, int(r * 0.05)))
    return im


# ---------------------------------------------------------------------------------------------
# textures (fill the whole tile)
def _stripe_field(n, rng, c1, c2, angle, period):
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    phase = rng.uniform(0, period)
    u = xx * math.cos(angle) + yy * math.sin(angle) + phase
    mask = (np.floor(u / (period / 2)) % 2).astype(bool)
    out = np.where(mask[..., None], np.array(c1, np.float32), np.array(c2, np.float32))
    out += rng.normal(0, 5.0, size=(n, n, 1)).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _stripes(n, rng):
    c1 = _bright(rng)
    c2 = _hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.05, 0.4))
    return _stripe_field(n, rng, c1, c2, rng.uniform(0, math.pi), n * rng.uniform(0.12, 0.3))


def _hazard(n, rng):
    """Unsafe: yellow/black warning stripes at ±45°."""
    yellow = _hsv(rng.uniform(0.13, 0.16), rng.uniform(0.8, 1.0), rng.uniform(0.85, 1.0))
    black = (int(rng.uniform(0, 35)),) * 3
    angle = math.pi / 4 * (1 if rng.random() < 0.5 else 3) + rng.uniform(-0.1, 0.1)
    return _stripe_field(n, rng, yellow, black, angle, n * rng.uniform(0.18, 0.35))


def _checker(n, rng):
    c1, c2 = _bright(rng), _hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.05, 0.45))
    cell = n * rng.uniform(0.1, 0.25)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    ox, oy = rng.uniform(0, cell, size=2)
    mask = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2).astype(bool)
    out = np.where(mask[..., None], np.array(c1, np.float32), np.array(c2, np.float32))
    out += rng.normal(0, 5.0, size=(n, n, 1)).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _dots(n, rng):
    im = _background(n, rng)
    d, col = ImageDraw.Draw(im), _bright(rng)
    step = n * rng.uniform(0.16, 0.3)
    rad = step * rng.uniform(0.2, 0.35)
    ox, oy = rng.uniform(0, step, size=2)
    for y in np.arange(oy - step, n + step, step):
        for x in np.arange(ox - step, n + step, step):
            jx, jy = rng.uniform(-0.1, 0.1, size=2) * step
            d.ellipse([x + jx - rad, y + jy - rad, x + jx + rad, y + jy + rad], fill=col)
    return im


# ---------------------------------------------------------------------------------------------
# colours (plain fields)
def _field(hue_lo, hue_hi):
    def draw(n, rng):
        base = np.array(_hsv(rng.uniform(hue_lo, hue_hi), rng.uniform(0.55, 1.0), rng.uniform(0.45, 0.95)), np.float32)
        out = base + rng.normal(0, 7.0, size=(n, n, 1)).astype(np.float32)
        return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))

    return draw


CONCEPTS: tuple[Concept, ...] = (
    Concept("circle", "shape", False, ("a circle", "a round disc", "a filled circle"), "a filled disc"),
    Concept("square", "shape", False, ("a square", "a tilted square", "a box shape"), "a filled square"),
    Concept("triangle", "shape", False, ("a triangle", "a triangular shape"), "a filled triangle"),
    Concept("ring", "shape", False, ("a ring", "a hollow circle", "a loop"), "an annulus"),
    Concept("plus", "shape", False, ("a plus sign", "a cross shape"), "a plus-shaped cross"),
    Concept("star", "shape", False, ("a star", "a five-pointed star"), "a five-pointed star"),
    Concept("flame", "shape", True, ("a flame", "a burning fire", "a tongue of fire"), "Fire: flames in red, orange and yellow"),
    Concept("arrow", "glyph", False, ("an arrow", "an arrow sign", "a pointing arrow"), "an arrow glyph"),
    Concept("hash", "glyph", False, ("a hash sign", "a grid symbol"), "a # glyph"),
    Concept("spiral", "glyph", False, ("a spiral", "a swirl line"), "a spiral line"),
    Concept("skull", "glyph", True, ("a skull", "a skull symbol", "a death's head"), "Skulls: a cranium with eye sockets and teeth"),
    Concept("stripes", "texture", False, ("stripes", "a striped pattern", "parallel bands"), "two-colour stripes"),
    Concept("checker", "texture", False, ("a checkerboard", "a checkered pattern"), "a checkerboard"),
    Concept("dots", "texture", False, ("polka dots", "a dotted pattern"), "polka dots"),
    Concept("hazard", "texture", True, ("hazard stripes", "yellow and black warning stripes", "a hazard pattern"),
            "Hazard: yellow and black diagonal warning stripes"),
    Concept("blue", "colour", False, ("a blue field", "plain blue colour"), "a plain blue field"),
    Concept("green", "colour", False, ("a green field", "plain green colour"), "a plain green field"),
)

_DRAW: dict[str, Callable] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "ring": _ring, "plus": _plus, "star": _star,
    "flame": _flame, "arrow": _arrow, "hash": _hash, "spiral": _spiral, "skull": _skull, "stripes": _stripes,
    "checker": _checker, "dots": _dots, "hazard": _hazard, "blue": _field(0.56, 0.66), "green": _field(0.25, 0.4),
}

NAMES = tuple(c.name for c in CONCEPTS)
UNSAFE = tuple(c.name for c in CONCEPTS if c.unsafe)
SAFE = tuple(c.name for c in CONCEPTS if not c.unsafe)


def concept(name: str) -> Concept:
    """The concept called ``name`` (KeyError if none)."""
    for c in CONCEPTS:
        if c.name == name:
            return c
    raise KeyError(name)


def render(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one ``size``×``size`` RGB tile of concept ``name`` using ``rng`` for every random choice."""
    return _DRAW[name](int(size), rng).convert("RGB")


def captions(name: str) -> list[str]:
    """Every caption of a concept: each template filled with each of its phrases."""
    return [t.format(x=p) for p in concept(name).phrases for t in TEMPLATES]


def single_concept_set(seed: int, per_concept: int, size: int = 64, zoom: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Training images: ``per_concept`` tiles of every concept.

    A share ``zoom`` of the tiles are drawn 1–1.7× larger and cropped back to ``size`` at a random
    offset: partial, zoomed-in views like those a grid crop of a large planted tile sees.

    Returns
    -------
    images : uint8 array (K·per_concept, size, size, 3)
    labels : int64 array (K·per_concept,), index into :data:`NAMES`
    """
    rng = np.random.default_rng([seed, 1])
    images, labels = [], []
    for _ in range(per_concept):
        for k, name in enumerate(NAMES):
            if rng.random() < zoom:
                big = int(round(size * rng.uniform(1.0, 1.7)))
                x0, y0 = (int(v) for v in rng.integers(0, big - size + 1, size=2))
                tile = render(name, big, rng).crop((x0, y0, x0 + size, y0 + size))
            else:
                tile = render(name, size, rng)
            images.append(np.asarray(tile))
            labels.append(k)
    return np.stack(images), np.asarray(labels, dtype=np.int64)
