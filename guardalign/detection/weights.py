r"""Entropy weights, posteriors, category means and costs for the OT detector (DESIGN §1.1, Eqs. 7–9).

Pure math on torch tensors: no I/O, no logging. :mod:`guardalign.detection.transport` solves the transport
problems built from these.

- posterior :math:`p(i|x) = \mathrm{softmax}_i(s\cos(x, \bar z_i))`, entropy
  :math:`h(x) = -\sum_i p(i|x)\log p(i|x)`;
- patch weights :math:`a^m = \mathrm{softmax}_m(-h(x^m))`; variant weights
  :math:`b_i^n = \mathrm{softmax}_n(-h(z_i^n))` within category i (the rulings; ``uniform`` and
  ``entropy_positive`` as options);
- cost :math:`C_i(m,n) = 1 - \cos(x^m, z_i^n)`.
"""
from __future__ import annotations

import torch
from torch import Tensor

WEIGHTING_MODES = ("entropy", "uniform", "entropy_positive")


def _float(x: Tensor) -> Tensor:
    """Promote integer / half tensors to float32; leave float32 and float64 alone."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def l2_normalize(x: Tensor, dim: int = -1) -> Tensor:
    r"""Scale vectors to unit L2 norm, :math:`x / \max(\lVert x\rVert_2, 10^{-12})`.

    Parameters
    ----------
    x : Tensor, shape (..., D)
        Vectors along ``dim``.
    dim : int
        Axis holding the vector components.

    Returns
    -------
    Tensor, same shape as ``x`` (float32 or float64).
    """
    return torch.nn.functional.normalize(_float(x), p=2.0, dim=dim, eps=1e-12)


def _check_owner(owner: Tensor, n_vars: int, n_categories: int) -> Tensor:
    """Validate the variant → category map and return the variant count of each category, (C,)."""
    if owner.dim() != 1 or owner.shape[0] != n_vars:
        raise ValueError(f"owner must have shape ({n_vars},), got {tuple(owner.shape)}")
    if owner.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"owner must be an integer tensor, got {owner.dtype}")
    counts = torch.bincount(owner.long(), minlength=n_categories) if n_vars else owner.new_zeros(n_categories)
    lo, hi = (int(owner.min()), int(owner.max())) if n_vars else (0, -1)
    if lo < 0 or hi >= n_categories or counts.shape[0] != n_categories:
        raise ValueError(f"owner values must lie in [0, {n_categories}), got range [{lo}, {hi}]")
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"categories {empty} have no variants")
    return counts


def category_means(z: Tensor, owner: Tensor, n_categories: int) -> Tensor:
    r"""Normalised mean of each category's variants, :math:`\bar z_i = \mathrm{norm}(\frac{1}{N_i}\sum_n z_i^n)`.

    Parameters
    ----------
    z : Tensor, shape (V, D)
        L2-normalised variant embeddings of all categories, stacked.
    owner : Tensor, shape (V,), long
        Category index in [0, C) of each variant.
    n_categories : int
        C; every category needs at least one variant.

    Returns
    -------
    Tensor, shape (C, D)
        Unit-norm category means.
    """
    z, owner = _float(z), owner.to(z.device)
    counts = _check_owner(owner, z.shape[0], n_categories)
    sums = z.new_zeros(n_categories, z.shape[1]).index_add_(0, owner.long(), z)
    return l2_normalize(sums / counts.to(z.dtype)[:, None])


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    r"""Shannon entropy :math:`h(p) = -\sum_k p_k \log p_k` (natural log), with :math:`0\log 0 = 0`.

    Parameters
    ----------
    p : Tensor, shape (..., K, ...)
        Probability vectors along ``dim``.
    dim : int
        Axis to reduce.

    Returns
    -------
    Tensor, shape of ``p`` without ``dim``
        Values in [0, log K].
    """
    return -torch.special.xlogy(p, p).sum(dim=dim)


def posterior(x: Tensor, zbar: Tensor, scale: float | Tensor) -> Tensor:
    r"""Category posterior :math:`p(i|x) = \mathrm{softmax}_i(s \cos(x, \bar z_i))`.

    Parameters
    ----------
    x : Tensor, shape (..., D)
        Embeddings (normalised inside, so cos is exact for any input norm).
    zbar : Tensor, shape (C, D)
        Category means.
    scale : float or 0-d Tensor
        s, CLIP's logit scale ``model.logit_scale.exp()`` (≈ 100).

    Returns
    -------
    Tensor, shape (..., C)
        Rows sum to 1.
    """
    cos = l2_normalize(x) @ l2_normalize(zbar).to(_float(x).dtype).T
    return torch.softmax(scale * cos, dim=-1)


def _signed_logits(h: Tensor, mode: str) -> Tensor:
    """Map entropies to softmax logits for a weighting mode (−h, 0 or +h)."""
    if mode == "entropy":
        return -h
    if mode == "uniform":
        return torch.zeros_like(h)
    if mode == "entropy_positive":
        return h
    raise ValueError(f"unknown weighting mode {mode!r}: expected one of {WEIGHTING_MODES}")


def entropy_weights(h: Tensor, mode: str, dim: int = -1) -> Tensor:
    r"""Weights from entropies along ``dim``.

    - ``"entropy"`` (DESIGN ruling): :math:`w = \mathrm{softmax}(-h)`, confident (low-entropy) items weigh more;
    - ``"uniform"``: :math:`w = 1/K`;
    - ``"entropy_positive"`` (the paper's printed equation): :math:`w = \mathrm{softmax}(+h)`.

    Parameters
    ----------
    h : Tensor, shape (..., K, ...)
        Entropies.
    mode : str
        One of ``WEIGHTING_MODES``.
    dim : int
        Axis along which the weights sum to 1.

    Returns
    -------
    Tensor, shape of ``h``
    """
    return torch.softmax(_signed_logits(_float(h), mode), dim=dim)


def patch_weights(x: Tensor, zbar: Tensor, scale: float | Tensor, mode: str = "entropy") -> Tensor:
    r"""Patch weights :math:`a^m = \mathrm{softmax}_m(-h(x^m))` with :math:`h(x^m)` the entropy of :math:`p(\cdot|x^m)`.

    Parameters
    ----------
    x : Tensor, shape (B, M, D)
        Patch embeddings of B images.
    zbar : Tensor, shape (C, D)
        Category means.
    scale : float or 0-d Tensor
        Logit scale s.
    mode : str
        Weighting mode, see :func:`entropy_weights`.

    Returns
    -------
    Tensor, shape (B, M)
        Each row sums to 1.
    """
    if mode == "uniform":  # skip the posterior; same result
        x = _float(x)
        return torch.full(x.shape[:-1], 1.0 / x.shape[-2], dtype=x.dtype, device=x.device)
    return entropy_weights(entropy(posterior(x, zbar, scale)), mode, dim=-1)


def variant_weights(
    z: Tensor, owner: Tensor, zbar: Tensor, scale: float | Tensor, mode: str = "entropy"
) -> Tensor:
    r"""Variant weights :math:`b_i^n = \mathrm{softmax}_{n \in i}(-h(z_i^n))`, a softmax within each category.

    :math:`h(z_i^n)` is the entropy of :math:`p(j|z_i^n) = \mathrm{softmax}_j(s\cos(z_i^n, \bar z_j))`
    over all C category means (DESIGN ruling).

    Parameters
    ----------
    z : Tensor, shape (V, D)
        Variant embeddings.
    owner : Tensor, shape (V,), long
        Category of each variant, in [0, C).
    zbar : Tensor, shape (C, D)
        Category means.
    scale : float or 0-d Tensor
        Logit scale s.
    mode : str
        Weighting mode, see :func:`entropy_weights`.

    Returns
    -------
    Tensor, shape (V,)
        Weights of each category's variants sum to 1.
    """
    n_categories, owner = zbar.shape[0], owner.to(z.device)
    _check_owner(owner, z.shape[0], n_categories)
    if mode == "uniform":  # skip the posterior; softmax of zeros is 1/N_i
        logits = _float(z).new_zeros(z.shape[0])
    else:
        logits = _signed_logits(entropy(posterior(z, zbar, scale)), mode)
    idx = owner.long()
    seg_max = logits.new_full((n_categories,), -torch.inf).scatter_reduce(0, idx, logits, "amax")
    e = torch.exp(logits - seg_max[idx])
    return e / e.new_zeros(n_categories).index_add_(0, idx, e)[idx]


def cost_matrix(x: Tensor, z: Tensor) -> Tensor:
    r"""Cosine cost :math:`C(m, v) = 1 - \cos(x^m, z^v)`.

    Parameters
    ----------
    x : Tensor, shape (B, M, D)
        Patch embeddings (normalised inside).
    z : Tensor, shape (V, D)
        Variant embeddings (normalised inside).

    Returns
    -------
    Tensor, shape (B, M, V)
        Values in [0, 2].
    """
    xn = l2_normalize(x)
    return 1.0 - xn @ l2_normalize(z).to(xn.dtype).T
