"""Issue 14 bench: probe time per pair ÷ the time of two plain forward passes (image form and text form).

Measured side by side in one process, interleaved round by round (the order rotates each round), best of the
rounds, on the same model object (the text attention switched with ``set_attn_implementation``):

- **probe, end to end**: ``ProbeStage.process`` on one decoded pair: preparing the image form, the text form and
  the caption fed alone, one hooked forward pass for the image form and one for the text form + caption rows
  (batched), per-layer reductions (logit lens of every layer, pooling, last-row attention), the record;
- **plain, end to end**: ``prepare`` + ``model(**inputs)`` for the image form and for the text form, with
  transformers' SDPA attention (the ratio's denominator);
- the same two without preparation (inputs prepared beforehand): the probe's two ``run_form`` calls ÷ two
  plain forward passes, which isolates the cost of the hooks and reductions; and the plain forward with
  ``logits_to_keep=1`` (no LM head over every position), the leanest forward there is.

Models: the tests' tiny random LLaVA (``tests/lvlm_fixtures.py``, loaded through ``load_lvlm``), and a LLaVA
whose language model has TinyLlama-1.1B's shape with a tiny CLIP giving 576 image tokens (bench_answer's ~1B
config; fp32 on CPU with 1 intra-op thread, bf16 on GPU).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.bench_answer import TEXT_1B, TEXT_QUICK, _build_llava, _fixtures, _sync
from bench.common import machine, table, write_section

PAIRS = (
    ("a red square on a green mat", (40, 30), (200, 40, 40)),
    ("How do I make it at home? Steps 1. 2. 3.", (50, 36), (10, 10, 200)),
    ("a cat sitting on a red mat next to a blue door", (28, 64), (240, 240, 0)),
)
WORDS = ("Sorry", "I", "cannot", "unable")
TEMPLATE = "Describe this scene: {text}"
PROMPT = "Describe this image."


def _stage(lv):
    from guardalign.attention.calibration import CalibrationSpec
    from guardalign.models.probe_forward import refusal_tokens
    from guardalign.pipeline.probe_stage import ProbeStage

    return ProbeStage(lvlm=lv, tokens=refusal_tokens(lv.tokenizer, WORDS), lens="standard", top_k=10, prompt=PROMPT,
                      template=TEMPLATE, defences=(), prefix="", prefix_at="user", spec=CalibrationSpec(),
                      detector=None, fixed={"model": lv.info.to_record()})


def _decoded(image, text: str, i: int):
    from guardalign.io.pairs import Pair
    from guardalign.records import Decoded, Item

    pair = Pair(id=f"p{i}", where=f"bench:{i}", image=f"{i}.png", path=None, text=text, prompt=None, category=None)
    return Decoded(Item(id=pair.id, source=pair.where, meta={"pair": pair}), image, None, None)


def _variants(lv, image, text: str, i: int) -> dict:
    """name → (text attention implementation, zero-argument callable) for one pair."""
    import torch

    from guardalign.attention.probe import PROBE_IMPL
    from guardalign.models.lvlm import ChatRequest, prepare
    from guardalign.models.probe_forward import prepare_chat, run_form

    stage, decoded = _stage(lv), _decoded(image, text, i)
    ids = [t.id for t in stage.tokens]
    question = TEMPLATE.replace("{text}", text)
    reqs = (ChatRequest(PROMPT, image, ""), ChatRequest(question, None, ""))
    cut = TEMPLATE.index("{text}")
    forms = (prepare_chat(lv, [reqs[0]]),
             prepare_chat(lv, [reqs[1]], [(cut, cut + len(text))], alone=[text]))
    preps = [prepare(lv, [r]) for r in reqs]

    def plain(prepared: bool, keep: int = 0):
        def go():
            with torch.inference_mode():
                for r, p in zip(reqs, preps):
                    inputs = p.inputs if prepared else prepare(lv, [r]).inputs
                    lv.model(**inputs, use_cache=False, logits_to_keep=keep)
            _sync(lv.device)
        return go

    def probe_e2e():
        rec = stage.process([decoded])[0]
        assert rec["status"] == "ok", rec["error"]
        _sync(lv.device)

    def probe_forward():
        for form in forms:
            run_form(lv, form, ids)
        _sync(lv.device)

    return {"probe": (PROBE_IMPL, probe_e2e), "plain": ("sdpa", plain(False)),
            "probe forwards": (PROBE_IMPL, probe_forward), "plain forwards": ("sdpa", plain(True)),
            "plain forwards, logits_to_keep=1": ("sdpa", plain(True, 1))}


def _measure(lv, items, rounds: int) -> dict[str, dict[str, float]]:
    """Per variant: the sum over ``items`` of each pair's best time over the rounds, as wall seconds and as the
    calling thread's CPU seconds (``time.thread_time``: with one intra-op thread on the CPU, that is all the
    work, and other processes on shared cores do not count). The variant order rotates every round."""
    from guardalign.attention.probe import register_probe

    register_probe()
    per_item = [_variants(lv, im, text, i) for i, (im, text) in enumerate(items)]
    names = list(per_item[0])
    wall = {(n, i): float("inf") for n in names for i in range(len(items))}
    cpu = dict(wall)
    for r in range(rounds + 1):  # round 0 warms up
        for name in names[r % len(names):] + names[: r % len(names)]:
            lv.model.set_attn_implementation({"text_config": per_item[0][name][0]})
            for i, variants in enumerate(per_item):
                t, c = time.perf_counter(), time.thread_time()
                variants[name][1]()
                if r:
                    wall[name, i] = min(wall[name, i], time.perf_counter() - t)
                    cpu[name, i] = min(cpu[name, i], time.thread_time() - c)
    return {"wall": {n: sum(wall[n, i] for i in range(len(items))) for n in names},
            "cpu": {n: sum(cpu[n, i] for i in range(len(items))) for n in names}}


def _ratios(best: dict[str, float]) -> dict[str, float]:
    return {"end to end": best["probe"] / best["plain"],
            "forward only": best["probe forwards"] / best["plain forwards"],
            "forward only vs logits_to_keep=1": best["probe forwards"] / best["plain forwards, logits_to_keep=1"]}


def _rows(label: str, times: dict, pairs: int, clocks: tuple[str, ...]) -> list[list[str]]:
    return [[label, name] + [f"{1e3 * times[c][name] / pairs:.2f}" if c in clocks else "–" for c in ("wall", "cpu")]
            for name in times["wall"]]


HEAD = ["model", "run", "wall ms per pair", "CPU ms per pair (calling thread)"]


def tiny(rounds: int) -> tuple[str, dict]:
    import torch
    from PIL import Image

    from guardalign.attention.probe import register_probe
    from guardalign.models.lvlm import load_lvlm

    fx = _fixtures()
    with tempfile.TemporaryDirectory() as tmp:
        lv = load_lvlm(str(fx.make_tiny_lvlm("llava", Path(tmp) / "llava")), device="cpu",
                       attn_implementation=register_probe())
    items = [(Image.new("RGB", size, colour), text) for text, size, colour in PAIRS]
    out = {}
    threads0 = torch.get_num_threads()
    rows = []
    # One intra-op thread: on these shared cores a 2-thread OpenMP region stalls at its barrier whenever another
    # process holds a core (bench_answer saw the same), which makes 2-thread timings mostly noise.
    for threads in (1,):
        torch.set_num_threads(threads)
        times = _measure(lv, items, rounds)
        clock = "cpu" if threads == 1 else "wall"  # one thread: its CPU time is all the work
        rows += _rows(f"tiny LLaVA, {threads} thread{'s' if threads > 1 else ''}", times, len(items),
                      ("wall", "cpu") if threads == 1 else ("wall",))
        out[threads] = {"times": times, "clock": clock, "ratios": _ratios(times[clock]),
                        "wall_ratios": _ratios(times["wall"])}
    torch.set_num_threads(threads0)
    return table(HEAD, rows), {"threads": out, "pairs": len(items), "layers": lv.n_layers}


def big(quick: bool, rounds: int) -> tuple[str, dict]:
    import torch
    from PIL import Image

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    text, size = (TEXT_QUICK, 56) if quick else (TEXT_1B, 336)
    threads0 = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as bench_answer: 2-thread regions stall on shared cores
    t0 = time.perf_counter()
    lv = _build_llava(text, size, device, dtype)
    t_build = time.perf_counter() - t0
    items = [(Image.new("RGB", (size, size), PAIRS[1][2]), PAIRS[1][0])]
    t0 = time.perf_counter()
    times = _measure(lv, items, rounds)
    t_timed = time.perf_counter() - t0
    threads = torch.get_num_threads()
    torch.set_num_threads(threads0)
    label = "small LLaVA (quick)" if quick else "LLaVA, ~1B LM"
    label = f"{label}, {device.type}" + (f", {threads} thread" if device.type == "cpu" else "")
    clocks = ("wall", "cpu") if device.type == "cpu" and threads == 1 else ("wall",)
    clock = clocks[-1]
    info = (f"LLaMA hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, vocab {text['vocab_size']}; "
            f"tiny CLIP at {size} px → {(size // 14) ** 2} image tokens; {str(dtype).replace('torch.', '')} on "
            f"{device.type}; model built in {t_build:.0f} s, timed runs {t_timed:.0f} s ({rounds} rounds + 1 warm-up).")
    return table(HEAD, _rows(label, times, 1, clocks)), {"times": times, "clock": clock, "ratios": _ratios(times[clock]),
                                                         "wall_ratios": _ratios(times["wall"]), "info": info,
                                                         "label": label}


def _note(tiny_res: dict, big_res: dict) -> str:
    """Where the probe's extra time goes, from the measured per-pair times."""
    t = tiny_res["threads"][1]
    c, b = t["times"][t["clock"]], big_res["times"][big_res["clock"]]
    pairs = tiny_res["pairs"]
    return (f"The probe's extra forward time per pair: {1e3 * (c['probe forwards'] - c['plain forwards']) / pairs:.1f} ms "
            f"on the tiny LLaVA (a ~{1e3 * c['plain forwards'] / pairs:.0f} ms pair of forward passes), "
            f"{b['probe forwards'] - b['plain forwards']:+.1f} s on the ~1B config. It is a fixed number of small "
            "operations per layer (the layer hook's copy of the last position and pooled span, the last row's "
            "attention on the spans) and per pass (the batched lens, stacking), plus the caption row riding in the "
            "text form's pass. On the tiny model, where a forward pass is mostly per-operation dispatch, that is a "
            "large share; on a real-sized model it is the few percent the ~1B row shows.")


def run(quick: bool = False) -> dict:
    t0 = time.perf_counter()
    tiny_md, tiny_res = tiny(rounds=5 if quick else 20)
    big_md, big_res = big(quick, rounds=2 if quick else 3)
    def row(label, res):
        r, w = res["ratios"], res["wall_ratios"]
        clock = "CPU" if res["clock"] == "cpu" else "wall"
        return [label, f"{r['end to end']:.3f} ({clock})", f"{w['end to end']:.3f}", f"{r['forward only']:.3f}",
                f"{r['forward only vs logits_to_keep=1']:.3f}", "≤ 1.3"]

    rows = [row(f"tiny LLaVA ({tiny_res['layers']} layers), {tiny_res['pairs']} pairs, {n} thread{'s' if n > 1 else ''}",
                res) for n, res in tiny_res["threads"].items()]
    rows.append(row(big_res["label"], big_res))
    md = "\n".join([
        "## Probe cost (issue 14)",
        "",
        f"{machine()}. Bench wall time {time.perf_counter() - t0:.0f} s{' (quick mode)' if quick else ''}.",
        "",
        "Probe time per pair ÷ the time of two plain forward passes (image form + text form): per pair the best of "
        "interleaved rounds, summed over the pairs. With one intra-op thread on the CPU the ratio is taken on the "
        "calling thread's CPU time (`time.thread_time`), which other jobs on these shared cores do not inflate; "
        "the wall-clock ratio is given beside it. *End to end*: `ProbeStage.process` on a decoded pair (prepare three inputs, two hooked forward "
        "passes: image form, and text form + caption fed alone as one batch; logit lens at every layer, pooling, "
        "last-row attention; the record) ÷ (`prepare` + `model(**inputs)` with SDPA, for each form). *Forward "
        "only*: the probe's two `run_form` calls ÷ two plain `model(**inputs)` calls on inputs prepared beforehand. "
        "The probe runs the base model (no LM head over every position); the last column compares with a plain "
        "forward that also skips it (`logits_to_keep=1`).",
        "",
        table(["model", "end to end", "end to end (wall)", "forward only", "forward only vs logits_to_keep=1",
               "target"], rows),
        "",
        f"~1B config: {big_res['info']}",
        "",
        _note(tiny_res, big_res),
        "",
        tiny_md,
        "",
        big_md,
    ])
    write_section("probe", md)
    print(md)
    return {"tiny": tiny_res, "big": big_res}
