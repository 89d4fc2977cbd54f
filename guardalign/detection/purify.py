"""Purification fills (GuardAlign Eq. 11) and reviewer overlays.

Pure image functions: PIL images in, new PIL images out, no I/O and no logging.

Boxes are pixel boxes ``[x0, y0, x1, y1]`` in the coordinates of the image they are
applied to, half-open like :meth:`PIL.Image.Image.crop` (``x1``/``y1`` exclusive).
Fractional boxes are widened outward to whole pixels, so a mask always covers its patch.

Example
-------
>>> from PIL import Image
>>> img = Image.new("RGB", (64, 48), (255, 0, 0))
>>> out = apply_fill(img, [[0, 0, 32, 24]], fill="mean")
>>> out.getpixel((0, 0)), out.getpixel((40, 30))
((123, 117, 104), (255, 0, 0))
"""
from __future__ import annotations

import io
import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFilter, ImageFont

FILLS = ("mean", "black", "blur", "pixelate")

# CLIP's per-channel normalisation mean in [0, 1] (== open_clip.constants.OPENAI_DATASET_MEAN).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

# Formats a purified image is written back in (Pillow name → extension for renamed outputs); others → PNG.
KEEP_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}
OVERLAY_ALPHA = 0.45  # heatmap opacity over the original in overlays
UNSAFE_OUTLINE = (255, 32, 32)  # outline colour of unsafe boxes in overlays


def mean_fill_value(mean: Sequence[float] = OPENAI_CLIP_MEAN) -> tuple[int, int, int]:
    """The 8-bit RGB pixel that CLIP normalises to zero: ``round(mean * 255)`` per channel.

    Eq. 11 zeroes unsafe patches in the encoder's normalised input space
    ``(x/255 − mean) / std``; the pixel that maps to 0 is ``x = 255 · mean``.
    """
    if len(mean) != 3 or not all(0.0 <= float(m) <= 1.0 for m in mean):
        raise ValueError(f"mean must be three numbers in [0, 1], got {tuple(mean)!r}")
    return tuple(int(round(float(m) * 255)) for m in mean)  # type: ignore[return-value]


def pixel_box(box: Sequence[float], size: tuple[int, int], dilate: int = 0) -> tuple[int, int, int, int] | None:
    """Whole-pixel box grown by ``dilate`` px on every side and clipped to ``size`` (W, H).

    Returns None when the clipped box is empty.
    """
    if len(box) != 4:
        raise ValueError(f"a box needs 4 numbers [x0, y0, x1, y1], got {list(box)!r}")
    if dilate < 0:
        raise ValueError(f"dilate must be ≥ 0, got {dilate}")
    w, h = size
    x0 = max(0, math.floor(box[0]) - dilate)
    y0 = max(0, math.floor(box[1]) - dilate)
    x1 = min(w, math.ceil(box[2]) + dilate)
    y1 = min(h, math.ceil(box[3]) + dilate)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


# Blur and pixelate keep only what is coarser than the box itself. A detector crop the size of the box still
# resolves a few-by-few layout of colour (6×6 to 14×14 ViT tokens), so a finer blur or mosaic stays legible to
# it: the old defaults (σ = side/4, 6 blocks) left 1–2 % of the toy world's flagged images unsafe after masking
# (bench/RESULTS.md, "fills"). These defaults come back safe for every image there.
BLUR_SIGMA = 0.5  # blur: Gaussian σ as a fraction of the box's long side
PIXELATE_BLOCKS = 2  # pixelate: blocks along the box's long side
PIXELATE_CONTRAST = 0.5  # pixelate: each block's difference from the box's mean colour is scaled by this


def _blur(region: Image.Image) -> Image.Image:
    # σ half the long side: ±2σ spans the box twice over, so every pixel averages the whole region and only its
    # mean tone and a damped gradient remain (a pattern one cycle across the box keeps < 5 % of its contrast).
    return region.filter(ImageFilter.GaussianBlur(max(1.0, BLUR_SIGMA * max(region.size))))


def _pixelate(region: Image.Image) -> Image.Image:
    # A mosaic of PIXELATE_BLOCKS square blocks along the long side, each the mean of its pixels pulled halfway
    # to the box's mean colour: the blocks stay visible; what survives is a damped coarse layout, as with the blur.
    # Block averaging cannot add energy, so at most PIXELATE_CONTRAST² of the region's detail energy is left.
    import numpy as np

    a = np.asarray(region, dtype=np.float64)  # (H, W, 3)
    mean = a.mean(axis=(0, 1))
    block = math.ceil(max(region.size) / PIXELATE_BLOCKS)
    out = np.empty_like(a)
    for y in range(0, a.shape[0], block):
        for x in range(0, a.shape[1], block):
            cell = a[y:y + block, x:x + block]
            out[y:y + block, x:x + block] = mean + PIXELATE_CONTRAST * (cell.mean(axis=(0, 1)) - mean)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def apply_fill(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    fill: str = "mean",
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    dilate: int = 0,
) -> Image.Image:
    """Return a new image whose pixels inside ``boxes`` are replaced; every other pixel is unchanged.

    Parameters
    ----------
    image : PIL image, (W, H). Modes other than RGB/RGBA are converted to RGB first.
        In RGBA images the fill is made opaque (alpha 255) inside the boxes.
    boxes : [[x0, y0, x1, y1], ...] pixel boxes in ``image`` coordinates (half-open).
    fill : "mean" (Eq. 11: the pixel ``round(mean*255)``, zero in CLIP's normalised space),
        "black", "blur" (Gaussian, σ = :data:`BLUR_SIGMA` × the box's long side) or "pixelate"
        (:data:`PIXELATE_BLOCKS` blocks along the long side, at :data:`PIXELATE_CONTRAST` of their contrast).
    mean : the encoder's normalisation mean (RGB in [0, 1]) used by ``fill="mean"``.
    dilate : grow every box by this many pixels on each side (clipped at the borders).

    Blur and pixelate read from the original image, so overlapping boxes do not compound.
    """
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}: expected one of {FILLS}")
    src = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    out = src.copy()
    colour = {"mean": mean_fill_value(mean), "black": (0, 0, 0)}.get(fill)
    for box in boxes:
        pb = pixel_box(box, src.size, dilate)
        if pb is None:
            continue
        if colour is not None:
            out.paste(colour + ((255,) if src.mode == "RGBA" else ()), pb)
            continue
        region = src.crop(pb)
        rgb = region.convert("RGB")
        done = _blur(rgb) if fill == "blur" else _pixelate(rgb)
        out.paste(done.convert(src.mode), pb)  # RGB → RGBA gives alpha 255: the fill is opaque
    return out


def thumbnail_size(width: int, height: int, max_size: int = 512) -> tuple[int, int]:
    """(w, h) of a reviewer thumbnail: the long side at most ``max_size``, aspect kept, never upscaled."""
    if max_size < 1:
        raise ValueError(f"max_size must be ≥ 1, got {max_size}")
    scale = min(1.0, max_size / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _colormap(h: float) -> tuple[int, int, int]:
    # Diverging ramp: blue (0, safe) → near-white (0.5, at τ) → red (1, most unsafe).
    h = min(1.0, max(0.0, h))
    cool, mid, hot = (40, 90, 255), (245, 245, 235), (255, 0, 0)
    lo, hi, t = (cool, mid, h / 0.5) if h < 0.5 else (mid, hot, (h - 0.5) / 0.5)
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def heat_values(scores: Sequence[float], tau: float | None) -> list[float]:
    """Map patch costs (lower = more unsafe) to heat in [0, 1]; hotter = more unsafe.

    With ``tau``: piecewise linear with τ ↦ 0.5, the lowest cost ↦ 1 and the highest ↦ 0, so a
    patch is warm (> 0.5) exactly when its cost is below τ. Without τ: min-max, lowest ↦ 1.
    """
    if not scores:
        return []
    s = [float(x) for x in scores]
    lo, hi = min(s), max(s)
    if tau is None:
        return [(hi - x) / (hi - lo) if hi > lo else 0.5 for x in s]
    below, above = (tau - lo) or 1.0, (hi - tau) or 1.0
    return [0.5 + 0.5 * (tau - x) / below if x < tau else 0.5 - 0.5 * (x - tau) / above for x in s]


def overlay(
    image: Image.Image,
    patch_boxes: Sequence[Sequence[float]],
    patch_scores: Sequence[float],
    unsafe_patches: Sequence[int],
    box_categories: Sequence[str],
    tau: float | None,
    max_size: int = 512,
) -> Image.Image:
    """Reviewer thumbnail: per-patch heatmap over the original, unsafe boxes outlined and labelled.

    Parameters
    ----------
    image : original PIL image (W, H); boxes are in its coordinates.
    patch_boxes, patch_scores : every patch's pixel box and cost ``min_i d_i(m)`` (lower = hotter).
        Where patches overlap, the hottest one colours the pixel.
    unsafe_patches : indices into ``patch_boxes`` of the unsafe patches.
    box_categories : category label of each unsafe patch, parallel to ``unsafe_patches``.
    tau : the decision threshold (heat 0.5); None scales heat min-max.
    max_size : long side of the returned RGB thumbnail (see :func:`thumbnail_size`).
    """
    import numpy as np

    if len(patch_boxes) != len(patch_scores):
        raise ValueError(f"{len(patch_boxes)} patch boxes but {len(patch_scores)} patch scores")
    w, h = image.size
    tw, th = thumbnail_size(w, h, max_size)
    sx, sy = tw / w, th / h
    base = image.convert("RGB").resize((tw, th), Image.Resampling.LANCZOS)
    heat = np.full((th, tw), -1.0)
    for box, hv in zip(patch_boxes, heat_values(patch_scores, tau)):
        pb = pixel_box((box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), (tw, th))
        if pb is not None:
            x0, y0, x1, y1 = pb
            heat[y0:y1, x0:x1] = np.maximum(heat[y0:y1, x0:x1], hv)
    lut = np.array([_colormap(i / 255) for i in range(256)], dtype=np.float64)
    covered = heat >= 0
    colours = lut[np.clip(np.round(heat * 255), 0, 255).astype(int)]
    arr = np.asarray(base, dtype=np.float64)
    arr[covered] = (1 - OVERLAY_ALPHA) * arr[covered] + OVERLAY_ALPHA * colours[covered]
    out = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")
    _draw_unsafe(out, patch_boxes, unsafe_patches, box_categories, (sx, sy))
    return out


def _draw_unsafe(
    out: Image.Image,
    patch_boxes: Sequence[Sequence[float]],
    unsafe_patches: Sequence[int],
    box_categories: Sequence[str],
    scale: tuple[float, float],
) -> None:
    # Outline each unsafe box; label it unless the label would cover an earlier one (dense grids).
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    line = max(1, round(max(out.size) / 256))
    placed: list[tuple[int, int, int, int]] = []
    for k, idx in enumerate(unsafe_patches):
        if not 0 <= idx < len(patch_boxes):
            raise ValueError(f"unsafe patch index {idx} out of range for {len(patch_boxes)} patches")
        b = patch_boxes[idx]
        pb = pixel_box((b[0] * scale[0], b[1] * scale[1], b[2] * scale[0], b[3] * scale[1]), out.size)
        if pb is None:
            continue
        draw.rectangle((pb[0], pb[1], pb[2] - 1, pb[3] - 1), outline=UNSAFE_OUTLINE, width=line)
        label = box_categories[k] if k < len(box_categories) and box_categories[k] else "unsafe"
        tb = draw.textbbox((pb[0] + line + 1, pb[1] + line + 1), label, font=font)
        bg = (tb[0] - 1, tb[1] - 1, tb[2] + 1, tb[3] + 1)
        if any(not (bg[2] <= p[0] or p[2] <= bg[0] or bg[3] <= p[1] or p[3] <= bg[1]) for p in placed):
            continue
        placed.append(bg)
        draw.rectangle(bg, fill=UNSAFE_OUTLINE)
        draw.text((pb[0] + line + 1, pb[1] + line + 1), label, fill=(255, 255, 255), font=font)


def encode_image(image: Image.Image, fmt: str | None, original: bytes | None = None) -> tuple[bytes, str, list[str]]:
    """Encode a purified RGB image in its original format, without metadata.

    Parameters
    ----------
    image : the purified image (already EXIF-upright, so no orientation tag is needed).
    fmt : Pillow format of the original ("JPEG", "PNG", ...); formats outside :data:`KEEP_FORMATS` become PNG.
    original : the original file's bytes, read for JPEG quantisation tables/subsampling and the ICC
        colour profile only. EXIF (GPS, camera, orientation), XMP, text chunks and comments are dropped.

    Returns
    -------
    (data, format written, notes) : notes explain anything a user would not expect (lossy re-encode, …).
    """
    notes: list[str] = []
    out_fmt = fmt if fmt in KEEP_FORMATS else "PNG"
    if out_fmt != fmt:
        notes.append(f"format {fmt or 'unknown'} cannot be written back: saved as PNG")
    kwargs: dict = {}
    icc = None
    if original is not None and fmt:
        try:  # only the plugin of the format the original was decoded as (never another, e.g. EPS)
            with Image.open(io.BytesIO(original), formats=["JPEG" if fmt == "MPO" else fmt]) as src:
                if src.mode in ("RGB", "RGBA", "P"):  # an RGB profile; CMYK/grey profiles would not fit RGB pixels
                    icc = src.info.get("icc_profile")
                if out_fmt == "JPEG" and src.format == "JPEG":
                    from PIL import JpegImagePlugin

                    kwargs.update(qtables=src.quantization, subsampling=JpegImagePlugin.get_sampling(src))
        except Exception:  # the original was decodable moments ago; missing extras are not worth failing for
            kwargs.clear()
    if icc and out_fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        kwargs["icc_profile"] = icc
    if out_fmt == "JPEG":
        kwargs.setdefault("quality", 95)
        if kwargs.get("subsampling") == -1:
            kwargs.pop("subsampling")
        notes.append("JPEG re-encoded with the original's quantisation: pixels outside the boxes may shift slightly")
    elif out_fmt == "WEBP":
        kwargs["lossless"] = True
    elif out_fmt == "GIF":
        notes.append("GIF re-quantised to a palette: fill colours are approximate")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=out_fmt, **kwargs)
    return buf.getvalue(), out_fmt, notes


def boxes_to_fill(boxes: Sequence[Sequence[int]], size: tuple[int, int]) -> list[list[int]]:
    """The boxes to fill in an unsafe image: its unsafe patch boxes, or the whole image when the
    detector gave none (``--method global`` judges the whole image, so the whole image is masked)."""
    return [list(b) for b in boxes] if boxes else [[0, 0, int(size[0]), int(size[1])]]
