"""TGA probe internals (DESIGN §1.3): logit-lens ranks, first refusal layers, span pooling, cosine, and the
attention mass of the last position, each reduced per layer while the forward pass runs, so that what is kept
per row is O(layers), never O(layers × sequence).

The pure functions take and return tensors (or lists). :func:`probe_attention` is an attention function for
transformers' AttentionInterface: it is guardalign's calibrated attention (plain SDPA outside
``calibrating(...)``), and while :func:`probing` is active it also records, on every text self-attention layer,
how the last query position's attention splits over given key spans, with the calibration of that layer
applied when one is active. Register it with :func:`register_probe`.

torch and transformers are imported lazily.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from guardalign.attention.calibration import _REQUEST, _self_attention_layer, calibrated_attention, modify_scores

PROBE_IMPL = "guardalign_probe"  # attn_implementation of the language model while probing
LENSES = ("standard", "raw")


def token_ranks(logits, ids):
    """1-based rank of each token of ``ids`` in each row of ``logits``: 1 + the number of vocabulary entries
    with a strictly larger logit (ties count in the token's favour).

    logits : Tensor (B, V);  ids : LongTensor (n,)  →  LongTensor (B, n)
    """
    chosen = logits.index_select(1, ids)  # (B, n)
    return (logits[:, None, :] > chosen[:, :, None]).sum(-1) + 1


def first_layer(ranks: Sequence[int], k: int) -> int | None:
    """The first layer whose rank is ≤ ``k`` (0-based layer index), None when no layer reaches it."""
    return next((i for i, r in enumerate(ranks) if r is not None and r <= k), None)


def pool(hidden, weights):
    """Weighted sum over positions in float32: hidden (B, S, D), weights (B, S) (rows summing to 1 for a mean,
    all zero for an empty span) → (B, D)."""
    return (weights[:, None, :] @ hidden.float()).squeeze(1)


def cosine(a, b):
    """Cosine similarity along the last axis, float32: a, b (..., D) → (...). Zero for a zero vector."""
    import torch

    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)


def lens_logits(last, norm, lm_head, lens: str = "standard"):
    """The logit lens at the last position of every layer at once.

    ``last`` (L, B, D) holds each decoder layer's output at the last position, before the final norm.
    ``standard`` applies the model's final norm to every layer, then the LM head; ``raw`` (the authors' released
    code) applies the LM head directly, except on the last layer, whose state transformers returns normed.
    Returns (L, B, V) logits in the model's dtype.
    """
    import torch

    if lens not in LENSES:
        raise ValueError(f"unknown lens {lens!r}: expected one of {LENSES}")
    return lm_head(norm(last) if lens == "standard" else torch.cat([last[:-1], norm(last[-1:])]))


def last_row_mass(query, key, mask, scaling, spans, calibration=None, bias=None):
    """Attention mass of the last query position on each key span, averaged over heads.

    Parameters
    ----------
    query : Tensor (B, H, q, d);  key : Tensor (B, Hkv, k, d) (GQA: H = g·Hkv)
    mask : None, bool (B|1, 1|H, q, k) (True = attend) or additive float; the last row of it is used
    scaling : float or None (default d^-½)
    spans : Tensor (B, k, n) float: 1 where key j belongs to span s of row b
    calibration : None, or (mode, gamma, row_mask (B,) bool, col_mask (B, k) bool): the calibration of this layer
        (:func:`guardalign.attention.calibration.modify_scores`), applied when the last row is in T
    bias : None, or (B, 1, 1, k) float32 additive mask of the last row (0 or the dtype's minimum), used
        instead of ``mask`` (one precomputed tensor for every layer of a forward pass)

    Returns
    -------
    Tensor (B, n) float32: Σ_{j in span} softmax(z)_j, mean over heads.
    """
    import torch

    bsz, n_heads, _, d = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    g = n_heads // n_kv
    q = query[:, :, -1:].reshape(bsz, n_kv, g, d)
    if q.dtype != torch.float32:
        q, key = q.float(), key.float()
    z = torch.matmul(q, key.transpose(-1, -2)).mul_(scaling if scaling is not None else d ** -0.5)  # (B, Hkv, g, k)
    if calibration is not None:
        mode, gamma, rows, cols = calibration
        z = modify_scores(z[..., None, :], z[..., None, :], mode, gamma, rows[:, None, None, None],
                          cols[:, None, None, :])[..., 0, :]
    if bias is not None:
        z = z.add_(bias)
    elif mask is not None:
        m = mask[..., -1, :kv_len]  # (B|1, 1|H, k)
        m = m[:, :, None, :] if m.shape[1] == 1 else m.reshape(m.shape[0], n_kv, g, kv_len)
        z = z.masked_fill_(~m, torch.finfo(z.dtype).min) if m.dtype == torch.bool else z.add_(m)
    probs = torch.softmax(z, dim=-1).view(bsz, n_heads, kv_len)
    return torch.matmul(probs, spans).mean(1)


@dataclass
class ProbeState:
    """What :func:`probing` collects during one forward pass."""

    spans: Any  # (B, k, n) float key-span indicators
    n_layers: int  # decoder layer count (Mllama: cross-attention layers included)
    mass: list  # per layer: (B, n) float32 tensor, None for layers without text self-attention
    bias: Any = None  # (B, 1, 1, k) float32 last-row padding mask (additive), or None: use the model's mask


_PROBE: contextvars.ContextVar[ProbeState | None] = contextvars.ContextVar("guardalign_probe", default=None)


@contextmanager
def probing(spans, n_layers: int, bias=None) -> Iterator[ProbeState]:
    """Record the last position's attention mass on ``spans`` (B, k, n) in every forward pass of a model loaded
    with PROBE_IMPL inside this block, in this context only. ``bias`` (B, 1, 1, k), the additive padding mask
    of the last row (whose causal part allows every key), stands in for the model's mask when given."""
    state = ProbeState(spans=spans, n_layers=n_layers, mass=[None] * n_layers, bias=bias)
    token = _PROBE.set(state)
    try:
        yield state
    finally:
        _PROBE.reset(token)


def _calibration_of(layer: int, batch: int, kv_len: int, device):
    """(mode, γ, rows, cols) of the active calibration on ``layer`` for a last row at key position kv_len − 1, or None."""
    import torch

    req = _REQUEST.get()
    if req is None or layer not in req.calibrated:
        return None
    r0, r1, t0 = (torch.tensor(v, device=device) for v in req._rows(batch))
    cols = torch.arange(kv_len, device=device)
    return (req.spec.mode, req.spec.gamma, t0 <= kv_len - 1,
            (cols[None, :] >= r0[:, None]) & (cols[None, :] < r1[:, None]))


def probe_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The PROBE_IMPL attention function: calibrated attention, plus the last-row span mass while probing."""
    out = calibrated_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    state = _PROBE.get()
    if state is not None and kwargs.get("is_causal") is not False:
        layer = _self_attention_layer(module, state.n_layers)
        if layer is not None and key.shape[2] == state.spans.shape[1]:
            calib = _calibration_of(layer, query.shape[0], key.shape[2], query.device)
            bias = state.bias if attention_mask is not None else None
            state.mass[layer] = last_row_mass(query, key, None if bias is not None else attention_mask, scaling,
                                              state.spans, calib, bias=bias)
    return out


def register_probe() -> str:
    """Register PROBE_IMPL (and the calibrated attention it wraps) with transformers. Idempotent; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from guardalign.attention.calibration import register

    register()
    AttentionInterface.register(PROBE_IMPL, probe_attention)
    AttentionMaskInterface.register(PROBE_IMPL, sdpa_mask)
    return PROBE_IMPL
