"""Tiny random judge checkpoints built offline and saved to disk (see lvlm_fixtures for the LVLMs).

- :func:`make_tiny_shieldgemma2`: a ``shieldgemma2`` checkpoint (Gemma 3 text + SigLIP vision, 4 image
  tokens) with a ``ShieldGemma2Processor`` whose chat template is guardalign's published-format template.
- :func:`make_remote_code_checkpoint`: a config.json that needs ``trust_remote_code`` (like MD-Judge v0.2,
  InternLM2), with no code files: loading it must fail before anything runs.
- :data:`CHATML_TEMPLATE`: an InternLM2-style ChatML template (MD-Judge v0.2's format).
"""
from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SG2_SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
                 "<start_of_turn>", "<end_of_turn>"]


def _sg2_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=_SG2_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Yes No You are a policy expert. Does the image violate the safety policy?"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )


def make_tiny_shieldgemma2(path: str | Path, *, seed: int = 0, chat_template: bool = True) -> Path:
    """Save a random tiny ShieldGemma 2 (model + processor) under ``path``."""
    import torch
    from transformers import Gemma3ImageProcessor, ShieldGemma2Config, ShieldGemma2ForImageClassification, ShieldGemma2Processor

    from guardalign.models.judges.shieldgemma import CHAT_TEMPLATE

    torch.manual_seed(seed)
    path = Path(path)
    tok = _sg2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in _SG2_SPECIALS}
    text = dict(model_type="gemma3_text", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=512, sliding_window=64, pad_token_id=ids["<pad>"],
                bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"])
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=28, patch_size=7)
    cfg = ShieldGemma2Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                             boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                             image_token_index=ids["<image_soft_token>"])
    cfg.yes_token_index = tok.convert_tokens_to_ids("Yes")
    cfg.no_token_index = tok.convert_tokens_to_ids("No")
    ShieldGemma2ForImageClassification(cfg).save_pretrained(path)
    proc = ShieldGemma2Processor(image_processor=Gemma3ImageProcessor(size={"height": 28, "width": 28}), tokenizer=tok,
                                 chat_template=CHAT_TEMPLATE if chat_template else None, image_seq_length=4)
    proc.save_pretrained(path)
    return path


def make_remote_code_checkpoint(path: str | Path) -> Path:
    """A config.json naming custom code (``auto_map``) for a model type transformers lacks."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
    }))
    return path
