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
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from guardalign.errors import ConfigError

ATTN_IMPL = "guardalign_calibrated"  # name passed as attn_implementation= when loading models
MODES = ("scale", "paper", "pai", "off")


@dataclass(frozen=True)
class CalibrationSpec:
    mode: str = "scale"  # scale: Z·(1+γ) where Z>0 | paper: Z + γ·max(0,Z)·Z | pai: Z + γ|Z| | off
    gamma: float = 0.5  # amplification γ ≥ 0 (0.5: PAI's α for LLaVA; the paper gives no number)
    layers: tuple[int, int] | None = None  # [start, stop) decoder layers; None = the middle half [L//4, 3L//4)

    def validate(self) -> "CalibrationSpec":
        """Return self, or raise ConfigError naming the bad field."""
        if self.mode not in MODES:
            raise ConfigError(f"invalid calibration mode={self.mode!r}: expected one of {MODES}")
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ConfigError(f"invalid gamma={g!r}: expected a finite number ≥ 0")
        if self.layers is not None:
            ok = (isinstance(self.layers, tuple) and len(self.layers) == 2
                  and all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers))
            if not ok:
                raise ConfigError(f"invalid layers={self.layers!r}: expected a pair of integers (start, stop)")
        return self

    @property
    def active(self) -> bool:
        """Whether any logit is modified at all (False for mode off and for γ = 0)."""
        return self.mode != "off" and self.gamma > 0

    def resolve_layers(self, n_layers: int) -> tuple[int, int]:
        """The calibrated layer range [start, stop) for a model with ``n_layers`` decoder layers.

        The default is ``[L//4, 3L//4)``, widened to one layer when that is empty (L < 2).
        Raises ConfigError when the range is empty or outside ``[0, n_layers]``.
        """
        self.validate()
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ConfigError(f"invalid n_layers={n_layers!r}: expected a positive integer")
        if self.layers is None:
            start = n_layers // 4
            return start, max(start + 1, (3 * n_layers) // 4)
        start, stop = self.layers
        if not 0 <= start < stop <= n_layers:
            raise ConfigError(
                f"invalid layers={start}:{stop}: expected 0 ≤ start < stop ≤ {n_layers} (the model's layer count)"
            )
        return start, stop


def parse_layers(text: str) -> tuple[int, int]:
    """Parse the ``--layers A:B`` flag into ``(A, B)``; raise ConfigError naming the flag when malformed."""
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"invalid --layers {text!r}: expected START:STOP, e.g. 8:24") from None


@dataclass(frozen=True)
class Positions:
    prefix: tuple[tuple[int, int], ...]  # per batch row: R = [r0, r1) absolute key positions of the prefix
    instr_start: tuple[int, ...]  # per batch row: T = every query position ≥ t0 (question, then generated tokens)

    def __post_init__(self) -> None:
        if len(self.prefix) != len(self.instr_start) or not self.prefix:
            raise ConfigError(
                f"positions: {len(self.prefix)} prefix spans but {len(self.instr_start)} instr_start values "
                "(need one of each per batch row, at least one row)"
            )
        for row, ((r0, r1), t0) in enumerate(zip(self.prefix, self.instr_start)):
            if not 0 <= r0 <= r1 <= t0:
                raise ConfigError(
                    f"positions row {row}: need 0 ≤ r0 ≤ r1 ≤ t0 (prefix before the instruction), "
                    f"got prefix=[{r0}, {r1}) instr_start={t0}"
                )


def modify_scores(z, qk, mode: str, gamma: float, row_mask, col_mask):
    """Apply the calibration of ``mode`` to scaled logits on the pairs (i in T, j in R).

    Parameters
    ----------
    z : Tensor (..., n, k)
        Scaled attention logits Z = QKᵀ·scaling, before the mask.
    qk : Tensor (..., n, k) or None
        The similarity ⟨Q_i, K_j⟩ of the ``paper`` mode (ignored by the others). The attention function passes
        Z itself (the scaled product), so γ means the same for every head dimension.
    mode : str
        ``scale``: Z·(1+γ) where Z > 0; ``paper``: Z + γ·max(0, qk)·Z; ``pai``: Z + γ|Z|; ``off``: Z.
    gamma : float
        γ ≥ 0.
    row_mask : bool Tensor broadcastable to (..., n)
        True for query rows in T.
    col_mask : bool Tensor broadcastable to (..., k)
        True for key columns in R.

    Returns
    -------
    Tensor (..., n, k): Ẑ, equal to ``z`` outside the T×R pairs.
    """
    if mode not in MODES:
        raise ConfigError(f"invalid calibration mode={mode!r}: expected one of {MODES}")
    if mode == "off" or gamma == 0:
        return z
    if mode == "paper" and qk is None:
        raise ValueError("modify_scores: mode 'paper' needs qk")
    pair = row_mask[..., :, None] & col_mask[..., None, :]
    return _modify(z, qk, mode, pair.to(z.dtype) * gamma)


def _modify(z, qk, mode: str, gpair):
    """Ẑ = Z + γ·1[pair]·f(Z) with f = relu(Z) (scale: Z·(1+γ) where Z > 0), relu(qk)·Z (paper), |Z| (pai).
    ``gpair`` is γ on the (i∈T, j∈R) pairs and 0 elsewhere, broadcastable to z; off pairs keep Z exactly."""
    import torch

    if mode == "scale":
        return torch.addcmul(z, z.relu(), gpair)
    if mode == "pai":
        return torch.addcmul(z, z.abs(), gpair)
    return torch.addcmul(z, qk.relu() * z, gpair)


class Audit:
    """Accumulates, per layer, the attention mass from T rows to R columns over every forward step."""

    def __init__(self, n_layers: int, enabled: bool = True):
        self.n_layers = n_layers  # decoder layer count the curve is indexed by
        self.enabled = enabled  # False: nothing is measured and mass() is all None
        self._sum: list[Any] = [None] * n_layers  # per layer: 0-dim device tensor, Σ over (T row, head) of mass
        self._count: list[int] = [0] * n_layers  # per layer: number of (T row, head) pairs summed

    def add(self, layer: int, mass_sum, count: int) -> None:
        """Add a step's T→R mass summed over ``count`` (T row, head) pairs (0-dim tensor, no sync) to ``layer``."""
        mass_sum = mass_sum.detach().float()
        if self._sum[layer] is None:
            self._sum[layer] = mass_sum.clone()
        else:
            self._sum[layer].add_(mass_sum)
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
    count: int  # number of (batch row, query row) pairs in T
    gpair: Any  # (B, 1, 1, n, k), z's dtype: γ on the (T, R) pairs, 0 elsewhere
    row_sel: Any  # (B, n, 1, 1) bool: query row first+i is in T for batch row b (output layout)
    row_f: Any  # (B, 1, n) float32 row mask for the audit
    col_f: Any  # (B, k, 1) float32: key column j is in R for batch row b
    causal: Any  # (n, k) bool "may attend" when the model passed no mask and q > 1, else None


@dataclass
class _Request:
    spec: CalibrationSpec  # validated spec
    positions: Positions  # per-row R and t0
    n_layers: int  # decoder layer count
    start: int  # first calibrated layer
    stop: int  # one past the last calibrated layer
    audit: Audit | None  # accumulator, None when audit is off
    _geo_key: tuple | None = None  # key of the cached step geometry
    _geo: _Geometry | None = None  # geometry of the latest step (None: no T rows in it)

    def _rows(self, batch: int) -> tuple[list[int], list[int], list[int]]:
        """Per batch row (r0, r1, t0); positions rows are repeated consecutively when generate() expands the
        batch (num_beams, num_return_sequences)."""
        n = len(self.positions.instr_start)
        if batch % n:
            raise ConfigError(f"calibration positions describe {n} rows but the model ran a batch of {batch}")
        rep = batch // n
        r0 = [r[0] for r in self.positions.prefix for _ in range(rep)]
        r1 = [r[1] for r in self.positions.prefix for _ in range(rep)]
        return r0, r1, [t for t in self.positions.instr_start for _ in range(rep)]

    def geometry(self, batch: int, q_len: int, kv_len: int, masked: bool, dtype, device) -> _Geometry | None:
        """The step geometry, None when no query row is in T. Query row i sits at key position
        ``offset + i``: offset = kv_len − q_len, or 0 for an unmasked multi-token prefill (SDPA's upper-left
        causal alignment)."""
        key = (batch, q_len, kv_len, masked, dtype, device)
        if key == self._geo_key:
            return self._geo
        import torch

        r0, r1, t0 = self._rows(batch)
        offset = 0 if (not masked and q_len > 1) else kv_len - q_len
        first = max(0, min(t0) - offset)
        geo = None
        if first < q_len:
            pos = torch.arange(first, q_len, device=device) + offset  # (n,)
            cols = torch.arange(kv_len, device=device)  # (k,)
            t0_t, r0_t, r1_t = (torch.tensor(v, device=device)[:, None] for v in (t0, r0, r1))
            rows = pos[None, :] >= t0_t  # (B, n)
            col = (cols[None, :] >= r0_t) & (cols[None, :] < r1_t)  # (B, k)
            pair = rows[:, None, None, :, None] & col[:, None, None, None, :]
            count = sum(max(0, offset + q_len - max(t, offset + first)) for t in t0)
            geo = _Geometry(
                first=first, all_rows=max(t0) <= offset + first, count=count,
                gpair=pair.to(dtype) * self.spec.gamma, row_sel=rows[:, :, None, None],
                row_f=rows.float()[:, None, :], col_f=col.float()[:, :, None],
                causal=None if masked or q_len == 1 else cols[None, :] <= pos[:, None],
            )
        self._geo_key, self._geo = key, geo
        return geo


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("guardalign_calibration", default=None)


@contextmanager
def calibrating(
    spec: CalibrationSpec, positions: Positions, n_layers: int, *, audit: bool = True
) -> Iterator[Audit]:
    """Calibrate every forward pass (prefill and each decode step) of models loaded with ATTN_IMPL inside
    this block, in this context (thread / task) only. Yields the Audit that collects the T→R mass per layer.
    ``n_layers`` is the LM's decoder layer count (Mllama: including its cross-attention layers)."""
    spec = spec.validate()
    start, stop = spec.resolve_layers(n_layers)
    acc = Audit(n_layers, enabled=audit)
    token = _REQUEST.set(_Request(spec, positions, n_layers, start, stop, acc if audit else None))
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
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    req = _REQUEST.get()
    if req is None or kwargs.get("cache") is not None or kwargs.get("is_causal") is False:
        return sdpa()
    layer = _self_attention_layer(module, req.n_layers)
    if layer is None:
        return sdpa()
    calibrate = req.spec.active and req.start <= layer < req.stop
    if not calibrate and req.audit is None:
        return sdpa()
    bsz, _, q_len, _ = query.shape
    geo = req.geometry(bsz, q_len, key.shape[2], attention_mask is not None, query.dtype, query.device)
    if geo is None:
        return sdpa()
    # When every output row is recomputed (typically a decode step), the SDPA output would be discarded.
    out = None if (calibrate and geo.all_rows and geo.first == 0) else sdpa()[0]
    return _recompute_t_rows(module, query, key, value, attention_mask, dropout, scaling, out, req, layer,
                             calibrate, geo)


def _recompute_t_rows(module, query, key, value, mask, dropout, scaling, out, req, layer, calibrate, geo):
    """Eagerly recompute the T rows: record their T→R mass (audit) and, on calibrated layers, overwrite them
    in the SDPA output ``out`` (B, q, H, dv), or return them as the output when ``out`` is None (every row
    recomputed). Works on (B, Hkv, g·n, ·) views of the GQA heads (no repeat_kv copy)."""
    import torch

    bsz, n_heads, q_len, d = query.shape
    n_kv, kv_len, dv = key.shape[1], key.shape[2], value.shape[-1]
    g = n_heads // n_kv
    first, n = geo.first, q_len - geo.first

    q_rows = query[:, :, first:, :].reshape(bsz, n_kv, g * n, d)
    z = torch.matmul(q_rows, key.transpose(-1, -2)).view(bsz, n_kv, g, n, kv_len)
    z = z * (scaling if scaling is not None else d ** -0.5)
    if calibrate:
        z = _modify(z, z, req.spec.mode, geo.gpair)
    z = _apply_mask(z, mask, geo.causal, first, n_kv, g)
    probs = torch.softmax(z, dim=-1, dtype=torch.float32)  # (B, Hkv, g, n, k)

    if req.audit is not None:  # Σ over (T row, head) of the mass on R
        mass = torch.matmul(probs.view(bsz, n_heads * n, kv_len), geo.col_f).view(bsz, n_heads, n)
        req.audit.add(layer, mass.sum() if geo.all_rows else (mass * geo.row_f).sum(), geo.count * n_heads)
    if not calibrate:
        return out, None
    p = probs.to(value.dtype)
    if dropout and module.training:
        p = torch.nn.functional.dropout(p, p=dropout, training=True)
    rows = torch.matmul(p.view(bsz, n_kv, g * n, kv_len), value)  # (B, Hkv, g·n, dv)
    rows = rows.view(bsz, n_heads, n, dv).transpose(1, 2)  # (B, n, H, dv)
    if out is None:
        return rows.contiguous(), None
    if not geo.all_rows:
        rows = torch.where(geo.row_sel, rows, out[:, first:])
    return torch.cat([out[:, :first], rows], dim=1), None  # out of place: SDPA's output may be saved for backward


def _apply_mask(z, mask, causal, first, n_kv, g):
    """Mask logits z (B, Hkv, g, n, k) with rows ``first:`` of the model's mask, or with ``causal`` (n, k)
    when the model passed none (None too: a single query row attends to every key)."""
    import torch

    neg = torch.finfo(z.dtype).min
    if mask is None:
        return z if causal is None else z.masked_fill(~causal, neg)
    m = mask[..., first:, : z.shape[-1]]  # (B|1, 1|H, n, k)
    if m.shape[1] == 1:
        m = m[:, :, None]
    else:
        m = m.reshape(m.shape[0], n_kv, g, *m.shape[-2:])
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
