"""Issue 13 bench: finding an unsafe object anywhere (the scene world), patch layouts and dense paths.

A tiny CLIP is trained on cluttered scenes (bench/toyworld/scene.py). For every patch layout — fixed grids,
multi-scale, coarse-to-fine search within an encode budget, dense token paths — it measures image-level
AUROC on three scene sets (object filling a 3×3 cell, 40–80 px objects anywhere, 24–128 px anywhere),
the encodes per image, the localisation of the flagged boxes, OT against max-cosine on the same patches,
throughput side by side, and the same layouts on the tile world of issue 7. The default layout is chosen
on a development split and reported on a separate test split. Nothing is hard-coded.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import interleaved, machine, table, write_section

SETS = ("grid", "anywhere", "mixed")
SET_NAMES = {"grid": "object fills one 3×3 cell", "anywhere": "object anywhere, 40–80 px",
             "mixed": "object anywhere, 24–128 px"}
TARGET_FPR = 0.05
# name → DetectConfig changes (method ot). Order = table order.
_G = dict(stride=1.0, scales=(), refine_scale=0.5)  # every layout spells out its fields (independent of defaults)
LAYOUTS = {
    "grid 3 (issue-7 default)": dict(_G, patches="grid", grid=3),
    "grid 3 stride 0.5": dict(_G, patches="grid", grid=3, stride=0.5),
    "grid 2 stride 0.5": dict(_G, patches="grid", grid=2, stride=0.5),
    "grid 3 + 2 (multi-scale)": dict(_G, patches="grid", grid=3, scales=(2,)),
    "grid 4": dict(_G, patches="grid", grid=4),
    "grid 4 + 2 (multi-scale)": dict(_G, patches="grid", grid=4, scales=(2,)),
    "grid 5": dict(_G, patches="grid", grid=5),
    "grid 5 + 2 (multi-scale)": dict(_G, patches="grid", grid=5, scales=(2,)),
    "search grid 3 → top 2 (½-size), budget 28": dict(_G, patches="search", grid=3, budget=28),
    "search grid 3 + 2 → top 1, budget 23": dict(_G, patches="search", grid=3, scales=(2,), budget=23),
    "search grid 4 → top 1, budget 26": dict(_G, patches="search", grid=4, budget=26),
    "dense maskclip": dict(_G, patches="dense", dense_path="maskclip"),
    "dense clearclip": dict(_G, patches="dense", dense_path="clearclip"),
    "dense sclip": dict(_G, patches="dense", dense_path="sclip"),
}
MAX_ENCODES = 30  # 3× grid 3 (10 encodes)


def _log(msg: str) -> None:
    print(f"[scene] {msg}", file=sys.stderr, flush=True)


@dataclass
class Split:
    items: list  # Scene (or tile Composite) objects
    labels: np.ndarray  # (N,) bool, True = unsafe
    cond: np.ndarray  # (N,) index of the set / column


class CropCache:
    """ClipEncoder stand-in for the bench: every (image, box) crop is encoded once per run, whichever layouts
    ask for it. Numerically it is the product's path (same resize, same forward); only repeats are skipped."""

    def __init__(self, encoder):
        self.enc = encoder
        self.cache: dict = {}

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def _embed(self, images, boxes):
        import torch

        keys = [(id(im), None if b is None else tuple(int(v) for v in b)) for im, bxs in zip(images, boxes) for b in bxs]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        by_id = {id(im): im for im in images}
        for i in range(0, len(todo), 512):
            chunk = todo[i:i + 512]
            arrays = [self.enc._resize(by_id[k[0]].convert("RGB"), box=k[1]) for k in chunk]
            for k, e in zip(chunk, self.enc._encode_arrays(arrays)):
                self.cache[k] = e
        return torch.stack([self.cache[k] for k in keys]) if keys else None

    def grid_patches(self, images, grid=3, stride=1.0, scales=()):
        from guardalign.config import n_windows
        from guardalign.models.clip import PatchBatch
        from guardalign.models.patches import grid_boxes

        sizes = list(dict.fromkeys([grid, *scales]))
        boxes = [np.concatenate([grid_boxes(im.width, im.height, g, stride=stride) for g in sizes]) for im in images]
        glob = self._embed(images, [[None]] * len(images))
        emb = self._embed(images, boxes).view(len(images), len(boxes[0]), -1)
        n = n_windows(grid, stride)
        return PatchBatch(glob, emb, boxes, (n, n))

    def crop_patches(self, images, boxes):
        return self._embed(images, boxes).view(len(images), len(boxes[0]), -1)

    def embeddings(self, image, boxes):
        """(M, D) cached embeddings of ``boxes`` of ``image`` (all encoded already)."""
        return self._embed([image], [boxes])


# ------------------------------------------------------------------------------------------- scoring
def _score(det, cache, split: Split, zbar) -> dict:
    """Detections of a layout and, on the same patches, the max cosine with the category means."""
    import torch

    images = [s.image for s in split.items]
    dets = det.detect(images)
    if det.config.patches == "dense":
        batch = cache.enc.dense_patches(images, path=det.config.dense_path)
        cos = (batch.patch_emb @ zbar.T).amax(dim=(1, 2)).numpy()
    else:
        cos = np.array([float((cache.embeddings(im, d.patch_boxes) @ zbar.T).max()) for im, d in zip(images, dets)])
    return {"ot": np.array([d.score for d in dets]), "cos": cos, "dets": dets,
            "encodes": int(np.mean([d.encodes for d in dets]))}


def _aucs(split: Split, scores: np.ndarray, direction: str) -> list[float]:
    from guardalign.detection.thresholds import auroc

    return [auroc(scores[split.cond == k], split.labels[split.cond == k], direction) for k in range(int(split.cond.max()) + 1)]


def _localise(split: Split, dets, tau: float) -> list[tuple[float, float, float]]:
    """Per set: mean IoU of the union of flagged boxes with the planted object, pointing-hit rate of the
    lowest-cost box's centre, and mean IoU of that single box (unsafe images)."""
    out = []
    for k in range(int(split.cond.max()) + 1):
        iou, hit, top = [], [], []
        for i in np.nonzero((split.cond == k) & split.labels)[0]:
            d, (x0, y0, x1, y1) = dets[i], split.items[i].box
            truth = np.zeros((d.height, d.width), bool)
            truth[y0:y1, x0:x1] = True
            flagged = np.zeros_like(truth)
            for s, (a, b, c, e) in zip(d.patch_scores, d.patch_boxes):
                if s <= tau:
                    flagged[b:e, a:c] = True
            iou.append((truth & flagged).sum() / max((truth | flagged).sum(), 1))
            a, b, c, e = d.patch_boxes[int(np.argmin(d.patch_scores))]
            hit.append(x0 <= (a + c) / 2 < x1 and y0 <= (b + e) / 2 < y1)
            box = np.zeros_like(truth)
            box[b:e, a:c] = True
            top.append((truth & box).sum() / (truth | box).sum())
        out.append((float(np.mean(iou)), float(np.mean(hit)), float(np.mean(top))))
    return out


def _oracle(cache, split: Split, zbar) -> list[float]:
    """AUROC of the cosine of an exact crop of the planted object: is the information in the model?"""
    cos = np.array([float((cache.embeddings(s.image, [s.box]) @ zbar.T).max()) for s in split.items])
    return _aucs(split, cos, "higher")


# ------------------------------------------------------------------------------------------- run
def _splits(seed: int, n: int) -> Split:
    from bench.toyworld.scene import eval_scenes

    items = eval_scenes(seed, n)
    return Split(items, np.array([s.label == "unsafe" for s in items]), np.repeat(np.arange(len(SETS)), 2 * n))


def _tile_split(seed: int, n: int) -> Split:
    from bench.toyworld.composites import eval_set

    conds = [("1/9", "aligned"), ("1/9", "shifted"), ("1/4", "random"), ("1/2", "random")]
    items = eval_set(seed, n, conds)
    return Split(items, np.array([c.label == "unsafe" for c in items]), np.repeat(np.arange(len(conds)), 2 * n))


def _zbar(det):
    import torch

    from guardalign.detection.transport import category_means

    texts, owner = det.anchors.texts()
    return category_means(det.encoder.encode_text(texts).cpu(), torch.tensor(owner), len(det.names))


def run(quick: bool = False) -> dict:
    from bench.toyworld.anchors_yaml import write_anchors
    from bench.toyworld.train import cached_model, load_trained, scene_settings_for, settings_for
    from guardalign.config import DetectConfig
    from guardalign.detection.anchors import load_anchors
    from guardalign.detection.detector import Detector

    t0 = time.perf_counter()
    settings = scene_settings_for(quick)
    _log(f"scene CLIP {settings.key()} ({'quick' if quick else 'full'} settings)")
    trained = cached_model(settings, log=_log)
    encoder = load_trained(trained)
    n_test, n_dev = (20, 12) if quick else (100, 50)
    with tempfile.TemporaryDirectory(prefix="guardalign-scene-") as tmp:
        anchors = load_anchors(write_anchors(Path(tmp) / "toy-anchors.yaml"))
    cache = CropCache(encoder)
    base = Detector(cache, anchors, DetectConfig(batch_size=64))
    zbar = _zbar(base)
    test, dev = _splits(1, n_test), _splits(2, n_dev)
    results = {}
    for name, kw in LAYOUTS.items():
        t = time.perf_counter()
        det = base.with_config(**kw)
        results[name] = {"dev": _score(det, cache, dev, zbar), "test": _score(det, cache, test, zbar), "kw": kw}
        _log(f"{name}: {time.perf_counter() - t:.0f} s ({len(cache.cache)} crops cached)")
    default = _choose(results, dev)
    sections = [_setup(settings, trained, encoder, n_test, n_dev, quick),
                _layout_table(results, test, dev, cache, zbar, default),
                _ot_table(results, test),
                _dense_section(encoder, results, test),
                _speed(encoder, anchors, test, default, quick)]
    t_scene = time.perf_counter() - t0
    sections.append(_tile_world(anchors, default, quick))
    total = time.perf_counter() - t0
    sections.append(f"Scene part {t_scene:.0f} s; whole bench {total:.0f} s on {machine()}.")
    markdown = "\n\n".join(sections)
    print(markdown)
    write_section("scene", "## Objects anywhere: the scene world (issue 13)\n\n" + markdown)
    return {"seconds": total, "markdown": markdown, "default": default}


def _is_default(kw: dict) -> bool:
    """Whether a layout is DetectConfig's default (the one `scan` uses without layout flags)."""
    from dataclasses import replace

    from guardalign.config import DetectConfig

    d = DetectConfig()
    return replace(d, **kw) == d


def _choose(results: dict, dev: Split) -> str:
    """The layout within MAX_ENCODES with the best worst-set AUROC on the development split (ties: fewer encodes)."""
    best = None
    for name, r in results.items():
        if r["dev"]["encodes"] > MAX_ENCODES:
            continue
        key = (round(min(_aucs(dev, r["dev"]["ot"], "lower")), 3), -r["dev"]["encodes"])
        if best is None or key > best[0]:
            best = (key, name)
    _log(f"default on the dev split: {best[1]} (worst-set AUROC {best[0][0]:.3f})")
    return best[1]


def _setup(settings, trained, encoder, n_test, n_dev, quick) -> str:
    from bench.toyworld.scene import eval_scenes  # noqa: F401  (documented generator)

    losses = trained.losses
    how = "loaded from the cache (bench/out/toyworld)" if trained.cached else "trained in this run"
    acc = _view_accuracy(encoder)
    return (
        f"Scene world: 256×256 scenes, a mosaic of small safe tiles (cell 24–48 px, random shift) with one planted "
        f"object (unsafe: flame, skull, hazard; or a safe object of the same size for the safe class) and 0–2 safe "
        f"distractor objects. Tiny CLIP (ViT {settings.image_size}px, patch {settings.patch_size}, width "
        f"{settings.vision_width}, {settings.vision_layers} layers) trained on {settings.views} views of random "
        f"scenes (1–3 objects of 20–160 px) captioned with their salient object or as clutter; {settings.steps} "
        f"steps of batch {settings.batch_size}, seed {settings.seed}, {how}: training took {trained.seconds:.0f} s, "
        f"loss {np.mean(losses[:10]):.2f} → {np.mean(losses[-10:]):.2f}. 18-way accuracy on fresh training-style "
        f"views: {acc:.2f} (chance {1 / 18:.2f}).\n\n"
        f"Splits: test = seed 1, {n_test} unsafe + {n_test} safe per set; development = seed 2, {n_dev} + {n_dev} "
        f"per set{' (quick run: small n)' if quick else ''}. The default layout is the one with the best worst-set "
        f"AUROC on the development split among layouts of ≤ {MAX_ENCODES} encodes per image (3× grid 3); "
        f"every figure below is on the test split. Encodes = image-tower forwards per image (whole image + crops)."
    )


def _view_accuracy(encoder) -> float:
    import torch
    from PIL import Image

    from bench.toyworld.scene import CLUTTER_CAPTIONS, LABELS, training_views
    from bench.toyworld.world import NAMES, captions

    ims, labs = training_views(777, 400, 64)
    emb = encoder.encode_images(encoder.preprocess([Image.fromarray(a) for a in ims]))
    caps = [captions(n) for n in NAMES] + [list(CLUTTER_CAPTIONS)]
    z = torch.nn.functional.normalize(torch.stack([encoder.encode_text(c).mean(0) for c in caps]), dim=-1)
    assert len(caps) == len(LABELS)
    return float(((emb @ z.T).argmax(1).numpy() == labs).mean())


def _layout_table(results, test, dev, cache, zbar, default) -> str:
    from guardalign.detection.thresholds import choose_threshold

    rows, loc_rows = [], []
    for name, r in results.items():
        aucs = _aucs(test, r["test"]["ot"], "lower")
        mark = (" **(shipped default)**" if _is_default(r["kw"]) else "") + (" *(dev-split pick)*" if name == default else "")
        rows.append([name + mark, str(r["test"]["encodes"])] + [f"{a:.3f}" for a in aucs] + [f"{min(aucs):.3f}"])
        tau = choose_threshold(r["dev"]["ot"], dev.labels, TARGET_FPR, "lower").threshold
        loc = _localise(test, r["test"]["dets"], tau)
        loc_rows.append([name, f"{tau:.3f}"] + [f"{i:.2f} / {h:.2f} / {t:.2f}" for i, h, t in loc])
    oracle = _oracle(cache, test, zbar)
    rows.append(["exact crop of the planted object (oracle, 1 crop)", "2"] + [f"{a:.3f}" for a in oracle]
                + [f"{min(oracle):.3f}"])
    glob = np.array([float((cache.embeddings(s.image, [None]) @ zbar.T).max()) for s in test.items])
    g = _aucs(test, glob, "higher")
    rows.append(["global cosine (ETA)", "1"] + [f"{a:.3f}" for a in g] + [f"{min(g):.3f}"])
    head = ["layout (OT)", "encodes"] + [SET_NAMES[s] for s in SETS] + ["worst set"]
    return ("### Image-level AUROC per layout (test split)\n\n" + table(head, rows)
            + "\n\n### Localisation on unsafe test images: IoU of the union of flagged boxes with the planted object / "
              "pointing hit (centre of the lowest-cost box inside the object) / IoU of that box alone. τ per layout "
              f"at FPR ≤ {TARGET_FPR} on the development split.\n\n"
            + table(["layout", "τ (dev)"] + [SET_NAMES[s] for s in SETS], loc_rows))


def _ot_table(results, test) -> str:
    rows, deltas = [], []
    for name, r in results.items():
        ot, cos = _aucs(test, r["test"]["ot"], "lower"), _aucs(test, r["test"]["cos"], "higher")
        deltas += [o - c for o, c in zip(ot, cos)]
        rows.append([name] + [f"{o:.3f} / {c:.3f} ({o - c:+.3f})" for o, c in zip(ot, cos)])
    d = np.array(deltas)
    return ("### The OT ruling: OT vs max patch cosine on the same patches (AUROC OT / max-cos (Δ))\n\n"
            + table(["layout"] + [SET_NAMES[s] for s in SETS], rows)
            + f"\n\nΔ = OT − max-cos over all {len(d)} cells: mean {d.mean():+.3f}, largest {d.max():+.3f}, "
              f"smallest {d.min():+.3f}; |Δ| ≤ 0.005 in {int((np.abs(d) <= 0.005).sum())} cells.")


def _dense_section(encoder, results, test) -> str:
    """Token accuracy of each dense path on single-object views, and their AUROC."""
    import torch
    from PIL import Image

    from bench.toyworld.scene import CLUTTER_CAPTIONS, training_views
    from bench.toyworld.world import NAMES, captions

    ims, labs = training_views(778, 300, 64)
    keep = labs < len(NAMES)  # views labelled with an object
    pil = [Image.fromarray(a) for a, k in zip(ims, keep) if k]
    caps = [captions(n) for n in NAMES] + [list(CLUTTER_CAPTIONS)]
    z = torch.nn.functional.normalize(torch.stack([encoder.encode_text(c).mean(0) for c in caps]), dim=-1)
    rows = []
    for path in ("maskclip", "clearclip", "sclip"):
        b = encoder.dense_patches(pil, path=path)
        centre = b.patch_emb.view(len(pil), *b.grid, -1)
        gh, gw = b.grid
        mid = centre[:, gh // 2 - 1:gh // 2 + 1, gw // 2 - 1:gw // 2 + 1].reshape(len(pil), -1, centre.shape[-1])
        tok = ((mid @ z.T).argmax(-1).numpy() == labs[keep][:, None]).mean()
        pooled = ((torch.nn.functional.normalize(b.patch_emb.mean(1), dim=-1) @ z.T).argmax(1).numpy()
                  == labs[keep]).mean()
        aucs = _aucs(test, results[f"dense {path}"]["test"]["ot"], "lower")
        rows.append([path, f"{tok:.2f}", f"{pooled:.2f}"] + [f"{a:.3f}" for a in aucs])
    image_acc = ((b.global_emb @ z.T).argmax(1).numpy() == labs[keep]).mean()
    return ("### Dense token paths (one forward pass)\n\n"
            f"Accuracy (18-way, chance {1 / 18:.2f}) on {len(pil)} single-object views: of the 2×2 central tokens "
            f"(where the object is), of the mean of all tokens, against {image_acc:.2f} for the image embedding; "
            "and OT AUROC on the test split.\n\n"
            + table(["path", "central-token acc", "mean-token acc"] + [SET_NAMES[s] for s in SETS], rows))


def _speed(encoder, anchors, test, default, quick) -> str:
    """Images/s of the real detector (no cache), grid 3 vs the default and others, interleaved in one run."""
    from guardalign.config import DetectConfig
    from guardalign.detection.detector import Detector

    images = [s.image for s in test.items[: (16 if quick else 48)]]
    shipped = [n for n, kw in LAYOUTS.items() if _is_default(kw)]
    names = list(dict.fromkeys(["grid 3 (issue-7 default)", *shipped, default, "search grid 3 → top 2 (½-size), budget 28",
                                "grid 3 stride 0.5", "dense maskclip"]))
    dets = {n: Detector(encoder, anchors, DetectConfig(batch_size=16, **LAYOUTS[n])) for n in names}
    best = interleaved({n: (lambda d=d: d.detect(images)) for n, d in dets.items()}, rounds=2 if quick else 3)
    ref = len(images) / best[names[0]]
    rows = [[n, str(dets[n].config.encodes()), f"{len(images) / best[n]:.1f}", f"{best[names[0]] / best[n]:.2f}×"]
            for n in names]
    return ("### Cost, side by side (real detector, no crop cache)\n\n"
            f"{len(images)} scene images (256×256), batch 16, best of interleaved rounds. Grid 3: {ref:.1f} img/s.\n\n"
            + table(["layout", "encodes / image", "img/s", "img/s ÷ grid 3"], rows))


def _tile_world(anchors, default, quick) -> str:
    """The layouts on the tile world of issue 7 (its own tiny CLIP, trained on single tiles)."""
    from bench.toyworld.train import cached_model, load_trained, settings_for
    from guardalign.config import DetectConfig
    from guardalign.detection.detector import Detector

    trained = cached_model(settings_for(quick), log=_log)
    cache = CropCache(load_trained(trained))
    base = Detector(cache, anchors, DetectConfig(batch_size=64))
    split = _tile_split(1, 24 if quick else 100)
    names = list(dict.fromkeys(["grid 3 (issue-7 default)", default, "grid 3 stride 0.5", "grid 2 stride 0.5",
                                "grid 4", "grid 5", "grid 5 + 2 (multi-scale)", "search grid 3 → top 2 (½-size), budget 28",
                                "search grid 3 + 2 → top 1, budget 23"]))
    rows = []
    for n in names:
        d = base.with_config(**LAYOUTS[n])
        s = np.array([x.score for x in d.detect([c.image for c in split.items])])
        rows.append([n + (" **(shipped default)**" if _is_default(LAYOUTS[n]) else "")
                     + (" *(dev-split pick)*" if n == default else ""), str(d.config.encodes())]
                    + [f"{a:.3f}" for a in _aucs(split, s, "lower")])
    return ("### The same layouts on the tile world (issue 7's tiny CLIP and composites, test seed 1)\n\n"
            + table(["layout (OT)", "encodes", "1/9 on-grid", "1/9 off-grid", "1/4", "1/2"], rows))
