"""Issue 7 bench: detection quality on the toy world (a tiny CLIP trained here, on CPU).

Does OT patch detection beat the global cosine (ETA) when the unsafe content is small? Image-level
AUROC per coverage for the global baseline, max patch cosine, OT grid and OT dense; localisation;
the effect of each DESIGN ruling; grid layouts; and ``calibrate`` on a held-out split. Every number
is measured in this run; nothing is hard-coded.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import machine, table, write_section

CONDITIONS = [("1/9", "aligned"), ("1/9", "shifted"), ("1/4", "random"), ("1/2", "random")]
COLUMNS = ["1/9 on-grid", "1/9 off-grid", "1/4", "1/2"]
TARGET_FPR = 0.05
N_BOOT = 500


@dataclass
class Split:
    items: list  # Composite objects
    labels: np.ndarray  # (N,) bool, True = unsafe
    cond: np.ndarray  # (N,) index into CONDITIONS
    sizes: list  # (width, height) per image


@dataclass
class Scores:
    image: np.ndarray  # (N,) image score
    direction: str  # "lower" (cost) or "higher" (cosine)
    cats: np.ndarray  # (N, C) per-category image score
    dets: list | None = None  # Detection records (OT only)


def _log(msg: str) -> None:
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def _split(seed: int, n: int) -> Split:
    from bench.toyworld.composites import eval_set

    items = eval_set(seed, n, CONDITIONS)
    cond = np.repeat(np.arange(len(CONDITIONS)), 2 * n)
    return Split(items, np.array([c.label == "unsafe" for c in items]), cond, [c.image.size for c in items])


def _encode(encoder, split: Split, mode: str, grid=3, stride=1.0, scales=(), chunk=64):
    """One PatchBatch for the whole split (grid crops or dense tokens)."""
    import torch

    from guardalign.models.clip import PatchBatch

    parts = []
    for i in range(0, len(split.items), chunk):
        ims = [c.image for c in split.items[i:i + chunk]]
        parts.append(encoder.dense_patches(ims) if mode == "dense"
                     else encoder.grid_patches(ims, grid=grid, stride=stride, scales=scales))
    return PatchBatch(torch.cat([p.global_emb for p in parts]), torch.cat([p.patch_emb for p in parts]),
                      [b for p in parts for b in p.boxes], parts[0].grid)


def _ot(det, batch, sizes, chunk=200) -> Scores:
    from guardalign.models.clip import PatchBatch

    dets = []
    for i in range(0, len(sizes), chunk):
        sub = PatchBatch(batch.global_emb[i:i + chunk], batch.patch_emb[i:i + chunk], batch.boxes[i:i + chunk], batch.grid)
        dets += det.detect_patches(sub, sizes[i:i + chunk])
    cats = np.array([[d.categories[n] for n in det.names] for d in dets])
    return Scores(np.array([d.score for d in dets]), "lower", cats, dets)


def _cosines(det, batch) -> tuple[Scores, Scores]:
    """Global (ETA) and max-patch cosine with the category means."""
    from guardalign.detection.transport import category_means

    texts, owner = det.anchors.texts()
    import torch

    zbar = category_means(det.encoder.encode_text(texts).cpu(), torch.tensor(owner), len(det.names))
    glob = (batch.global_emb.cpu() @ zbar.T).numpy()  # (N, C)
    patch = (batch.patch_emb.cpu() @ zbar.T).amax(dim=1).numpy()  # (N, C)
    return Scores(glob.max(1), "higher", glob), Scores(patch.max(1), "higher", patch)


def _aucs(split: Split, s: Scores) -> list[float]:
    from guardalign.detection.thresholds import auroc

    return [auroc(s.image[split.cond == k], split.labels[split.cond == k], s.direction) for k in range(len(CONDITIONS))]


def _auc_cells(split: Split, s: Scores, ci: bool = True, into: list | None = None) -> list[str]:
    """AUROC per column (with bootstrap intervals when ``ci``); the raw values are appended to ``into``."""
    from guardalign.detection.thresholds import bootstrap_auroc

    values = _aucs(split, s)
    if into is not None:
        into.append(values)
    if not ci:
        return [f"{a:.3f}" for a in values]
    cells = []
    for k, a in enumerate(values):
        m = split.cond == k
        lo, hi = bootstrap_auroc(s.image[m], split.labels[m], s.direction, N_BOOT, seed=k)
        cells.append(f"{a:.3f} ({lo:.2f}–{hi:.2f})")
    return cells


def _diffs(values: list[float], ref: list[float]) -> str:
    return ", ".join(f"{v - r:+.3f} ({c})" for v, r, c in zip(values, ref, COLUMNS))


def _iou_cells(split: Split, s: Scores, tau: float) -> tuple[list[str], list[str]]:
    """Mean IoU of the union of flagged patch boxes with the planted tile, and the pointing hit rate."""
    ious, hits = [], []
    for k in range(len(CONDITIONS)):
        iou_k, hit_k = [], []
        for i in np.nonzero((split.cond == k) & split.labels)[0]:
            d, (x0, y0, x1, y1) = s.dets[i], split.items[i].box
            w, h = split.sizes[i]
            truth = np.zeros((h, w), bool)
            truth[y0:y1, x0:x1] = True
            flagged = np.zeros((h, w), bool)
            for score, (a, b, c, e) in zip(d.patch_scores, d.patch_boxes):
                if score <= tau:
                    flagged[b:e, a:c] = True
            iou_k.append((truth & flagged).sum() / max((truth | flagged).sum(), 1))
            a, b, c, e = d.patch_boxes[int(np.argmin(d.patch_scores))]
            hit_k.append(x0 <= (a + c) / 2 < x1 and y0 <= (b + e) / 2 < y1)
        ious.append(f"{np.mean(iou_k):.2f}")
        hits.append(f"{np.mean(hit_k):.2f}")
    return ious, hits


def _calibrated(split: Split, s: Scores, anchors_path: Path, work: Path, name: str, per_category=False):
    """Run the product's ``calibrate`` on this split's records (a scan output joined with labels)."""
    from guardalign.commands.calibrate import calibrate

    lab = work / f"calib-{name}.jsonl"
    names = _names(anchors_path)
    with lab.open("w") as f:
        for i, item in enumerate(split.items):
            rec = ({"status": "ok", **s.dets[i].to_record()} if s.dets is not None else
                   {"status": "ok", "method": "global", "score": float(s.image[i]),
                    "categories": dict(zip(names, map(float, s.cats[i])))})
            rec.update(id=f"{name}-{i}", label=item.label, category=item.concept if item.label == "unsafe" else None)
            f.write(json.dumps(rec) + "\n")
    out = work / f"tuned-{name}.yaml" if s.direction == "lower" else None
    return calibrate(lab, anchors=anchors_path, target_fpr=TARGET_FPR, per_category=per_category, out=out,
                     overwrite=True, bootstrap=200, progress=False)


def _names(anchors_path: Path):
    from guardalign.detection.anchors import load_anchors

    return load_anchors(anchors_path).names


def _rates(split: Split, flagged: np.ndarray) -> list[str]:
    cells = [f"{flagged[~split.labels].mean():.3f}"]
    for k in range(len(CONDITIONS)):
        m = (split.cond == k) & split.labels
        cells.append(f"{flagged[m].mean():.2f}")
    return cells


def _zero_shot(encoder) -> tuple[float, float]:
    """17-way accuracy on fresh single-concept tiles: of the image embedding, and of each dense token."""
    import torch
    from PIL import Image

    from bench.toyworld.world import NAMES, captions, single_concept_set

    ims, labs = single_concept_set(seed=12345, per_concept=20, size=64, zoom=0.0)
    batch = encoder.dense_patches([Image.fromarray(a) for a in ims])
    z = torch.nn.functional.normalize(torch.stack([encoder.encode_text(captions(n)).mean(0) for n in NAMES]), dim=-1)
    image_acc = float(((batch.global_emb @ z.T).argmax(1).cpu().numpy() == labs).mean())
    token_acc = float(((batch.patch_emb @ z.T).argmax(-1).cpu().numpy() == labs[:, None]).mean())
    return image_acc, token_acc


def run(quick: bool = False) -> dict:
    """Train (or load the cached) toy CLIP, evaluate, print and write the ``quality`` section."""
    from bench.toyworld.anchors_yaml import write_anchors
    from bench.toyworld.train import cached_model, load_trained, settings_for
    from guardalign.detection.anchors import load_anchors
    from guardalign.config import DetectConfig
    from guardalign.detection.detector import Detector

    t0 = time.perf_counter()
    settings = settings_for(quick)
    _log(f"tiny CLIP {settings.key()} ({'quick' if quick else 'full'} settings)")
    trained = cached_model(settings, log=_log)
    encoder = load_trained(trained)
    with tempfile.TemporaryDirectory(prefix="guardalign-quality-") as tmp:
        work = Path(tmp)
        anchors_path = write_anchors(work / "toy-anchors.yaml")
        det = Detector(encoder, load_anchors(anchors_path), DetectConfig(batch_size=64))
        n = 24 if quick else 100
        test, calib = _split(1, n), _split(2, n)
        _log(f"eval set: {len(test.items)} test + {len(calib.items)} calibration composites; encoding")
        t1 = time.perf_counter()
        enc = {}
        for split_name, split in (("test", test), ("calib", calib)):
            enc[split_name, "grid"] = _encode(encoder, split, "grid")
            enc[split_name, "dense"] = _encode(encoder, split, "dense")
            enc[split_name, "overlap"] = _encode(encoder, split, "grid", stride=0.5)
        for name, kw in (("multi 3+2", dict(scales=(2,))), ("multi 3+2+1", dict(scales=(2, 1)))):
            enc["test", name] = _encode(encoder, test, "grid", **kw)
        t_enc = time.perf_counter() - t1
        _log(f"encoded in {t_enc:.0f} s; scoring")
        sections = [_setup(settings, trained, encoder, det, n, quick),
                    _methods(det, enc, test),
                    _rulings(det, enc, test),
                    _layouts(det, enc, test),
                    _calibration(det, enc, test, calib, anchors_path, work)]
    total = time.perf_counter() - t0
    sections.append(f"Encoding {t_enc:.0f} s; whole bench {total:.0f} s on {machine()}.")
    markdown = "\n\n".join(sections)
    print(markdown)
    write_section("quality", "## Detection quality on the toy world (issue 7)\n\n" + markdown)
    return {"seconds": total, "markdown": markdown}


def _setup(settings, trained, encoder, det, n, quick) -> str:
    from bench.toyworld.world import CONCEPTS, UNSAFE

    losses = trained.losses
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    how = "loaded from the cache (bench/out/toyworld)" if trained.cached else "trained in this run"
    acc, token_acc = _zero_shot(encoder)
    return (
        f"Toy world: {len(CONCEPTS)} procedurally drawn concepts (shapes, glyphs, textures, colours), unsafe: "
        f"{', '.join(UNSAFE)}. Tiny CLIP (open_clip config: ViT {settings.image_size}px, patch {settings.patch_size}, "
        f"width {settings.vision_width}, {settings.vision_layers} layers; text width {settings.text_width}, "
        f"{settings.text_layers} layers), {settings.steps} steps of batch {settings.batch_size}, seed {settings.seed}, "
        f"{how}: training took {trained.seconds:.0f} s, loss {first:.2f} → {last:.2f} (mean of first/last 10 steps). "
        f"Loaded back with `load_encoder(model.json, model.safetensors)` (the `--clip-model/--pretrained` path). "
        f"Zero-shot accuracy on fresh single-concept tiles (17-way, chance {1 / 17:.2f}): {acc:.2f} for the image "
        f"embedding, {token_acc:.2f} for each dense value-path token of the same tiles: the tiny model's patch tokens "
        f"are {'barely ' if token_acc < 0.5 else ''}aligned with its text, so its dense numbers below say "
        f"{'little' if token_acc < 0.5 else 'something'} about dense mode on a real CLIP.\n\n"
        f"Eval: 192×192 mosaics of 3×3 safe tiles with one planted tile (unsafe, or a safe distractor of the same "
        f"size for the safe class), {n} unsafe + {n} safe per column{' (quick run: small n, wide intervals)' if quick else ''}. "
        f"Columns: planted tile = one mosaic cell on the 3×3 grid, one cell offset by half a cell (every grid crop "
        f"cuts it in four), a 1/4 tile and a 1/2 tile at random positions. AUROC with 95% bootstrap intervals "
        f"({N_BOOT} stratified resamples)."
    )


def _methods(det, enc, test) -> str:
    g = enc["test", "grid"]
    glob, maxcos = _cosines(det, g)
    dense_max = _cosines(det, enc["test", "dense"])[1]
    vals: list = []
    rows = [
        ["global cosine (ETA baseline)"] + _auc_cells(test, glob, into=vals),
        ["max patch cosine, grid 3×3"] + _auc_cells(test, maxcos, into=vals),
        ["max token cosine, dense"] + _auc_cells(test, dense_max, into=vals),
        ["OT grid 3×3"] + _auc_cells(test, _ot(det, g, test.sizes), into=vals),
        ["OT dense (value-path tokens)"] + _auc_cells(test, _ot(det, enc["test", "dense"], test.sizes), into=vals),
    ]
    best = [" = ".join(r[0] for r, v in zip(rows, vals) if round(v[k], 3) == round(max(w[k] for w in vals), 3))
            for k in range(len(COLUMNS))]
    notes = (f"\n\nAUROC difference to the global baseline: OT grid {_diffs(vals[3], vals[0])}; "
             f"OT dense {_diffs(vals[4], vals[0])}. OT grid minus max patch cosine on the same crops: "
             f"{_diffs(vals[3], vals[1])}. Best per column: "
             + "; ".join(f"{c}: {b}" for c, b in zip(COLUMNS, best)) + ".")
    return "### Image-level AUROC by coverage of the unsafe tile\n\n" + table(["method"] + COLUMNS, rows) + notes


def _rulings(det, enc, test) -> str:
    g = enc["test", "grid"]
    variants = [
        ("ruling: a = softmax(−h), b = softmax(−h), ε 0.05, normalised d_i(m)", {}),
        ("patch weights softmax(+h) (the paper's print)", dict(patch_weighting="entropy_positive")),
        ("patch weights uniform", dict(patch_weighting="uniform")),
        ("variant weights uniform", dict(variant_weighting="uniform")),
        ("variant weights softmax(+h)", dict(variant_weighting="entropy_positive")),
        ("ε = 0.01", dict(eps=0.01)),
        ("ε = 0.1", dict(eps=0.1)),
        ("ε = 0.5", dict(eps=0.5)),
        ("paper aggregate d_paper(m) = Σ_i Σ_n T C", dict(aggregate="paper")),
    ]
    vals: list = []
    rows = [[label] + _auc_cells(test, _ot(det.with_config(**kw), g, test.sizes), ci=False, into=vals)
            for label, kw in variants]
    shift = [float(np.mean(v) - np.mean(vals[0])) for v in vals]
    k = int(np.argmax(np.abs(shift[1:]))) + 1
    note = (f"\n\nLargest change of the mean AUROC against the ruling row: {variants[k][0]} ({shift[k]:+.3f}); "
            "every other setting moves it by at most "
            f"{max(abs(x) for i, x in enumerate(shift) if i not in (0, k)):.3f}.")
    return ("### Effect of each DESIGN ruling (OT grid 3×3, AUROC)\n\n" + table(["setting"] + COLUMNS, rows) + note
            + "\n\n" + _portability(det, enc, test))


def _portability(det, enc, test) -> str:
    """τ fitted on 3×3 windows (M=9), applied to 5×5 overlapping windows (M=25) of the same images."""
    from guardalign.detection.thresholds import choose_threshold, flags

    rows = []
    for agg in ("normalized", "paper"):
        d = det.with_config(aggregate=agg)
        s9, s25 = _ot(d, enc["test", "grid"], test.sizes), _ot(d, enc["test", "overlap"], test.sizes)
        pt = choose_threshold(s9.image, test.labels, TARGET_FPR, "lower")
        f25 = flags(s25.image, pt.threshold, "lower")
        rows.append([agg, f"{pt.threshold:.4g}", f"{pt.fpr:.3f}", f"{pt.tpr:.2f}", f"{f25[~test.labels].mean():.3f}",
                     f"{f25[test.labels].mean():.2f}"])
    return ("τ portability across grid sizes: τ at FPR ≤ 0.05 fitted on 3×3 windows (M = 9), then applied "
            "unchanged to 5×5 overlapping windows (M = 25) of the same test images.\n\n"
            + table(["aggregate", "τ", "FPR M=9", "TPR M=9", "FPR M=25", "TPR M=25"], rows))


def _layouts(det, enc, test) -> str:
    rows, vals = [], []
    for label, key in (("3×3, stride 1 (default)", "grid"), ("3×3 windows, stride 0.5 (5×5 = 25 windows)", "overlap"),
                       ("3×3 + 2×2 (multi-scale, 13 windows)", "multi 3+2"),
                       ("3×3 + 2×2 + whole image (14 windows)", "multi 3+2+1"), ("dense tokens", "dense")):
        b = enc["test", key]
        rows.append([label, str(b.patch_emb.shape[1])] + _auc_cells(test, _ot(det, b, test.sizes), ci=False, into=vals))
    means = [float(np.mean(v)) for v in vals]
    k = int(np.argmax(means))
    note = (f"\n\nMean AUROC over the four columns: default {means[0]:.3f}; best {rows[k][0]} {means[k]:.3f} "
            f"with {rows[k][1]} windows per image (encoder cost ≈ M + 1 forwards). Off the grid (1/9 off-grid): "
            + ", ".join(f"{r[0]} {v[1]:.3f}" for r, v in zip(rows, vals)) + ".")
    return ("### Patch layouts (OT, AUROC): does overlap or multi-scale help off the grid?\n\n"
            + table(["patches", "M"] + COLUMNS, rows) + note)


def _calibration(det, enc, test, calib, anchors_path, work) -> str:
    """Fit τ/θ with `calibrate` on the calibration split; apply it to the test split."""
    from guardalign.detection.anchors import load_anchors
    from guardalign.detection.detector import Detector
    from guardalign.detection.thresholds import flags

    rows, loc_rows = [], []
    for name, key in (("global cosine (θ)", None), ("OT grid 3×3", "grid"), ("OT dense", "dense"),
                      ("OT grid 3×3, per-category τ (`--per-category`)", "grid-pc")):
        if key is None:
            c_s, t_s = _cosines(det, enc["calib", "grid"])[0], _cosines(det, enc["test", "grid"])[0]
            res = _calibrated(calib, c_s, anchors_path, work, "global")
            flagged = flags(t_s.image, res.chosen.threshold, "higher")
        else:
            mode = key.split("-")[0]
            c_s = _ot(det, enc["calib", mode], calib.sizes)
            per_cat = key.endswith("-pc")
            res = _calibrated(calib, c_s, anchors_path, work, key, per_category=per_cat)
            tuned = Detector(det.encoder, load_anchors(res.out), det.config)  # the written YAML, as scan uses it
            t_s = _ot(tuned, enc["test", mode], test.sizes)
            flagged = np.array([d.verdict == "unsafe" for d in t_s.dets])
            if not per_cat:
                ious, hits = _iou_cells(test, t_s, res.chosen.threshold)
                loc_rows.append([name] + [f"{i} / {h}" for i, h in zip(ious, hits)])
        sym = "θ" if key is None else "τ"
        thr = (f"{sym} {res.chosen.threshold:.4g}" if not key or not key.endswith("-pc") else
               "τ " + ", ".join(f"{c.name} {c.tau:.3g}" for c in res.per_category)
               + f" (each at FPR ≤ α = {res.category_fpr:.3f})")
        rows.append([name, thr, f"{res.achieved[1]:.3f}"] + _rates(test, flagged))
    out = ("### Calibration on a held-out split (`guardalign calibrate`, target FPR ≤ 0.05)\n\n"
           f"Fitted on the calibration split ({len(calib.items)} images), applied to the test split "
           f"({len(test.items)} images, {int((~test.labels).sum())} safe). TPR per column. An image is unsafe when "
           "any category flags it, so `--per-category` fits every category at one FPR level α, the largest that "
           "keeps the combined FPR on the calibration split within the target.\n\n"
           + table(["method", "fitted", "FPR (calib)", "FPR (test)"] + [f"TPR {c}" for c in COLUMNS], rows))
    out += ("\n\n### Localisation (OT, calibrated τ): IoU of flagged patches with the planted tile / pointing hit "
            "rate (lowest-cost patch centred in the tile), unsafe test images\n\n" + table(["method"] + COLUMNS, loc_rows))
    return out
