"""Detector: planted embeddings (exact decisions) and the real tiny CLIP end to end (plumbing)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from guardalign.detection.anchors import parse_anchors
from guardalign.config import DetectConfig
from guardalign.detection.detector import Detector
from guardalign.models.clip import PatchBatch, grid_boxes

ANCHORS = """
version: 1
tau: 0.5
prefix: Be careful.
refusal_phrases: ["I cannot"]
categories:
  - {name: weapons, description: guns, variants: ["a gun", "a rifle"]}
  - {name: drugs, description: drugs, variants: ["pills", "a syringe", "powder"]}
  - {name: hate, description: hate, variants: ["a hate symbol"]}
"""

D = 64


class StubEncoder:
    """Deterministic text table; image side is fed directly through detect_patches/detect_global."""

    name = "stub"
    device = torch.device("cpu")
    logit_scale = 100.0

    def __init__(self, texts: list[str], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        table = torch.nn.functional.normalize(torch.randn(len(texts), D, generator=g), dim=-1)
        self.table = dict(zip(texts, table))

    def encode_text(self, texts):
        return torch.stack([self.table[t] for t in texts])


def _detector(tau=None, **cfg):
    anchors = parse_anchors(ANCHORS)
    texts, _ = anchors.texts()
    return Detector(StubEncoder(texts), anchors, DetectConfig(tau=tau, **cfg)), anchors


def _planted_batch(det: Detector, planted: dict[int, str], n_patches=9, seed=1) -> PatchBatch:
    """Random patches (cos ≈ 0 with every anchor) except ``planted``: patch index → anchor text it copies."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(1, n_patches, D, generator=g), dim=-1)
    for m, text in planted.items():
        x[0, m] = det.encoder.table[text]
    boxes = grid_boxes(90, 90, 3)
    return PatchBatch(global_emb=x[:, 0], patch_emb=x, boxes=[boxes], grid=(3, 3))


def test_planted_patch_is_the_only_one_flagged_with_its_category():
    det, _ = _detector()
    rec = det.detect_patches(_planted_batch(det, {4: "a rifle"}), [(90, 90)])[0]
    assert rec.verdict == "unsafe"
    assert rec.unsafe_patches == [4]
    assert rec.category == "weapons" and rec.box_categories == ["weapons"]
    assert rec.boxes == [[30, 30, 60, 60]]
    # the planted patch's own mass rides on its copy: its expected cost is ~0, every other patch's ~1
    assert rec.patch_scores[4] < 0.05
    assert min(s for m, s in enumerate(rec.patch_scores) if m != 4) > 0.6
    assert rec.score == pytest.approx(rec.patch_scores[4])
    assert rec.categories["weapons"] == pytest.approx(rec.score)
    assert rec.categories["drugs"] > 0.6 and rec.categories["hate"] > 0.6


def test_two_planted_categories_and_safe_image():
    det, _ = _detector()
    rec = det.detect_patches(_planted_batch(det, {0: "pills", 8: "a hate symbol"}), [(90, 90)])[0]
    assert rec.unsafe_patches == [0, 8]
    assert rec.box_categories == ["drugs", "hate"]
    safe = det.detect_patches(_planted_batch(det, {}), [(90, 90)])[0]
    assert safe.verdict == "safe" and safe.unsafe_patches == [] and safe.boxes == []
    assert safe.score > safe.threshold


def test_tau_override_and_per_category_threshold():
    det, _ = _detector(tau=1.99)  # every patch is within cost 1.99 of some category
    rec = det.detect_patches(_planted_batch(det, {}), [(90, 90)])[0]
    assert rec.unsafe_patches == list(range(9)) and rec.threshold == 1.99
    strict = det.with_config(tau=0.3)  # same encoder and text embeddings, new threshold
    rec = strict.detect_patches(_planted_batch(det, {}), [(90, 90)])[0]
    assert rec.verdict == "safe" and rec.threshold == 0.3


def test_tau_zero_flags_nothing_even_where_a_cost_rounds_below_zero(monkeypatch):
    from guardalign.detection import transport

    real = transport.ot_patch_scores

    def rounded_below_zero(*args, **kwargs):  # 1 − cos of a patch equal to its anchor can round to −ε
        res = real(*args, **kwargs)
        return dataclasses.replace(res, d=res.d - res.d.min() - 1e-7)

    monkeypatch.setattr(transport, "ot_patch_scores", rounded_below_zero)
    det, _ = _detector(tau=0)
    rec = det.detect_patches(_planted_batch(det, {4: "a rifle"}), [(90, 90)])[0]
    assert rec.score < 0  # the case that a plain d ≤ τ rule would flag
    assert rec.verdict == "safe" and rec.unsafe_patches == [] and rec.threshold == 0.0
    assert rec.category == "weapons"  # the nearest category is still reported
    tiny = det.with_config(tau=1e-9).detect_patches(_planted_batch(det, {4: "a rifle"}), [(90, 90)])[0]
    assert tiny.unsafe_patches == [4]  # any positive τ applies the rule d ≤ τ as usual
    zero_cat = Detector(det.encoder, parse_anchors(ANCHORS.replace("tau: 0.5", "tau: 0")), DetectConfig())
    assert zero_cat.detect_patches(_planted_batch(det, {4: "a rifle"}), [(90, 90)])[0].verdict == "safe"


def test_paper_aggregate_is_reported_through_config():
    det, _ = _detector(aggregate="paper")
    rec = det.detect_patches(_planted_batch(det, {4: "a gun"}), [(90, 90)])[0]
    # d_paper sums over categories and is not normalised by a^m: its scale differs from d_i(m)
    normal = det.with_config(aggregate="normalized").detect_patches(_planted_batch(det, {4: "a gun"}), [(90, 90)])[0]
    assert rec.patch_scores != pytest.approx(normal.patch_scores)


def test_global_baseline_uses_category_means():
    det, anchors = _detector(method="global")
    texts, owner = anchors.texts()
    z = det.encoder.encode_text(texts)
    mean_drugs = torch.nn.functional.normalize(z[torch.tensor(owner) == 1].mean(0), dim=0)
    emb = torch.stack([mean_drugs, -mean_drugs])
    safe_unsafe = det.detect_global(emb, [(10, 20), (10, 20)])
    assert safe_unsafe[0].verdict == "unsafe" and safe_unsafe[0].category == "drugs"
    assert safe_unsafe[0].score == pytest.approx(1.0, abs=1e-5)
    assert safe_unsafe[1].verdict == "safe"
    assert safe_unsafe[0].unsafe_patches == [] and safe_unsafe[0].method == "global"


def test_bad_config_is_a_config_error():
    from guardalign.errors import ConfigError

    with pytest.raises(ConfigError, match="patches"):
        _detector(patches="tiles")
    with pytest.raises(ConfigError, match="tau"):
        _detector(tau=3.0)


# --------------------------------------------------------------- real tiny CLIP: plumbing only


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in [(64, 64), (101, 37), (30, 200)]]


@pytest.mark.parametrize("patches", ["grid", "dense"])
def test_tiny_clip_end_to_end_records(tiny_encoder, patches):
    from guardalign.detection.anchors import load_anchors

    anchors = load_anchors()
    images = _images()
    one = dict(patches=patches, scales=(), batch_size=2)  # one grid (5×5 by default): rec["grid"] counts the boxes
    all_unsafe = Detector(tiny_encoder, anchors, DetectConfig(tau=2.0, **one)).detect(images)
    none_unsafe = Detector(tiny_encoder, anchors, DetectConfig(tau=1e-4, **one)).detect(images)
    assert [d.verdict for d in all_unsafe] == ["unsafe"] * 3
    assert [d.verdict for d in none_unsafe] == ["safe"] * 3
    for det, im in zip(all_unsafe, images):
        rec = det.to_record()
        assert (rec["width"], rec["height"]) == im.size
        assert len(rec["patch_scores"]) == len(rec["patch_boxes"]) == len(rec["unsafe_patches"])
        assert set(rec["categories"]) == set(anchors.names)
        assert rec["anchors_sha256"] == anchors.sha256 and rec["model"] == tiny_encoder.name
        assert rec["patches"] == patches and rec["grid"][0] * rec["grid"][1] == len(rec["patch_boxes"])
        area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in rec["boxes"])
        assert area == im.size[0] * im.size[1]  # every patch flagged: the boxes tile the image


def test_batching_does_not_change_scores(tiny_encoder):
    from guardalign.detection.anchors import load_anchors

    anchors = load_anchors()
    images = _images()
    one = Detector(tiny_encoder, anchors, DetectConfig(batch_size=1)).detect(images)
    three = Detector(tiny_encoder, anchors, DetectConfig(batch_size=3)).detect(images)
    for a, b in zip(one, three):
        assert a.patch_scores == pytest.approx(b.patch_scores, abs=1e-5)
