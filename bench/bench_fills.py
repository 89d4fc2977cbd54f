"""Issue 12 bench: does every ``mask --fill`` really purify? Measured on the toy world (the tiny CLIP of the quality bench).

The unsafe test composites of every kind the quality bench uses (a planted unsafe tile covering 1/9 of the
image on the 3×3 grid or off it, 1/4, 1/2) go through the product as a user would run it:
``guardalign.scan`` (OT, the default layout, τ fitted by ``guardalign.calibrate`` on a held-out split at
FPR ≤ 0.05, the way the quality bench fits it), then ``guardalign.mask --from-scan`` once per fill, then
``guardalign.scan`` of each purified folder with the same detector and τ. Per fill: the share of the flagged
images whose purified copy comes back safe, the mean rise of the image score (a cost: higher is safer) and,
for those still flagged, whether a re-flagged patch lies inside the filled boxes (the fill left the content
recognisable) or only outside them (content the boxes never covered: a localisation miss, the same for every
fill). The blur and pixelate defaults before issue 12 run through the same path beside today's, for comparison.
Every number is measured in this run.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.common import machine, table, write_section


def _old_blur(region):
    # The defaults before this bench (σ = a quarter of the long side, ≥ 8 px), kept to show what changed.
    from PIL import ImageFilter

    return region.filter(ImageFilter.GaussianBlur(max(8.0, max(region.size) / 4.0)))


def _old_pixelate(region):
    # The defaults before this bench: about 6 blocks along the long side (≥ 4 px each), full contrast.
    from PIL import Image

    w, h = region.size
    block = max(4, math.ceil(max(w, h) / 6))
    small = region.resize((max(1, math.ceil(w / block)), max(1, math.ceil(h / block))), Image.Resampling.BOX)
    return small.resize((w, h), Image.Resampling.NEAREST)


# label → (fill, replacement of the fill's region function or None): the old defaults run through the same
# mask path, with the module's region function swapped for the run.
VARIANTS = {"mean": ("mean", None), "black": ("black", None), "blur": ("blur", None),
            "pixelate": ("pixelate", None), "blur, old default (σ = side/4)": ("blur", _old_blur),
            "pixelate, old default (6 blocks)": ("pixelate", _old_pixelate)}


@contextmanager
def _swapped(fill: str, fn):
    from guardalign.detection import purify

    name = {"blur": "_blur", "pixelate": "_pixelate"}.get(fill)
    if fn is None or name is None:
        yield
        return
    original = getattr(purify, name)
    setattr(purify, name, fn)
    try:
        yield
    finally:
        setattr(purify, name, original)


def _log(msg: str) -> None:
    print(f"[fills] {msg}", file=sys.stderr, flush=True)


def _records(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {r["id"]: r for r in map(json.loads, f) if r.get("status") == "ok"}


def _inside_share(box, filled) -> float:
    """Share of ``box``'s area covered by the union of the ``filled`` boxes (all [x0, y0, x1, y1])."""
    x0, y0, x1, y1 = box
    cover = np.zeros((y1 - y0, x1 - x0), bool)
    for a, b, c, d in filled:
        cover[max(b, y0) - y0:max(min(d, y1) - y0, 0), max(a, x0) - x0:max(min(c, x1) - x0, 0)] = True
    return float(cover.mean()) if cover.size else 0.0


def _patch_rise(before: dict, after: dict) -> float:
    """Mean cost rise of the flagged patches, each matched by its box in the rescan (NaN when a layout that
    adapts to the content cut none of them again)."""
    now = {tuple(b): s for b, s in zip(after["patch_boxes"], after["patch_scores"])}
    rises = [now[tuple(before["patch_boxes"][p])] - before["patch_scores"][p] for p in before["unsafe_patches"]
             if tuple(before["patch_boxes"][p]) in now]
    return float(np.mean(rises)) if rises else float("nan")


def _fit_tau(det, anchors_path: Path, work: Path, n: int):
    """τ as the quality bench fits it (``calibrate`` at FPR ≤ 0.05 on the calibration split), on this detector's
    own records, so it fits whatever layout the detector uses."""
    from bench.bench_quality import Scores, _calibrated, _split

    calib = _split(2, n)
    dets = det.detect([c.image for c in calib.items])
    scores = Scores(np.array([d.score for d in dets]), "lower",
                    np.array([[d.categories[c] for c in det.names] for d in dets]), dets)
    return _calibrated(calib, scores, anchors_path, work, "grid"), len(calib.items)


def _unsafe_tests(folder: Path, n: int) -> dict[str, int]:
    """Write the unsafe test composites as PNGs; id → condition index."""
    from bench.bench_quality import _split

    test = _split(1, n)
    folder.mkdir(parents=True)
    cond = {}
    for i, (item, k) in enumerate(zip(test.items, test.cond)):
        if item.label == "unsafe":
            name = f"{i:04d}.png"
            item.image.save(folder / name)
            cond[name] = int(k)
    return cond


def measure(det, anchors_path: Path, work: Path, n_calib: int, n_test: int, variants=None) -> dict:
    """Scan → mask (each fill) → rescan on the toy world. Returns the raw per-image outcomes."""
    from guardalign.commands.mask import mask
    from guardalign.commands.scan import scan
    from guardalign.detection.anchors import load_anchors
    from guardalign.detection.detector import Detector

    res, n_cal = _fit_tau(det, anchors_path, work, n_calib)
    tuned = Detector(det.encoder, load_anchors(res.out), det.config)  # the written YAML, as scan uses it
    cond = _unsafe_tests(work / "unsafe", n_test)
    scan([str(work / "unsafe")], out=str(work / "scan.jsonl"), detector=tuned, progress=False)
    before = _records(work / "scan.jsonl")
    flagged = sorted(i for i, r in before.items() if r["verdict"] == "unsafe")
    _log(f"τ {res.chosen.threshold:.4g}; {len(flagged)} of {len(cond)} unsafe test images flagged")
    layout = {k: v for k, v in tuned.settings().items() if k in ("method", "patches", "grid", "stride", "scales")}
    out = {"tau": res.chosen.threshold, "layout": layout, "n_calib": n_cal, "n_unsafe": len(cond), "cond": cond,
           "flagged": flagged, "fills": {}}
    for n, (label, (fill, fn)) in enumerate((variants or VARIANTS).items()):
        dest = work / f"masked-{n}"
        with _swapped(fill, fn):
            mask([str(work / "unsafe")], out_dir=str(dest), from_scan=str(work / "scan.jsonl"), fill=fill,
                 only_unsafe=True, progress=False)
        entries = {e["id"]: e for e in map(json.loads, (dest / "manifest.jsonl").open())}
        rescan = work / f"rescan-{n}.jsonl"
        scan([str(dest)], out=str(rescan), detector=tuned, progress=False)
        after = {k: r for k, r in _records(rescan).items() if k.endswith(".png")}
        rows = {}
        for i in flagged:
            e, r = entries[i], after[entries[i]["output"]]
            reflagged = r["boxes"] if r["verdict"] == "unsafe" else []
            rows[i] = {"safe": r["verdict"] == "safe", "rise": r["score"] - before[i]["score"],
                       "patch_rise": _patch_rise(before[i], r),
                       "inside": any(_inside_share(b, e["boxes"]) >= 0.5 for b in reflagged)}
        out["fills"][label] = rows
        n_safe = sum(v["safe"] for v in rows.values())
        _log(f"{label}: {n_safe}/{len(rows)} come back safe")
    return out


def _cells(rows: dict, ids) -> str:
    ids = list(ids)
    if not ids:
        return "–"
    safe = sum(rows[i]["safe"] for i in ids)
    return f"{safe / len(ids):.2f} ({safe}/{len(ids)})"


def report(m: dict) -> str:
    from bench.bench_quality import COLUMNS

    by_cond = {k: [i for i in m["flagged"] if m["cond"][i] == k] for k in range(len(COLUMNS))}
    rows = []
    for fill, r in m["fills"].items():
        still = [i for i in m["flagged"] if not r[i]["safe"]]
        inside = sum(r[i]["inside"] for i in still)
        rows.append([fill, _cells(r, m["flagged"])] + [_cells(r, by_cond[k]) for k in range(len(COLUMNS))]
                    + [f"{np.mean([r[i]['rise'] for i in m['flagged']]):+.3f}",
                       f"{np.nanmean([r[i]['patch_rise'] for i in m['flagged']]):+.3f}", f"{inside} / {len(still) - inside}"])
    flagged_per = ", ".join(f"{c} {len(by_cond[k])}" for k, c in enumerate(COLUMNS))
    return (
        f"Detector: the default layout ({', '.join(f'{k} {v}' for k, v in m['layout'].items())}); "
        f"τ {m['tau']:.4g}, fitted by `calibrate` on {m['n_calib']} held-out composites at FPR ≤ 0.05, "
        f"the way the quality section fits it. {len(m['flagged'])} of {m['n_unsafe']} unsafe test composites are flagged "
        f"({flagged_per}); each fill masks exactly those, through `scan` → `mask --from-scan --fill F` → `scan` "
        "of the purified folder with the same detector and τ. The two \"old default\" rows are the blur and pixelate "
        "of before issue 12 (σ = a quarter of the box's long side; 6 full-contrast blocks), swapped into the same "
        "mask path for comparison; today's: σ = half the long side; 2 blocks at half contrast.\n\n"
        + table(["fill", "safe after", "safe, 1/9 on-grid", "safe, 1/9 off-grid", "safe, 1/4", "safe, 1/2",
                 "mean score rise", "mean cost rise, filled patches",
                 "still flagged: inside / outside the filled boxes"], rows)
        + "\n\nScore = the image's lowest patch cost (lower = more unsafe); its rise is the purified copy's score "
        "minus the original's. Once the planted tile is masked the score is often set by another (safe) patch, so "
        "the rise of the filled patches' own costs (each matched by its box in the rescan) measures the fill directly. "
        "\"Inside\": a re-flagged patch lies at least half inside the filled boxes, so the "
        "fill left something the detector still reads as unsafe. \"Outside\": every re-flagged patch lies mostly "
        "outside them, i.e. part of the tile the flagged patches never covered (a localisation miss that no fill "
        "can repair; `--dilate` or overlapping windows can)."
    )


def run(quick: bool = False) -> dict:
    """Load the cached toy CLIP (training it if absent), measure, print and write the ``fills`` section."""
    from bench.toyworld.anchors_yaml import write_anchors
    from bench.toyworld.train import cached_model, load_trained, settings_for
    from guardalign.config import DetectConfig
    from guardalign.detection.anchors import load_anchors
    from guardalign.detection.detector import Detector

    t0 = time.perf_counter()
    settings = settings_for(quick)
    trained = cached_model(settings, log=_log)
    encoder = load_trained(trained)
    with tempfile.TemporaryDirectory(prefix="guardalign-fills-") as tmp:
        work = Path(tmp)
        anchors_path = write_anchors(work / "toy-anchors.yaml")
        det = Detector(encoder, load_anchors(anchors_path), DetectConfig(batch_size=64))
        m = measure(det, anchors_path, work, n_calib=24 if quick else 100, n_test=12 if quick else 50)
    total = time.perf_counter() - t0
    markdown = report(m) + f"\n\nTiny CLIP {settings.key()}; whole bench {total:.0f} s on {machine()}."
    print(markdown)
    if not quick:
        write_section("fills", "## Do the mask fills purify? (issue 12, toy world)\n\n" + markdown)
    return {"seconds": total, "measure": m, "markdown": markdown}


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
