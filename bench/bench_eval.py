"""Issue 16 bench: the cost of ``guardalign eval``'s six-defence matrix, and its memory against the item count.

Cost. The tiny random LLaVA of the tests and the tests' tiny random CLIP (τ = 2, so OT flags every image and
purifies it: the most generations), N prompts of distinct images, all six defences, ``--judge refusal``,
models loaded once outside the timing. The reference is the same work done by hand with the same library
calls, item by item: decode, one OT detection and one ETA pre-check (together the detection pass), one
purification, then six bare ``prepare`` + ``generate`` calls, one per defence's request. Target: eval time
≤ 1.1 × that reference. The two are interleaved round by round (best of the rounds); the reference's
answers are checked to equal eval's records, so both did the same generations.

eval runs fewer than six generations per image: ``eta-detect`` asks exactly what ``vanilla`` or ``prefix``
asks (the pre-check only decides whether the prefix is there), and ``ot``/``guardalign`` on an image OT calls
safe ask what ``vanilla``/``calibration`` ask; identical greedy requests are generated once. The table also
gives eval against a reference of only the distinct requests, i.e. eval's own overhead (records, runner,
judge, summary).

Memory. Peak RSS (VmHWM) of a fresh process running ``evaluate`` over N and 4N items (the summary is rebuilt
from the records file at the end, by counting): target ratio ≤ 1.15.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.common import machine, table, write_section

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8
QUESTION = "List the steps shown in the image."


def _fixtures():
    """tests/lvlm_fixtures.py as a module (the tests' tiny-model builders), without touching sys.path."""
    spec = importlib.util.spec_from_file_location("lvlm_fixtures", ROOT / "tests" / "lvlm_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_prompts(root: Path, n: int) -> Path:
    """``n`` prompt lines with distinct small images (a generic ``prompts:`` benchmark)."""
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        img = Image.new("RGB", (64, 48), (37 * i % 256, 91 * i % 256, 53 * i % 256))
        ImageDraw.Draw(img).rectangle([i % 20, 4, 30 + i % 30, 40], fill=(250 - i % 200, 20, 120))
        img.save(root / f"{i}.png")
        lines.append(json.dumps({"id": f"p{i}", "image": f"{i}.png", "prompt": QUESTION, "category": f"c{i % 3}"}))
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return root / "prompts.jsonl"


def tiny_clip(tmp: Path) -> tuple[str, str]:
    import torch

    from guardalign.models.clip import load_encoder, save_checkpoint

    cfg = ROOT / "tests" / "fixtures" / "tiny-clip.json"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = save_checkpoint(load_encoder(str(cfg), "none", device="cpu").model, tmp / "tiny-clip.safetensors")
    return str(cfg), str(ckpt)


def reference(lv, det, pre, prompts: Path, spec, prefix: str, distinct: bool) -> tuple[float, dict]:
    """Seconds of the hand-written matrix (all six requests, or only the distinct ones) and its answers."""
    import dataclasses

    from guardalign.detection.purify import apply_fill, boxes_to_fill
    from guardalign.io.images import decode_image
    from guardalign.models.lvlm import ChatRequest, generate, prepare

    off = dataclasses.replace(spec, mode="off")
    answers = {}
    t = time.perf_counter()
    for line in prompts.read_text().splitlines():
        obj = json.loads(line)
        image, _ = decode_image(path=prompts.parent / obj["image"])
        ot, gate = det.detect([image])[0], pre.detect([image])[0]
        purified = apply_fill(image, boxes_to_fill(ot.boxes, image.size), mean=det.encoder.mean) \
            if ot.verdict == "unsafe" else image
        eta_prefix = prefix if gate.verdict == "unsafe" else ""
        requests = {"vanilla": (image, "", off), "prefix": (image, prefix, off), "eta-detect": (image, eta_prefix, off),
                    "ot": (purified, "", off), "calibration": (image, prefix, spec), "guardalign": (purified, prefix, spec)}
        done = {}
        for name, (img, pfx, s) in requests.items():
            key = (id(img), pfx, s.mode)
            if distinct and key in done:
                answers[f"{obj['id']}@{name}"] = done[key]
                continue
            prep = prepare(lv, [ChatRequest(question=obj["prompt"], image=img, prefix=pfx)], max_new_tokens=NEW_TOKENS)
            done[key] = answers[f"{obj['id']}@{name}"] = generate(lv, prep, s, max_new_tokens=NEW_TOKENS).texts[0]
    return time.perf_counter() - t, answers


def cost(quick: bool) -> dict:
    from guardalign.attention.calibration import CalibrationSpec
    from guardalign.commands.eval import evaluate
    from guardalign.detection.anchors import load_anchors
    from guardalign.detection.detector import Detector
    from guardalign.models.lvlm import load_lvlm

    n, rounds = (6, 1) if quick else (12, 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = _fixtures().make_tiny_lvlm("llava", tmp / "llava")
        clip_cfg, clip_ckpt = tiny_clip(tmp)
        prompts = write_prompts(tmp / "bench", n)
        lv = load_lvlm(str(model), device="cpu")
        det = Detector.from_options(clip_model=clip_cfg, pretrained=clip_ckpt, device="cpu", tau=2.0)
        pre = det.with_config(method="global", theta=0.16)
        prefix = load_anchors().prefix
        spec = CalibrationSpec()
        times = {"eval": [], "ref6": [], "ref_distinct": []}
        stats = {}
        for r in range(rounds + 1):  # round 0 warms up
            order = ["eval", "ref6", "ref_distinct"][r % 3:] + ["eval", "ref6", "ref_distinct"][: r % 3]
            for what in order:
                if what == "eval":
                    out = tmp / f"eval{r}"
                    t = time.perf_counter()
                    s = evaluate([f"prompts:{prompts}"], model=str(model), out=str(out), judge=["refusal"],
                                 max_new_tokens=NEW_TOKENS, loaded_lvlm=lv, detector=det, progress=False)
                    took = time.perf_counter() - t
                    recs = {json.loads(x)["id"].split("/", 1)[1]: json.loads(x) for x in (out / "records.jsonl").open()}
                    stats.update(generations=s.tally["generations"], detections=s.tally["detections"],
                                 records=s.total, answers={k: v["response"] for k, v in recs.items()})
                else:
                    took, answers = reference(lv, det, pre, prompts, spec, prefix, distinct=what == "ref_distinct")
                    stats[what] = answers
                if r:
                    times[what].append(took)
        assert stats["ref6"] == stats["answers"] == stats["ref_distinct"], "eval and the reference answered differently"
    best = {k: min(v) for k, v in times.items()}
    return {"n": n, "rounds": rounds, **best, "ratio6": best["eval"] / best["ref6"],
            "ratio_distinct": best["eval"] / best["ref_distinct"], "generations": stats["generations"],
            "detections": stats["detections"], "records": stats["records"]}


RSS_SCRIPT = r"""
import re, sys, json
from guardalign.commands.eval import evaluate
s = evaluate(["prompts:" + sys.argv[1]], model=sys.argv[2], out=sys.argv[3], clip_model=sys.argv[4],
             pretrained=sys.argv[5], device="cpu", tau=2.0, max_new_tokens=4, judge=["refusal"], progress=False)
hwm = re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)
print(json.dumps({"maxrss_kb": int(hwm), "records": s.total}))
"""


def peak_rss(quick: bool) -> dict:
    small = 6 if quick else 8
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = _fixtures().make_tiny_lvlm("llava", tmp / "llava")
        clip_cfg, clip_ckpt = tiny_clip(tmp)
        for n in (small, 4 * small):
            prompts = write_prompts(tmp / f"p{n}", n)
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(prompts), str(model), str(tmp / f"o{n}"),
                                  clip_cfg, clip_ckpt], capture_output=True, text=True, cwd=ROOT, check=True)
            got = json.loads(res.stdout.strip().splitlines()[-1])
            out[n] = (got["maxrss_kb"] / 1024, time.perf_counter() - t, got["records"])
    return out


def run(quick: bool = False) -> dict:
    res = cost(quick)
    rss = peak_rss(quick)
    (small, (rs, ts, ns)), (big, (rb, tb, nb)) = sorted(rss.items())
    res["rss_ratio"] = rb / rs
    n = res["n"]
    md = "\n".join([
        "## Eval defence matrix (issue 16)",
        "",
        f"{machine()}.",
        "",
        f"Tiny random LLaVA and tiny random CLIP of the tests, τ = 2 (every image flagged and purified), "
        f"{n} prompts with distinct images, all six defences, `--judge refusal`, {NEW_TOKENS} new tokens, models "
        f"loaded once outside the timing; best of {res['rounds']} interleaved rounds after a warm-up. Reference: "
        "the same library calls by hand (decode, OT detection + ETA pre-check, purification, then bare "
        "`prepare` + `generate` per defence request). eval's answers equal the reference's.",
        "",
        table(["run", "wall (s)", "per item (s)", "eval ÷ run"], [
            ["eval (6 defences, records, judge, summary)", f"{res['eval']:.2f}", f"{res['eval'] / n:.3f}", "1.000"],
            ["reference: 1 detection pass + 6 generations per item", f"{res['ref6']:.2f}", f"{res['ref6'] / n:.3f}",
             f"**{res['ratio6']:.3f}**"],
            ["reference: 1 detection pass + the distinct generations only", f"{res['ref_distinct']:.2f}",
             f"{res['ref_distinct'] / n:.3f}", f"{res['ratio_distinct']:.3f}"],
        ]),
        "",
        f"eval ran {res['generations']} generations and {res['detections']} OT detections for {res['records']} "
        f"records ({n} items × 6 defences): `eta-detect` always repeats the request of `vanilla` or `prefix`, so "
        "at most five generations per image are distinct. Target: eval ≤ 1.1 × (6 generations + 1 detection "
        f"pass): **{res['ratio6']:.3f}**; eval's own overhead over the distinct work: {res['ratio_distinct']:.3f}.",
        "",
        "Peak RSS (fresh process, `evaluate` over the items, 4 new tokens):",
        "",
        table(["items", "records", "peak RSS (MiB)", "wall (s)"],
              [[small, ns, f"{rs:.0f}", f"{ts:.0f}"], [big, nb, f"{rb:.0f}", f"{tb:.0f}"]]),
        "",
        f"peak RSS {big} ÷ {small} items: **{res['rss_ratio']:.3f}** (target ≤ 1.15)",
    ])
    write_section("eval", md)
    print(md)
    return res
