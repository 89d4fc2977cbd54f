"""The probe's model side on tiny random models of every family, saved and loaded through ``load_lvlm``.

Each measurement is checked against an independent computation written here: transformers' own
``output_hidden_states`` → final norm → LM head → rank (the logit lens), mean-pooled hidden states (cosine),
``output_attentions`` of an eager-attention copy (attention mass), and the model's real logits under calibration.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from guardalign.attention.calibration import CalibrationSpec, calibrating
from guardalign.attention.probe import PROBE_IMPL, register_probe
from guardalign.models.lvlm import ChatRequest, load_lvlm
from guardalign.models.probe_forward import (
    SPANS, prepare_chat, probe_attention_on, refusal_tokens, run_form, text_parts,
)
from lvlm_fixtures import FAMILIES, make_tiny_lvlm

WORDS = ("Sorry", "I", "cannot")
CAPTION = "a cat sitting on a red mat"
TEMPLATE_HEAD = "Describe this scene: "


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-lvlm")
    return {f: make_tiny_lvlm(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(model_dirs):
    return {f: load_lvlm(str(p), device="cpu", attn_implementation=register_probe()) for f, p in model_dirs.items()}


def _image(size=(40, 30), colour=(200, 30, 30)):
    return Image.new("RGB", size, colour)


def _forms(lv, image=None, caption=CAPTION):
    img = prepare_chat(lv, [ChatRequest("Describe this image.", image or _image(), "")])
    text = prepare_chat(lv, [ChatRequest(TEMPLATE_HEAD + caption, None, "")],
                        [(len(TEMPLATE_HEAD), len(TEMPLATE_HEAD) + len(caption))], alone=[caption])
    return img, text


def _hidden_states(lv, inputs):
    """transformers' hidden states of decoder layers 0..L-1 (the last one after the final norm), the way a
    user would get them; Mllama's skipped cross-attention layers (no image) repeat the previous state."""
    with torch.inference_mode():
        out = lv.model(**inputs, output_hidden_states=True, use_cache=False)
    states = list(out.hidden_states[1:])
    if len(states) < lv.n_layers:  # Mllama without an image: cross-attention layers did not run
        cross = set(lv.model.config.get_text_config().cross_attention_layers)
        it = iter(states)
        states, prev = [], None
        for i in range(lv.n_layers):
            prev = prev if i in cross else next(it)
            states.append(prev)
    assert len(states) == lv.n_layers
    return states, out.logits


def _reference_ranks(lv, states, ids, lens):
    _, _, norm, head = text_parts(lv.model)
    ranks = []
    with torch.inference_mode():
        for layer, h in enumerate(states):
            last = h[:, -1]
            if lens == "standard" and layer < lv.n_layers - 1:  # the last state is already normed
                last = norm(last)
            logits = last @ head.weight.T
            ranks.append([[1 + int((logits[b] > logits[b, i]).sum()) for i in ids] for b in range(len(logits))])
    return torch.tensor(ranks).permute(1, 0, 2)  # (B, L, n)


@pytest.mark.parametrize("lens", ["standard", "raw"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_ranks_match_hidden_states(loaded, family, lens):
    lv = loaded[family]
    ids = [t.id for t in refusal_tokens(lv.tokenizer, WORDS)]
    for form in _forms(lv):
        got = run_form(lv, form, ids, lens=lens)
        states, logits = _hidden_states(lv, {k: v for k, v in form.inputs.items()})
        assert torch.equal(got.ranks, _reference_ranks(lv, states, ids, lens))
        assert torch.equal(got.top1[:, -1], logits[:, -1].argmax(-1))  # the last layer is the model's own output


@pytest.mark.parametrize("family", FAMILIES)
def test_cosine_and_pooling_match_a_hand_computation(loaded, family):
    from guardalign.attention.probe import cosine

    lv = loaded[family]
    img_form, text_form = _forms(lv)
    ids = [refusal_tokens(lv.tokenizer, WORDS)[0].id]
    img, text = run_form(lv, img_form, ids), run_form(lv, text_form, ids)
    got = cosine(img.pooled[0], text.pooled[1])  # (L,): image form vs the caption row
    img_states, _ = _hidden_states(lv, img_form.inputs)
    where = (img_form.inputs["input_ids"][0] == lv.model.config.image_token_id).nonzero().flatten().tolist()
    assert where and len(where) == int(img_form.pool[0].sum())
    bos = lv.tokenizer.bos_token  # the caption fed alone: BOS (when the tokenizer has one), then the caption
    enc = lv.tokenizer((bos or "") + CAPTION, add_special_tokens=False, return_tensors="pt")
    cap_states, _ = _hidden_states(lv, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    special = set(lv.tokenizer.all_special_ids)
    keep = [i for i, t in enumerate(enc["input_ids"][0].tolist()) if t not in special]
    for layer in range(lv.n_layers):
        a = img_states[layer][0, where].mean(0)
        b = cap_states[layer][0, keep].mean(0)
        want = float(a @ b / (a.norm() * b.norm()))
        assert got[layer].item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mass_matches_eager_output_attentions(model_dirs, loaded, family):
    lv = loaded[family]
    eager = load_lvlm(str(model_dirs[family]), device="cpu", attn_implementation="eager")
    ids = [refusal_tokens(lv.tokenizer, WORDS)[0].id]
    for form in _forms(lv):
        got = run_form(lv, form, ids).mass
        with torch.inference_mode():
            att = eager.model(**form.inputs, output_attentions=True, use_cache=False).attentions
        self_layers = [i for i, layer in enumerate(text_parts(lv.model)[1]) if hasattr(layer, "self_attn")]
        assert torch.isnan(got[:, [i for i in range(lv.n_layers) if i not in self_layers]]).all()
        by_layer = dict(zip(self_layers, [a for a in att if a.shape[-1] == a.shape[-2]]))
        for layer in self_layers:
            last = by_layer[layer][:, :, -1, :]  # (B, H, S)
            want = torch.einsum("bhs,bsn->bn", last, form.spans) / last.shape[1]
            assert torch.allclose(got[:, layer], want, atol=1e-5), (family, layer)
    assert form.spans[0, :, SPANS.index("caption")].sum() > 0  # the text form has a caption span


def test_calibrated_form_is_the_model_under_calibration(loaded):
    lv = loaded["llava"]
    ids = [t.id for t in refusal_tokens(lv.tokenizer, WORDS)]
    form = prepare_chat(lv, [ChatRequest("Describe this image.", _image(), "If unsafe, refuse to answer.")])
    spec = CalibrationSpec(mode="scale", gamma=8.0)
    hot, plain = run_form(lv, form, ids, spec=spec), run_form(lv, form, ids)
    with torch.inference_mode(), calibrating(spec, form.positions, lv.n_layers, audit=False):
        logits = lv.model(**form.inputs, use_cache=False).logits[:, -1]
    want = [[1 + int((logits[0] > logits[0, i]).sum()) for i in ids]]
    assert hot.ranks[:, -1].tolist() == want
    assert not torch.equal(hot.mass, plain.mass)  # calibration reached the measured attention too
    mid = slice(*spec.resolve_layers(lv.n_layers))
    assert (hot.mass[0, mid, SPANS.index("prefix")] > plain.mass[0, mid, SPANS.index("prefix")]).all()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("lens", ["standard", "raw"])
def test_planted_layer_makes_sorry_top1_from_layer_k(model_dirs, k, lens):
    """Layer k's MLP gets a bias along "Sorry"'s LM-head row: the lens must report first top-1 at layer k."""
    lv = load_lvlm(str(model_dirs["llava"]), device="cpu", attn_implementation=register_probe())
    sorry = refusal_tokens(lv.tokenizer, ["Sorry"])[0].id
    _, layers, norm, head = text_parts(lv.model)
    before = [run_form(lv, f, [sorry], lens=lens).ranks[0, :, 0].tolist() for f in _forms(lv)]
    assert all(min(r[: k + 1]) > 1 for r in before)  # unplanted, "Sorry" is not top-1 up to layer k
    u = head.weight[sorry] / norm.weight
    layers[k].mlp.down_proj.bias = torch.nn.Parameter(1e3 * u / u.norm())
    for form in _forms(lv):
        ranks = run_form(lv, form, [sorry], lens=lens).ranks[0, :, 0].tolist()
        assert ranks[k:] == [1] * (lv.n_layers - k) and min(ranks[:k]) > 1, ranks


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "mllama"])
def test_results_do_not_depend_on_batching_or_padding(loaded, family):
    lv = loaded[family]
    ids = [t.id for t in refusal_tokens(lv.tokenizer, WORDS)]
    images = [_image((40, 30)), _image((30, 60), (10, 200, 40)), _image((64, 20), (90, 90, 250))]
    captions = ["a cat", "the red mat next to a blue door", "a helpful assistant"]

    def batch(idx):
        img = prepare_chat(lv, [ChatRequest("Describe this image.", images[i], "") for i in idx])
        qs = [TEMPLATE_HEAD + captions[i] for i in idx]
        text = prepare_chat(lv, [ChatRequest(q, None, "") for q in qs],
                            [(len(TEMPLATE_HEAD), len(q)) for q in qs], alone=[captions[i] for i in idx])
        return run_form(lv, img, ids), run_form(lv, text, ids)

    together = batch([0, 1, 2])
    assert together[1].pooled.shape[0] == 6
    for i in range(3):
        alone = batch([i])
        for whole, single, rows in ((together[0], alone[0], ([i], [0])), (together[1], alone[1], ([i, 3 + i], [0, 1]))):
            assert torch.equal(whole.ranks[rows[0]], single.ranks[rows[1]])
            assert torch.allclose(whole.pooled[rows[0]], single.pooled[rows[1]], atol=1e-4)
            assert torch.allclose(whole.mass[rows[0]], single.mass[rows[1]], atol=1e-5, equal_nan=True)


def test_memory_per_pair_is_o_layers(loaded):
    """What a forward pass keeps per row does not grow with the sequence; no hook outlives the call."""
    lv = loaded["llava"]
    ids = [t.id for t in refusal_tokens(lv.tokenizer, WORDS)]
    layers_ = text_parts(lv.model)[1]
    hooks_before = [len(layer._forward_hooks) for layer in layers_]
    sizes = []
    for caption in ("a cat", " ".join(["a cat on a red mat next to a blue door"] * 20)):
        _, text = _forms(lv, caption=caption)
        res = run_form(lv, text, ids)
        assert text.inputs["input_ids"].shape[1] > 0
        sizes.append({k: tuple(getattr(res, k).shape) for k in ("ranks", "top1", "pooled", "mass")})
    rows, n, d = 2, len(ids), lv.model.config.get_text_config().hidden_size
    layers = lv.n_layers
    assert sizes[0] == sizes[1] == {"ranks": (rows, layers, n), "top1": (rows, layers), "pooled": (rows, layers, d),
                                    "mass": (rows, layers, len(SPANS))}
    assert [len(layer._forward_hooks) for layer in layers_] == hooks_before


def test_probe_attention_on_switches_and_restores(model_dirs):
    lv = load_lvlm(str(model_dirs["qwen2_vl"]), device="cpu")  # loaded for answer: calibrated attention
    before = lv.model.config.get_text_config()._attn_implementation
    assert before != PROBE_IMPL
    with probe_attention_on(lv):
        assert lv.model.config.get_text_config()._attn_implementation == PROBE_IMPL
        res = run_form(lv, _forms(lv)[0], [refusal_tokens(lv.tokenizer, WORDS)[0].id])
    assert not torch.isnan(res.mass).all()
    assert lv.model.config.get_text_config()._attn_implementation == before


def test_refusal_tokens_with_and_without_space(loaded):
    tok = loaded["llava"].tokenizer
    got = refusal_tokens(tok, ["I", "Sorry", "I"])
    assert [(t.word, t.text) for t in got] == [("I", "I"), ("I", " I"), ("Sorry", "Sorry")]  # " Sorry" → bare " "
    for t in got:
        assert t.id == tok(t.text, add_special_tokens=False)["input_ids"][0] and t.token == tok.decode([t.id])
    with pytest.raises(ValueError, match="no refusal token"):
        refusal_tokens(tok, [" "])


def test_spans_with_a_prefix_in_the_user_turn_and_in_the_response(loaded):
    lv = loaded["qwen2_vl"]
    for at in ("user", "response"):
        form = prepare_chat(lv, [ChatRequest("Describe this image.", _image(), "Be safe.", at)])
        ids = form.inputs["input_ids"][0].tolist()
        spans = {name: form.spans[0, :, i].nonzero().flatten().tolist() for i, name in enumerate(SPANS)}
        decoded = {k: lv.tokenizer.decode([ids[j] for j in v]) for k, v in spans.items() if k != "image"}
        assert decoded["prefix"].strip() == "Be safe." and decoded["text"].strip() == "Describe this image."
        assert all(ids[j] == lv.model.config.image_token_id for j in spans["image"]) and spans["image"]
        assert form.pool[0].tolist() == form.spans[0, :, 0].bool().tolist()
        r0, r1 = form.positions.prefix[0]
        assert list(range(r0, r1)) == spans["prefix"]
        if at == "response":  # the prefix starts the answer: the last position is its last token
            assert spans["prefix"][-1] == len(ids) - 1 and spans["prefix"][0] > spans["text"][-1]
        else:
            assert spans["prefix"][-1] < spans["text"][0] and form.positions.instr_start[0] == r1
