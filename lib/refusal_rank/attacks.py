"""Rank-K subspace estimators (notebook 04): each returns an orthonormal (d, K) basis, float64.

The estimators here are pure functions of activations, so they can be tested on synthetic data with a
planted subspace. The two that need the model in the loop (``iterated``, the paper's own attacker, and
``optimized``, the adaptive one) live in :mod:`refusal_rank.sweep` and use these helpers.

* ``dim_svd``: top-K right singular vectors of the stacked, normalised difference-in-means vectors
  (all layers and positions).
* ``pca_centered``: top-K principal directions of harmful activations centred on the harmless mean.
* ``cov_diff``: top-K eigenvectors of the excess second moment of harmful over harmless (both about
  the harmless mean).
* ``inlp``: K rounds of iterative nullspace projection with logistic-regression probes.
"""
from __future__ import annotations

import numpy as np
import torch

from .ablation import orthonormalize


def _check_k(k: int, d: int) -> None:
    if not 1 <= k <= d:
        raise ValueError(f"K must be in 1..{d}, got {k}")


def dim_svd(dims: torch.Tensor, k: int) -> torch.Tensor:
    """dims: (N, d) difference-in-means vectors (any layers/positions); zero rows are ignored."""
    x = dims.double().reshape(-1, dims.shape[-1])
    n = x.norm(dim=-1, keepdim=True)
    keep = n[:, 0] > 1e-9 * n.max()
    x = x[keep] / n[keep]
    _check_k(k, x.shape[1])
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return orthonormalize(vh[:k].T)


def pca_centered(harmful: torch.Tensor, harmless: torch.Tensor, k: int) -> torch.Tensor:
    """harmful (n, d), harmless (m, d): principal directions of harmful - mean(harmless)."""
    h = harmful.double() - harmless.double().mean(0)
    _check_k(k, h.shape[1])
    _, _, vh = torch.linalg.svd(h, full_matrices=False)
    return orthonormalize(vh[:k].T)


def excess_second_moment(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """E_h[(x-mu_b)(x-mu_b)^T] - E_b[(x-mu_b)(x-mu_b)^T], (d, d) float64."""
    mu = harmless.double().mean(0)
    h = harmful.double() - mu
    b = harmless.double() - mu
    return h.T @ h / h.shape[0] - b.T @ b / b.shape[0]


def cov_diff(harmful: torch.Tensor, harmless: torch.Tensor, k: int) -> torch.Tensor:
    """Top-K eigenvectors (largest eigenvalues) of the excess second moment."""
    m = excess_second_moment(harmful, harmless)
    _check_k(k, m.shape[0])
    vals, vecs = torch.linalg.eigh(m)
    return orthonormalize(vecs[:, torch.argsort(vals, descending=True)[:k]])


def inlp(x: torch.Tensor, y: torch.Tensor, k: int, seed: int = 0, max_iter: int = 500) -> torch.Tensor:
    """x (n, d) activations, y (n,) 0/1 labels: K rounds of fit-probe, remove its direction."""
    from sklearn.linear_model import LogisticRegression

    _check_k(k, x.shape[1])
    X = x.double().numpy()
    X = (X - X.mean(0)) / (X.std(0).mean() + 1e-12)  # one global scale keeps directions comparable
    Y = y.numpy().astype(int)
    basis = np.zeros((X.shape[1], 0))
    for _ in range(k):
        Xp = X - (X @ basis) @ basis.T
        clf = LogisticRegression(max_iter=max_iter, random_state=seed).fit(Xp, Y)
        w = clf.coef_[0]
        w = w - basis @ (basis.T @ w)
        if np.linalg.norm(w) < 1e-12:
            break
        basis = np.concatenate([basis, (w / np.linalg.norm(w))[:, None]], axis=1)
    return orthonormalize(torch.from_numpy(basis))
