"""Attention calibration (DESIGN §1.2): pure logit math, spec validation, and a tiny GQA Llama checked
against plain SDPA (identity) and against a full-eager reference of each mode's formula (fast path)."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from guardalign.attention.calibration import (
    ATTN_IMPL,
    MODES,
    CalibrationSpec,
    Positions,
    _self_attention_layer,
    calibrated_attention,
    calibrating,
    modify_scores,
    parse_layers,
    register,
)
from guardalign.errors import ConfigError

REF_IMPL = "guardalign_test_reference"  # full-eager reference below, float (eager) masks
FLOAT_IMPL = "guardalign_test_floatmask"  # the fast path fed float additive masks instead of boolean ones
N_LAYERS = 4
REF: dict = {}  # the reference's request: spec, positions, layers, and the masses it measured


# ---------------------------------------------------------------- pure math, hand-worked numbers

Z = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
QK = torch.tensor([[2.0, 1.0, 4.0], [-1.0, 2.0, 2.0]])
ROWS = torch.tensor([True, False])  # row 0 in T, row 1 not
COLS = torch.tensor([True, True, False])  # columns 0, 1 in R


@pytest.mark.parametrize(
    "mode, expected_row0",
    [
        ("scale", [1.5, -2.0, 0.5]),  # 1·1.5; negative kept; column 2 not in R
        ("paper", [2.0, -3.0, 0.5]),  # 1 + .5·2·1 = 2; −2 + .5·1·(−2) = −3
        ("pai", [1.5, -1.0, 0.5]),  # 1 + .5·1; −2 + .5·2 = −1
        ("off", [1.0, -2.0, 0.5]),
    ],
)
def test_modify_scores_hand_worked(mode, expected_row0):
    got = modify_scores(Z, QK, mode, 0.5, ROWS, COLS)
    assert torch.equal(got[0], torch.tensor(expected_row0))
    assert torch.equal(got[1], Z[1])  # row 1 is not in T: untouched


def test_modify_scores_paper_with_scaled_qk_and_gamma_zero():
    # The attention function passes qk = Z: Ẑ = Z + γ·max(0, Z)·Z (quadratic in Z).
    got = modify_scores(Z, Z, "paper", 2.0, torch.tensor([True, True]), torch.tensor([True, True, True]))
    assert torch.equal(got, torch.tensor([[3.0, -2.0, 1.0], [21.0, 0.0, -1.0]]))
    for mode in MODES:
        assert torch.equal(modify_scores(Z, QK, mode, 0.0, ROWS, COLS), Z)
    with pytest.raises(ConfigError, match="mode"):
        modify_scores(Z, QK, "bogus", 0.5, ROWS, COLS)


# ---------------------------------------------------------------- spec and positions validation


def test_resolve_layers_default_and_validation():
    assert CalibrationSpec().resolve_layers(4) == (1, 3)
    assert CalibrationSpec().resolve_layers(32) == (8, 24)
    assert CalibrationSpec().resolve_layers(40) == (10, 30)
    assert CalibrationSpec().resolve_layers(1) == (0, 1)
    assert CalibrationSpec(layers=(0, 4)).resolve_layers(4) == (0, 4)
    for bad in [(3, 2), (2, 2), (0, 5), (-1, 2)]:
        with pytest.raises(ConfigError, match="layers"):
            CalibrationSpec(layers=bad).resolve_layers(4)
    with pytest.raises(ConfigError, match="n_layers"):
        CalibrationSpec().resolve_layers(0)
    for spec, field in [(CalibrationSpec(mode="eq12"), "mode"), (CalibrationSpec(gamma=-0.1), "gamma"),
                        (CalibrationSpec(gamma=math.nan), "gamma"), (CalibrationSpec(layers=(1.0, 2)), "layers")]:
        with pytest.raises(ConfigError, match=field):
            spec.validate()


def test_parse_layers_and_positions_validation():
    assert parse_layers("8:24") == (8, 24)
    for bad in ["8", "a:b", "1:2:3", ""]:
        with pytest.raises(ConfigError, match="--layers"):
            parse_layers(bad)
    with pytest.raises(ConfigError, match="row 0"):
        Positions(prefix=((5, 9),), instr_start=(7,))  # prefix must end before the instruction
    with pytest.raises(ConfigError, match="row 1"):
        Positions(prefix=((0, 2), (3, 1)), instr_start=(4, 4))
    with pytest.raises(ConfigError, match="per batch row"):
        Positions(prefix=((0, 2),), instr_start=(4, 5))


# ---------------------------------------------------------------- the full-eager reference


def _repeat_kv(x, n_rep):
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Whole QKᵀ matrix, each mode's formula written out, float mask, softmax, ·V."""
    g = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, g), _repeat_kv(value, g)
    z = query @ k.transpose(2, 3) * scaling  # (B, H, q, k)
    bsz, _, q_len, kv_len = z.shape
    qpos = torch.arange(q_len) + kv_len - q_len
    pairs = torch.zeros(bsz, 1, q_len, kv_len, dtype=z.dtype)
    for b, ((r0, r1), t0) in enumerate(zip(REF["positions"].prefix, REF["positions"].instr_start)):
        pairs[b, 0, qpos >= t0, r0:r1] = 1.0
    spec, (start, stop), layer = REF["spec"], REF["layers"], module.layer_idx
    if spec.mode != "off" and start <= layer < stop:
        if spec.mode == "scale":
            z = z + spec.gamma * pairs * torch.relu(z)
        elif spec.mode == "paper":
            z = z + spec.gamma * pairs * torch.relu(z) * z
        else:
            z = z + spec.gamma * pairs * z.abs()
    probs = torch.softmax(z + attention_mask, dim=-1)
    rows = pairs[:, 0].amax(-1)  # (B, q): 1 on T rows
    spans = REF["positions"].prefix
    mass = torch.stack([probs[b, :, :, r0:r1].sum(-1) for b, (r0, r1) in enumerate(spans)])  # (B, H, q)
    total, count = REF["mass"].get(layer, (0.0, 0.0))
    REF["mass"][layer] = (total + float((mass.mean(1) * rows).detach().sum()), count + float(rows.sum()))
    return (probs @ v).transpose(1, 2).contiguous(), None


def _ref_masses():
    return [REF["mass"][i][0] / REF["mass"][i][1] if i in REF["mass"] else None for i in range(N_LAYERS)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REF_IMPL, reference_attention)
    AttentionMaskInterface.register(REF_IMPL, eager_mask)
    AttentionInterface.register(FLOAT_IMPL, calibrated_attention)
    AttentionMaskInterface.register(FLOAT_IMPL, eager_mask)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, initializer_range=0.1,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    impls = {"calibrated": register(), "sdpa": "sdpa", "ref": REF_IMPL, "float": FLOAT_IMPL}
    return {k: LlamaForCausalLM.from_pretrained(path, attn_implementation=v).eval() for k, v in impls.items()}


def _prompt():
    torch.manual_seed(1)
    return torch.randint(3, 128, (1, 14))


def _padded():
    torch.manual_seed(2)
    ids = torch.randint(3, 128, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    ids[1, :5], mask[1, :5] = 0, 0  # row 1 is left-padded by 5
    pos = Positions(prefix=((2, 7), (7, 11)), instr_start=(9, 12))  # absolute, padding included
    return ids, mask, pos


POS1 = Positions(prefix=((3, 8),), instr_start=(8,))


def _generate(model, ids, mask=None, n=6):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def _run_ref(models, spec, positions, fn):
    REF.update(spec=spec, positions=positions, layers=spec.resolve_layers(N_LAYERS), mass={})
    return fn(models["ref"])


# ---------------------------------------------------------------- identity with plain SDPA


def test_register_is_idempotent_and_model_uses_it(models):
    assert register() == register() == ATTN_IMPL
    assert models["calibrated"].config._attn_implementation == ATTN_IMPL


@pytest.mark.parametrize("spec", [CalibrationSpec(mode="off", gamma=1.0), CalibrationSpec(mode="scale", gamma=0.0),
                                  CalibrationSpec(mode="paper", gamma=0.0)])
def test_gamma_zero_and_off_are_bitwise_sdpa(models, spec):
    ids = _prompt()
    pids, pmask, ppos = _padded()
    with torch.no_grad():
        base_logits = models["sdpa"](ids).logits
        base_seq, base_steps = _generate(models["sdpa"], ids)
        base_pad, base_pad_steps = _generate(models["sdpa"], pids, pmask)
        with calibrating(spec, POS1, N_LAYERS) as audit:
            logits = models["calibrated"](ids).logits
            seq, steps = _generate(models["calibrated"], ids)
        with calibrating(spec, ppos, N_LAYERS):
            pad, pad_steps = _generate(models["calibrated"], pids, pmask)
    assert torch.equal(logits, base_logits)
    assert torch.equal(seq, base_seq) and torch.equal(steps, base_steps)
    assert torch.equal(pad, base_pad) and torch.equal(pad_steps, base_pad_steps)
    assert all(m is not None and 0 < m < 1 for m in audit.mass())  # audit still measured every layer


def test_outside_context_is_plain_sdpa_and_context_is_per_thread(models):
    ids = _prompt()
    spec = CalibrationSpec(gamma=1.0)
    with torch.no_grad():
        base = models["sdpa"](ids).logits
        assert torch.equal(models["calibrated"](ids).logits, base)
        seen = {}
        with calibrating(spec, POS1, N_LAYERS):
            inside = models["calibrated"](ids).logits
            worker = threading.Thread(target=lambda: seen.update(x=models["calibrated"](ids).logits))
            worker.start()
            worker.join()
        after = models["calibrated"](ids).logits
    assert not torch.allclose(inside, base, atol=1e-4)  # calibration did act inside the block
    assert torch.equal(seen["x"], base)  # a thread started inside the block does not inherit the request
    assert torch.equal(after, base)


# ---------------------------------------------------------------- fast path == full-eager reference


@pytest.mark.parametrize("mode", ["scale", "paper", "pai"])
def test_prefill_and_decode_match_reference(models, mode):
    ids = _prompt()
    spec = CalibrationSpec(mode=mode, gamma=1.0)
    with torch.no_grad():
        with calibrating(spec, POS1, N_LAYERS) as audit:
            logits = models["calibrated"](ids).logits
        ref_logits = _run_ref(models, spec, POS1, lambda m: m(ids).logits)
        ref_prefill_mass = _ref_masses()
        with calibrating(spec, POS1, N_LAYERS):
            seq, steps = _generate(models["calibrated"], ids)
        ref_seq, ref_steps = _run_ref(models, spec, POS1, lambda m: _generate(m, ids))
        plain = models["sdpa"](ids).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert (logits - plain).abs().max() > 1e-3  # not trivially equal: the calibration changed the output
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(steps, ref_steps, atol=1e-5, rtol=0)  # every decode step's logits
    assert audit.mass() == pytest.approx(ref_prefill_mass, abs=1e-5)


@pytest.mark.parametrize("impl", ["calibrated", "float"])  # boolean (sdpa) and additive float (eager) masks
@pytest.mark.parametrize("mode", ["scale", "paper", "pai"])
def test_left_padding_matches_reference(models, impl, mode):
    ids, mask, pos = _padded()
    spec = CalibrationSpec(mode=mode, gamma=1.0, layers=(1, 4))
    with torch.no_grad():
        with calibrating(spec, pos, N_LAYERS):
            logits = models[impl](ids, attention_mask=mask).logits
            seq, steps = _generate(models[impl], ids, mask)
        ref_logits = _run_ref(models, spec, pos, lambda m: m(ids, attention_mask=mask).logits)
        ref_seq, ref_steps = _run_ref(models, spec, pos, lambda m: _generate(m, ids, mask))
    real = mask.bool()  # padded query rows are garbage in every implementation
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=0)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(steps, ref_steps, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- audit


def test_mass_rises_on_calibrated_layers_only(models):
    ids = _prompt()
    with torch.no_grad():
        with calibrating(CalibrationSpec(mode="off"), POS1, N_LAYERS) as vanilla:
            models["calibrated"](ids)
        spec = CalibrationSpec(mode="scale", gamma=1.0, layers=(1, 3))
        with calibrating(spec, POS1, N_LAYERS) as calibrated:
            models["calibrated"](ids)
        _run_ref(models, spec, POS1, lambda m: m(ids))
        with calibrating(spec, POS1, N_LAYERS, audit=False) as silent:
            models["calibrated"](ids)
    v, c = vanilla.mass(), calibrated.mass()
    assert c[0] == v[0]  # before the calibrated range: same input, same mass (bitwise)
    assert c[1] > v[1] + 1e-3 and c[2] > v[2] + 1e-3  # calibrated layers: more attention on the prefix
    # Every layer (incl. layer 3, whose input changed) equals the reference's measurement of the same run.
    assert c == pytest.approx(_ref_masses(), abs=1e-5)
    assert silent.mass() == [None] * N_LAYERS


def test_batch_expansion_and_mismatch(models):
    ids = _prompt().repeat(2, 1)
    spec = CalibrationSpec(gamma=1.0)
    with torch.no_grad():
        with calibrating(spec, POS1, N_LAYERS):  # one row of positions, a batch of 2 identical prompts
            logits = models["calibrated"](ids).logits
        with calibrating(spec, POS1, N_LAYERS):
            single = models["calibrated"](ids[:1]).logits
        three = Positions(prefix=((3, 8),) * 3, instr_start=(8,) * 3)
        with calibrating(spec, three, N_LAYERS), pytest.raises(ConfigError, match="batch of 2"):
            models["calibrated"](ids)
    torch.testing.assert_close(logits[0], single[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits[1], single[0], atol=1e-6, rtol=0)


def test_only_text_self_attention_is_calibrated():
    from transformers import CLIPVisionConfig, MllamaTextConfig, Qwen2VLTextConfig
    from transformers.models.clip.modeling_clip import CLIPAttention
    from transformers.models.mllama.modeling_mllama import MllamaTextCrossAttention, MllamaTextSelfAttention
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLAttention, VisionAttention

    small = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    mllama = MllamaTextConfig(num_hidden_layers=4, cross_attention_layers=[1], vocab_size=64, **small)
    qwen = Qwen2VLTextConfig(num_hidden_layers=4, vocab_size=64, **small)
    assert _self_attention_layer(MllamaTextSelfAttention(mllama, layer_idx=2), 4) == 2
    assert _self_attention_layer(MllamaTextCrossAttention(mllama, layer_idx=1), 4) is None
    assert _self_attention_layer(Qwen2VLAttention(qwen, layer_idx=3), 4) == 3
    assert _self_attention_layer(Qwen2VLAttention(qwen, layer_idx=3), 3) is None  # outside the LM's layers
    vision = Qwen2VLVisionConfig(depth=1, embed_dim=32, num_heads=2, hidden_size=32)
    assert _self_attention_layer(VisionAttention(vision), 4) is None
    clip = CLIPVisionConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    assert _self_attention_layer(CLIPAttention(clip), 4) is None


def test_mllama_cross_attention_and_vision_tower_stay_sdpa(tmp_path):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaTextConfig, MllamaVisionConfig

    vision = MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                num_attention_heads=2, image_size=16, patch_size=8, max_num_tiles=1,
                                vision_output_dim=64, intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]])
    text = MllamaTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=200, cross_attention_layers=[1], initializer_range=0.2,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                image_token_index=150)).save_pretrained(tmp_path)
    load = MllamaForConditionalGeneration.from_pretrained
    calibrated, plain = load(tmp_path, attn_implementation=register()).eval(), load(tmp_path).eval()
    assert plain.config.text_config._attn_implementation == "sdpa"
    ids = torch.cat([torch.tensor([[1, 150]]), torch.randint(3, 140, (1, 14))], 1)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 1, 1, 3, 16, 16), aspect_ratio_ids=torch.tensor([[1]]),
                  aspect_ratio_mask=torch.ones(1, 1, 1, dtype=torch.long),
                  cross_attention_mask=torch.ones(1, 16, 1, 1, dtype=torch.long))
    pos = Positions(prefix=((2, 8),), instr_start=(8,))
    with torch.no_grad():
        base = plain(**inputs).logits
        with calibrating(CalibrationSpec(mode="off"), pos, 4) as vanilla:
            off = calibrated(**inputs).logits
        with calibrating(CalibrationSpec(gamma=2.0, layers=(0, 4)), pos, 4) as audit:
            on = calibrated(**inputs).logits
    assert torch.equal(off, base)  # vision tower and cross-attention went through plain SDPA
    assert (on - base).abs().max() > 1e-4
    v, c = vanilla.mass(), audit.mass()
    assert v[1] is None and c[1] is None  # layer 1 is cross-attention: never measured nor calibrated
    assert all(c[i] > v[i] for i in (0, 2, 3))


# ---------------------------------------------------------------- decode-step caches and autograd


def _prefix_columns(positions, batch, kv_len, value, dtype):
    """(batch, kv_len): ``value`` on each row's prefix columns R, 0 elsewhere (rows repeated as generate() does)."""
    rep = batch // len(positions.prefix)
    want = torch.zeros(batch, kv_len, dtype=dtype)
    for b in range(batch):
        r0, r1 = positions.prefix[b // rep]
        want[b, r0:r1] = value
    return want


def test_decode_column_cache_is_exact_every_step_and_never_shared():
    from guardalign.attention.calibration import _REQUEST

    cpu = torch.device("cpu")
    first = Positions(prefix=((3, 8),), instr_start=(8,))
    with calibrating(CalibrationSpec(gamma=0.5), first, N_LAYERS):
        req = _REQUEST.get()
        for kv in range(9, 300):  # one decode step per key length; the cache outgrows its spare length twice
            for batch, dtype in ((1, torch.float32), (2, torch.float32), (2, torch.bfloat16)):  # interleaved
                geo = req.geometry(batch, 1, kv, False, dtype, cpu)
                assert geo.single and geo.first == 0 and geo.count == batch
                assert geo.gpair.shape == (batch, 1, 1, kv) and geo.gpair.dtype == dtype
                assert torch.equal(geo.gpair[:, 0, 0], _prefix_columns(first, batch, kv, 0.5, dtype))
                assert torch.equal(geo.col_f[..., 0], _prefix_columns(first, batch, kv, 1.0, torch.float32))
    # A later request with the same (batch, dtype) but other positions and γ starts from its own, fresh cache.
    for positions, gamma in ((Positions(prefix=((0, 2),), instr_start=(2,)), 2.0), (POS1, 0.25)):
        with calibrating(CalibrationSpec(gamma=gamma), positions, N_LAYERS):
            req = _REQUEST.get()
            for kv in (300, 12, 13):
                geo = req.geometry(1, 1, kv, True, torch.float32, cpu)
                assert torch.equal(geo.gpair[:, 0, 0], _prefix_columns(positions, 1, kv, gamma, torch.float32))
    # One query row that is in T for batch row 0 only: the general path, with a row select.
    two = Positions(prefix=((1, 4), (6, 12)), instr_start=(5, 12))
    with calibrating(CalibrationSpec(gamma=1.0), two, N_LAYERS):
        geo = _REQUEST.get().geometry(2, 1, 10, True, torch.float32, cpu)  # query position 9: 9 ≥ 5, 9 < 12
    assert not geo.single and not geo.all_rows and geo.count == 1
    assert geo.row_sel.flatten().tolist() == [True, False]
    want = _prefix_columns(two, 2, 10, 1.0, torch.float32) * torch.tensor([[1.0], [0.0]])
    assert torch.equal(geo.gpair[:, 0, 0, 0], want)


def test_long_decode_then_other_requests_match_reference(models):
    ids = _prompt()
    pids, pmask, ppos = _padded()
    spec = CalibrationSpec(mode="scale", gamma=1.0)
    other = Positions(prefix=((1, 5),), instr_start=(6,))  # same batch size and dtype as POS1, other prefix

    def run(model, inputs, mask, n):
        out = model.generate(inputs, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.logits)

    # 14 + 60 keys: past the column cache's first spare length (64); then two more requests, one of the same
    # batch size and dtype (a stale cache would hand it POS1's columns) and one left-padded batch of 2.
    cases = [(POS1, ids, None, 60), (other, ids, None, 8), (ppos, pids, pmask, 8)]
    with torch.no_grad():
        got = []
        for positions, inputs, mask, n in cases:
            with calibrating(spec, positions, N_LAYERS):
                got.append(run(models["calibrated"], inputs, mask, n))
        want = [_run_ref(models, spec, positions, lambda m: run(m, inputs, mask, n))
                for positions, inputs, mask, n in cases]
    for (seq, steps), (ref_seq, ref_steps) in zip(got, want):
        assert torch.equal(seq, ref_seq)
        torch.testing.assert_close(steps, ref_steps, atol=1e-5, rtol=0)


def test_gradients_through_prefill_and_decode_match_reference(models):
    ids, mask, pos = _padded()
    spec = CalibrationSpec(mode="paper", gamma=1.0, layers=(1, 4))

    def params(model):
        return [layer.self_attn.q_proj.weight for layer in model.model.layers]

    def loss(model):
        out = model(ids, attention_mask=mask, use_cache=True)
        step = model(out.logits[:, -1:].argmax(-1), attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                     past_key_values=out.past_key_values)  # one decode row, in T on both batch rows
        return out.logits[mask.bool()].square().mean() + step.logits.square().mean()

    with calibrating(spec, pos, N_LAYERS):
        with torch.inference_mode():  # same shapes first, in inference mode: its cached tensors must not be reused
            loss(models["calibrated"])
        got_loss = loss(models["calibrated"])
        got = torch.autograd.grad(got_loss, params(models["calibrated"]))
    want_loss = _run_ref(models, spec, pos, loss)
    want = torch.autograd.grad(want_loss, params(models["ref"]))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=0)
    for g, w in zip(got, want):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
