"""Tests for guardalign.detection.transport against POT, numpy and hand-worked cases (DESIGN §1.1)."""
from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from guardalign.detection import transport as tr
from guardalign.errors import GuardalignError

F64 = torch.float64


def _rand_unit(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return tr.l2_normalize(torch.randn(*shape, generator=g, dtype=dtype))


def _problem(n_per_cat, B=3, M=6, D=16, seed=0, interleave=True):
    """Random patches x (B,M,D), variants z (V,D) and owner (V,) for categories with n_per_cat variants."""
    owner = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(n_per_cat)])
    if interleave:  # variants of a category need not be contiguous
        owner = owner[torch.randperm(len(owner), generator=torch.Generator().manual_seed(seed + 7))]
    return _rand_unit(B, M, D, seed=seed), _rand_unit(len(owner), D, seed=seed + 1), owner


def _ref_sinkhorn(a, b, C, eps):
    """POT's single-problem log-domain Sinkhorn, run to tight convergence, as numpy."""
    return ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)


# --------------------------------------------------------------------------- sinkhorn_batch


@pytest.mark.parametrize("K,m,n,eps", [(1, 3, 4, 0.1), (5, 7, 3, 0.05), (4, 12, 9, 0.2), (2, 1, 5, 0.05)])
def test_sinkhorn_batch_matches_ot_sinkhorn(K, m, n, eps):
    g = torch.Generator().manual_seed(K * 100 + m * 10 + n)
    cost = torch.rand(K, m, n, generator=g, dtype=F64)
    a = torch.softmax(torch.randn(K, m, generator=g, dtype=F64), -1)
    b = torch.softmax(torch.randn(K, n, generator=g, dtype=F64), -1)
    plans = tr.sinkhorn_batch(cost, a, b, eps, max_iter=20000, tol=1e-12)
    assert plans.shape == (K, m, n) and plans.dtype == F64
    for k in range(K):
        ref = _ref_sinkhorn(a[k], b[k], cost[k], eps)
        np.testing.assert_allclose(plans[k].numpy(), ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(plans[k].sum(1).numpy(), a[k].numpy(), atol=1e-10)
        np.testing.assert_allclose(plans[k].sum(0).numpy(), b[k].numpy(), atol=1e-10)


def test_sinkhorn_batch_float32_close_to_float64():
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(6, 8, 5, generator=g, dtype=F64)
    a = torch.softmax(torch.randn(6, 8, generator=g, dtype=F64), -1)
    b = torch.softmax(torch.randn(6, 5, generator=g, dtype=F64), -1)
    p64 = tr.sinkhorn_batch(cost, a, b, 0.05, max_iter=5000, tol=1e-10)
    p32 = tr.sinkhorn_batch(cost.float(), a.float(), b.float(), 0.05, max_iter=5000, tol=1e-6)
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.double(), p64, atol=1e-5, rtol=0)


def test_sinkhorn_batch_zero_mass_columns_give_zero_and_no_nan():
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(3, 4, 6, generator=g, dtype=F64)
    a = torch.full((3, 4), 0.25, dtype=F64)
    b = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [0.2, 0.2, 0.2, 0.2, 0.2, 0], [1.0, 0, 0, 0, 0, 0]], dtype=F64)
    plans = tr.sinkhorn_batch(cost, a, b, 0.05, tol=1e-10)
    assert torch.isfinite(plans).all()
    assert (plans[(b == 0)[:, None, :].expand_as(plans)] == 0).all()
    ref = _ref_sinkhorn(a[0], b[0, :2], cost[0, :, :2], 0.05)
    np.testing.assert_allclose(plans[0, :, :2].numpy(), ref, atol=1e-6)


def test_sinkhorn_batch_rejects_bad_shapes_and_eps():
    cost, a, b = torch.rand(2, 3, 4), torch.full((2, 3), 1 / 3), torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="expected cost"):
        tr.sinkhorn_batch(cost, a[:, :2], b, 0.1)
    with pytest.raises(ValueError, match="eps"):
        tr.sinkhorn_batch(cost, a, b, 0.0)


def test_sinkhorn_batch_result_without_plan_names_pot_version(monkeypatch):
    import ot.batch

    class Old:  # a result object of an incompatible release
        pass

    monkeypatch.setattr(ot.batch, "solve_batch", lambda M, **kw: Old())
    with pytest.raises(GuardalignError, match=f"POT {ot.__version__}.*without a .plan"):
        tr.sinkhorn_batch(torch.rand(1, 2, 2), torch.full((1, 2), 0.5), torch.full((1, 2), 0.5), 0.1)


# --------------------------------------------------------------------------- padding / plans


def test_unequal_variant_counts_plans_equal_per_category_solves():
    counts = [3, 1, 5, 2]
    x, z, owner = _problem(counts, B=3, M=6)
    eps = 0.05
    s = tr.ot_patch_scores(x, z, owner, 4, 100.0, eps=eps, return_plans=True, max_iter=20000, tol=1e-12)
    assert s.plans.shape == (3, 4, 6, max(counts))
    assert torch.isfinite(s.plans).all() and torch.isfinite(s.d).all()
    cos = torch.einsum("bmd,vd->bmv", x, z)
    for i, n_i in enumerate(counts):
        sel = torch.nonzero(owner == i).flatten()  # variant order within the category = input order
        for bi in range(3):
            C_i = 1 - cos[bi][:, sel]
            # padded columns are exactly zero
            assert (s.plans[bi, i, :, n_i:] == 0).all()
            # same as POT's single-problem solver on the unpadded category
            ref = _ref_sinkhorn(s.a[bi], s.b[sel], C_i, eps)
            np.testing.assert_allclose(s.plans[bi, i, :, :n_i].numpy(), ref, atol=1e-5, rtol=0)
            # and (to rounding) the same as the batched solver run on that category alone
            alone = tr.sinkhorn_batch(C_i[None], s.a[bi][None], s.b[sel][None], eps, max_iter=20000, tol=1e-12)[0]
            torch.testing.assert_close(s.plans[bi, i, :, :n_i], alone, atol=1e-12, rtol=0)
            d_ref = (torch.as_tensor(ref) * C_i).sum(1) / s.a[bi]
            np.testing.assert_allclose(s.d[bi, :, i].numpy(), d_ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(F64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("iters", [1, 11])
def test_padding_is_exact_along_the_whole_sinkhorn_trajectory(iters, dtype, atol):
    """Even before convergence (max_iter = 1, 11), the padded plan equals the unpadded one."""
    counts = [4, 1, 2]
    x, z, owner = _problem(counts, B=2, M=5, seed=3)
    x, z = x.to(dtype), z.to(dtype)
    s = tr.ot_patch_scores(x, z, owner, 3, 100.0, eps=0.02, return_plans=True, max_iter=iters, tol=0.0)
    C = tr.cost_matrix(x, z)
    for i, n_i in enumerate(counts):
        sel = torch.nonzero(owner == i).flatten()
        alone = tr.sinkhorn_batch(C[:, :, sel], s.a, s.b[sel].expand(2, n_i), 0.02, max_iter=iters, tol=0.0)
        torch.testing.assert_close(s.plans[:, i, :, :n_i], alone, atol=atol, rtol=0)
        assert (s.plans[:, i, :, n_i:] == 0).all()


def test_all_categories_solved_in_one_sinkhorn_call(monkeypatch):
    calls = []
    real = tr.sinkhorn_batch

    def spy(cost, a, b, eps, **kw):
        calls.append(cost.shape)
        return real(cost, a, b, eps, **kw)

    monkeypatch.setattr(tr, "sinkhorn_batch", spy)
    x, z, owner = _problem([2, 4, 3], B=5, M=4)
    tr.ot_patch_scores(x, z, owner, 3, 100.0)
    assert calls == [torch.Size([15, 4, 4])]


# --------------------------------------------------------------------------- entropy and weights


def test_entropy_hand_worked():
    C = 5
    assert tr.entropy(torch.eye(C, dtype=F64)).tolist() == [0.0] * C  # one-hot: 0 (0·log0 = 0)
    assert tr.entropy(torch.full((C,), 1 / C, dtype=F64)).item() == pytest.approx(math.log(C), abs=1e-12)
    assert tr.entropy(torch.tensor([0.5, 0.5, 0.0], dtype=F64)).item() == pytest.approx(math.log(2), abs=1e-12)
    p = torch.tensor([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]], dtype=F64)
    np.testing.assert_allclose(tr.entropy(p).numpy(), -(p.numpy() * np.log(p.numpy())).sum(1), atol=1e-12)
    np.testing.assert_allclose(tr.entropy(p.T, dim=0).numpy(), tr.entropy(p).numpy(), atol=1e-15)


def test_entropy_weights_sign_ruling_hand_worked():
    h = torch.tensor([0.0, math.log(2)], dtype=F64)
    # softmax(−h) = [1, 1/2] / (3/2) = [2/3, 1/3]
    np.testing.assert_allclose(tr.entropy_weights(h, "entropy").numpy(), [2 / 3, 1 / 3], atol=1e-12)
    np.testing.assert_allclose(tr.entropy_weights(h, "entropy_positive").numpy(), [1 / 3, 2 / 3], atol=1e-12)
    np.testing.assert_allclose(tr.entropy_weights(h, "uniform").numpy(), [0.5, 0.5], atol=1e-15)
    with pytest.raises(ValueError, match="entropy_positive"):
        tr.entropy_weights(h, "softmax")


def test_patch_weights_low_entropy_patch_weighs_more_under_ruling():
    zbar = torch.eye(3, dtype=F64)
    x = torch.stack([torch.tensor([1.0, 0, 0]), torch.ones(3) / 3**0.5, torch.tensor([0.6, 0.8, 0.0])])
    x = x.to(F64)[None]  # (1, 3, 3): confident, maximally unsure, in between
    h = tr.entropy(tr.posterior(x, zbar, 100.0))[0]
    assert h[0] < h[2] < h[1] and h[1].item() == pytest.approx(math.log(3), abs=1e-12)
    a = tr.patch_weights(x, zbar, 100.0, "entropy")[0]
    assert a[0] > a[2] > a[1]
    np.testing.assert_allclose(a.numpy(), np.exp(-h.numpy()) / np.exp(-h.numpy()).sum(), atol=1e-12)
    a_pos = tr.patch_weights(x, zbar, 100.0, "entropy_positive")[0]
    assert a_pos[0] < a_pos[2] < a_pos[1]
    np.testing.assert_allclose(tr.patch_weights(x, zbar, 100.0, "uniform")[0].numpy(), [1 / 3] * 3, atol=1e-15)


@pytest.mark.parametrize("mode", ["entropy", "uniform", "entropy_positive"])
def test_variant_weights_per_category_against_numpy(mode):
    _, z, owner = _problem([3, 1, 4, 2], seed=5)
    zbar = tr.category_means(z, owner, 4)
    b = tr.variant_weights(z, owner, zbar, 50.0, mode)
    sums = torch.zeros(4, dtype=F64).index_add_(0, owner, b)
    np.testing.assert_allclose(sums.numpy(), np.ones(4), atol=1e-12)
    zn, zb = z.numpy(), zbar.numpy()
    logit = 50.0 * zn @ zb.T
    p = np.exp(logit - logit.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = -(p * np.log(p)).sum(1)
    sign = {"entropy": -1.0, "uniform": 0.0, "entropy_positive": 1.0}[mode]
    for i in range(4):
        sel = (owner == i).numpy()
        w = np.exp(sign * h[sel])
        np.testing.assert_allclose(b.numpy()[sel], w / w.sum(), atol=1e-12)


# --------------------------------------------------------------------------- means, posterior, cost


def test_category_means_posterior_cost_against_numpy():
    x, z, owner = _problem([2, 3, 1], B=2, M=4, D=8, seed=11)
    zbar = tr.category_means(z, owner, 3)
    zn, on = z.numpy(), owner.numpy()
    for i in range(3):
        mu = zn[on == i].mean(0)
        np.testing.assert_allclose(zbar[i].numpy(), mu / np.linalg.norm(mu), atol=1e-12)
    x_raw = 3.0 * x  # cos must not depend on the input norm
    cos = np.einsum("bmd,cd->bmc", x.numpy(), zbar.numpy())
    lg = 30.0 * cos
    p = np.exp(lg) / np.exp(lg).sum(-1, keepdims=True)
    np.testing.assert_allclose(tr.posterior(x_raw, zbar, 30.0).numpy(), p, atol=1e-12)
    cost = 1 - np.einsum("bmd,vd->bmv", x.numpy(), zn)
    np.testing.assert_allclose(tr.cost_matrix(x_raw, z).numpy(), cost, atol=1e-12)


def test_owner_validation():
    z = _rand_unit(4, 8)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        tr.category_means(z, torch.tensor([0, 1, 2, 1]), 2)
    with pytest.raises(ValueError, match=r"categories \[1\] have no variants"):
        tr.category_means(z, torch.tensor([0, 0, 2, 2]), 3)
    with pytest.raises(ValueError, match="shape"):
        tr.category_means(z, torch.tensor([0, 1]), 2)


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("k", [2, 4])
def test_d_invariant_to_duplicated_patches_and_d_paper_shrinks(k):
    x, z, owner = _problem([3, 2, 4], B=2, M=5, seed=2)
    kw = dict(eps=0.05, max_iter=20000, tol=1e-12)
    s1 = tr.ot_patch_scores(x, z, owner, 3, 100.0, **kw)
    sk = tr.ot_patch_scores(x.repeat_interleave(k, dim=1), z, owner, 3, 100.0, **kw)
    torch.testing.assert_close(sk.d, s1.d.repeat_interleave(k, dim=1), atol=1e-9, rtol=0)
    torch.testing.assert_close(sk.a, s1.a.repeat_interleave(k, dim=1) / k, atol=1e-12, rtol=0)
    torch.testing.assert_close(sk.d_paper, s1.d_paper.repeat_interleave(k, dim=1) / k, atol=1e-10, rtol=1e-8)


def test_d_is_expected_cost_of_patch_mass():
    x, z, owner = _problem([2, 5, 3], B=3, M=7, seed=4)
    s = tr.ot_patch_scores(x, z, owner, 3, 100.0, return_plans=True)
    cos = torch.einsum("bmd,vd->bmv", x, z)
    for i in range(3):
        sel = torch.nonzero(owner == i).flatten()
        T = s.plans[:, i, :, : len(sel)]
        total = (T * (1 - cos[:, :, sel])).sum((1, 2))  # <T_i, C_i> per image
        torch.testing.assert_close((s.a * s.d[:, :, i]).sum(1), total, atol=1e-12, rtol=0)
    torch.testing.assert_close(s.d_paper, (s.a[:, :, None] * s.d).sum(-1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_patch_has_lowest_d_for_its_category(seed):
    B, M, D = 2, 9, 64
    x, z, owner = _problem([4, 3, 5, 2], B=B, M=M, D=D, seed=seed)
    g = torch.Generator().manual_seed(seed + 99)
    j = int(torch.randint(len(owner), (1,), generator=g))
    cat = int(owner[j])
    planted = tr.l2_normalize(z[j] + 0.02 * torch.randn(D, generator=g, dtype=F64))
    x = x.clone()
    x[:, 4] = planted
    s = tr.ot_patch_scores(x, z, owner, 4, 100.0)
    assert (s.d[:, :, cat].argmin(dim=1) == 4).all()
    assert (s.d[:, 4, :].argmin(dim=1) == cat).all()
    assert (s.d[:, 4, cat] < 0.1).all() and (s.d[:, :4, cat] > 0.5).all()


def test_float32_and_half_inputs():
    x, z, owner = _problem([2, 3], B=2, M=4, seed=6)
    s64 = tr.ot_patch_scores(x, z, owner, 2, 100.0)
    s32 = tr.ot_patch_scores(x.float(), z.float(), owner, 2, 100.0)
    assert s32.d.dtype == torch.float32 and s32.a.dtype == torch.float32
    torch.testing.assert_close(s32.d.double(), s64.d, atol=1e-4, rtol=0)
    s16 = tr.ot_patch_scores(x.half(), z.half(), owner, 2, 100.0)  # promoted to float32
    assert s16.d.dtype == torch.float32 and torch.isfinite(s16.d).all()


def test_shapes_and_uniform_weighting():
    x, z, owner = _problem([2, 3, 1], B=4, M=9, seed=8)
    s = tr.ot_patch_scores(x, z, owner, 3, 100.0, patch_weighting="uniform", variant_weighting="uniform")
    assert s.d.shape == (4, 9, 3) and s.d_paper.shape == (4, 9) and s.plans is None
    torch.testing.assert_close(s.a, torch.full((4, 9), 1 / 9, dtype=F64))
    expected_b = torch.tensor([1 / 2, 1 / 3, 1.0], dtype=F64)[owner]
    torch.testing.assert_close(s.b, expected_b)
    assert ((s.d >= 0) & (s.d <= 2)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, z, owner = _problem([3, 1, 4], B=4, M=9, seed=9)
    cpu = tr.ot_patch_scores(x.float(), z.float(), owner, 3, 100.0, return_plans=True)
    gpu = tr.ot_patch_scores(x.float().cuda(), z.float().cuda(), owner.cuda(), 3, 100.0, return_plans=True)
    assert gpu.d.is_cuda and gpu.plans.is_cuda
    torch.testing.assert_close(gpu.d.cpu(), cpu.d, atol=1e-5, rtol=0)
    torch.testing.assert_close(gpu.plans.cpu(), cpu.plans, atol=1e-6, rtol=0)
