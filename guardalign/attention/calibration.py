"""Attention calibration (GuardAlign Eqs. 12-14, DESIGN §1.2) as a transformers attention function.

Load a model with ``attn_implementation=register()``. Outside ``calibrating(...)`` the registered function is
plain SDPA (the transformers kernel, bitwise). Inside it, on the calibrated decoder layers, the query rows
in T (question tokens after the prefix, then every generated token) are recomputed eagerly with the logits
to the prefix columns R amplified, and overwrite those rows of the SDPA output (when every row is recomputed,
as at a decode step, the SDPA call is skipped). Everything else keeps SDPA. With ``audit=True`` the T→R
attention mass is measured on every self-attention layer (T rows only), calibrated or not.

Positions are absolute key positions in the padded sequence (left padding included). A query row's
position is ``key_len - q_len + i`` (a growing KV cache: generate()'s default DynamicCache), or ``i`` for an
unmasked multi-token prefill (SDPA's upper-left causal alignment). Static / sliding-window caches that drop
or pre-allocate keys are not supported.

torch and transformers are imported lazily so that ``cli/`` can import this module cheaply.
"""
from __future__ import annotations

import contextvars
import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from guardalign.attention.scores import (  # noqa: F401 (the public names stay importable from here)
    MODES, CalibrationSpec, Positions, _modify, modify_scores, parse_layers,
)
from guardalign.errors import ConfigError

ATTN_IMPL = "guardalign_calibrated"  # name passed as attn_implementation= when loading models
class Audit:
    """Accumulates, per layer, the attention mass from T rows to R columns over every forward step."""

    def __init__(self, n_layers: int, enabled: bool = True):
        self.n_layers = n_layers  # decoder layer count the curve is indexed by
        self.enabled = enabled  # False: nothing is measured and mass() is all None
        self._sum: list[Any] = [None] * n_layers  # per layer: 0-dim device tensor, Σ over (T row, head) of mass
        self._count: list[int] = [0] * n_layers  # per layer: number of (T row, head) pairs summed

    def add(self, layer: int, mass_sum, count: int) -> None:
        """Add a step's T→R mass summed over ``count`` (T row, head) pairs (0-dim tensor, no sync) to ``layer``."""
        mass_sum, total = mass_sum.detach().float(), self._sum[layer]
        # Out of place: a sum begun in inference mode may go on outside it (no in-place update of inference tensors).
        self._sum[layer] = mass_sum if total is None else total + mass_sum
        self._count[layer] += count

    def mass(self) -> list[float | None]:
        """Per layer: mean T→R attention mass (post-softmax sum over R, averaged over heads, T rows, batch rows
        and steps); None for layers never seen (audit off, cross-attention layers, no T rows)."""
        return [float(s) / c if c else None for s, c in zip(self._sum, self._count)]


@dataclass
class _Geometry:
    """Where the T rows and R columns of one forward step lie; shared by every layer of that step."""

    first: int  # first query row (in this call) in T for some batch row; rows first: are recomputed
    all_rows: bool  # every (batch row, query row ≥ first) pair is in T: overwrite without a select
    single: bool  # one query row, in T on every batch row (a decode step): the lean (B, Hkv, g, ·) path
    count: int  # number of (batch row, query row) pairs in T
    gpair: Any  # z's dtype, γ on the (T, R) pairs, 0 elsewhere: (B, 1, 1, k) if single, else (B, 1, 1, n|1, k)
    col_f: Any  # (B, k, 1) float32: key column j is in R for batch row b (None when audit is off)
    row_sel: Any  # (B, n, 1, 1) bool: query row first+i is in T for batch row b (output layout); None if all_rows
    row_f: Any  # (B, 1, n) float32 row mask for the audit; None if all_rows
    blocked: Any  # (n, k) bool "may not attend" (causal) when the model passed no mask and q > 1, else None


@dataclass
class _Request:
    spec: CalibrationSpec  # validated spec
    positions: Positions  # per-row R and t0
    n_layers: int  # decoder layer count
    calibrated: range  # layers whose logits are modified: [start, stop), empty when the spec is inactive
    audit: Audit | None  # accumulator, None when audit is off
    _geo_key: tuple | None = None  # key of the cached step geometry
    _geo: _Geometry | None = None  # geometry of the latest step (None: no T rows in it)
    _rows_of: dict = field(default_factory=dict)  # batch size -> per batch row (r0, r1, t0) lists
    _cols: dict = field(default_factory=dict)  # (batch, dtype, device, inference?) -> _columns' pair

    def _rows(self, batch: int) -> tuple[list[int], list[int], list[int]]:
        """Per batch row (r0, r1, t0); positions rows are repeated consecutively when generate() expands the
        batch (num_beams, num_return_sequences)."""
        if batch not in self._rows_of:
            n = len(self.positions.instr_start)
            if batch % n:
                raise ConfigError(f"calibration positions describe {n} rows but the model ran a batch of {batch}")
            rep = batch // n
            self._rows_of[batch] = ([r[0] for r in self.positions.prefix for _ in range(rep)],
                                    [r[1] for r in self.positions.prefix for _ in range(rep)],
                                    [t for t in self.positions.instr_start for _ in range(rep)])
        return self._rows_of[batch]

    def _columns(self, batch: int, kv_len: int, dtype, device):
        """γ·1[j ∈ R] in ``dtype`` (B, 1, 1, cap) and 1[j ∈ R] float32 (B, cap, 1), cap ≥ kv_len, per (batch, dtype,
        device, inference mode: an inference tensor cannot be saved for backward). Built with spare length (doubled
        when outgrown) so that a decode step, one key longer, only slices them."""
        import torch

        key = (batch, dtype, device, torch.is_inference_mode_enabled())
        hit = self._cols.get(key)
        if hit is None or hit[0].shape[-1] < kv_len:
            r0, r1, _ = self._rows(batch)
            cols = torch.arange(max(2 * kv_len, 64), device=device)
            col = (cols >= torch.tensor(r0, device=device)[:, None]) & (cols < torch.tensor(r1, device=device)[:, None])
            hit = self._cols[key] = ((col.to(dtype) * self.spec.gamma)[:, None, None, :], col.float()[:, :, None])
        return hit

    def geometry(self, batch: int, q_len: int, kv_len: int, masked: bool, dtype, device) -> _Geometry | None:
        """The step geometry, None when no query row is in T. Query row i sits at key position
        ``offset + i``: offset = kv_len − q_len, or 0 for an unmasked multi-token prefill (SDPA's upper-left
        causal alignment)."""
        import torch

        key = (batch, q_len, kv_len, masked, dtype, device, torch.is_inference_mode_enabled())
        if key != self._geo_key:
            self._geo_key, self._geo = key, self._build(batch, q_len, kv_len, masked, dtype, device)
        return self._geo

    def _build(self, batch: int, q_len: int, kv_len: int, masked: bool, dtype, device) -> _Geometry | None:
        _, _, t0 = self._rows(batch)
        offset = 0 if (not masked and q_len > 1) else kv_len - q_len
        first = max(0, min(t0) - offset)
        if first >= q_len:
            return None
        all_rows = max(t0) <= offset + first
        count = sum(max(0, offset + q_len - max(t, offset + first)) for t in t0)
        gcol, colf = self._columns(batch, kv_len, dtype, device)
        col_f = colf[:, :kv_len] if self.audit is not None else None
        if q_len == 1 and all_rows:
            return _Geometry(first=0, all_rows=True, single=True, count=count, gpair=gcol[..., :kv_len],
                             col_f=col_f, row_sel=None, row_f=None, blocked=None)
        import torch

        pos = torch.arange(first, q_len, device=device) + offset  # (n,)
        gpair, row_sel, row_f = gcol[..., None, :kv_len], None, None
        if not all_rows:
            rows = pos[None, :] >= torch.tensor(t0, device=device)[:, None]  # (B, n)
            gpair = rows[:, None, None, :, None].to(dtype) * gpair
            row_sel, row_f = rows[:, :, None, None], rows.float()[:, None, :]
        blocked = None if masked or q_len == 1 else torch.arange(kv_len, device=device)[None, :] > pos[:, None]
        return _Geometry(first=first, all_rows=all_rows, single=False, count=count, gpair=gpair, col_f=col_f,
                         row_sel=row_sel, row_f=row_f, blocked=blocked)


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("guardalign_calibration", default=None)


@contextmanager
def calibrating(
    spec: CalibrationSpec, positions: Positions, n_layers: int, *, audit: bool = True
) -> Iterator[Audit]:
    """Calibrate every forward pass (prefill and each decode step) of models loaded with ATTN_IMPL inside
    this block, in this context (thread / task) only. Yields the Audit that collects the T→R mass per layer.
    ``n_layers`` is the LM's decoder layer count (Mllama: including its cross-attention layers)."""
    spec = spec.validate()
    layers = range(*spec.resolve_layers(n_layers)) if spec.active else range(0)
    acc = Audit(n_layers, enabled=audit)
    token = _REQUEST.set(_Request(spec, positions, n_layers, layers, acc if audit else None))
    try:
        yield acc
    finally:
        _REQUEST.reset(token)


def _self_attention_layer(module, n_layers: int) -> int | None:
    """The decoder layer index of a causal text self-attention module, else None (vision towers, Mllama
    cross-attention: no ``is_causal`` attribute / ``is_causal`` False / no ``layer_idx``)."""
    idx = getattr(module, "layer_idx", None)
    if getattr(module, "is_causal", False) is not True or isinstance(idx, bool) or not isinstance(idx, int):
        return None
    if "cross" in type(module).__name__.lower() or not 0 <= idx < n_layers:
        return None
    return idx


@functools.cache
def _sdpa_forward():
    """transformers' ``sdpa_attention_forward``, imported on first use (this module imports without torch)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def calibrated_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The ATTN_IMPL attention function (transformers' AttentionInterface contract).

    Parameters
    ----------
    query : Tensor (B, H, q, d);  key, value : Tensor (B, Hkv, k, d)
    attention_mask : None, bool (B, 1, q, k) (True = attend) or additive float (B, 1, q, k)

    Returns
    -------
    (attn_output (B, q, H, d), None), as transformers' sdpa_attention_forward.
    """
    sdpa = _sdpa_forward()
    req = _REQUEST.get()
    plan = None if req is None else _plan(req, module, query, key, attention_mask, kwargs)
    if plan is None:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer, calibrate, geo = plan
    if kwargs.get("position_bias") is not None:  # the eager recompute has no additive bias term
        raise NotImplementedError(f"{type(module).__name__} passes position_bias, which calibrated attention does not "
                                  "support; run this model with --calibration off")
    out = None  # when every output row is recomputed (typically a decode step), SDPA's output would be discarded
    if not (calibrate and geo.all_rows and geo.first == 0):
        out = sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0]
    return _recompute_t_rows(module, query, key, value, attention_mask, dropout, scaling, out, req, layer, calibrate,
                             geo)


def _plan(req: _Request, module, query, key, mask, kwargs: dict) -> tuple[int, bool, _Geometry] | None:
    """(layer, calibrate?, step geometry) when this call recomputes T rows (to calibrate or to audit them),
    None when it is plain SDPA (paged cache, non-causal call, not a text self-attention layer, no T rows)."""
    if kwargs.get("cache") is not None or kwargs.get("is_causal") is False:
        return None
    layer = _self_attention_layer(module, req.n_layers)
    if layer is None:
        return None
    calibrate = layer in req.calibrated
    if not calibrate and req.audit is None:
        return None
    bsz, _, q_len, _ = query.shape
    geo = req.geometry(bsz, q_len, key.shape[2], mask is not None, query.dtype, query.device)
    return None if geo is None else (layer, calibrate, geo)


def _recompute_t_rows(module, query, key, value, mask, dropout, scaling, out, req, layer, calibrate, geo):
    """Eagerly recompute the T rows (query rows ``first:``): record their T→R mass (audit) and, on calibrated
    layers, overwrite them in the SDPA output ``out`` (B, q, H, dv), or return them as the output when ``out`` is
    None (every row recomputed). Works on (B·Hkv, g·n, ·) views of the GQA heads (no repeat_kv copy); a decode
    step (``geo.single``) has no row axis, no row slice, no select and no output copy."""
    import torch

    bsz, n_heads, q_len, d = query.shape
    n_kv, kv_len, dv = key.shape[1], key.shape[2], value.shape[-1]
    g, first = n_heads // n_kv, geo.first
    n = q_len - first
    q_rows = query[:, :, first:] if first else query
    qk = torch.bmm(q_rows.reshape(bsz * n_kv, g * n, d), key.reshape(bsz * n_kv, kv_len, d).mT)
    z = qk.view((bsz, n_kv, g, kv_len) if geo.single else (bsz, n_kv, g, n, kv_len))
    z = z.mul_(scaling if scaling is not None else d ** -0.5)  # in place: a fresh product
    if calibrate:
        z = _modify(z, z, req.spec.mode, geo.gpair)
    if mask is not None or geo.blocked is not None:
        z = _apply_mask(z, mask, geo.blocked, first, n_kv, g)
    probs = torch.softmax(z, dim=-1, dtype=torch.float32)  # (B, Hkv, g, [n,] k)

    if req.audit is not None:  # Σ over (T row, head) of the mass on R
        mass = torch.matmul(probs.view(bsz, n_heads * n, kv_len), geo.col_f)  # (B, H·n, 1)
        total = mass.sum() if geo.all_rows else (mass.view(bsz, n_heads, n) * geo.row_f).sum()
        req.audit.add(layer, total, geo.count * n_heads)
    if not calibrate:
        return out, None
    p = probs if probs.dtype == value.dtype else probs.to(value.dtype)
    if dropout and module.training:
        p = torch.nn.functional.dropout(p, p=dropout, training=True)
    rows = torch.matmul(p.view(bsz, n_kv, g * n, kv_len), value)  # (B, Hkv, g·n, dv)
    if geo.single:
        return rows.view(bsz, 1, n_heads, dv), None
    rows = rows.view(bsz, n_heads, n, dv).transpose(1, 2)  # (B, n, H, dv)
    if out is None:
        return rows.contiguous(), None
    if not geo.all_rows:
        rows = torch.where(geo.row_sel, rows, out[:, first:])
    if out.requires_grad:  # out of place: SDPA's output may be saved for backward
        return torch.cat([out[:, :first], rows], dim=1), None
    out[:, first:] = rows  # no autograd: write into SDPA's output (a fresh tensor of its own)
    return out, None


def _apply_mask(z, mask, blocked, first, n_kv, g):
    """Mask logits z (B, Hkv, g, n, k), or (B, Hkv, g, k) for one query row, with rows ``first:`` of the model's
    mask, or with ``blocked`` (n, k) when the model passed none."""
    import torch

    neg = torch.finfo(z.dtype).min
    if mask is None:
        return z.masked_fill(blocked, neg)
    m = mask[..., first:, : z.shape[-1]]  # (B|1, 1|H, n, k)
    heads = (n_kv, g) if m.shape[1] > 1 else (1, 1)
    m = m.reshape(m.shape[0], *heads, *z.shape[3:])  # broadcastable to z
    if m.dtype == torch.bool:
        return z.masked_fill(~m, neg)
    return z + m.to(z.dtype)


def register() -> str:
    """Register ATTN_IMPL with transformers' AttentionInterface (and SDPA's mask with AttentionMaskInterface).
    Idempotent. Returns ATTN_IMPL, to pass as ``attn_implementation=``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, calibrated_attention)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
    return ATTN_IMPL
