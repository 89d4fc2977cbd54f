"""Fills change exactly the flagged boxes; Eq. 11's mean fill is CLIP's zero; overlays are small."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from guardalign.detection.purify import (
    FILLS,
    OPENAI_CLIP_MEAN,
    apply_fill,
    heat_values,
    mean_fill_value,
    overlay,
    pixel_box,
    thumbnail_size,
)


def noise_image(w: int = 97, h: int = 71, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = 4 if mode == "RGBA" else 3
    return Image.fromarray(rng.integers(0, 256, (h, w, bands), dtype=np.uint8), mode)


def box_mask(size: tuple[int, int], boxes) -> np.ndarray:
    # Independent reference: boolean (H, W) mask of half-open integer boxes.
    w, h = size
    m = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        m[max(0, y0):min(h, y1), max(0, x0):min(w, x1)] = True
    return m


BOXES = [[10, 5, 40, 30], [60, 40, 97, 71]]  # the second touches the right and bottom borders


@pytest.mark.parametrize("fill", FILLS)
def test_fill_changes_exactly_the_boxes(fill):
    img = noise_image()
    out = apply_fill(img, BOXES, fill=fill)
    a, b = np.asarray(img), np.asarray(out)
    assert out.size == img.size and out.mode == "RGB"
    changed = (a != b).any(axis=2)
    inside = box_mask(img.size, BOXES)
    assert not changed[~inside].any(), "a pixel outside the boxes changed"
    # On noise every fill replaces (almost) every pixel of the box.
    assert changed[inside].mean() > 0.95
    assert np.array_equal(np.asarray(img), a), "input image was modified in place"


def test_mean_fill_is_clip_zero():
    # Eq. 11 literally: the filled pixel normalises to 0 in CLIP's input space (x/255 - mean)/std.
    import open_clip.constants as oc

    assert OPENAI_CLIP_MEAN == tuple(oc.OPENAI_DATASET_MEAN)
    assert mean_fill_value() == (123, 117, 104)  # hand-worked: 0.4815*255=122.77, 0.4578*255=116.75, 0.4082*255=104.09
    out = np.asarray(apply_fill(noise_image(), BOXES, fill="mean"))
    region = out[5:30, 10:40].reshape(-1, 3)
    assert (region == np.array([round(m * 255) for m in oc.OPENAI_DATASET_MEAN])).all()
    normalised = (region[0] / 255 - np.array(oc.OPENAI_DATASET_MEAN)) / np.array(oc.OPENAI_DATASET_STD)
    assert np.abs(normalised).max() < 0.5 / 255 / min(oc.OPENAI_DATASET_STD) + 1e-9  # zero up to 8-bit rounding


def test_custom_mean_and_black():
    out = np.asarray(apply_fill(noise_image(), [[0, 0, 5, 5]], fill="mean", mean=(0.5, 0.0, 1.0)))
    assert tuple(out[2, 2]) == (128, 0, 255)
    out = np.asarray(apply_fill(noise_image(), [[0, 0, 5, 5]], fill="black"))
    assert (out[:5, :5] == 0).all()
    with pytest.raises(ValueError, match="mean"):
        mean_fill_value((0.5, 0.5))


def test_dilate_grows_and_clips():
    img = noise_image(50, 40)
    out = apply_fill(img, [[0, 30, 10, 40]], fill="black", dilate=3)
    changed = (np.asarray(img) != np.asarray(out)).any(axis=2)
    expected = box_mask(img.size, [[0, 27, 13, 40]])  # grown by 3, clipped at x=0 and y=40
    assert np.array_equal(changed & expected, changed)  # nothing outside the dilated box
    assert (np.asarray(out)[expected] == 0).all()  # and every pixel inside it is black
    assert pixel_box([0, 30, 10, 40], (50, 40), 3) == (0, 27, 13, 40)
    assert pixel_box([48, 38, 60, 60], (50, 40), 5) == (43, 33, 50, 40)
    assert pixel_box([60, 60, 70, 70], (50, 40)) is None
    assert pixel_box([1.4, 2.6, 3.2, 4.0], (50, 40)) == (1, 2, 4, 4)  # fractional boxes widen outward
    with pytest.raises(ValueError, match="dilate"):
        pixel_box([0, 0, 1, 1], (5, 5), -1)


def test_empty_and_out_of_image_boxes_change_nothing():
    img = noise_image()
    for boxes in ([], [[200, 200, 300, 300]]):
        assert np.array_equal(np.asarray(apply_fill(img, boxes, fill="blur")), np.asarray(img))


def test_unknown_fill_is_an_error():
    with pytest.raises(ValueError, match="unknown fill 'grey'"):
        apply_fill(noise_image(), BOXES, fill="grey")


@pytest.mark.parametrize("fill", FILLS)
def test_rgba_keeps_alpha_outside_and_is_opaque_inside(fill):
    img = noise_image(mode="RGBA")
    out = apply_fill(img, BOXES, fill=fill)
    a, b = np.asarray(img), np.asarray(out)
    inside = box_mask(img.size, BOXES)
    assert out.mode == "RGBA"
    assert np.array_equal(a[~inside], b[~inside])
    assert (b[inside][:, 3] == 255).all()


def test_thumbnail_size():
    assert thumbnail_size(2048, 1024) == (512, 256)
    assert thumbnail_size(300, 1200, 512) == (128, 512)
    assert thumbnail_size(100, 50) == (100, 50)  # never upscaled


def test_heat_values_centred_on_tau():
    # Hand-worked: τ=0.3, lowest 0.1 → 1, 0.2 halfway below → 0.75, τ → 0.5, highest 0.7 → 0, 0.5 → 0.25.
    assert heat_values([0.1, 0.2, 0.3, 0.5, 0.7], tau=0.3) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert heat_values([0.2, 0.4], tau=None) == pytest.approx([1.0, 0.0])
    h = heat_values([0.25, 0.26], tau=2.0)  # everything unsafe: everything warm
    assert min(h) > 0.5 and h[0] == pytest.approx(1.0)
    assert max(heat_values([0.5, 0.6], tau=0.0001)) < 0.5  # nothing unsafe: nothing warm


def test_overlay_size_and_marks():
    img = noise_image(1000, 600, seed=1)
    boxes = [[x * 250, y * 200, (x + 1) * 250, (y + 1) * 200] for y in range(3) for x in range(4)]
    scores = [0.5 + 0.01 * i for i in range(12)]
    scores[5] = 0.1
    ov = overlay(img, boxes, scores, [5], ["violence"], tau=0.3)
    assert ov.size == (512, 307) and ov.mode == "RGB"
    plain = np.asarray(img.convert("RGB").resize(ov.size, Image.Resampling.LANCZOS), dtype=int)
    arr = np.asarray(ov, dtype=int)
    assert np.abs(arr - plain).max(axis=2).mean() > 5  # the heatmap is drawn
    # The unsafe patch (x 250..500 → 128..256, y 200..400 → 102..205) is outlined in red.
    assert tuple(arr[150, 128]) == (255, 32, 32)
    assert tuple(arr[150, 127]) != (255, 32, 32)
    # and it is hotter (redder) than a safe patch, averaged over its interior.
    hot = arr[130:200, 140:250]
    cold = arr[10:90, 10:120]
    assert (hot[..., 0] - hot[..., 2]).mean() > (cold[..., 0] - cold[..., 2]).mean() + 50


def test_overlay_validates_inputs():
    img = noise_image(40, 40)
    with pytest.raises(ValueError, match="patch scores"):
        overlay(img, [[0, 0, 20, 20]], [0.1, 0.2], [], [], tau=0.3)
    with pytest.raises(ValueError, match="out of range"):
        overlay(img, [[0, 0, 20, 20]], [0.1], [3], ["x"], tau=0.3)


def test_boxes_to_fill_masks_patches_or_the_whole_image():
    from guardalign.detection.purify import boxes_to_fill

    assert boxes_to_fill([(1, 2, 3, 4)], (10, 20)) == [[1, 2, 3, 4]]
    assert boxes_to_fill([], (10, 20)) == [[0, 0, 10, 20]]  # global method: no patches, whole image
