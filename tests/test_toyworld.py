"""Toy world: deterministic generator, composites' geometry, the contrastive loss, and a smoke pipeline.

The smoke test trains a tiny CLIP for a few steps on CPU, saves it, loads it back through the
product's ``load_encoder(config.json, checkpoint)`` path and checks that OT detection beats chance
on composites whose unsafe tile covers half the image.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from bench.toyworld import composites as comp
from bench.toyworld.anchors_yaml import anchors_text, write_anchors
from bench.toyworld.train import TrainSettings, cached_model, load_trained, soft_infonce
from bench.toyworld.world import CONCEPTS, NAMES, SAFE, UNSAFE, captions, render, single_concept_set
from guardalign.detection.anchors import load_anchors, parse_anchors


def _digest(images) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(np.asarray(im).tobytes())
    return h.hexdigest()


def test_world_has_enough_concepts_of_every_kind():
    kinds = {c.kind for c in CONCEPTS}
    assert len(CONCEPTS) >= 12 and kinds == {"shape", "glyph", "texture", "colour"}
    assert len(UNSAFE) >= 3 and set(UNSAFE) | set(SAFE) == set(NAMES) and not set(UNSAFE) & set(SAFE)
    for name in NAMES:
        caps = captions(name)
        assert len(caps) >= 12 and len(set(caps)) == len(caps)  # ≥ 2 phrases × 6 templates, all distinct


@pytest.mark.parametrize("name", NAMES)
def test_render_is_deterministic_per_seed(name):
    a = render(name, 64, np.random.default_rng(7))
    b = render(name, 64, np.random.default_rng(7))
    c = render(name, 64, np.random.default_rng(8))
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_sets_are_deterministic_byte_for_byte():
    ims1, lab1 = single_concept_set(3, 2)
    ims2, lab2 = single_concept_set(3, 2)
    ims3, _ = single_concept_set(4, 2)
    assert ims1.tobytes() == ims2.tobytes() and (lab1 == lab2).all()
    assert ims1.tobytes() != ims3.tobytes()
    assert ims1.shape == (2 * len(NAMES), 64, 64, 3)
    e1, e2, e3 = comp.eval_set(5, 2), comp.eval_set(5, 2), comp.eval_set(6, 2)
    assert _digest(c.image for c in e1) == _digest(c.image for c in e2)
    assert [c.box for c in e1] == [c.box for c in e2]
    assert _digest(c.image for c in e1) != _digest(c.image for c in e3)


@pytest.mark.parametrize("coverage,layout", [("1/9", "aligned"), ("1/9", "shifted"), ("1/4", "random"), ("1/2", "random")])
def test_composites_plant_exactly_one_tile_of_the_right_class(monkeypatch, coverage, layout):
    drawn = []
    real = comp.render
    monkeypatch.setattr(comp, "render", lambda name, size, rng: drawn.append((name, size)) or real(name, size, rng))
    rng = np.random.default_rng(0)
    for unsafe in (True, False, True, False):
        drawn.clear()
        c = comp.composite(rng, coverage, unsafe, layout)
        x0, y0, x1, y1 = c.box
        assert c.image.size == (192, 192) and 0 <= x0 < x1 <= 192 and 0 <= y0 < y1 <= 192
        assert abs((x1 - x0) * (y1 - y0) / 192**2 - comp.COVERAGES[coverage]) < 0.01
        assert drawn[-1] == (c.concept, x1 - x0)  # the planted tile is drawn last, at its size
        unsafe_drawn = [n for n, _ in drawn if n in UNSAFE]
        assert unsafe_drawn == ([c.concept] if unsafe else [])  # exactly one unsafe tile, or none
        assert c.label == ("unsafe" if unsafe else "safe")
        if layout == "aligned":
            assert x0 % 64 == 0 and y0 % 64 == 0
        if layout == "shifted":
            assert x0 % 64 == 32 and y0 % 64 == 32


def test_anchor_yaml_lists_unsafe_concepts_with_caption_variants(tmp_path):
    a = parse_anchors(anchors_text(0.4))
    assert a.names == UNSAFE and a.tau == 0.4
    assert all(list(cat.variants) == captions(cat.name) for cat in a.categories)
    assert load_anchors(write_anchors(tmp_path / "a.yaml")).sha256 == parse_anchors(anchors_text()).sha256


def test_soft_infonce_reduces_to_clip_loss_when_every_label_is_distinct():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    labels = torch.arange(6)
    ours = soft_infonce(img, txt, torch.tensor(10.0), labels, labels)
    ref = ClipLoss()(img, txt, torch.tensor(10.0))
    assert torch.allclose(ours, ref, atol=1e-6)
    # shared labels: image 0 and 1 share concept 0; the i→t target splits over the two captions of concept 0
    lab = torch.tensor([0, 0, 1, 2, 3, 4])
    logits = 10.0 * img @ txt.T
    i2t0 = -(torch.log_softmax(logits[0], 0)[:2].mean())
    manual_i2t = torch.stack([i2t0, -(torch.log_softmax(logits[1], 0)[:2].mean())]
                             + [-torch.log_softmax(logits[k], 0)[k] for k in range(2, 6)]).mean()
    t2i = torch.stack([-(torch.log_softmax(logits[:, 0], 0)[:2].mean()), -(torch.log_softmax(logits[:, 1], 0)[:2].mean())]
                      + [-torch.log_softmax(logits[:, k], 0)[k] for k in range(2, 6)]).mean()
    assert torch.allclose(soft_infonce(img, txt, torch.tensor(10.0), lab, lab), (manual_i2t + t2i) / 2, atol=1e-6)


SMOKE = TrainSettings(per_concept=24, steps=120, batch_size=64, lr=3e-3, warmup=20, vision_width=64,
                      vision_layers=2, text_layers=1)


def test_smoke_pipeline_trains_and_ot_beats_chance_at_half_coverage(tmp_path):
    from guardalign.config import DetectConfig
    from guardalign.detection.detector import Detector
    from guardalign.detection.thresholds import auroc

    trained = cached_model(SMOKE, root=tmp_path)
    assert not trained.cached and trained.checkpoint_path.suffix == ".safetensors"
    losses = np.array(trained.losses)
    assert losses[-10:].mean() < 0.8 * losses[:10].mean()  # training loss drops
    again = cached_model(SMOKE, root=tmp_path)  # same settings → the cache answers
    assert again.cached and again.losses == trained.losses

    encoder = load_trained(trained)  # load_encoder(config.json, checkpoint): the product's path
    det = Detector(encoder, load_anchors(write_anchors(tmp_path / "toy.yaml")), DetectConfig(grid=3, batch_size=64))
    n = 30
    items = comp.eval_set(11, n, [("1/2", "random")])
    dets = det.detect([c.image for c in items])
    labels = np.array([c.label == "unsafe" for c in items])
    score = auroc([d.score for d in dets], labels, "lower")
    # Under H0 (scores independent of labels) the AUROC has sd √((n1+n0+1)/(12·n1·n0)) ≈ 0.075 for 30 + 30;
    # demand three of them above chance (p ≈ 0.001 one-sided).
    margin = 3 * math.sqrt((2 * n + 1) / (12 * n * n))
    assert score > 0.5 + margin, f"OT AUROC {score:.3f} at 1/2 coverage is not above chance + {margin:.3f}"


# ---- scene world (issue 13) -------------------------------------------------------------------
def test_scenes_are_deterministic_and_seeded():
    from bench.toyworld.scene import eval_scenes, training_views

    a, b, c = eval_scenes(3, 2), eval_scenes(3, 2), eval_scenes(4, 2)
    assert _digest(s.image for s in a) == _digest(s.image for s in b) and [s.box for s in a] == [s.box for s in b]
    assert _digest(s.image for s in a) != _digest(s.image for s in c)
    v1, l1 = training_views(5, 20, 48)
    v2, l2 = training_views(5, 20, 48)
    assert v1.shape == (20, 48, 48, 3) and v1.tobytes() == v2.tobytes() and (l1 == l2).all()


@pytest.mark.parametrize("setting", ["grid", "anywhere", "mixed"])
def test_scene_plants_one_object_of_the_set_size_on_top(monkeypatch, setting):
    from bench.toyworld import scene as sc

    drawn = []
    real = sc.render
    monkeypatch.setattr(sc, "render", lambda name, size, rng: drawn.append((name, size)) or real(name, size, rng))
    rng = np.random.default_rng(1)
    edges = [round(k * 256 / 3) for k in range(4)]
    for unsafe in (True, False) * 6:
        drawn.clear()
        s = sc.scene(rng, setting, unsafe)
        x0, y0, x1, y1 = s.box
        assert s.image.size == (256, 256) and 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
        if setting == "grid":
            assert x0 in edges and x1 == edges[edges.index(x0) + 1] and y0 in edges and y1 == edges[edges.index(y0) + 1]
        else:
            lo, hi = sc.SIDES[setting]
            assert lo <= x1 - x0 <= hi and x1 - x0 == y1 - y0
        assert drawn[-1] == (s.concept, x1 - x0)  # the planted object is drawn last
        assert [n for n, _ in drawn if n in UNSAFE] == ([s.concept] if unsafe else [])
        for d in s.distractors:  # distractors never touch the planted object
            assert d[2] <= x0 or x1 <= d[0] or d[3] <= y0 or y1 <= d[1]


def test_view_labels_follow_the_salient_object():
    from bench.toyworld.scene import LABELS, NAMES, _view_label

    owner = np.full((100, 100), -1, np.int16)
    owner[10:50, 10:50] = 0  # object 0: 40×40
    owner[60:66, 60:66] = 1  # object 1: 6×6
    objects = [(NAMES.index("skull"), (10, 10, 50, 50)), (NAMES.index("circle"), (60, 60, 66, 66))]
    assert LABELS[_view_label(owner, (0, 0, 60, 60), objects)] == "skull"  # 44% of the view
    assert LABELS[_view_label(owner, (55, 55, 100, 100), objects)] == "clutter"  # 1.8% of the view
    assert LABELS[_view_label(owner, (0, 0, 100, 100), objects)] == "skull"  # 16% of the view, all of the object
    assert _view_label(owner, (0, 30, 100, 100), objects) is None  # 8%: neither salient nor absent
    assert _view_label(owner, (35, 0, 95, 60), objects) is None  # 17% of the view, but only 37% of the object
    assert LABELS[_view_label(owner, (30, 30, 50, 50), objects)] == "skull"  # a part that fills the view


def test_scene_settings_key_their_own_cache_entry():
    from bench.toyworld.train import SceneSettings, TrainSettings

    assert SceneSettings().key() != TrainSettings().key() != SceneSettings(steps=10).key()
    assert SceneSettings(threads=2).key() == SceneSettings().key()


@pytest.mark.slow
def test_scene_smoke_training_loads_through_the_product_path(tmp_path):
    from bench.toyworld.scene import LABELS
    from bench.toyworld.train import SceneSettings

    s = SceneSettings(views=240, views_per_scene=12, steps=40, batch_size=32, warmup=5, vision_width=64,
                      vision_layers=1, text_layers=1)
    trained = cached_model(s, root=tmp_path)
    losses = np.array(trained.losses)
    assert len(losses) == 40 and losses[-5:].mean() < losses[:5].mean()
    assert cached_model(s, root=tmp_path).cached
    encoder = load_trained(trained)
    assert encoder.image_size == 48 and encoder.encode_text(list(LABELS)).shape == (len(LABELS), 64)
