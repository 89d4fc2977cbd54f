"""Patch geometry and the dense token paths of :class:`guardalign.models.clip.ClipEncoder` (DESIGN §1.1 "Patches",
§4 "Dense CLIP features"), split out of :mod:`guardalign.models.clip`.

- grid mode: :func:`grid_boxes` / :func:`n_windows` give the pixel windows that are cropped and encoded;
- search mode: :func:`refine_boxes` gives the smaller windows that re-cut a suspicious coarse window;
- dense mode: :func:`dense_forward` runs the ViT once and takes the last block's patch tokens through one of
  :data:`DENSE_PATHS` (:func:`dense_tokens`), then ``ln_post`` and ``proj``:

  * ``maskclip``: the value path ``out_proj(v)``; no residual, no FFN (:func:`_value_path`);
  * ``clearclip``: attention with ``softmax(q qᵀ/√d)`` (query–query), no residual, no FFN;
  * ``sclip``: correlative self-attention ``softmax(q qᵀ/√d) + softmax(k kᵀ/√d)`` in place of the block's
    attention; the residual and the FFN are kept (as SCLIP's last block does).

Heavy imports: torch at module level, like :mod:`guardalign.models.clip` (only imported lazily by the CLI);
open_clip inside functions.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from guardalign.config import n_windows  # noqa: F401  (re-exported: window counts live with the config)
from guardalign.errors import ConfigError

DENSE_PATHS = ("maskclip", "clearclip", "sclip")


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


def dense_forward(visual, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype,
                  path: str = "maskclip") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) → global (B, D) and dense patch embeddings (B, gh·gw, D), normalised.

    ``visual`` is a tower accepted by :func:`dense_visual`; ``pixels`` are moved to ``device``/``dtype``;
    ``path`` is one of :data:`DENSE_PATHS`. The global embedding is the tower's own output.
    """
    if path not in DENSE_PATHS:
        raise ConfigError(f"invalid dense path {path!r}: expected one of {DENSE_PATHS}")
    batch_first = getattr(visual.transformer, "batch_first", True)
    with torch.inference_mode():
        x = visual._embeds(pixels.to(device, dtype))
        x = x if batch_first else x.transpose(0, 1)
        *blocks, last = visual.transformer.resblocks
        for blk in blocks:
            x = blk(x)
        values = dense_tokens(last, x if batch_first else x.transpose(0, 1), path)  # (B, L, W)
        x = last(x)
        if not batch_first:
            x = x.transpose(0, 1)
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



def dense_tokens(block: torch.nn.Module, x: torch.Tensor, path: str = "maskclip") -> torch.Tensor:
    """Dense tokens of the last block: (B, L, W) input of the block → (B, L, W), before ``ln_post``.

    ``maskclip``: ``out_proj(v)``; ``clearclip``: ``out_proj(softmax(q qᵀ·s) v)``; neither keeps the residual or
    the FFN. ``sclip``: the whole block with its attention weights replaced by ``softmax(q qᵀ·s) + softmax(k kᵀ·s)``.
    s is the block's attention scale (1/√head_dim; scaled-cosine attention uses its own logit scale).
    """
    y = block.ln_1(x)
    if path == "maskclip":
        return _value_path(block, y)
    q, k, v = _heads(block.attn, y)
    weights = _self_softmax(block.attn, q)
    if path == "sclip":
        weights = weights + _self_softmax(block.attn, k)
    out = getattr(block, "ls_1", torch.nn.Identity())(getattr(block, "ln_attn", torch.nn.Identity())(
        _attend(block.attn, weights, v)))
    if path == "clearclip":
        return out
    h = x + out
    return h + getattr(block, "ls_2", torch.nn.Identity())(block.mlp(block.ln_2(h)))


def _heads(attn, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, W) normalised tokens → q, k, v of shape (B, H, L, W/H) (with the block's q/k norms)."""
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
    return getattr(attn, "ln_q", torch.nn.Identity())(q), getattr(attn, "ln_k", torch.nn.Identity())(k), v


def _self_softmax(attn, a: torch.Tensor) -> torch.Tensor:
    """softmax over keys of the self-similarity a·aᵀ (B, H, L, L) at the attention's scale."""
    scale = getattr(attn, "logit_scale", None)
    if scale is not None:  # open_clip scaled-cosine attention
        a = F.normalize(a, dim=-1)
        logits = a @ a.transpose(-1, -2) * torch.clamp(scale, max=attn.logit_scale_max).exp()
    else:
        logits = a @ a.transpose(-1, -2) * a.shape[-1] ** -0.5
    return logits.softmax(dim=-1)


def _attend(attn, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, L, L) weights and (B, H, L, W/H) values → (B, L, W) through head scale, inner norm and out_proj."""
    x = weights @ v
    head_scale = getattr(attn, "head_scale", None)
    if head_scale is not None:
        x = x * head_scale
    x = getattr(attn, "ln_inner", torch.nn.Identity())(x.transpose(1, 2).flatten(-2))
    return attn.out_proj(x)


def _refine_axis(a: int, b: int, n_px: int, scale: float) -> list[tuple[int, int]]:
    """Three 1-D windows of side ``scale·(b − a)`` at stride 0.5, spanning ``2·scale·(b − a)`` centred on [a, b)."""
    side = max(scale * (b - a), 1.0)
    start = min(max((a + b) / 2 - side, 0.0), max(n_px - 2 * side, 0.0))  # keep the region inside the image
    out = []
    for k in range(3):
        lo = math.floor(start + k * side / 2 + 0.5)
        hi = min(max(math.floor(start + k * side / 2 + side + 0.5), lo + 1), n_px)
        out.append((min(lo, hi - 1), hi))
    return out


def refine_boxes(box, width: int, height: int, scale: float = 0.5) -> np.ndarray:
    """The 9 windows ``(9, 4)`` that re-cut a suspicious ``box`` (x0, y0, x1, y1) in search mode.

    A 3×3 grid of windows ``scale`` times the box's side, at stride 0.5, spanning a region of ``2·scale`` times the
    box centred on it: scale 0.5 re-cuts the box itself into half-size windows; 0.75 also reaches a quarter of the
    box beyond each edge (an object the box cut in two); 1 gives the box and its 8 half-shifted neighbours.
    The region is moved inside the ``width``×``height`` image; every window keeps ≥ 1 px per side.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    xs, ys = _refine_axis(x0, x1, width, scale), _refine_axis(y0, y1, height, scale)
    return np.array([(a, c, b, d) for c, d in ys for a, b in xs], dtype=np.int64).reshape(-1, 4)
