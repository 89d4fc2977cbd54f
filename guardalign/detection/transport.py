r"""Entropy-weighted optimal transport between image patches and anchor texts (DESIGN §1.1).

Pure math on torch tensors: no I/O, no logging. Everything runs on the device and dtype of the
inputs (half precision is promoted to float32, because Sinkhorn in fp16/bf16 is not reliable).

Notation (GuardAlign Eqs. 7–10 with the DESIGN rulings):

- :math:`x^m`, m = 1..M: patch embeddings; :math:`z_i^n`, n = 1..N_i: variant embeddings of
  category i = 1..C; :math:`\bar z_i` the normalised mean of category i's variants.
- posterior :math:`p(i|x) = \mathrm{softmax}_i(s\cos(x, \bar z_i))`, entropy
  :math:`h(x) = -\sum_i p(i|x)\log p(i|x)`.
- patch weights :math:`a^m = \mathrm{softmax}_m(-h(x^m))`; variant weights
  :math:`b_i^n = \mathrm{softmax}_n(-h(z_i^n))` within category i.
- cost :math:`C_i(m,n) = 1 - \cos(x^m, z_i^n)`; plan
  :math:`T_i = \arg\min_T \langle T, C_i\rangle - \varepsilon H(T)` s.t. :math:`T1=a`, :math:`T^\top 1=b_i`.
- scores :math:`d_i(m) = \sum_n T_i(m,n) C_i(m,n) / a^m` (ruling) and the paper's
  :math:`d_{paper}(m) = \sum_i\sum_n T_i(m,n) C_i(m,n)`.

Padding proof sketch (tested in ``tests/test_transport.py``): categories are padded to
:math:`N_{max}` columns with mass :math:`b=0` and cost :math:`2 + 2000\varepsilon` (real costs lie in [0, 2]). POT's
log-Sinkhorn starts from :math:`v=0`; in its first row update a padded column contributes
:math:`\exp(-2000)`, which is exactly 0 in fp32 and fp64, and after the first column update
:math:`v_{pad} = \log 0 - \text{finite} = -\infty`, so padded columns contribute exactly 0 from then
on and their plan entries are :math:`\exp(-\infty) = 0`. The cost is kept finite on purpose: an
infinite cost would give :math:`v_{pad} = -\infty - (-\infty) = \mathrm{NaN}`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from guardalign.detection.weights import (  # noqa: F401 (the building blocks stay importable from here)
    WEIGHTING_MODES, _check_owner, _float, _signed_logits, category_means, cost_matrix, entropy, entropy_weights,
    l2_normalize, patch_weights, posterior, variant_weights,
)
_PAD_COST = 2.0  # upper bound of the real costs 1 − cos
_PAD_MARGIN = 2000.0  # padded cost = 2 + _PAD_MARGIN·ε, so exp(−(pad−real)/ε) ≤ exp(−2000) == 0 exactly


@dataclass(frozen=True)
class OTScores:
    d: Tensor  # (B, M, C) per-patch per-category normalised score d_i(m) = Σ_n T_i(m,n) C_i(m,n) / a^m
    d_paper: Tensor  # (B, M) paper aggregate d_paper(m) = Σ_i Σ_n T_i(m,n) C_i(m,n)
    a: Tensor  # (B, M) patch weights
    b: Tensor  # (V,) variant weights (each category's variants sum to 1)
    plans: Tensor | None  # (B, C, M, Nmax) transport plans if return_plans else None (padded cols are 0)


def _solve_batch():
    """Import POT's batched solver or fail naming the installed POT version."""
    import ot

    try:
        from ot.batch import solve_batch
    except ImportError as exc:  # POT < 0.9.6
        from guardalign.errors import GuardalignError

        raise GuardalignError(
            f"POT {ot.__version__} has no ot.batch.solve_batch; guardalign needs POT>=0.9.6,<0.11"
        ) from exc
    return ot.__version__, solve_batch


def sinkhorn_batch(
    cost: Tensor, a: Tensor, b: Tensor, eps: float, max_iter: int = 1000, tol: float = 1e-6
) -> Tensor:
    r"""Solve K entropic OT problems at once with POT's ``ot.batch.solve_batch(method="log_sinkhorn")``.

    For each k: :math:`T_k = \arg\min_T \langle T, C_k\rangle - \varepsilon H(T)` subject to
    :math:`T 1 = a_k`, :math:`T^\top 1 = b_k`, :math:`T \ge 0`, with
    :math:`H(T) = -\sum T\log T`. This is the only place guardalign calls ``ot.batch``.

    Parameters
    ----------
    cost : Tensor, shape (K, m, n)
        Cost matrices (finite).
    a : Tensor, shape (K, m)
        Row marginals, positive, each summing to 1.
    b : Tensor, shape (K, n)
        Column marginals, each summing to 1; zero entries are allowed (their columns get plan 0).
    eps : float
        Entropic regularisation ε > 0.
    max_iter : int
        Sinkhorn iteration cap.
    tol : float
        Stop when :math:`\max_k \lVert T_k 1 - a_k\rVert_2 < tol` (checked every 10 iterations;
        the column marginals are exact after each iteration).

    Returns
    -------
    Tensor, shape (K, m, n)
        Transport plans, on the device and in the dtype of ``cost``; no gradient flows through them.
    """
    if cost.dim() != 3 or a.shape != cost.shape[:2] or b.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(
            f"expected cost (K,m,n), a (K,m), b (K,n); got {tuple(cost.shape)}, {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    version, solve_batch = _solve_batch()
    kwargs = dict(reg=float(eps), a=a, b=b, max_iter=int(max_iter), tol=float(tol), method="log_sinkhorn")
    if "grad" in inspect.signature(solve_batch).parameters:
        kwargs["grad"] = "detach"
    with torch.no_grad():  # no autograd graph through the iterations (a logit scale may require grad)
        res = solve_batch(cost, **kwargs)
    plan = getattr(res, "plan", None)
    if plan is None:
        from guardalign.errors import GuardalignError

        raise GuardalignError(
            f"ot.batch.solve_batch of POT {version} returned {type(res).__name__} without a .plan; "
            "guardalign supports POT>=0.9.6,<0.11"
        )
    return plan


def _padded_index(owner: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """(C, Nmax) variant index of each category slot (0 where padded) and its validity mask."""
    idx = owner.long()
    order = torch.argsort(idx, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(idx.shape[0], device=idx.device) - starts[idx[order]]
    n_max = int(counts.max())
    table = torch.zeros(counts.shape[0], n_max, dtype=torch.long, device=idx.device)
    table[idx[order], slot] = order
    mask = torch.arange(n_max, device=idx.device)[None, :] < counts[:, None]
    return table, mask


def ot_patch_scores(
    x: Tensor,
    z: Tensor,
    owner: Tensor,
    n_categories: int,
    scale: float | Tensor,
    *,
    eps: float = 0.05,
    patch_weighting: str = "entropy",
    variant_weighting: str = "entropy",
    max_iter: int = 1000,
    tol: float = 1e-6,
    return_plans: bool = False,
) -> OTScores:
    r"""Per-patch, per-category OT scores for a batch of images (GuardAlign Eqs. 7–10, DESIGN rulings).

    All B·C problems (image b, category i) are solved in one :func:`sinkhorn_batch` call, categories
    padded to :math:`N_{max}` variants with zero-mass columns (exact, see the module docstring).

    Parameters
    ----------
    x : Tensor, shape (B, M, D)
        Patch embeddings.
    z : Tensor, shape (V, D)
        Variant embeddings of all categories, V = Σ_i N_i.
    owner : Tensor, shape (V,), long
        Category of each variant, in [0, C).
    n_categories : int
        C.
    scale : float or 0-d Tensor
        Logit scale s for the posteriors.
    eps : float
        Entropic regularisation ε.
    patch_weighting, variant_weighting : str
        ``"entropy"`` (softmax(−h), ruling), ``"uniform"`` or ``"entropy_positive"`` (softmax(+h)).
    max_iter, tol : int, float
        Passed to :func:`sinkhorn_batch`.
    return_plans : bool
        Also return the (B, C, M, Nmax) plans.

    Returns
    -------
    OTScores
        ``d`` (B, M, C) with :math:`d_i(m) = \sum_n T_i(m,n) C_i(m,n) / a^m`;
        ``d_paper`` (B, M) with :math:`\sum_i\sum_n T_i(m,n) C_i(m,n)`; ``a`` (B, M); ``b`` (V,); ``plans``.
    """
    if x.dim() != 3 or z.dim() != 2 or x.shape[-1] != z.shape[-1]:
        raise ValueError(f"expected x (B,M,D) and z (V,D); got {tuple(x.shape)} and {tuple(z.shape)}")
    dtype = torch.promote_types(_float(x).dtype, _float(z).dtype)
    x, z = l2_normalize(x.to(dtype)), l2_normalize(z.to(device=x.device, dtype=dtype))
    n_b, n_m, _ = x.shape
    owner = owner.to(x.device)
    counts = _check_owner(owner, z.shape[0], n_categories)
    zbar = category_means(z, owner, n_categories)
    a = patch_weights(x, zbar, scale, patch_weighting)  # (B, M)
    b = variant_weights(z, owner, zbar, scale, variant_weighting)  # (V,)

    table, mask = _padded_index(owner, counts)  # (C, Nmax)
    n_max = table.shape[1]
    cost = cost_matrix(x, z)[:, :, table]  # (B, M, C, Nmax)
    cost = cost.masked_fill(~mask, _PAD_COST + _PAD_MARGIN * eps)
    cost = cost.permute(0, 2, 1, 3).reshape(n_b * n_categories, n_m, n_max)
    b_pad = torch.where(mask, b[table], torch.zeros((), dtype=dtype, device=b.device))
    b_pad = b_pad.expand(n_b, n_categories, n_max).reshape(n_b * n_categories, n_max)
    a_rep = a[:, None, :].expand(n_b, n_categories, n_m).reshape(n_b * n_categories, n_m)

    plans = sinkhorn_batch(cost, a_rep, b_pad, eps, max_iter=max_iter, tol=tol)
    plans = plans.reshape(n_b, n_categories, n_m, n_max)
    cost = cost.reshape(n_b, n_categories, n_m, n_max)
    mass_cost = (plans * cost.masked_fill(~mask[:, None, :], 0.0)).sum(-1)  # (B, C, M)
    d = (mass_cost / a[:, None, :]).permute(0, 2, 1)
    return OTScores(
        d=d.contiguous(),
        d_paper=mass_cost.sum(1),
        a=a,
        b=b,
        plans=plans if return_plans else None,
    )
