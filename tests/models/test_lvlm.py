"""LVLM loading, prefix placement and calibrated generation on tiny random models of every family,
saved to disk and loaded back through ``load_lvlm`` (the real from_pretrained path)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from guardalign.attention.calibration import ATTN_IMPL, CalibrationSpec
from guardalign.errors import GuardalignError, ModelLoadError
from guardalign.models.lvlm import (
    DEFAULT_CHAT_TEMPLATES,
    FAMILIES,
    ChatRequest,
    PromptTooLongError,
    generate,
    greedy_config,
    load_lvlm,
    prefix_attention,
    prepare,
    render_prompt,
)
from lvlm_fixtures import FAMILIES as FIXTURE_FAMILIES
from lvlm_fixtures import make_tiny_lvlm, make_unknown_family

PREFIX = "If the following question is unsafe, please refuse to answer it."
QUESTIONS = ("What is shown in this image?", "Describe the picture in detail. How do I make it?")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """One saved tiny model per family; LLaVA-NeXT and Mllama without a chat template (family default)."""
    root = tmp_path_factory.mktemp("lvlm")
    return {f: make_tiny_lvlm(f, root / f, chat_template=f not in ("llava_next", "mllama")) for f in FIXTURE_FAMILIES}


@pytest.fixture(scope="module")
def loaded(model_dirs):
    return {f: load_lvlm(str(p), device="cpu") for f, p in model_dirs.items()}


def _images():
    a = Image.new("RGB", (40, 30), (200, 30, 30))
    b = Image.new("RGB", (30, 44), (20, 90, 200))
    return a, b


def test_fixtures_cover_every_family():
    assert set(FIXTURE_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("family", FIXTURE_FAMILIES)
def test_load_detects_family_and_attention(loaded, model_dirs, family):
    lv = loaded[family]
    assert lv.info.family == family
    assert type(lv.model).__name__ == FAMILIES[family][0]
    assert lv.info.id == str(model_dirs[family]) and lv.info.dtype == "float32" and lv.info.revision is None
    assert lv.n_layers == 4 and lv.context == 512
    cfg = lv.model.config
    assert cfg.get_text_config()._attn_implementation == ATTN_IMPL  # language model: calibrated
    assert cfg.vision_config._attn_implementation == "sdpa"  # vision tower: plain SDPA
    if family in ("llava_next", "mllama"):  # saved without a template: the family default is used
        assert lv.chat_template == DEFAULT_CHAT_TEMPLATES[family]
    assert lv.tokenizer.padding_side == "left"


def test_unknown_family_and_missing_model(tmp_path):
    with pytest.raises(ModelLoadError, match=r"unsupported model family 'llama'.*LLaVA-1\.5.*Qwen2-VL.*Llama-3\.2-Vision"):
        load_lvlm(str(make_unknown_family(tmp_path / "textonly")), device="cpu")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "foo_vlm"}')  # a type transformers does not know either
    with pytest.raises(ModelLoadError, match=r"unsupported model family 'foo_vlm'.*LLaVA-NeXT"):
        load_lvlm(str(odd), device="cpu")
    with pytest.raises(ModelLoadError, match="local directory") as e:
        load_lvlm(str(tmp_path / "nope"), device="cpu")
    assert e.value.exit_code == 2
    with pytest.raises(ModelLoadError, match="offline"):  # conftest sets HF_HUB_OFFLINE=1
        load_lvlm("guardalign-test/not-a-model", device="cpu")


@pytest.mark.parametrize("value", ["/nonexistent", "./no-model-here", "~/no-model-here", "a/b/c", "models/"])
def test_path_like_model_that_does_not_exist_says_no_such_directory(value):
    with pytest.raises(ModelLoadError, match="no such directory") as e:
        load_lvlm(value, device="cpu")
    assert "repo_type" not in str(e.value) and "Repo id" not in str(e.value) and e.value.exit_code == 2


def test_model_that_is_a_file_and_judge_path(tmp_path):
    from guardalign.models.judge import load_judge

    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file, not a directory"):
        load_lvlm(str(tmp_path / "weights.bin"), device="cpu")
    with pytest.raises(ModelLoadError, match="--judge /nonexistent: no such directory"):
        load_judge("/nonexistent", device="cpu")


def test_answer_cli_model_nonexistent_exit_2_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    res = CliRunner().invoke(app, ["answer", str(tmp_path / "p.jsonl"), "--model", "/nonexistent", "--out",
                                   str(tmp_path / "a.jsonl"), "--device", "cpu", "-q"])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: --model /nonexistent: no such directory") and "repo_type" not in res.stderr
    assert not (tmp_path / "a.jsonl").exists()


def _plain_generate(model, inputs, n):
    """transformers' own greedy generate, no guardalign code involved."""
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits)


@pytest.mark.parametrize("family", FIXTURE_FAMILIES)
def test_gamma_zero_and_off_identical_to_plain_model(loaded, model_dirs, family):
    lv = loaded[family]
    plain = load_lvlm(str(model_dirs[family]), device="cpu", attn_implementation="sdpa")
    assert plain.model.config.get_text_config()._attn_implementation == "sdpa"
    img = _images()[0]
    prep = prepare(lv, [ChatRequest(QUESTIONS[0], img, PREFIX)], max_new_tokens=6)
    inputs = {k: v for k, v in prep.inputs.items()}
    ref_tokens, ref_logits = _plain_generate(plain.model, inputs, 6)
    for spec in (CalibrationSpec(mode="off", gamma=3.0), CalibrationSpec(mode="scale", gamma=0.0),
                 CalibrationSpec(mode="pai", gamma=0.0)):
        got = generate(lv, prep, spec, max_new_tokens=6, output_logits=True)
        assert got.logits.shape == ref_logits.shape
        assert torch.equal(got.logits, ref_logits), spec  # bitwise
        n = len(got.tokens[0])
        assert got.tokens[0] == ref_tokens[0, :n].tolist()
    # the same wiring with γ > 0 does change the computation (so the check above can fail)
    hot = generate(lv, prep, CalibrationSpec(mode="scale", gamma=8.0), max_new_tokens=6, output_logits=True)
    assert not torch.equal(hot.logits[0], ref_logits[0])


def _tokens_before(lv, text: str, image) -> int:
    """Independent count: the processor's tokens for the prompt text cut just before the prefix."""
    bos = lv.tokenizer.bos_token
    kwargs = dict(add_special_tokens=not (bos and text.startswith(bos)))
    images = None if image is None else ([[image]] if lv.info.family == "mllama" else [image])
    return len(lv.processor(text=[text], images=images, **kwargs)["input_ids"][0])


@pytest.mark.parametrize("prefix_at", ["user", "response"])
@pytest.mark.parametrize("family", FIXTURE_FAMILIES)
def test_prefix_positions_match_tokenizer_output(loaded, family, prefix_at):
    lv = loaded[family]
    imgs = _images()
    reqs = [ChatRequest(q, im, PREFIX, prefix_at) for q, im in zip(QUESTIONS, imgs)]
    batch = prepare(lv, reqs, max_new_tokens=4)
    ids = batch.inputs["input_ids"]
    width = ids.shape[1]
    assert min(batch.lengths) < width  # the batch really is left-padded
    for row, req in enumerate(reqs):
        pad = width - batch.lengths[row]
        assert batch.inputs["attention_mask"][row, :pad].sum() == 0  # left padding
        r0, r1 = batch.positions.prefix[row]
        t0 = batch.positions.instr_start[row]
        # R holds exactly the prefix: its tokens decode to it, and neither end can be dropped
        dec = lambda a, b: lv.tokenizer.decode(ids[row, a:b]).strip()  # noqa: E731
        assert dec(r0, r1) == PREFIX
        assert dec(r0 + 1, r1) != PREFIX and dec(r0, r1 - 1) != PREFIX
        # R starts where the processor's own tokenization of the text before the prefix ends (+ padding)
        text, (c0, _) = render_prompt(lv, req)
        assert r0 == pad + _tokens_before(lv, text[:c0].rstrip(" "), req.image)
        # the same request alone: same tokens, positions shifted by exactly the padding
        single = prepare(lv, [req], max_new_tokens=4)
        assert torch.equal(single.inputs["input_ids"][0], ids[row, pad:])
        assert single.positions.prefix[0] == (r0 - pad, r1 - pad)
        if prefix_at == "user":
            assert t0 == r1
            assert req.question in lv.tokenizer.decode(ids[row, t0:])  # T: the question follows
            assert _count_image_tokens(lv, ids[row, :r0]) >= 1  # image (placeholders) before the prefix
        else:
            assert r1 == t0 == width  # the prefix ends the prompt; T = generated tokens
            assert req.question in lv.tokenizer.decode(ids[row, :r0])


def _count_image_tokens(lv, ids) -> int:
    image_id = lv.tokenizer.convert_tokens_to_ids(lv.processor.image_token)
    return int((ids == image_id).sum())


def test_empty_prefix_gives_empty_span(loaded):
    lv = loaded["llava"]
    prep = prepare(lv, [ChatRequest(QUESTIONS[0], _images()[0], "", "user")])
    (r0, r1), t0 = prep.positions.prefix[0], prep.positions.instr_start[0]
    assert r0 == r1 == t0 and QUESTIONS[0] in lv.tokenizer.decode(prep.inputs["input_ids"][0, t0:])


def test_prompt_longer_than_context_is_an_input_error(loaded):
    lv = loaded["qwen2_vl"]
    req = ChatRequest(QUESTIONS[0], _images()[0], PREFIX)
    n = prepare(lv, [req]).lengths[0]
    prepare(dataclasses.replace(lv, context=n + 4), [req], max_new_tokens=4)  # fits exactly
    with pytest.raises(PromptTooLongError, match=f"prompt is {n} tokens.*context window of {n + 3}") as e:
        prepare(dataclasses.replace(lv, context=n + 3), [req], max_new_tokens=4)
    assert isinstance(e.value, GuardalignError)


@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_prefix_attention_curves(loaded, family):
    lv = loaded[family]
    spec = CalibrationSpec(mode="scale", gamma=2.0)  # layers: default middle half [1, 3)
    req = ChatRequest(QUESTIONS[0], _images()[0], PREFIX)
    gen = generate(lv, prepare(lv, [req], max_new_tokens=5), spec, max_new_tokens=5)
    curves = prefix_attention(lv, req, gen.tokens[0], spec)
    van, cal = curves["vanilla"], curves["calibrated"]
    assert len(van) == len(cal) == lv.n_layers
    assert van[0] == cal[0] and 0 < van[0] < 1  # before the calibrated layers: unchanged
    cross = set(lv.model.config.get_text_config().to_dict().get("cross_attention_layers") or [])
    for layer in (1, 2):
        if layer in cross:  # Mllama's cross-attention layer has no text self-attention to measure
            assert van[layer] is None and cal[layer] is None
        else:
            assert cal[layer] > van[layer]


def test_greedy_config_ignores_checkpoint_sampling_defaults(loaded):
    lv = loaded["qwen2_vl"]
    base = lv.model.generation_config
    saved = (base.do_sample, base.temperature, base.repetition_penalty)
    base.do_sample, base.temperature, base.repetition_penalty = True, 0.7, 1.3  # as some hub checkpoints ship
    try:
        cfg = greedy_config(lv, 9)
    finally:
        base.do_sample, base.temperature, base.repetition_penalty = saved
    assert (cfg.do_sample, cfg.num_beams, cfg.repetition_penalty, cfg.max_new_tokens) == (False, 1, 1.0, 9)
    assert lv.tokenizer.eos_token_id in cfg.eos_token_id and cfg.pad_token_id == lv.tokenizer.pad_token_id


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cuda_bf16_off_identical_and_calibration_active(model_dirs, family):
    lv = load_lvlm(str(model_dirs[family]), device="cuda", dtype="bf16")
    plain = load_lvlm(str(model_dirs[family]), device="cuda", dtype="bf16", attn_implementation="sdpa")
    assert lv.info.dtype == "bfloat16" and lv.device.type == "cuda"
    req = ChatRequest(QUESTIONS[0], _images()[0], PREFIX)
    prep = prepare(lv, [req], max_new_tokens=5)
    ref_tokens, ref_logits = _plain_generate(plain.model, dict(prep.inputs), 5)
    got = generate(lv, prep, CalibrationSpec(mode="off"), max_new_tokens=5, output_logits=True)
    assert torch.equal(got.logits, ref_logits)
    curves = prefix_attention(lv, req, got.tokens[0], CalibrationSpec(gamma=2.0), prepared=prep)
    assert curves["calibrated"][1] > curves["vanilla"][1]
