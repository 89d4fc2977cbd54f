"""What every judge model shares: loading through transformers, greedy decoding, and the Judgement record.

A judge is any object with ``name`` (recorded as ``judge.model``), ``kind`` (its registry key),
``target`` ("response": it judges the answer; "image": it judges the input image), ``needs_image``
and ``judge(prompt, response, image=None) -> Judgement``. Judges never raise for an odd output: a
verdict they cannot read is ``unsafe=None`` with the raw text kept.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from guardalign.errors import ModelLoadError
from guardalign.models.judge import Judgement  # noqa: F401 (re-exported for the judge modules)

REMOTE_CODE_HINT = (
    "it ships its own model code (e.g. OpenSafetyLab/MD-Judge-v0_2-internlm2_7b, an InternLM2 model that "
    "transformers does not include); guardalign runs such code only when you pass --trust-remote-code"
)


@contextmanager
def quiet_bars() -> Iterator[None]:
    """transformers' download/loading bars off for the block, the caller's setting restored after (as load_lvlm)."""
    from transformers.utils import logging as hf_logging

    were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # stderr belongs to guardalign's own progress bar and summary
    try:
        yield
    finally:
        if were_on:
            hf_logging.enable_progress_bar()


def device_dtype(device: str, dtype: str):
    from guardalign.models.lvlm import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def load_config(model: str, trust_remote_code: bool):
    """The checkpoint's config; ModelLoadError naming --trust-remote-code when it needs custom code."""
    from transformers import AutoConfig

    from guardalign.models.lvlm import _from_pretrained

    try:
        return _from_pretrained(AutoConfig.from_pretrained, model, trust_remote_code=trust_remote_code)
    except ModelLoadError as e:
        text = str(e)
        if "trust_remote_code" in text or "does not recognize this architecture" in text:
            raise ModelLoadError(f"cannot load judge {model!r}: {REMOTE_CODE_HINT}") from None
        raise


def load_causal_lm(model: str, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """(model in eval mode on its device, tokenizer) of a text-only judge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardalign.models.lvlm import _from_pretrained

    dev, torch_dtype = device_dtype(device, dtype)
    load_config(model, trust_remote_code)
    kw = {"trust_remote_code": True} if trust_remote_code else {}
    with quiet_bars():
        tok = _from_pretrained(AutoTokenizer.from_pretrained, model, **kw)
        net = _from_pretrained(AutoModelForCausalLM.from_pretrained, model, dtype=torch_dtype, **kw)
    return net.to(dev).eval(), tok


def load_image_text(model: str, *, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode on its device, processor) of an image+text judge (Llama Guard Vision, LlavaGuard)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from guardalign.models.lvlm import _from_pretrained

    dev, torch_dtype = device_dtype(device, dtype)
    config = load_config(model, False)
    try:
        with quiet_bars():
            net = _from_pretrained(AutoModelForImageTextToText.from_pretrained, model, dtype=torch_dtype)
            proc = _from_pretrained(AutoProcessor.from_pretrained, model)
    except ModelLoadError as e:
        raise ModelLoadError(f"{model!r} ({getattr(config, 'model_type', '?')}) is not an image-text-to-text model "
                             f"transformers can load: {e}") from None
    return net.to(dev).eval(), proc


def greedy(net, inputs: dict, *, max_new_tokens: int, pad_token_id: int | None) -> list[int]:
    """Greedy-decode one row; returns the new token ids (prompt excluded)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                              pad_token_id=pad_token_id, eos_token_id=net.generation_config.eos_token_id)
    with torch.inference_mode():
        out = net.generate(**inputs, generation_config=config)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def pad_id(tokenizer: Any) -> int | None:
    """The tokenizer's pad id, else its eos id (greedy generation needs one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer: Any, text: str, device) -> dict:
    """Tokenize a rendered prompt, without a second BOS when the template already starts with one."""
    bos = tokenizer.bos_token
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos)))
    return enc.to(device)
