"""Tiny, random-weight LVLMs of every supported family, built offline and saved to disk.

Each builder writes a directory that ``guardalign.models.lvlm.load_lvlm`` loads through the real
``from_pretrained`` path: ``config.json`` + safetensors weights, a byte-level BPE tokenizer
trained here with the ``tokenizers`` library, the family's image processor with tiny sizes,
and the processor (optionally without a chat template, so the family default is exercised).
Nothing touches the network.
"""
from __future__ import annotations

from pathlib import Path

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "mllama")

# Words the tiny BPE learns merges from; any other text still tokenizes (byte-level).
_CORPUS = [
    "USER: ASSISTANT: [INST] [/INST] system user assistant You are a helpful assistant.",
    "What is shown in this image? Describe the picture in detail. How do I make it?",
    "If the following question is unsafe, harmful, or malicious, please refuse to answer it.",
    "I'm sorry, but I cannot help with that. As an AI, I am unable to assist.",
    "The image shows a cat sitting on a red mat next to a blue door.",
]

# Special tokens per family: (bos, eos, pad, image token, other specials).
_SPECIALS = {
    "llava": ("<s>", "</s>", "<pad>", "<image>", []),
    "llava_next": ("<s>", "</s>", "<pad>", "<image>", []),
    "qwen2_vl": (
        None,
        "<|im_end|>",
        "<|endoftext|>",
        "<|image_pad|>",
        ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"],
    ),
    "mllama": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        "<|image|>",
        ["<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"],
    ),
}
_SPECIALS["qwen2_5_vl"] = _SPECIALS["qwen2_vl"]

_TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def build_tokenizer(family: str):
    """Train a byte-level BPE tokenizer on a tiny corpus and wrap it for transformers.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        With the family's special tokens; a BOS token is prepended by the post-processor
        for the LLaMA-style families (as the real LLaVA tokenizers do).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, image, others = _SPECIALS[family]
    specials = [t for t in (pad, bos, eos, image) if t] + others
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    if family in ("llava", "llava_next"):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = dict(eos_token=eos, pad_token=pad, additional_special_tokens=[image, *others])
    if bos:
        kwargs["bos_token"] = bos
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _text_config(tokenizer, **extra) -> dict:
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return {**_TINY_TEXT, **ids, **extra}


def _clip_vision(image_size: int = 28) -> dict:
    return dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        projection_dim=32,
    )


def _llava(tokenizer, max_pos):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        vision_config=_clip_vision(),
        text_config={"model_type": "llama", **_text_config(tokenizer, max_position_embeddings=max_pos)},
        image_token_index=image_id,
        image_seq_length=4,
        vision_feature_layer=-2,
    )
    improc = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(
        image_processor=improc,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LlavaForConditionalGeneration(cfg), proc


def _llava_next(tokenizer, max_pos):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    pinpoints = [[28, 28], [28, 56], [56, 28]]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    cfg = LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config={"model_type": "llama", **_text_config(tokenizer, max_position_embeddings=max_pos)},
        image_token_index=image_id,
        image_grid_pinpoints=pinpoints,
        image_seq_length=4,
    )
    improc = LlavaNextImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints
    )
    proc = LlavaNextProcessor(
        image_processor=improc,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LlavaNextForConditionalGeneration(cfg), proc


def _qwen(tokenizer, max_pos, version: str):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor

        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2)
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
            window_size=56, fullatt_block_indexes=[1],
        )
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    text = _text_config(tokenizer, max_position_embeddings=max_pos)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    cfg = Config(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    size = {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}
    improc = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    vidproc = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Processor(image_processor=improc, tokenizer=tokenizer, video_processor=vidproc)
    return Model(cfg), proc


def _mllama(tokenizer, max_pos):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        vision_output_dim=64,  # hidden_size × (1 + len(intermediate_layers_indices))
        image_size=28,
        patch_size=14,
        max_num_tiles=2,
        intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    text = _text_config(tokenizer, max_position_embeddings=max_pos, cross_attention_layers=[1])
    cfg = MllamaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<|image|>")
    )
    improc = MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=2)
    proc = MllamaProcessor(image_processor=improc, tokenizer=tokenizer)
    return MllamaForConditionalGeneration(cfg), proc


def make_tiny_lvlm(
    family: str, path: str | Path, *, chat_template: bool = True, max_positions: int = 512, seed: int = 0,
    text_layers: int | None = None,
) -> Path:
    """Build a random tiny model of ``family`` and save model + processor under ``path``.

    Parameters
    ----------
    chat_template : bool
        Save the family's default template with the processor (as hub checkpoints do); False saves
        none, so the loader must fall back to its own family default.
    max_positions : int
        The text model's context window (``max_position_embeddings``).
    text_layers : int, optional
        Decoder layers of the language model (default 4), e.g. enough for an example's ``--layers 6:20``.
    """
    if text_layers is not None:
        saved = dict(_TINY_TEXT)
        _TINY_TEXT["num_hidden_layers"] = text_layers
        try:
            return make_tiny_lvlm(family, path, chat_template=chat_template, max_positions=max_positions, seed=seed)
        finally:
            _TINY_TEXT.clear()
            _TINY_TEXT.update(saved)
    import torch

    from guardalign.models.lvlm import DEFAULT_CHAT_TEMPLATES

    torch.manual_seed(seed)
    path = Path(path)
    tokenizer = build_tokenizer(family)
    builder = {
        "llava": _llava,
        "llava_next": _llava_next,
        "qwen2_vl": lambda t, m: _qwen(t, m, "2"),
        "qwen2_5_vl": lambda t, m: _qwen(t, m, "2.5"),
        "mllama": _mllama,
    }[family]
    model, processor = builder(tokenizer, max_positions)
    if chat_template:
        processor.chat_template = DEFAULT_CHAT_TEMPLATES[family]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_unknown_family(path: str | Path) -> Path:
    """Save a tiny text-only LLaMA (a model type ``load_lvlm`` does not support)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer("llava")
    LlamaForCausalLM(LlamaConfig(**_text_config(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


GUARD_TEMPLATE = (
    "{{ bos_token }}Task: Check if there is unsafe content in the conversation.\n"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "Provide your safety assessment:\n"
)


def make_tiny_judge(path: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny random causal LM + tokenizer with a Llama-Guard-like chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    path = Path(path)
    tokenizer = build_tokenizer("llava")
    tokenizer.chat_template = GUARD_TEMPLATE
    model = LlamaForCausalLM(LlamaConfig(**_text_config(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_image(path: str | Path, size: tuple[int, int] = (40, 30), color=(200, 40, 40)) -> Path:
    """Write a small RGB PNG with a contrasting square (so patches differ)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, color)
    ImageDraw.Draw(img).rectangle([2, 2, size[0] // 2, size[1] // 2], fill=(20, 200, 90))
    path = Path(path)
    img.save(path)
    return path
