"""CLIP loading through open_clip (registry name + tag | model-config JSON | local checkpoint) and patches.

Two ways to get patch embeddings (DESIGN §1.1 "Patches", §4 "Dense CLIP features"):

- ``grid_patches``: crop r×c windows of the original image (optionally overlapping, several scales),
  squash-resize each crop to the model's input size and encode all crops of all images in one batch.
- ``dense_patches``: one forward pass; the last block's patch tokens go through a dense path (MaskCLIP value
  path ``out_proj(v)``, ClearCLIP q–q attention or SCLIP correlative attention), then ``ln_post`` and ``proj``;
- ``crop_patches``: encode given pixel boxes of each image (the refinement stage of search mode).

Both return pixel boxes in the original image (geometry: :mod:`guardalign.models.patches`). torch is imported at
module level (the CLI imports this module lazily), open_clip inside functions.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from guardalign.errors import ConfigError, ModelLoadError, warn
from guardalign.models.clip_weights import (  # noqa: F401
    HOWTO, PRECISIONS, quiet_logging, register_config_json, resolve_precision, resolve_weights, short_error,
)
from guardalign.models.patches import (  # noqa: F401
    DENSE_PATHS, _value_path, dense_forward, dense_visual, grid_boxes, n_windows,
)

@dataclass(frozen=True)
class PatchBatch:
    global_emb: torch.Tensor  # (B, D) float32, L2-normalised embedding of each whole image
    patch_emb: torch.Tensor  # (B, M, D) float32, L2-normalised patch embeddings
    boxes: list  # B int arrays (M, 4): (x0, y0, x1, y1) pixel boxes in each ORIGINAL image, x1/y1 exclusive
    grid: tuple  # (rows, cols) of the primary grid (grid mode) or of the token grid (dense mode)


def load_encoder(model: str = "ViT-B-32", pretrained: str | None = "openai", device: str = "auto",
                 precision: str = "fp32", cache_dir: str | None = None) -> "ClipEncoder":
    """Load a CLIP model through open_clip.

    Parameters
    ----------
    model : open_clip registry name (``ViT-B-32``), ``hf-hub:org/repo``, ``local-dir:DIR``, or the path
        of an open_clip model-config JSON (``{embed_dim, vision_cfg, text_cfg}`` or ``{model_cfg, preprocess_cfg}``).
    pretrained : a pretrained tag of that model (``openai``), a local checkpoint (.safetensors, or
        .pt/.bin/.pth loaded with ``weights_only=True``), or ``none`` for random weights (warns loudly).
    device : ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:N``.
    precision : ``fp32``; ``fp16``/``bf16`` cast the model on CUDA only (fp32 on CPU, with a warning).
    cache_dir : where open_clip caches downloads (default: the Hugging Face cache).

    Raises
    ------
    ModelLoadError : unknown model or tag, weights not cached while offline, missing or corrupt checkpoint.
    ConfigError : bad device or precision.
    """
    import open_clip

    from guardalign.config import resolve_device

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    pretrained = "none" if pretrained is None or str(pretrained).strip() == "" else str(pretrained).strip()
    model = str(model)
    preprocess_cfg = None
    if model.startswith(("hf-hub:", "local-dir:")):
        arch, label, weights, suffix, quick = model, model, None, "", False
    else:
        if model.endswith(".json") or (Path(model).is_file() and model not in open_clip.list_models()):
            arch, preprocess_cfg = register_config_json(Path(model).expanduser())
            label = Path(model).name
        else:
            arch = label = model.replace("/", "-")
            if arch not in open_clip.list_models():
                close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
                raise ModelLoadError(f"Unknown CLIP model {model!r} (not in open_clip's registry"
                                     f"{'; did you mean ' + ', '.join(close) + '?' if close else ''}); "
                                     f"pass a registry name or an open_clip model-config JSON.{HOWTO}")
        weights, suffix, quick = resolve_weights(arch, label, pretrained)
    try:
        from guardalign.models.hub import offline_if_unreachable

        with quiet_logging(), warnings.catch_warnings(), offline_if_unreachable():
            warnings.filterwarnings("ignore", message="QuickGELU mismatch")
            clip = open_clip.create_model(arch, pretrained=weights, precision=prec, device=dev,
                                          force_quick_gelu=quick, force_preprocess_cfg=preprocess_cfg,
                                          cache_dir=cache_dir, weights_only=True)
            tokenizer = open_clip.get_tokenizer(arch, cache_dir=cache_dir)
    except Exception as exc:  # open_clip raises RuntimeError/OSError/safetensors errors with long messages
        if weights is not None and not os.path.isfile(weights):
            why = ("its weights are not in the local cache and could not be downloaded "
                   "(no internet, or HF_HUB_OFFLINE=1)")
        elif weights is not None:
            why = f"checkpoint {weights} is corrupt or does not match the architecture"
        else:
            why = "its config or weights could not be fetched or read" if not suffix else "the model could not be built"
        detail = "" if "not in the local cache" in why else f" [{short_error(exc)}]"
        raise ModelLoadError(f"Could not load CLIP model {label} with pretrained={pretrained!r}: {why}"
                             f"{detail}.{HOWTO}") from None
    name = f"{label}:{suffix}" if suffix else label
    return ClipEncoder(clip, tokenizer, name=name, device=dev)


def save_checkpoint(model: torch.nn.Module, path) -> Path:
    """Write ``model.state_dict()`` atomically: safetensors for ``*.safetensors``, else ``torch.save``.

    The file loads back with ``load_encoder(config_json, path)``.
    """
    path = Path(path)
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        state[key] = t.clone() if ptr in seen else t  # safetensors refuses tensors that share memory
        seen.add(ptr)
    from guardalign.io.durable import write_parts

    def write(tmp: Path) -> None:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, tmp)

    write_parts(path, write)  # temp file beside it, fsync, rename: never a half-written checkpoint
    return path


def _rgb(image):
    return image if image.mode == "RGB" else image.convert("RGB")


class ClipEncoder:
    """An open_clip CLIP model with text caching, preprocessing and grid/dense patch encoders.

    Embeddings are float32 on ``device``, L2-normalised along the last axis.
    """

    max_batch = 256  # images or crops per forward pass

    def __init__(self, model: torch.nn.Module, tokenizer=None, name: str = "custom", device=None):
        import open_clip

        self.model = model.eval()
        self.name = name
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        visual = model.visual
        pp = dict(getattr(visual, "preprocess_cfg", {}) or {})
        size = getattr(visual, "image_size", None) or pp.get("size", 224)
        self.input_hw = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.image_size = int(self.input_hw[0])
        self.mean = tuple(float(m) for m in pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(float(s) for s in pp.get("std", open_clip.OPENAI_DATASET_STD))
        self._resample = _pil_resample(pp.get("interpolation", "bicubic"))
        self.logit_scale = float(model.logit_scale.exp().item())
        context = getattr(model, "context_length", 77)
        self.tokenizer = tokenizer if tokenizer is not None else open_clip.get_tokenizer("", context_length=context)
        self.dtype = _input_dtype(visual)  # dtype the image tower expects for its pixels
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        self._text_cache: dict[tuple, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"ClipEncoder({self.name!r}, device={self.device}, image_size={self.image_size})"

    # ---- text -------------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(V, D) normalised text embeddings; the same tensor object is returned for the same texts."""
        key = tuple(texts)
        if key not in self._text_cache:
            chunks = []
            with torch.inference_mode():
                for i in range(0, len(key), self.max_batch):
                    tokens = self.tokenizer(list(key[i:i + self.max_batch])).to(self.device)
                    chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
            self._text_cache[key] = torch.cat(chunks) if chunks else torch.empty(0, self._dim(), device=self.device)
        return self._text_cache[key]

    def clear_text_cache(self) -> None:
        """Forget cached text embeddings (after changing the model's weights)."""
        self._text_cache.clear()

    # ---- images -----------------------------------------------------------------------------
    def _resize(self, image, box=None) -> np.ndarray:
        """(H_s, W_s, 3) uint8: squash-resize the image (or its ``box`` crop) to the input size."""
        h, w = self.input_hw
        crop = image if box is None else image.crop(box)  # crop first: no resampling support outside the box
        return np.asarray(crop.resize((w, h), self._resample))

    def _to_pixels(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack uint8 (H, W, 3) arrays into normalised (B, 3, H, W) float32 pixels on ``device``."""
        if not len(arrays):
            return torch.empty(0, 3, *self.input_hw, device=self.device)
        x = torch.from_numpy(np.stack(arrays)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - self._mean_t) / self._std_t).contiguous()

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """(B, 3, S, S): RGB, squash-resize to S×S (no centre crop), normalise with mean/std."""
        return self._to_pixels([self._resize(_rgb(im)) for im in images])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels → (B, D) normalised image embeddings (float32)."""
        out = []
        with torch.inference_mode():
            for chunk in pixels.split(self.max_batch):
                feats = self.model.encode_image(chunk.to(self.device, self.dtype))
                out.append(F.normalize(feats.float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, self._dim(), device=self.device)

    def _encode_arrays(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        parts = [self.encode_images(self._to_pixels(arrays[i:i + self.max_batch]))
                 for i in range(0, len(arrays), self.max_batch)]
        return torch.cat(parts) if parts else torch.empty(0, self._dim(), device=self.device)

    def _dim(self) -> int:
        dim = getattr(self.model.visual, "output_dim", None)
        return int(dim) if dim else int(self.encode_text(("",)).shape[1])

    # ---- patches ----------------------------------------------------------------------------
    def grid_patches(self, images: Sequence, grid: int = 3, stride: float = 1.0, scales=()) -> PatchBatch:
        """Encode r×c crops of each original image (plus the whole image) in batched forwards.

        Parameters
        ----------
        grid : windows per side of the primary grid (window = 1/grid of each side).
        stride : window step as a fraction of the window; < 1 overlaps windows (still reaching the edges).
        scales : extra grid sizes; their patches follow the primary ones in ``patch_emb``/``boxes``.

        Returns
        -------
        PatchBatch with ``patch_emb`` (B, M, D), M = Σ over scales of windows per grid, and
        ``grid`` = (n, n) windows per side of the primary grid.
        """
        sizes = list(dict.fromkeys([grid, *scales]))
        if not all(isinstance(g, (int, np.integer)) and g >= 1 for g in sizes):
            raise ConfigError(f"invalid grid sizes {sizes}: expected positive integers")
        if not 0 < stride <= 1:
            raise ConfigError(f"invalid stride={stride!r}: expected a fraction in (0, 1]")
        arrays, boxes = [], []
        for image in images:
            image = _rgb(image)
            bxs = np.concatenate([grid_boxes(image.width, image.height, int(g), stride=stride) for g in sizes])
            boxes.append(bxs)
            arrays.append(self._resize(image))
            arrays.extend(self._resize(image, box=tuple(int(v) for v in b)) for b in bxs)
        n_side = n_windows(grid, stride)
        per_image = 1 + sum(n_windows(g, stride) ** 2 for g in sizes)
        emb = self._encode_arrays(arrays).view(len(boxes), per_image, self._dim())
        return PatchBatch(emb[:, 0], emb[:, 1:], boxes, (n_side, n_side))

    def crop_patches(self, images: Sequence, boxes: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, K, D) normalised embeddings of the crops ``boxes[b]`` (K, 4) of each image (K equal for all)."""
        counts = {len(b) for b in boxes}
        if len(counts) > 1:
            raise ValueError(f"every image needs the same number of boxes, got {sorted(counts)}")
        k = counts.pop() if counts else 0
        arrays = [self._resize(_rgb(image), box=tuple(int(v) for v in b))
                  for image, bxs in zip(images, boxes) for b in bxs]
        return self._encode_arrays(arrays).view(len(boxes), k, self._dim())

    def _dense_visual(self):
        """The ViT image tower, or ConfigError when dense patches cannot be computed for it."""
        return dense_visual(self.model.visual, self.name)

    def _dense_forward(self, pixels: torch.Tensor, path: str = "maskclip") -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) → global (B, D) and dense patch embeddings (B, gh·gw, D) of ``path``, normalised."""
        return dense_forward(self._dense_visual(), pixels, self.device, self.dtype, path)

    def dense_patches(self, images: Sequence, path: str = "maskclip") -> PatchBatch:
        """One forward per image batch: dense tokens of ``path`` (one of DENSE_PATHS) as patches, the tower's
        pooled output as global view.

        Returns
        -------
        PatchBatch with ``patch_emb`` (B, gh·gw, D) in row-major token order, ``grid`` = (gh, gw)
        and boxes mapping token (r, c) to rows ``r·H/gh .. (r+1)·H/gh`` of the original image.
        """
        if path not in DENSE_PATHS:
            raise ConfigError(f"invalid dense path {path!r}: expected one of {DENSE_PATHS}")
        visual = self._dense_visual()
        gh, gw = visual.grid_size
        arrays, boxes = [], []
        for image in images:
            image = _rgb(image)
            arrays.append(self._resize(image))
            boxes.append(grid_boxes(image.width, image.height, gh, gw))
        glob, toks = [], []
        for i in range(0, len(arrays), self.max_batch):
            g, t = self._dense_forward(self._to_pixels(arrays[i:i + self.max_batch]), path)
            glob.append(g)
            toks.append(t)
        if not glob:
            dim = self._dim()
            return PatchBatch(torch.empty(0, dim, device=self.device),
                              torch.empty(0, gh * gw, dim, device=self.device), [], (gh, gw))
        return PatchBatch(torch.cat(glob), torch.cat(toks), boxes, (gh, gw))


def _input_dtype(visual: torch.nn.Module) -> torch.dtype:
    """Weight dtype of the first convolution/linear layer (fp16/bf16 casts leave some tensors fp32)."""
    for module in visual.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            return module.weight.dtype
    return next(visual.parameters()).dtype


def _pil_resample(name: str):
    from PIL import Image

    return {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}.get(
        str(name), Image.Resampling.BICUBIC)
