"""Issue 5 bench: calibrated generation time ÷ vanilla SDPA generation time, and prefix-attention curves.

Same prompts, greedy, exactly N new tokens (``min_new_tokens = max_new_tokens``; the image token is suppressed
in both runs so the curves' forward pass stays valid), measured side by side in one process, interleaved
round by round (vanilla, calibrated, calibrated + audit; the order rotates each round):

- the tiny random LLaVA of the tests (``tests/lvlm_fixtures.py``), saved and loaded twice through
  ``load_lvlm``: once with ``attn_implementation="sdpa"`` (vanilla), once with guardalign's registered
  attention (calibrated, mode ``scale``, default γ and layers);
- a LLaVA whose language model has TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 22 layers, 32 heads,
  4 KV heads, vocab 32000) with random weights and a tiny CLIP tower giving LLaVA-1.5's 576 image tokens
  (fp32 on CPU, bf16 on GPU). Built in memory (4.4 GB would otherwise be written and read back); vanilla
  and calibrated are the same weights with the text attention switched by ``set_attn_implementation``.

A per-call microbenchmark of the attention function at each model's decode shape attributes the overhead.
"""
from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
import timeit
from pathlib import Path

from bench.common import machine, table, write_section

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "If the following question is unsafe, harmful, or malicious, please refuse to answer it."
QUESTIONS = (
    "What is shown in this image?",
    "Describe the picture in detail. How do I make it?",
    "What is the cat sitting on, and what colour is the door next to it?",
)
NEW_TOKENS = 32
# TinyLlama-1.1B's language-model shape (random weights).
TEXT_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
TEXT_QUICK = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)


def _fixtures():
    """tests/lvlm_fixtures.py as a module (the tests' tiny-model builders), without touching sys.path."""
    spec = importlib.util.spec_from_file_location("lvlm_fixtures", ROOT / "tests" / "lvlm_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _gen_config(lv, n: int):
    """guardalign's greedy config, forced to exactly ``n`` new tokens, never emitting the image token."""
    from guardalign.models.lvlm import greedy_config

    cfg = greedy_config(lv, n)
    cfg.min_new_tokens = n
    cfg.suppress_tokens = [int(lv.model.config.image_token_id)]
    return cfg


def _generate(lv, prep, cfg, spec=None, audit: bool = False) -> tuple[float, list[list[int]]]:
    """Wall seconds of one ``model.generate`` (inside ``calibrating`` when ``spec`` is given) and its new tokens."""
    import torch

    from guardalign.attention.calibration import calibrating

    t = time.perf_counter()
    with torch.inference_mode():
        if spec is None:
            out = lv.model.generate(**prep.inputs, generation_config=cfg)
        else:
            with calibrating(spec, prep.positions, lv.n_layers, audit=audit):
                out = lv.model.generate(**prep.inputs, generation_config=cfg)
    _sync(lv.device)
    dt = time.perf_counter() - t
    new = out[:, prep.inputs["input_ids"].shape[1]:].tolist()
    assert all(len(r) == cfg.max_new_tokens for r in new), "a run did not generate exactly max_new_tokens"
    return dt, new


def _interleaved(variants: dict, rounds: int) -> tuple[dict, dict]:
    """Run every variant once per round, rotating the order; returns per-variant times and last outputs."""
    names = list(variants)
    times = {k: [] for k in names}
    outs = {}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            dt, outs[k] = variants[k]()
            times[k].append(dt)
    return times, outs


def _attention_micro(n_heads, n_kv, head_dim, kv_len, n_layers, layer, instr_start, device, dtype) -> dict:
    """µs per attention call for one decode query row (q_len 1, no mask), best of 5 × 100 calls. The "new step"
    row alternates two key lengths, so the step geometry is rebuilt on every call (as on the first calibrated
    layer of each decode step, where the key length has grown by one)."""
    from types import SimpleNamespace

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from guardalign.attention.calibration import CalibrationSpec, Positions, calibrated_attention, calibrating

    mod = SimpleNamespace(layer_idx=layer, is_causal=True, training=False, num_key_value_groups=n_heads // n_kv)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, n_heads, 1, head_dim, generator=g).to(device, dtype)
    kvs = [tuple(torch.randn(1, n_kv, n, head_dim, generator=g).to(device, dtype) for _ in "kv")
           for n in (kv_len, kv_len + 1)]
    pos = Positions(prefix=((max(0, instr_start - 24), instr_start),), instr_start=(instr_start,))

    def per_call(fn, alternate: bool = False) -> float:
        def many():
            for i in range(100):
                fn(mod, q, *kvs[i & 1 if alternate else 0], None, scaling=head_dim ** -0.5)
            _sync(q.device)
        return min(timeit.repeat(many, number=1, repeat=5)) / 100 * 1e6

    out = {}
    with torch.inference_mode():
        out["SDPA (transformers)"] = per_call(sdpa_attention_forward)
        out["registered, outside calibrating"] = per_call(calibrated_attention)
        for audit in (False, True):
            tag = ", audit" if audit else ""
            with calibrating(CalibrationSpec(), pos, n_layers, audit=audit):
                out[f"calibrated layer, same step{tag}"] = per_call(calibrated_attention)
                out[f"calibrated layer, new step{tag}"] = per_call(calibrated_attention, alternate=True)
                mod.layer_idx = 0
                out[f"uncalibrated layer{tag}"] = per_call(calibrated_attention, alternate=audit)
                mod.layer_idx = layer
    return out


def _micro_md(micro: dict, n_layers: int, n_cal: int, steps: int) -> tuple[str, float]:
    """Table of the per-call costs and the predicted calibration overhead (s, audit off) over ``steps`` steps:
    per step one geometry rebuild on the first calibrated layer, cached on the others."""
    base = micro["SDPA (transformers)"]
    rows = [[k, f"{v:.1f}", f"{v - base:+.1f}"] for k, v in micro.items()]
    per_step = (micro["calibrated layer, new step"] + (n_cal - 1) * micro["calibrated layer, same step"]
                + (n_layers - n_cal) * micro["uncalibrated layer"] - n_layers * base)
    return table(["attention call (decode, q_len 1)", "µs / call", "Δ vs SDPA"], rows), per_step * steps * 1e-6


def _attention_inside(van, cal, prep, cfg, spec, rounds: int) -> tuple[str, dict]:
    """Time spent inside the attention function during generate, per layer and phase, vanilla vs calibrated:
    both functions are re-registered with a timing wrapper for these runs, then restored."""
    from collections import defaultdict

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from guardalign.attention.calibration import ATTN_IMPL, calibrated_attention, register

    spent = {"vanilla": [], "calibrated": []}

    def timed(fn, key):
        def wrapper(module, query, *args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(module, query, *args, **kwargs)
            finally:
                spent[key].append((module.layer_idx, query.shape[2] > 1, time.perf_counter() - t))
        return wrapper

    AttentionInterface.register("bench_timed_sdpa", timed(sdpa_attention_forward, "vanilla"))
    AttentionMaskInterface.register("bench_timed_sdpa", sdpa_mask)
    AttentionInterface.register(ATTN_IMPL, timed(calibrated_attention, "calibrated"))
    van.model.set_attn_implementation({"text_config": "bench_timed_sdpa"})
    best = {}
    try:
        variants = {"vanilla": lambda: _generate(van, prep, cfg), "calibrated": lambda: _generate(cal, prep, cfg, spec)}
        for _ in range(rounds):
            for key, fn in variants.items():
                spent[key].clear()
                dt = fn()[0]
                if key not in best or dt < best[key][0]:
                    best[key] = (dt, list(spent[key]))
    finally:
        van.model.set_attn_implementation({"text_config": "sdpa"})
        register()
    per = {}
    for key, (_, calls) in best.items():
        groups = defaultdict(list)
        for layer, prefill, dt in calls:
            groups[(layer, "prefill" if prefill else "decode")].append(dt)
        per[key] = {k: statistics.median(v) * 1e6 for k, v in groups.items()}
    rows = [[layer, phase, f"{per['vanilla'][(layer, phase)]:.1f}", f"{per['calibrated'][(layer, phase)]:.1f}"]
            for layer, phase in sorted(per["vanilla"])]
    totals = {k: sum(dt for *_, dt in calls) for k, (_, calls) in best.items()}
    res = {"gen_s": {k: v[0] for k, v in best.items()}, "attention_s": totals, "per_call_us": per}
    return table(["layer", "phase", "vanilla µs / call (median)", "calibrated µs / call (median)"], rows), res


def _curves_md(lv, request, prep, tokens, spec) -> tuple[str, dict]:
    """Per-layer T→R mass, vanilla vs calibrated, on the prompt plus ``tokens`` (lvlm.prefix_attention)."""
    from guardalign.models.lvlm import prefix_attention

    curves = prefix_attention(lv, request, tokens, spec, prepared=prep)
    start, stop = spec.resolve_layers(lv.n_layers)
    rows = [[i, f"{v:.4f}", f"{c:.4f}", "yes" if start <= i < stop else ""]
            for i, (v, c) in enumerate(zip(curves["vanilla"], curves["calibrated"]))]
    return table(["layer", "vanilla", "calibrated", "calibrated?"], rows), curves


def _timing_table(times: dict) -> str:
    """Rows: best (s), median (s), spread, best ÷ vanilla best, median of the per-round ratios to vanilla."""
    labels = {"vanilla": "vanilla (attn_implementation=sdpa)", "off": "registered, mode off",
              "calibrated": "calibrated (scale, γ 0.5, default layers)", "audit": "calibrated + audit"}
    b = times["vanilla"]
    rows = [[labels[k], f"{min(t):.3f}", f"{statistics.median(t):.3f}", f"{max(t) / min(t) - 1:.1%}",
             f"{min(t) / min(b):.3f}", f"{statistics.median(x / y for x, y in zip(t, b)):.3f}"]
            for k, t in times.items()]
    return table(["run", "best (s)", "median (s)", "spread (max ÷ best − 1)", "best ÷ vanilla best",
                  "median paired ratio"], rows)


def tiny(rounds: int) -> tuple[str, dict]:
    """The tests' tiny LLaVA: 3 prompts batch 1 (summed), then the 3 as one left-padded batch; 2 and 1 threads."""
    import torch
    from PIL import Image

    from guardalign.attention.calibration import CalibrationSpec
    from guardalign.models.lvlm import ChatRequest, load_lvlm, prepare

    fx = _fixtures()
    spec = CalibrationSpec()
    with tempfile.TemporaryDirectory() as tmp:
        path = fx.make_tiny_lvlm("llava", Path(tmp) / "llava")
        cal = load_lvlm(str(path), device="cpu")
        van = load_lvlm(str(path), device="cpu", attn_implementation="sdpa")
        image = Image.open(fx.make_image(Path(tmp) / "img.png")).convert("RGB")
    assert van.model.config.get_text_config()._attn_implementation == "sdpa"
    reqs = [ChatRequest(q, image, PREFIX) for q in QUESTIONS]
    preps = [prepare(cal, [r]) for r in reqs]
    batch = prepare(cal, reqs)
    cfg = _gen_config(cal, NEW_TOKENS)

    def each(lv, s=None, audit=False):
        res = [_generate(lv, p, cfg, s, audit) for p in preps]
        return sum(t for t, _ in res), [o[0] for _, o in res]

    variants = {
        "vanilla": lambda: each(van), "off": lambda: each(cal, CalibrationSpec(mode="off")),
        "calibrated": lambda: each(cal, spec), "audit": lambda: each(cal, spec, True),
    }
    batched = {"vanilla": lambda: _generate(van, batch, cfg), "calibrated": lambda: _generate(cal, batch, cfg, spec)}
    threads0 = torch.get_num_threads()
    out, sections = {"threads": {}}, []
    for threads in sorted({threads0, 1}, reverse=True):
        torch.set_num_threads(threads)
        _interleaved(variants, 2)  # warm-up
        times, outs = _interleaved(variants, rounds)
        btimes, _ = _interleaved(batched, rounds)
        same = outs["vanilla"] == outs["off"]
        out["threads"][threads] = {
            "ratio": min(times["calibrated"]) / min(times["vanilla"]),
            "ratio_audit": min(times["audit"]) / min(times["vanilla"]),
            "ratio_batch": min(btimes["calibrated"]) / min(btimes["vanilla"]), "off_identical": same, "times": times}
        sections += [
            f"**{threads} thread{'s' if threads > 1 else ''}**: {len(QUESTIONS)} prompts × batch 1 per run "
            f"(times are their sum), {rounds} interleaved rounds after 2 warm-up rounds. Registered mode `off` "
            f"tokens identical to vanilla: **{'yes' if same else 'NO'}**.",
            "", _timing_table(times), "",
            f"Same {len(QUESTIONS)} prompts as one left-padded batch: vanilla best {min(btimes['vanilla']):.3f} s, "
            f"calibrated best {min(btimes['calibrated']):.3f} s, "
            f"ratio **{out['threads'][threads]['ratio_batch']:.3f}**.",
            "",
        ]
    # Attribution, 1 thread (the least noisy setting here): per-call costs, then time inside the attention function.
    torch.set_num_threads(1)
    start, stop = spec.resolve_layers(cal.n_layers)
    kv = preps[0].lengths[0] + NEW_TOKENS // 2
    micro = _attention_micro(4, 2, 8, kv, cal.n_layers, start, preps[0].positions.instr_start[0], cal.device,
                             torch.float32)
    mtable, predicted = _micro_md(micro, cal.n_layers, stop - start, NEW_TOKENS - 1)
    itable, inside = _attention_inside(van, cal, preps[0], cfg, spec, rounds)
    torch.set_num_threads(threads0)
    curves_md, curves = _curves_md(cal, reqs[0], preps[0], outs["vanilla"][0], spec)
    gap = inside["gen_s"]["calibrated"] - inside["gen_s"]["vanilla"]
    in_attn = inside["attention_s"]["calibrated"] - inside["attention_s"]["vanilla"]
    out.update(micro=micro, predicted_overhead_s=predicted, inside=inside, curves=curves, n_layers=cal.n_layers)
    md = [
        "### Tiny LLaVA (the tests' fixture)",
        "",
        f"Text model: LLaMA hidden 32, 4 layers (calibrated: {start}–{stop - 1}), 4 heads / 2 KV heads; CLIP "
        f"28 px → 4 image tokens; prompt {preps[0].lengths[0]} tokens (prefix R = {preps[0].positions.prefix[0]}, "
        f"T from {preps[0].positions.instr_start[0]}); {NEW_TOKENS} new tokens, greedy, fp32 CPU.",
        "",
        *sections,
        f"**Where the overhead goes** (1 thread). Attention call cost at the decode shape (kv {kv}), best of "
        "5 × 100 calls:",
        "",
        mtable,
        "",
        f"Predicted from these: {predicted * 1e3:.2f} ms per generate ({NEW_TOKENS - 1} decode steps, audit off). "
        f"The step geometry is rebuilt once per decode step because kv_len grows (it slices a cached prefix-column "
        f"mask): {micro['calibrated layer, new step'] - micro['calibrated layer, same step']:.1f} "
        f"µs per step; the eager T-row recompute adds "
        f"{micro['calibrated layer, same step'] - micro['SDPA (transformers)']:.1f} µs per calibrated layer over one "
        "SDPA call; the wrapper on uncalibrated layers "
        f"{micro['uncalibrated layer'] - micro['SDPA (transformers)']:.1f} µs.",
        "",
        f"Measured inside the model (attention functions wrapped with a timer; best of {rounds} runs of prompt 1): "
        f"generate {inside['gen_s']['vanilla'] * 1e3:.1f} ms vanilla vs {inside['gen_s']['calibrated'] * 1e3:.1f} ms "
        f"calibrated (gap {gap * 1e3:.1f} ms); time inside the attention function "
        f"{inside['attention_s']['vanilla'] * 1e3:.1f} ms vs {inside['attention_s']['calibrated'] * 1e3:.1f} ms "
        f"(gap {in_attn * 1e3:.1f} ms"
        f"{f', {in_attn / gap:.0%} of the generate gap' if gap > 0 else ''}). Per call:",
        "",
        itable,
        "",
        f"Prefix-attention curve (mean T→R attention mass per layer) for {QUESTIONS[0]!r} plus its "
        f"{NEW_TOKENS} vanilla tokens:",
        "",
        curves_md,
    ]
    return "\n".join(md), out


def _build_llava(text: dict, image_size: int, device, dtype, seed: int = 0):
    """An in-memory random LLaVA (LLaMA text model ``text``, tiny CLIP at ``image_size``) wrapped as an LVLM."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from guardalign.attention.calibration import register
    from guardalign.models.lvlm import DEFAULT_CHAT_TEMPLATES, LVLM, ModelInfo

    fx = _fixtures()
    tok = fx.build_tokenizer("llava")
    tok.padding_side = "left"
    n_image = (image_size // 14) ** 2
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=fx._clip_vision(image_size), text_config={"model_type": "llama", **text, **ids},
                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=n_image,
                      vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).to(device, dtype).eval()
    model.set_attn_implementation({"text_config": register()})
    model.generation_config.pad_token_id = tok.pad_token_id
    side = {"height": image_size, "width": image_size}
    improc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=side)
    proc = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    info = ModelInfo(id="random-llava-1b", revision=None, dtype=str(dtype).replace("torch.", ""), family="llava")
    return LVLM(model=model, processor=proc, chat_template=DEFAULT_CHAT_TEMPLATES["llava"], info=info,
                n_layers=text["num_hidden_layers"], context=text["max_position_embeddings"], device=device)


def big(quick: bool, rounds: int) -> tuple[str, dict]:
    """The ~1B LLaVA (or a small one in quick mode): one prompt, batch 1, vanilla vs calibrated vs audit.
    On CPU with 1 intra-op thread: on these shared cores a 2-thread OpenMP region (SDPA's CPU kernel, every GEMM)
    stalls at its barrier whenever another process holds a core, which makes the timings mostly noise."""
    import torch
    from PIL import Image

    from guardalign.attention.calibration import ATTN_IMPL, CalibrationSpec
    from guardalign.models.lvlm import ChatRequest, prepare

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    text, image_size = (TEXT_QUICK, 56) if quick else (TEXT_1B, 336)
    threads0 = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    lv = _build_llava(text, image_size, device, dtype)
    n_params = sum(p.numel() for p in lv.model.model.language_model.parameters()) + lv.model.lm_head.weight.numel()
    t_build = time.perf_counter() - t0
    spec = CalibrationSpec()
    req = ChatRequest(QUESTIONS[1], Image.new("RGB", (image_size, image_size), (200, 40, 40)), PREFIX)
    prep = prepare(lv, [req])
    cfg = _gen_config(lv, NEW_TOKENS)

    def with_impl(impl, s=None, audit=False):
        lv.model.set_attn_implementation({"text_config": impl})
        assert lv.model.model.language_model.layers[0].self_attn.config._attn_implementation == impl
        return _generate(lv, prep, cfg, s, audit)

    variants = {"vanilla": lambda: with_impl("sdpa"), "calibrated": lambda: with_impl(ATTN_IMPL, spec),
                "audit": lambda: with_impl(ATTN_IMPL, spec, True)}
    warm = prepare(lv, [ChatRequest("Hi", None, PREFIX)])
    for impl in ("sdpa", ATTN_IMPL):  # warm-up on a short text-only prompt
        lv.model.set_attn_implementation({"text_config": impl})
        _generate(lv, warm, _gen_config(lv, 2), spec if impl == ATTN_IMPL else None)
    t1 = time.perf_counter()
    times, outs = _interleaved(variants, rounds)
    t_timed = time.perf_counter() - t1
    lv.model.set_attn_implementation({"text_config": ATTN_IMPL})
    start, stop = spec.resolve_layers(lv.n_layers)
    n_len, kv = prep.lengths[0], prep.lengths[0] + NEW_TOKENS // 2
    micro = _attention_micro(text["num_attention_heads"], text["num_key_value_heads"],
                             text["hidden_size"] // text["num_attention_heads"], kv, lv.n_layers, start,
                             prep.positions.instr_start[0], device, dtype)
    mtable, predicted = _micro_md(micro, lv.n_layers, stop - start, NEW_TOKENS - 1)
    t1 = time.perf_counter()
    curves_md, curves = _curves_md(lv, req, prep, outs["vanilla"][0], spec)
    t_curves = time.perf_counter() - t1
    threads = torch.get_num_threads()
    torch.set_num_threads(threads0)
    res = {"ratio": min(times["calibrated"]) / min(times["vanilla"]),
           "ratio_audit": min(times["audit"]) / min(times["vanilla"]),
           "times": times, "micro": micro, "predicted_overhead_s": predicted, "curves": curves,
           "params": n_params, "prompt_tokens": n_len, "threads": threads}
    del lv
    title = "Small LLaVA (quick mode)" if quick else "LLaVA with a ~1B language model (TinyLlama-1.1B shape)"
    diff = min(times["calibrated"]) - min(times["vanilla"])
    md = [
        f"### {title}",
        "",
        f"Random weights; LLaMA hidden {text['hidden_size']}, MLP {text['intermediate_size']}, "
        f"{text['num_hidden_layers']} layers (calibrated: {start}–{stop - 1}), {text['num_attention_heads']} heads / "
        f"{text['num_key_value_heads']} KV heads, vocab {text['vocab_size']}: {n_params / 1e9:.3f} B parameters "
        f"(LM + head); tiny CLIP at {image_size} px → {(image_size // 14) ** 2} image tokens; "
        f"{str(dtype).replace('torch.', '')} on {device.type}"
        f"{f', {threads} intra-op thread' + ('s' if threads > 1 else '') if device.type == 'cpu' else ''}. "
        f"Prompt {n_len} tokens (R = {prep.positions.prefix[0]}, T from {prep.positions.instr_start[0]}), "
        f"batch 1, {NEW_TOKENS} new tokens, greedy, {rounds} interleaved rounds after a short warm-up "
        f"(timed runs: {t_timed:.0f} s). Model built in {t_build:.0f} s; vanilla = the same weights with the text "
        "attention switched to `sdpa` (`set_attn_implementation`).",
        "",
        _timing_table(times),
        "",
        f"Attention call cost at the decode shape (kv {kv}), best of 5 × 100 calls:",
        "",
        mtable,
        "",
        f"Predicted calibration overhead from these per-call costs: {predicted * 1e3:+.1f} ms per generate "
        f"({NEW_TOKENS - 1} decode steps, audit off); measured best-vs-best difference {diff * 1e3:+.0f} ms "
        f"({diff / min(times['vanilla']):+.1%}).",
        "",
        f"Prefix-attention curve for {req.question!r} plus its {NEW_TOKENS} vanilla tokens "
        f"(two full forward passes, {t_curves:.0f} s):",
        "",
        curves_md,
    ]
    return "\n".join(md), res


def run(quick: bool = False) -> dict:
    t0 = time.perf_counter()
    tiny_md, tiny_res = tiny(rounds=5 if quick else 20)
    big_md, big_res = big(quick, rounds=2 if quick else 4)
    rows = [[f"tiny LLaVA, 3 prompts × batch 1, {n} thread{'s' if n > 1 else ''}", f"{r['ratio']:.3f}",
             f"{r['ratio_audit']:.3f}", "≤ 1.10"] for n, r in tiny_res["threads"].items()]
    rows.append([f"{'small LLaVA (quick)' if quick else 'LLaVA, ~1B LM'}, batch 1, {big_res['threads']} thread"
                 f"{'s' if big_res['threads'] > 1 else ''}", f"{big_res['ratio']:.3f}", f"{big_res['ratio_audit']:.3f}",
                 "≤ 1.10"])
    md = "\n".join([
        "## Calibrated answer generation (issue 5)",
        "",
        f"{machine()}. Bench wall time {time.perf_counter() - t0:.0f} s{' (quick mode)' if quick else ''}.",
        "",
        "Generation time of `model.generate` with guardalign's calibrated attention (mode `scale`, γ 0.5, layers "
        "[L/4, 3L/4), audit off) ÷ the same model with plain `sdpa`; same prompts, greedy, exactly "
        f"{NEW_TOKENS} new tokens (`min_new_tokens`), one process, runs interleaved with the order rotating each "
        "round. Ratios are best ÷ best; the tables below also give medians and the median of per-round ratios. "
        "The 2 cores are shared with other jobs, so best-of is the least noisy estimate.",
        "",
        table(["model", "calibrated ÷ vanilla", "audit on ÷ vanilla", "target"], rows),
        "",
        tiny_md,
        "",
        big_md,
    ])
    write_section("answer", md)
    print(md)
    return {"tiny": tiny_res, "big": big_res}
