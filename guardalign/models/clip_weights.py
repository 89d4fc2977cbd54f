"""How ``load_encoder`` finds a CLIP's weights: precision, config JSON registration, pretrained tags or local
checkpoints, and quiet, scoped logging while open_clip loads (split out of :mod:`guardalign.models.clip`)."""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from guardalign.errors import ConfigError, ModelLoadError, warn

PRECISIONS = ("fp32", "fp16", "bf16")
HOWTO = (
    "\nTo use weights already on disk, point at them:\n"
    "  --clip-model ViT-B-32 --pretrained /path/to/open_clip_pytorch_model.bin   (registry name + local checkpoint)\n"
    "  --clip-model my-config.json --pretrained ckpt.safetensors               (open_clip model-config JSON + checkpoint)\n"
    "(--pretrained none runs with random weights: scores are meaningless.)"
)


def short_error(exc: BaseException, limit: int = 240) -> str:
    """One-line summary of an exception: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


_NOISY_LOGGERS = ("open_clip", "huggingface_hub", "timm", "root")


@contextlib.contextmanager
def quiet_logging():
    """Silence open_clip/huggingface log lines while loading; failures become one ModelLoadError.

    Only these libraries' loggers are raised for the block and restored after it (no ``logging.disable``).
    """
    loggers = [logging.getLogger(n) if n != "root" else logging.getLogger() for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)




def resolve_precision(precision: str, dev: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"invalid precision={precision!r}: expected one of {PRECISIONS}")
    if precision != "fp32" and dev.type != "cuda":
        warnings.warn(f"precision={precision} needs CUDA; keeping fp32 on {dev}", UserWarning, stacklevel=3)
        return "fp32"
    return precision


def register_config_json(path: Path) -> tuple[str, dict | None]:
    """Register an open_clip model-config JSON under a content-hashed name; return (name, preprocess_cfg)."""
    import open_clip

    if not path.is_file():
        raise ModelLoadError(f"model config {path} not found.{HOWTO}")
    try:
        raw = path.read_bytes()
        obj = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model config {path} is not readable JSON ({short_error(exc)}).{HOWTO}") from None
    cfg = obj.get("model_cfg", obj) if isinstance(obj, dict) else None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ModelLoadError(f"model config {path} lacks field(s) {missing}: expected an open_clip model config "
                             f"with embed_dim, vision_cfg and text_cfg (optionally under model_cfg).")
    name = "guardalign-" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    if name not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as tmp:  # add_model_config keeps the parsed config after the file goes
            file = Path(tmp) / f"{name}.json"
            file.write_text(json.dumps(cfg))
            open_clip.add_model_config(file)
    return name, (obj.get("preprocess_cfg") if "model_cfg" in obj else None)


def resolve_weights(arch: str, label: str, pretrained: str) -> tuple[str | None, str, bool]:
    """Map --pretrained to (value for open_clip, provenance suffix, quick_gelu of the tag)."""
    import open_clip

    if pretrained.lower() == "none":
        warn(f"CLIP model {label} runs with RANDOM weights (--pretrained none): every score it produces is "
             "meaningless; use it only for tests.")
        return None, "none", False
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if tag_cfg:
        return pretrained, pretrained, bool(tag_cfg.get("quick_gelu", False))
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path.resolve()), str(path.resolve()), False
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if os.sep in pretrained or path.suffix in (".safetensors", ".pt", ".pth", ".bin", ".npz"):
        what = f"checkpoint file {pretrained} not found"
    elif tags:
        what = f"{pretrained!r} is neither a checkpoint file nor a known tag for {label} (known tags: {', '.join(tags)})"
    else:
        what = f"{pretrained!r} is not an existing checkpoint file ({label} has no pretrained tags)"
    raise ModelLoadError(f"Could not load CLIP weights: {what}.{HOWTO}")
