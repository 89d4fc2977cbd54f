"""Patch layouts: refine geometry, the encode budget of each layout, and search mode end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from guardalign.config import DetectConfig, n_windows
from guardalign.detection.anchors import parse_anchors
from guardalign.detection.detector import Detector
from guardalign.errors import ConfigError
from guardalign.models.patches import grid_boxes, refine_boxes

ANCHORS = """
version: 1
tau: 0.9
prefix: "Be careful."
refusal_phrases: ["I cannot"]
categories:
  - name: fire
    description: "flames"
    variants: ["a fire", "flames", "a burning house"]
  - name: skulls
    description: "skulls"
    variants: ["a skull", "a death's head"]
"""


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _cover(boxes, width, height) -> np.ndarray:
    count = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in boxes:
        count[y0:y1, x0:x1] += 1
    return count


# ---- geometry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("box", [(0, 0, 85, 85), (85, 171, 171, 256), (10, 7, 139, 100), (40, 60, 49, 69)])
def test_refine_boxes_at_half_scale_cover_their_parent_exactly(box):
    sub = refine_boxes(box, 256, 256)
    assert sub.shape == (9, 4) and sub.dtype == np.int64
    x0, y0, x1, y1 = box
    assert (sub[:, 0] >= x0).all() and (sub[:, 1] >= y0).all() and (sub[:, 2] <= x1).all() and (sub[:, 3] <= y1).all()
    cover = _cover(sub, 256, 256)
    assert (cover[y0:y1, x0:x1] >= 1).all()  # every pixel of the parent is seen
    assert cover.sum() == cover[y0:y1, x0:x1].sum()  # and nothing outside it
    w = (x1 - x0) / 2  # half-size windows at stride 0.5: starts a quarter of the parent apart
    assert np.allclose(sub[:3, 2] - sub[:3, 0], w, atol=1)
    assert np.allclose(np.diff(sub[:3, 0]), w / 2, atol=1)


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.0])
def test_refine_boxes_span_twice_their_scale_around_the_parent(scale):
    box = (90, 80, 150, 140)  # 60 px, centred on (120, 110)
    sub = refine_boxes(box, 256, 256, scale)
    side, region = 60 * scale, 2 * 60 * scale
    assert np.allclose(sub[:, 2] - sub[:, 0], side, atol=1) and np.allclose(sub[:, 3] - sub[:, 1], side, atol=1)
    cover = _cover(sub, 256, 256)
    ys, xs = np.nonzero(cover)
    assert abs(xs.min() - (120 - region / 2)) <= 1 and abs(xs.max() + 1 - (120 + region / 2)) <= 1
    assert abs(ys.min() - (110 - region / 2)) <= 1 and abs(ys.max() + 1 - (110 + region / 2)) <= 1
    assert (cover[ys.min():ys.max() + 1, xs.min():xs.max() + 1] >= 1).all()  # no holes in the region


@pytest.mark.parametrize("box,size", [((200, 200, 256, 240), (256, 240)), ((0, 0, 30, 30), (256, 256)),
                                      ((3, 3, 5, 4), (8, 8)), ((0, 0, 256, 256), (256, 256))])
def test_refine_boxes_stay_in_the_image_and_are_deterministic(box, size):
    for scale in (0.5, 0.75, 1.0):
        a = refine_boxes(box, *size, scale)
        assert a.shape == (9, 4) and (a[:, :2] >= 0).all()
        assert (a[:, 2] <= size[0]).all() and (a[:, 3] <= size[1]).all()
        assert (a[:, 2] > a[:, 0]).all() and (a[:, 3] > a[:, 1]).all()
        assert np.array_equal(a, refine_boxes(box, *size, scale))


@pytest.mark.parametrize("grid,stride,scales", [(3, 1.0, ()), (2, 0.5, ()), (3, 0.5, (2,)), (4, 1.0, (2, 1))])
def test_coarse_layout_covers_the_image(grid, stride, scales):
    cfg = DetectConfig(patches="search", grid=grid, stride=stride, scales=scales, budget=200).validate()
    boxes = np.concatenate([grid_boxes(257, 190, g, stride=stride) for g in dict.fromkeys([grid, *scales])])
    assert len(boxes) == cfg.coarse_windows()
    assert (_cover(boxes, 257, 190) >= 1).all()


# ---- budget -----------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,stride,budget", [(3, 1.0, 28), (2, 0.5, 28), (3, 1.0, 10), (3, 1.0, 18),
                                                (2, 0.5, 30), (3, 0.5, 30), (2, 1.0, 200)])
def test_search_plan_respects_the_budget(grid, stride, budget):
    cfg = DetectConfig(patches="search", grid=grid, stride=stride, budget=budget).validate()
    top, per = cfg.search_plan()
    coarse = n_windows(grid, stride) ** 2
    assert per == 9 and 0 <= top <= coarse
    assert cfg.encodes() == 1 + coarse + top * per <= budget
    if top < coarse:
        assert cfg.encodes() + per > budget  # the budget is used up to the last whole refinement


def test_encodes_of_the_fixed_layouts():
    assert DetectConfig(patches="grid", grid=3).encodes() == 10
    assert DetectConfig(patches="grid", grid=3, stride=0.5).encodes() == 26
    assert DetectConfig(patches="grid", grid=3, scales=(2,)).encodes() == 14
    assert DetectConfig(patches="grid", grid=4).encodes() == 17
    assert DetectConfig(patches="dense").encodes() == 1
    assert DetectConfig(method="global", patches="search").encodes() == 1


def test_budget_below_the_coarse_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="budget"):
        DetectConfig(patches="search", grid=3, budget=9).validate()
    with pytest.raises(ConfigError, match="budget"):
        DetectConfig(patches="search", budget=0).validate()
    DetectConfig(patches="grid", grid=3, budget=9).validate()  # the budget only binds search mode


# ---- search end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector(tiny_encoder):
    return Detector(tiny_encoder, parse_anchors(ANCHORS), DetectConfig(patches="search", grid=3, budget=28))


def test_search_records_report_encodes_within_budget(detector):
    images = [_noise(256, 256, 1), _noise(120, 200, 2), _noise(7, 5, 3)]
    dets = detector.detect(images)
    for det, im in zip(dets, images):
        assert det.encodes == detector.config.encodes() == 28
        assert len(det.patch_boxes) == len(det.patch_scores) == det.encodes - 1
        assert det.patches == "search" and det.to_record()["encodes"] == 28
        boxes = np.array(det.patch_boxes)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= im.width).all() and (boxes[:, 3] <= im.height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert np.array_equal(boxes[:9], grid_boxes(im.width, im.height, 3))  # the coarse layout first


def test_search_refines_the_most_suspicious_coarse_windows(detector, tiny_encoder):
    images = [_noise(256, 256, s) for s in range(4)]
    coarse = tiny_encoder.grid_patches(images, grid=3)
    margins = detector._margins(coarse.patch_emb)  # (B, 9), computed on the coarse windows alone
    dets = detector.detect(images)
    top, per = detector.config.search_plan()
    for b, det in enumerate(dets):
        chosen = torch.argsort(margins[b], stable=True)[:top].tolist()
        fine = np.array(det.patch_boxes[9:]).reshape(top, per, 4)
        for k, m in enumerate(chosen):
            assert np.array_equal(fine[k], refine_boxes(coarse.boxes[b][m], 256, 256))


def test_search_is_deterministic_and_batch_independent(detector):
    images = [_noise(200, 150, s) for s in range(3)]
    together = detector.detect(images)
    alone = [detector.with_config(batch_size=1).detect([im])[0] for im in images]
    again = detector.detect(images)
    for a, b, c in zip(together, alone, again):
        assert a.patch_boxes == b.patch_boxes == c.patch_boxes
        assert np.allclose(a.patch_scores, b.patch_scores, atol=1e-5) and a.patch_scores == c.patch_scores


def test_budget_without_room_to_refine_equals_grid(tiny_encoder):
    anchors = parse_anchors(ANCHORS)
    images = [_noise(100, 100, 7)]
    grid = Detector(tiny_encoder, anchors, DetectConfig(patches="grid", grid=3)).detect(images)[0]
    search = Detector(tiny_encoder, anchors, DetectConfig(patches="search", grid=3, budget=18)).detect(images)[0]
    assert search.encodes == grid.encodes == 10
    assert search.patch_boxes == grid.patch_boxes and np.allclose(search.patch_scores, grid.patch_scores)


def test_layout_defaults_follow_the_patches_mode():
    """No grid given: grid mode is 5×5 + 2×2 (30 encodes), search is grid 3 within budget 28; a grid given alone
    means that grid only; explicit scales are kept."""
    from guardalign.config import DetectConfig

    assert (DetectConfig().grid, DetectConfig().scales, DetectConfig().encodes()) == (5, (2,), 30)
    search = DetectConfig(patches="search")
    assert (search.grid, search.scales, search.encodes()) == (3, (), 28)
    assert (DetectConfig(grid=3).scales, DetectConfig(grid=3).encodes()) == ((), 10)
    assert DetectConfig(grid=4, scales=[2]).scales == (2,) and DetectConfig(scales=()).encodes() == 26
