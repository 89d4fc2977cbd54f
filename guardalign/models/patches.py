"""Patch geometry and the dense value path of :class:`guardalign.models.clip.ClipEncoder` (DESIGN §1.1 "Patches",
§4 "Dense CLIP features"), split out of :mod:`guardalign.models.clip`.

- grid mode: :func:`grid_boxes` / :func:`n_windows` give the pixel windows that are cropped and encoded;
- dense mode: :func:`dense_forward` runs the ViT once and takes the last block's patch tokens through the
  MaskCLIP value path ``out_proj(v)`` (:func:`_value_path`), then ``ln_post`` and ``proj``.

Heavy imports: torch at module level, like :mod:`guardalign.models.clip` (only imported lazily by the CLI);
open_clip inside functions.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from guardalign.errors import ConfigError


def n_windows(grid: int, stride: float = 1.0) -> int:
    """Windows per side of a grid: ``grid`` at stride 1, else ``ceil((grid − 1)/stride) + 1``."""
    if stride >= 1:
        return int(grid)
    return math.ceil(Fraction(int(grid) - 1) / Fraction(stride).limit_denominator(10**6)) + 1


def _windows(n_px: int, grid: int, stride: float = 1.0) -> list[tuple[int, int]]:
    """1-D windows ``[a, b)`` of length n_px/grid over ``n_px`` pixels.

    Stride 1 tiles exactly (edges ``round(k·n_px/grid)``); stride s < 1 gives ``ceil((grid−1)/s)+1``
    evenly spaced windows from 0 to the far edge, so consecutive starts are at most s·window apart.
    """
    n = n_windows(grid, stride)
    width = Fraction(n_px, grid)
    out = []
    for k in range(n):
        start = Fraction(0) if n == 1 else Fraction(k * (n_px - width)) / (n - 1)
        a, b = math.floor(start + Fraction(1, 2)), math.floor(start + width + Fraction(1, 2))
        b = min(max(b, a + 1), n_px)  # images smaller than the grid: keep every window ≥ 1 px
        out.append((min(a, b - 1), b))
    return out


def grid_boxes(width: int, height: int, rows: int, cols: int | None = None, stride: float = 1.0) -> np.ndarray:
    """Pixel boxes ``(M, 4)`` int64 ``(x0, y0, x1, y1)`` of a rows×cols window grid, row-major."""
    ys, xs = _windows(height, rows, stride), _windows(width, cols or rows, stride)
    return np.array([(x0, y0, x1, y1) for y0, y1 in ys for x0, x1 in xs], dtype=np.int64).reshape(-1, 4)


def dense_visual(visual, name: str):
    """The ViT image tower, or ConfigError when dense patches cannot be computed for it."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ConfigError(f"--patches dense needs a ViT image tower; {name} has "
                          f"{type(visual).__name__}: use --patches grid")
    blk = visual.transformer.resblocks[-1]
    attn = getattr(blk, "attn", None)
    if (visual.attn_pool is not None or visual.pool_type not in ("tok", "avg")
            or getattr(attn, "in_proj_weight", None) is None or not hasattr(attn, "out_proj")):
        raise ConfigError(f"--patches dense does not support the pooling/attention of {name}: "
                          "use --patches grid")
    return visual


def dense_forward(visual, pixels: torch.Tensor, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) → global (B, D) and value-path patch embeddings (B, gh·gw, D), normalised.

    ``visual`` is a tower accepted by :func:`dense_visual`; ``pixels`` are moved to ``device``/``dtype``.
    """
    batch_first = getattr(visual.transformer, "batch_first", True)
    with torch.inference_mode():
        x = visual._embeds(pixels.to(device, dtype))
        x = x if batch_first else x.transpose(0, 1)
        *blocks, last = visual.transformer.resblocks
        for blk in blocks:
            x = blk(x)
        values = _value_path(last, last.ln_1(x))
        x = last(x)
        if not batch_first:
            x, values = x.transpose(0, 1), values.transpose(0, 1)
        pooled, _ = visual._pool(x)
        tokens = visual.ln_post(values[:, 1:])
        if visual.proj is not None:
            pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
    return F.normalize(pooled.float(), dim=-1), F.normalize(tokens.float(), dim=-1)


def _value_path(block: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """MaskCLIP value path of one attention block: ``out_proj(v)`` for normalised tokens ``y`` (…, L, W).

    Equal to the block's attention output when every token attends only to itself; the residual
    and the FFN are dropped. Handles ``nn.MultiheadAttention`` and open_clip's custom ``Attention``
    (head scaling, inner norm, post-attention norm) and layer scale.
    """
    attn = block.attn
    width = y.shape[-1]
    bias = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    v = F.linear(y, attn.in_proj_weight[2 * width:], bias)
    head_scale = getattr(attn, "head_scale", None)
    if head_scale is not None:
        heads = head_scale.shape[0]
        v = (v.unflatten(-1, (heads, -1)) * head_scale.view(heads, 1)).flatten(-2)
    v = getattr(attn, "ln_inner", torch.nn.Identity())(v)
    out = attn.out_proj(v)
    out = getattr(block, "ln_attn", torch.nn.Identity())(out)
    return getattr(block, "ls_1", torch.nn.Identity())(out)

