"""Supported LVLM families and their default chat templates (split out of :mod:`guardalign.models.lvlm`).

A family is a transformers ``config.model_type``; :data:`FAMILIES` names its model class, and
:data:`DEFAULT_CHAT_TEMPLATES` its chat template for checkpoints that ship none.
"""
from __future__ import annotations

import os

from guardalign.errors import ModelLoadError

# model_type → (model class name in transformers, human name).
FAMILIES = {
    "llava": ("LlavaForConditionalGeneration", "LLaVA-1.5 (llava-hf/llava-1.5-*)"),
    "llava_next": ("LlavaNextForConditionalGeneration", "LLaVA-NeXT (llava-hf/llava-v1.6-*)"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2-VL (Qwen/Qwen2-VL-*)"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2.5-VL (Qwen/Qwen2.5-VL-*)"),
    "mllama": ("MllamaForConditionalGeneration", "Llama-3.2-Vision (meta-llama/Llama-3.2-*-Vision*)"),
}

# Family default chat templates, used when neither the processor nor the tokenizer ships one.
# They follow the templates of the reference checkpoints (llava-hf 1.5, llava-hf v1.6-mistral,
# Qwen2-VL-Instruct, Llama-3.2-Vision-Instruct without the date/tool preamble).
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + content['text'] }}"
    "{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
)
_QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image|>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
DEFAULT_CHAT_TEMPLATES = {
    "llava": _LLAVA_TEMPLATE,
    "llava_next": _LLAVA_NEXT_TEMPLATE,
    "qwen2_vl": _QWEN_TEMPLATE,
    "qwen2_5_vl": _QWEN_TEMPLATE,
    "mllama": _MLLAMA_TEMPLATE,
}

def supported_families() -> str:
    """A human list of supported families, for error messages."""
    return "; ".join(f"{name} ({k})" for k, (_, name) in FAMILIES.items())


def detect_family(config) -> str:
    """The family key of a transformers config, or ModelLoadError naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"unsupported model family {model_type!r}: guardalign answer supports {supported_families()}"
        )
    return model_type


def _check_local_family(model: str) -> None:
    """For a local directory, name an unsupported ``model_type`` before transformers tries to load it."""
    import json

    cfg = os.path.join(model, "config.json")
    if not os.path.isfile(cfg):
        return
    try:
        with open(cfg, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"cannot read {cfg}: {e}") from None
    if model_type not in FAMILIES:
        raise ModelLoadError(f"unsupported model family {model_type!r} in {cfg}: guardalign answer supports "
                             f"{supported_families()}")

def chat_template_for(processor, family: str) -> str:
    """The chat template to use: the processor's, else the tokenizer's, else the family default."""
    tok = processor.tokenizer
    template = (getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
                or DEFAULT_CHAT_TEMPLATES[family])
    if isinstance(template, dict):  # several named templates: take the default one
        template = template.get("default") or next(iter(template.values()))
    return template
