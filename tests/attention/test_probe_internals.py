"""TGA probe internals (DESIGN §1.3): ranks, first layers, pooling, cosine and the last row's attention mass,
each against a computation written out here (loops, explicit softmax), not against the module's own helpers."""
from __future__ import annotations

import math

import pytest
import torch

from guardalign.attention.calibration import CalibrationSpec, Positions, calibrating, modify_scores
from guardalign.attention.probe import (
    cosine, first_layer, lens_logits, last_row_mass, pool, probe_attention, probing, token_ranks,
)


def test_token_ranks_hand_worked():
    logits = torch.tensor([[0.1, 2.0, -1.0, 2.0, 0.5], [3.0, 1.0, 1.0, 0.0, -2.0]])
    ids = torch.tensor([1, 2, 4])
    # row 0: token 1 (2.0) ties with token 3: rank 1; token 2 (−1.0): 5; token 4 (0.5): 3
    # row 1: token 1 (1.0) below 3.0 only: rank 2; token 2 ties token 1: rank 2; token 4 (−2.0): 5
    assert token_ranks(logits, ids).tolist() == [[1, 5, 3], [2, 2, 5]]


def test_first_layer():
    assert first_layer([300, 12, 9, 1, 4], 10) == 2
    assert first_layer([300, 12, 9, 1, 4], 1) == 3
    assert first_layer([300, 12], 1) is None
    assert first_layer([], 5) is None


def test_pool_and_cosine_hand_worked():
    h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 9.0]]])  # (1, 3, 2)
    pooled = pool(h, torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.allclose(pooled, torch.tensor([[2.0, 1.0]]))  # mean of rows 0 and 1
    assert torch.equal(pool(h, torch.zeros(1, 3)), torch.zeros(1, 2))
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])
    assert cosine(a, b).item() == pytest.approx(24 / 25)
    assert cosine(a, torch.zeros(1, 2)).item() == 0.0


def test_lens_logits_standard_and_raw():
    norm = lambda x: x * 2  # noqa: E731 - stand-ins: a "norm" that doubles, an identity LM head
    head = lambda x: x  # noqa: E731
    last = torch.tensor([[[1.0, -1.0]], [[3.0, 0.5]], [[-2.0, 4.0]]])  # (L=3, B=1, D=2)
    assert torch.equal(lens_logits(last, norm, head, "standard"), 2 * last)
    raw = lens_logits(last, norm, head, "raw")
    assert torch.equal(raw[:2], last[:2]) and torch.equal(raw[2], 2 * last[2])  # the last state is normed
    with pytest.raises(ValueError, match="lens"):
        lens_logits(last, norm, head, "other")


def _reference_mass(q, k, mask_row, scaling, spans, calib=None):
    """Loops: per batch row and head, logits of the last query, calibrated, masked, softmax, summed per span."""
    bsz, n_heads, _, d = q.shape
    g = n_heads // k.shape[1]
    out = torch.zeros(bsz, spans.shape[2])
    for b in range(bsz):
        for h in range(n_heads):
            z = torch.tensor([float(q[b, h, -1] @ k[b, h // g, j]) * scaling for j in range(k.shape[2])])
            if calib is not None:
                mode, gamma, rows, cols = calib
                z = modify_scores(z[None], z[None], mode, gamma, rows[b:b + 1], cols[b])[0]
            z = torch.where(mask_row[b], z, torch.tensor(-math.inf))
            p = torch.exp(z - z.max())
            p = p / p.sum()
            out[b] += (p[:, None] * spans[b]).sum(0) / n_heads
    return out


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_last_row_mass_against_loops(mask_kind, calibrated):
    g = torch.Generator().manual_seed(1)
    bsz, n_heads, n_kv, s, d = 2, 4, 2, 7, 8
    q, k = torch.randn(bsz, n_heads, s, d, generator=g), torch.randn(bsz, n_kv, s, d, generator=g)
    keep = torch.ones(bsz, s, dtype=torch.bool)
    keep[1, :2] = False  # row 1 is left-padded by two
    spans = torch.zeros(bsz, s, 2)
    spans[:, 2:4, 0] = 1
    spans[:, 4:6, 1] = 1
    mask = None
    if mask_kind == "bool":
        mask = keep[:, None, None, :].expand(bsz, 1, s, s)
    elif mask_kind == "float":
        mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :].expand(bsz, 1, s, s)
    mask_row = keep if mask_kind != "none" else torch.ones(bsz, s, dtype=torch.bool)
    calib = None
    if calibrated:
        cols = torch.zeros(bsz, s, dtype=torch.bool)
        cols[:, 3:5] = True
        calib = ("pai", 2.0, torch.tensor([True, False]), cols)
    got = last_row_mass(q, k, mask, 0.3, spans, calib)
    want = _reference_mass(q, k, mask_row, 0.3, spans, calib)
    assert torch.allclose(got, want, atol=1e-6)
    if calibrated:  # row 0 is in T (calibrated), row 1 is not: only row 0 moves
        plain = last_row_mass(q, k, mask, 0.3, spans)
        assert not torch.allclose(got[0], plain[0]) and torch.allclose(got[1], plain[1])


class _Attn:
    """A stand-in attention module: causal text self-attention of layer 1 (what calibration looks for)."""

    is_causal, layer_idx, training = True, 1, False


def test_probe_attention_records_only_while_probing_and_applies_calibration():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    spans = torch.zeros(1, 5, 1)
    spans[0, :2, 0] = 1  # the prefix columns
    out_plain = probe_attention(_Attn(), q, k, v, None)[0]
    with probing(spans, 4) as state:
        out = probe_attention(_Attn(), q, k, v, None)[0]
    assert torch.equal(out, out_plain)  # the output is the model's attention, untouched
    assert state.mass[0] is None and state.mass[1] is not None
    assert torch.allclose(state.mass[1], last_row_mass(q, k, None, None, spans))
    pos = Positions(prefix=((0, 2),), instr_start=(2,))
    with calibrating(CalibrationSpec(mode="scale", gamma=3.0, layers=(1, 2)), pos, 4), probing(spans, 4) as hot:
        probe_attention(_Attn(), q, k, v, None)
    cols = torch.tensor([[True, True, False, False, False]])
    want = last_row_mass(q, k, None, None, spans, ("scale", 3.0, torch.tensor([True]), cols))
    assert torch.allclose(hot.mass[1], want) and not torch.allclose(hot.mass[1], state.mass[1])
