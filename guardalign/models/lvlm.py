"""LVLM loading, chat building with a safety prefix, and calibrated generation (DESIGN §1.2).

Families (detected from ``config.model_type``): LLaVA-1.5 (``llava``), LLaVA-NeXT (``llava_next``),
Qwen2-VL (``qwen2_vl``), Qwen2.5-VL (``qwen2_5_vl``) and Llama-3.2-Vision (``mllama``; the image
enters through cross-attention, while instruction→prefix attention stays in text self-attention).

The prefix token span R and the instruction start t0 are computed from the ACTUAL model input: the
prompt is rendered with the chat template, the prefix's character span is mapped through the
processor's image-placeholder expansion (``return_text_replacement_offsets``) and then to tokens
with the tokenizer's offset mapping; left padding shifts every position of a row.

torch / transformers are imported inside functions (``cli/`` imports this module lazily anyway).
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from guardalign.models.chat_templates import (  # noqa: F401 (names re-exported from here)
    DEFAULT_CHAT_TEMPLATES, FAMILIES, _check_local_family, chat_template_for, detect_family, supported_families,
)
from guardalign.config import resolve_device  # noqa: F401 (judge imports it from here)
from guardalign.errors import InputError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from guardalign.attention.calibration import CalibrationSpec, Positions

PREFIX_PLACEMENTS = ("user", "response")

_SENTINEL = "\ue000GUARDALIGN_PREFIX\ue001"  # private-use marker located after template rendering
_PREFIX_SEP = "\n"  # between the prefix and the question in the user turn


class PromptTooLongError(InputError):
    """A prompt (plus the requested new tokens) does not fit in the model's context window."""


@dataclass(frozen=True)
class ModelInfo:
    id: str  # the --model value: hub id or local directory
    revision: str | None  # hub commit hash when known (None for a local directory)
    dtype: str  # torch dtype of the weights, e.g. "float32", "bfloat16"
    family: str  # model_type: llava | llava_next | qwen2_vl | qwen2_5_vl | mllama

    def to_record(self) -> dict:
        """The record's ``model`` field."""
        return {"id": self.id, "revision": self.revision, "dtype": self.dtype, "family": self.family}


@dataclass
class LVLM:
    model: Any  # transformers *ForConditionalGeneration, eval mode, on ``device``
    processor: Any  # transformers processor (tokenizer + image processor)
    chat_template: str  # the template in use (processor's, tokenizer's or the family default)
    info: ModelInfo  # provenance for records
    n_layers: int  # decoder layers of the language model (Mllama: including cross-attention layers)
    context: int  # context window in tokens (max_position_embeddings of the language model)
    device: Any  # torch.device the model runs on

    @property
    def tokenizer(self):
        """The processor's tokenizer."""
        return self.processor.tokenizer


@dataclass(frozen=True)
class ChatRequest:
    question: str  # the user's question
    image: "Image.Image | None"  # the (purified) image, or None for a text-only turn
    prefix: str  # safety prefix text ("" for none)
    prefix_at: str = "user"  # "user": image, prefix, question; "response": the answer starts with the prefix


@dataclass
class Prepared:
    inputs: Any  # BatchFeature of model inputs on the model's device (left-padded batch)
    positions: "Positions"  # R and t0 per row, absolute positions including left padding
    lengths: list[int]  # unpadded prompt length of each row, in tokens
    texts: list[str]  # rendered prompt text of each row (before image-token expansion)


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _from_pretrained(loader, model: str, **kwargs):
    """``loader(model, ...)`` with local_files_only when offline; on a failed hub fetch retry from the
    local cache, then raise ModelLoadError explaining how to pass a local directory."""
    from guardalign.models.hub import hub_unreachable

    # An unresolvable hub would otherwise cost ~25 s of retries per file before failing.
    local = os.path.isdir(model) or _offline() or hub_unreachable()
    try:
        return loader(model, local_files_only=local, **kwargs)
    except (OSError, ValueError) as first:
        if not local:
            try:
                return loader(model, local_files_only=True, **kwargs)
            except (OSError, ValueError):
                pass
        where = "the directory" if os.path.isdir(model) else "the Hugging Face cache (offline)" if local else "the hub"
        raise ModelLoadError(
            f"could not load {model!r} from {where}: {first}. Pass a local directory holding config.json, the "
            "weights and the processor files (--model /path/to/model), or download it first "
            "(huggingface-cli download ID) and retry."
        ) from first


def resolve_dtype(dtype: str, device):
    """torch dtype for "auto" (bf16 on CUDA when supported, else fp16 on CUDA, fp32 on CPU) or a name."""
    import torch

    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise ModelLoadError(f"invalid dtype {dtype!r}: expected auto, {', '.join(names)}")
    return names[dtype]


def load_lvlm(model: str, *, device: str = "auto", dtype: str = "auto", revision: str | None = None,
              attn_implementation: str | None = None) -> LVLM:
    """Load a supported LVLM and its processor by hub id or local directory.

    Parameters
    ----------
    attn_implementation : str, optional
        Attention of the language model; default: guardalign's calibrated attention
        (``calibration.register()``), which is plain SDPA outside ``calibrating(...)``. Vision towers
        always use SDPA.

    Raises
    ------
    ModelLoadError
        Missing weights/files, an unknown family (naming the supported ones), a bad device or dtype.
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from guardalign.attention.calibration import register

    from guardalign.models.hub import local_or_hub

    model = local_or_hub(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    _check_local_family(model)
    try:
        config = _from_pretrained(AutoConfig.from_pretrained, model, revision=revision)
    except ModelLoadError as e:
        if "does not recognize this architecture" in str(e):
            raise ModelLoadError(f"unsupported model family of {model!r} (transformers does not know its model "
                                 f"type): guardalign answer supports {supported_families()}") from None
        raise
    family = detect_family(config)
    attn = attn_implementation or register()
    impl = {"": "sdpa", "vision_config": "sdpa", "text_config": attn}
    cls = getattr(transformers, FAMILIES[family][0])
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # stderr belongs to guardalign's own progress bar and summary
    try:
        net = _from_pretrained(cls.from_pretrained, model, revision=revision, dtype=torch_dtype,
                               attn_implementation=impl)
        processor = _from_pretrained(AutoProcessor.from_pretrained, model, revision=revision)
    finally:
        if bars_were_on:  # restore the caller's setting: a library call leaves no process-wide state behind
            hf_logging.enable_progress_bar()
    tok = processor.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    template = chat_template_for(processor, family)
    text_cfg = net.config.get_text_config()
    info = ModelInfo(id=model, revision=getattr(config, "_commit_hash", None) or revision,
                     dtype=str(torch_dtype).replace("torch.", ""), family=family)
    net.to(dev).eval()
    return LVLM(model=net, processor=processor, chat_template=template, info=info,
                n_layers=int(text_cfg.num_hidden_layers),
                context=int(getattr(text_cfg, "max_position_embeddings", 0) or 0), device=dev)


def _conversation(has_image: bool, text: str) -> list[dict]:
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def render_prompt(lvlm: LVLM, req: ChatRequest) -> tuple[str, tuple[int, int]]:
    """Render the chat for ``req`` and locate the prefix in it.

    Returns
    -------
    text : str
        The prompt text (image placeholders not yet expanded), ending with the generation prompt
        (and, for ``prefix_at="response"``, with the prefix that starts the answer).
    span : (c0, c1)
        Character span of the prefix in ``text`` (empty when there is no prefix).
    """
    if req.prefix_at not in PREFIX_PLACEMENTS:
        raise ValueError(f"prefix_at must be one of {PREFIX_PLACEMENTS}, got {req.prefix_at!r}")
    prefix = req.prefix.strip()
    has_image = req.image is not None
    user_text = req.question
    if req.prefix_at == "user":  # the sentinel marks where the prefix (possibly empty) goes
        user_text = _SENTINEL + (_PREFIX_SEP if prefix else "") + req.question
    text = lvlm.processor.apply_chat_template(
        _conversation(has_image, user_text), chat_template=lvlm.chat_template,
        add_generation_prompt=True, tokenize=False,
    )
    if isinstance(text, list):
        text = text[0]
    bos = lvlm.tokenizer.bos_token
    if lvlm.info.family == "mllama" and bos and not text.startswith(bos):
        text = bos + text  # what MllamaProcessor would insert; done here so the spans stay exact
    if req.prefix_at == "response":
        if not prefix:
            return text, (len(text), len(text))
        sep = " " if text and not text[-1].isspace() else ""
        c0 = len(text) + len(sep)
        return text + sep + prefix, (c0, c0 + len(prefix))
    if text.count(_SENTINEL) != 1:
        raise RuntimeError(f"the chat template did not render the user text exactly once: {text!r}")
    c0 = text.index(_SENTINEL)
    return text.replace(_SENTINEL, prefix), (c0, c0 + len(prefix))


def _token_span(offsets, span: tuple[int, int], replacements: list[dict]) -> tuple[int, int]:
    """Token index range [r0, r1) overlapping the character ``span`` of the unexpanded text.

    ``offsets`` (L, 2) are character offsets in the EXPANDED text (zero-width for padding and added
    special tokens); ``replacements`` are the processor's placeholder expansions, in order.
    """
    ends = [r["span"][1] for r in replacements]
    gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]
    e0, e1 = (c + gained[bisect.bisect_right(ends, c)] for c in span)
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < e1 and e > e0]
    if e1 > e0 and not hits:
        raise RuntimeError("the prefix was not found in the tokenized prompt (truncated?)")
    if not hits:  # empty prefix: an empty span just before the first token at or after it
        after = [i for i, (s, e) in enumerate(offsets) if e > s and s >= e0]
        t = after[0] if after else len(offsets)
        return t, t
    if hits != list(range(hits[0], hits[-1] + 1)):
        raise RuntimeError(f"the prefix maps to non-contiguous tokens {hits}")
    return hits[0], hits[-1] + 1


def _processor_call(lvlm: LVLM, texts: list[str], images: list) -> Any:
    """Run the processor on a batch (left padding) with offsets; returns the BatchFeature (CPU)."""
    bos = lvlm.tokenizer.bos_token
    kwargs: dict[str, Any] = dict(return_tensors="pt", padding=True, return_offsets_mapping=True,
                                  add_special_tokens=not (bos and all(t.startswith(bos) for t in texts)))
    if lvlm.info.family != "mllama":  # Mllama inserts no placeholders (cross-attention) and has no such option
        kwargs["return_text_replacement_offsets"] = True
    has = [im is not None for im in images]
    if any(has) and not all(has):
        raise InputError("a batch must be all text-only or all with one image each")
    if any(has):
        kwargs["images"] = [[im] for im in images] if lvlm.info.family == "mllama" else list(images)
    try:
        return lvlm.processor(text=list(texts), **kwargs)
    except ValueError as e:  # e.g. a question that contains the image placeholder token itself
        raise InputError(f"the processor rejected the prompt: {e}") from None


def prepare(lvlm: LVLM, requests: Sequence[ChatRequest], *, max_new_tokens: int = 0) -> Prepared:
    """Tokenize a batch of chats (left-padded) and compute the calibration positions.

    Raises
    ------
    PromptTooLongError
        A row's prompt plus ``max_new_tokens`` exceeds the context window (message names the row).
    """
    from guardalign.attention.calibration import Positions

    if not requests:
        raise ValueError("prepare() needs at least one request")
    rendered = [render_prompt(lvlm, r) for r in requests]
    texts = [t for t, _ in rendered]
    enc = _processor_call(lvlm, texts, [r.image for r in requests])
    offsets = enc.pop("offset_mapping").tolist()
    repl = enc.pop("text_replacement_offsets", None) or [[] for _ in texts]
    width = enc["input_ids"].shape[1]
    lengths = [int(n) for n in enc["attention_mask"].sum(dim=1).tolist()]
    for row, n in enumerate(lengths):
        if lvlm.context and n + max_new_tokens > lvlm.context:
            raise PromptTooLongError(
                f"prompt{f' (batch row {row})' if len(texts) > 1 else ''} is {n} tokens; with max_new_tokens="
                f"{max_new_tokens} it exceeds the model's context window of {lvlm.context} tokens"
            )
    spans, starts = [], []
    for row, ((_, span), req) in enumerate(zip(rendered, requests)):
        r0, r1 = _token_span(offsets[row], span, repl[row])
        spans.append((r0, r1))
        starts.append(r1 if req.prefix_at == "user" else width)
    positions = Positions(prefix=tuple(spans), instr_start=tuple(starts))
    return Prepared(inputs=enc.to(lvlm.device), positions=positions, lengths=lengths, texts=texts)


def _eos_ids(lvlm: LVLM) -> set[int]:
    eos = lvlm.model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if lvlm.tokenizer.eos_token_id is not None:
        eos.append(lvlm.tokenizer.eos_token_id)
    return set(eos)


GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}  # recorded in every answer record


def greedy_config(lvlm: LVLM, max_new_tokens: int):
    """A fresh GenerationConfig: plain greedy decoding, ignoring the checkpoint's sampling and penalty
    defaults (e.g. Qwen2-VL's repetition_penalty), so runs are repeatable and the record says it all."""
    from transformers import GenerationConfig

    base = lvlm.model.generation_config
    return GenerationConfig(max_new_tokens=max_new_tokens, **GREEDY, eos_token_id=sorted(_eos_ids(lvlm)),
                            pad_token_id=lvlm.tokenizer.pad_token_id, bos_token_id=base.bos_token_id)


@dataclass
class Generation:
    tokens: list[list[int]]  # per row: generated token ids up to and including the first EOS
    texts: list[str]  # per row: decoded response (special tokens skipped, stripped)
    logits: Any  # (steps, B, V) float tensor of per-step logits when requested, else None


def generate(lvlm: LVLM, prepared: Prepared, spec: "CalibrationSpec", *, max_new_tokens: int = 128,
             output_logits: bool = False) -> Generation:
    """Greedy generation with the calibration ``spec`` active in prefill and every decode step."""
    import torch

    from guardalign.attention.calibration import calibrating

    tok = lvlm.tokenizer
    config = greedy_config(lvlm, max_new_tokens)
    config.return_dict_in_generate, config.output_logits = True, output_logits  # all settings in one config
    with torch.inference_mode(), calibrating(spec, prepared.positions, lvlm.n_layers, audit=False):
        out = lvlm.model.generate(**prepared.inputs, generation_config=config)
    new = out.sequences[:, prepared.inputs["input_ids"].shape[1]:].tolist()
    eos = _eos_ids(lvlm)
    tokens = []
    for row in new:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        tokens.append(row[:cut])
    texts = [tok.decode(t, skip_special_tokens=True).strip() for t in tokens]
    logits = torch.stack(out.logits) if output_logits else None
    return Generation(tokens=tokens, texts=texts, logits=logits)


def _extend(inputs, new_ids: list[int]):
    """Append ``new_ids`` to a single-row input dict, extending the per-token tensors."""
    import torch

    out = dict(inputs)
    ids = out["input_ids"]
    add = torch.tensor([new_ids], dtype=ids.dtype, device=ids.device)
    out["input_ids"] = torch.cat([ids, add], dim=1)
    n = len(new_ids)
    for key in ("attention_mask", "token_type_ids", "mm_token_type_ids"):
        if key in out and out[key] is not None:
            fill = 1 if key == "attention_mask" else 0
            out[key] = torch.cat([out[key], out[key].new_full((1, n), fill)], dim=1)
    if out.get("cross_attention_mask") is not None:  # Mllama: generated tokens see the image like the last one
        cam = out["cross_attention_mask"]
        out["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, n, *cam.shape[2:])], dim=1)
    return out


def prefix_attention(lvlm: LVLM, request: ChatRequest, tokens: list[int], spec: "CalibrationSpec",
                     prepared: Prepared | None = None) -> dict[str, list[float | None]]:
    """Per-layer mean T→R attention mass on the same sequence (prompt + ``tokens``), without and with ``spec``.

    ``prepared`` may pass the single-row ``prepare([request])`` result to avoid processing it again.
    Returns ``{"vanilla": [...], "calibrated": [...]}`` of length ``n_layers`` (None for layers without
    text self-attention, e.g. Mllama's cross-attention layers).
    """
    import dataclasses

    import torch

    from guardalign.attention.calibration import calibrating

    single = prepared if prepared is not None and len(prepared.lengths) == 1 else prepare(lvlm, [request])
    inputs = _extend(single.inputs, tokens)
    curves = {}
    for name, s in (("vanilla", dataclasses.replace(spec, mode="off")), ("calibrated", spec)):
        with torch.inference_mode(), calibrating(s, single.positions, lvlm.n_layers, audit=True) as audit:
            lvlm.model(**inputs, use_cache=False)
        curves[name] = audit.mass()
    return curves
