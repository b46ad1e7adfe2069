"""Estimators on synthetic data with a planted k-dimensional refusal subspace."""
import pytest
import torch

from refusal_rank.ablation import orthonormalize, project_out
from refusal_rank.attacks import cov_diff, dim_svd, inlp, pca_centered

D, K = 24, 3


def _planted(seed=0, n=400):
    g = torch.Generator().manual_seed(seed)
    S = orthonormalize(torch.randn(D, K, generator=g, dtype=torch.float64))
    noise = lambda m: torch.randn(m, D, generator=g, dtype=torch.float64) * 0.3
    coef = torch.randn(n, K, generator=g, dtype=torch.float64).abs() * 2 + 1.0  # harmful: spread in the subspace
    harmful = coef @ S.T + noise(n)
    harmless = noise(n)
    return S, harmful, harmless


def _captured(S, B):
    """Fraction of the planted subspace inside span(B): 1 = fully recovered."""
    return float((B.T @ S).pow(2).sum() / S.shape[1])


def _orthonormal(B):
    return torch.allclose(B.T @ B, torch.eye(B.shape[1], dtype=B.dtype), atol=1e-8)


@pytest.mark.parametrize("est", ["dim-svd", "pca-centered", "cov-diff"])
def test_estimators_recover_planted_subspace(est):
    S, h, b = _planted()
    if est == "dim-svd":
        # difference-in-means vectors from many "layers/positions": different mixtures of the planted directions
        g = torch.Generator().manual_seed(5)
        mix = torch.randn(40, K, generator=g, dtype=torch.float64)
        B = dim_svd(mix @ S.T + 0.01 * torch.randn(40, D, generator=g, dtype=torch.float64), K)
    elif est == "pca-centered":
        B = pca_centered(h, b, K)
    else:
        B = cov_diff(h, b, K)
    assert B.shape[0] == D and _orthonormal(B)
    assert _captured(S, B) > 0.9, est


def test_inlp_recovers_planted_subspace():
    """INLP removes what a linear probe can read: with class-shared noise that is anisotropic inside the
    planted subspace, each round's probe (~ Sigma^-1 delta-mu) lies in the subspace but leaves part of the
    mean difference behind, so a few rounds per planted dimension span it (weak directions come last)."""
    g = torch.Generator().manual_seed(3)
    S = orthonormalize(torch.randn(D, K, generator=g, dtype=torch.float64))
    n = 600

    def sample(shift):
        inside = torch.randn(n, K, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
        return (inside + shift) @ S.T + torch.randn(n, D, generator=g, dtype=torch.float64) * 0.3

    h, b = sample(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)), sample(0.0)
    x, y = torch.cat([h, b]), torch.cat([torch.ones(n), torch.zeros(n)])
    first = inlp(x, y, 1)
    assert _captured(S, first) * K > 0.8  # the first probe lies (mostly) inside the planted subspace
    B = inlp(x, y, 3 * K)
    assert _orthonormal(B) and B.shape[1] == 3 * K
    assert _captured(S, B) > 0.95


def test_ablating_planted_direction_removes_signal():
    S, h, b = _planted(1)
    u = S[:, :1]
    h_abl = project_out(h, u)
    assert (h_abl @ u).abs().max() < 1e-10
    # the class-mean difference along the planted subspace shrinks by the ablated part only
    diff_before = (h.mean(0) - b.mean(0)) @ S
    diff_after = (h_abl.mean(0) - project_out(b, u).mean(0)) @ S
    assert diff_after[0].abs() < 1e-10 and torch.allclose(diff_after[1:], diff_before[1:])


def test_bad_k_is_clear():
    with pytest.raises(ValueError, match="K must be"):
        pca_centered(torch.randn(5, 4), torch.randn(5, 4), 0)
