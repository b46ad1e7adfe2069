"""Spectra, probes and removal curves on synthetic data with planted harmful-vs-harmless signals."""
import json

import pytest
import torch
from threadpoolctl import threadpool_limits

from refusal_rank import attacks, probes
from refusal_rank.ablation import orthonormalize
from refusal_rank.probes import (acc_vs_removed, effective_rank, inlp_curve, k_chance, layer_report,
                                 linear_probe_acc, mlp_probe_acc, spectrum, standardize)

D = 32
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """The fits here are tiny; multithreaded BLAS on a busy machine makes them ~100x slower."""
    with threadpool_limits(1):
        yield


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _planted(seed=0, n=200, scales=(0.0,), shift=(3.0,), noise=1.0, d=D):
    """Train and test splits (x, y, x, y), n per class each: harmful = harmless + ``shift`` inside a random
    orthonormal k-dim subspace S; both classes share noise of std ``scales`` inside S and ``noise`` everywhere."""
    g = _gen(seed)
    k = len(scales)
    S = orthonormalize(torch.randn(d, k, generator=g, dtype=F64))
    sc, sh = torch.tensor(scales, dtype=F64), torch.tensor(shift, dtype=F64)

    def sample(m, s):
        inside = torch.randn(m, k, generator=g, dtype=F64) * sc + s
        return inside @ S.T + torch.randn(m, d, generator=g, dtype=F64) * noise

    def split():
        return torch.cat([sample(n, sh), sample(n, 0.0)]), torch.cat([torch.ones(n), torch.zeros(n)])

    return S, (*split(), *split())


def _spread(seed=0):
    """Mean shift spread over 8 orthogonal directions with anisotropic class-shared noise there: the probe
    direction (~ Sigma^-1 delta-mu) never takes all of the mean difference, so INLP needs many rounds."""
    return _planted(seed, scales=(0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), shift=(1.5,) * 8, noise=0.5)


# --- spectrum / effective rank -------------------------------------------------------------------

def test_effective_rank_counts_equal_positive_eigenvalues():
    vals = torch.tensor([2.0, 2.0, 2.0, 0.0, -1.0, -5.0], dtype=F64)
    assert effective_rank(vals) == pytest.approx(3.0, rel=1e-12)
    assert effective_rank(torch.tensor([0.5] * 7 + [-3.0], dtype=F64)) == pytest.approx(7.0, rel=1e-12)


def test_effective_rank_one_dominant_and_none_positive():
    assert effective_rank(torch.tensor([100.0, 0.1, 0.1, 0.1, -50.0], dtype=F64)) == pytest.approx(1.0, abs=0.01)
    assert effective_rank(torch.tensor([0.0, -1.0, -2.0], dtype=F64)) == 0.0


def test_spectrum_of_planted_rank3_extra_variance():
    g = _gen(1)
    n = 2000
    S = orthonormalize(torch.randn(D, 3, generator=g, dtype=F64))
    harmless = torch.randn(n, D, generator=g, dtype=F64) * 0.3
    harmful = torch.randn(n, D, generator=g, dtype=F64) * 0.3 + (torch.randn(n, 3, generator=g, dtype=F64) * 2) @ S.T
    vals = spectrum(harmful, harmless)
    assert vals.dtype == F64 and vals.shape == (D,)
    assert torch.all(vals[:-1] >= vals[1:])  # descending
    assert vals[2] > 10 * vals[3].abs() and vals[2] > 2.0  # ~4, 4, 4 then noise
    assert 2.5 < effective_rank(vals) < 3.5


# --- standardisation and probes ------------------------------------------------------------------

def test_standardize_uses_train_statistics_and_floors_std():
    g = _gen(2)
    tr = torch.randn(100, 4, generator=g, dtype=F64) * torch.tensor([1.0, 1e4, 0.01, 1.0], dtype=F64) + 5.0
    tr[:, 3] = 7.0  # constant column: std floored, no nan
    te = tr[:10] + 1.0
    a, b = standardize(tr, te)
    assert a.dtype == b.dtype == "float64" and a.shape == (100, 4) and b.shape == (10, 4)
    assert abs(a[:, :3].mean(0)).max() < 1e-9 and abs(a[:, :3].std(0) - 1).max() < 1e-9
    assert (a[:, 3] == 0).all() and not torch.isnan(torch.from_numpy(b)).any()
    mu, sd = tr.mean(0).numpy(), tr.std(0, unbiased=False).numpy()
    assert abs(b[:, :3] - (te.numpy()[:, :3] - mu[:3]) / sd[:3]).max() < 1e-9


def test_linear_probe_reads_mean_shift_and_not_shuffled_labels():
    _, (xtr, ytr, xte, yte) = _planted(0, shift=(5.0,))
    assert linear_probe_acc(xtr, ytr, xte, yte) > 0.95
    g = _gen(3)
    shuffled = ytr[torch.randperm(len(ytr), generator=g)], yte[torch.randperm(len(yte), generator=g)]
    assert linear_probe_acc(xtr, shuffled[0], xte, shuffled[1]) < 0.7


def test_mlp_probe_reads_xor_signal_that_linear_cannot():
    g = _gen(4)
    n, d = 300, 8
    x = torch.randn(2 * n, d, generator=g, dtype=F64)
    y = (x[:, 0] * x[:, 1] > 0).double()
    lin = linear_probe_acc(x[:n], y[:n], x[n:], y[n:])
    mlp = mlp_probe_acc(x[:n], y[:n], x[n:], y[n:])
    assert lin < 0.65
    assert mlp > 0.8 and mlp > lin + 0.2


# --- removal curves ------------------------------------------------------------------------------

def test_acc_vs_removed_drops_to_chance_when_planted_direction_removed():
    S, (xtr, ytr, xte, yte) = _planted(0, shift=(4.0,))
    other = torch.randn(D, 1, generator=_gen(5), dtype=F64)
    basis = orthonormalize(torch.cat([S, other], dim=1))
    acc = acc_vs_removed(xtr, ytr, xte, yte, basis, [0, 1, 2, 5])
    assert sorted(acc) == [0, 1, 2]  # k > basis.shape[1] skipped
    assert acc[0] == linear_probe_acc(xtr, ytr, xte, yte) and acc[0] > 0.95
    assert acc[1] < 0.65 and acc[2] < 0.65
    # removing an unrelated direction leaves the signal
    assert acc_vs_removed(xtr, ytr, xte, yte, orthonormalize(other), [1])[1] > 0.95


def test_acc_vs_removed_projects_raw_train_and_test(monkeypatch):
    S, (xtr, ytr, xte, yte) = _planted(0, n=50)
    basis = orthonormalize(torch.cat([S, torch.randn(D, 2, generator=_gen(6), dtype=F64)], dim=1))
    seen = {}

    def fake_probe(a, ya, b, yb, seed=0):
        seen[len(seen)] = (torch.as_tensor(a), torch.as_tensor(b))
        return 0.5

    monkeypatch.setattr(probes, "linear_probe_acc", fake_probe)
    acc_vs_removed(xtr, ytr, xte, yte, basis, [0, 2])
    (a0, b0), (a2, b2) = seen[0], seen[1]
    assert torch.allclose(a0, xtr) and torch.allclose(b0, xte)  # k = 0: raw features untouched
    for a, x in ((a2, xtr), (b2, xte)):
        assert (a @ basis[:, :2]).abs().max() < 1e-10  # first two columns gone...
        assert torch.allclose(a @ basis[:, 2:], x @ basis[:, 2:])  # ...the third kept, no rescaling


def test_k_chance_threshold_logic():
    curve = {0: 0.9, 1: 0.7, 2: 0.6, 3: 0.5}
    assert k_chance(curve) == 2  # <= threshold, inclusive
    assert k_chance(curve, threshold=0.55) == 3
    assert k_chance({3: 0.5, 1: 0.55, 0: 0.9}) == 1  # key order does not matter
    assert k_chance({0: 0.9, 1: 0.8}) is None
    assert k_chance({}) is None


def test_inlp_curve_one_direction_vs_spread_signal():
    _, one = _planted(0, shift=(3.0,))
    _, spread = _spread(0)
    c_one = inlp_curve(*one, k_max=12, ks=range(13))
    c_spread = inlp_curve(*spread, k_max=12, ks=range(13))
    k_one, k_spread = k_chance(c_one), k_chance(c_spread)
    assert c_one[0] > 0.85 and c_spread[0] > 0.85
    assert k_one is not None and k_one <= 3
    assert k_spread is None or k_spread > k_one + 1
    assert c_spread[k_one] > 0.6  # where the one-direction signal is gone, the spread one is still readable


def test_inlp_curve_stops_at_chance_and_skips_missing_columns():
    _, one = _planted(0, shift=(3.0,))
    stopped = inlp_curve(*one, k_max=8, ks=[4, 0, 1, 2, 3, 4, 6, 8])
    full = inlp_curve(*one, k_max=8, ks=[0, 1, 2, 3, 4, 6, 8], stop_at_chance=False)
    k = k_chance(stopped)
    assert k is not None and max(stopped) == k
    assert all(stopped[j] == full[j] for j in stopped)
    assert max(full) > k
    assert set(inlp_curve(*one, k_max=2, ks=range(10), stop_at_chance=False)) <= {0, 1, 2}


def test_inlp_curve_fits_basis_on_train_only(monkeypatch):
    _, (xtr, ytr, xte, yte) = _planted(0, n=50)
    seen = []

    def fake_inlp(x, y, k, seed=0, max_iter=500):
        seen.append((x.shape[0], y.shape[0], k))
        return torch.eye(D, dtype=F64)[:, :1]

    monkeypatch.setattr(attacks, "inlp", fake_inlp)
    curve = inlp_curve(xtr, ytr, xte[:30], yte[:30], k_max=4, ks=[0, 1, 3])
    assert seen == [(100, 100, 4)]
    assert set(curve) <= {0, 1}


def test_layer_report_keys_and_json():
    _, (xtr, ytr, xte, yte) = _planted(0, n=100, shift=(3.0,))
    rep = layer_report(xtr, ytr, xte, yte, k_max=6, ks=[0, 1, 2, 4, 6])
    assert set(rep) == {"effective_rank", "top_eigvals", "linear_acc", "mlp_acc", "acc_vs_removed", "k_chance"}
    json.dumps(rep)
    assert len(rep["top_eigvals"]) == D and rep["top_eigvals"] == sorted(rep["top_eigvals"], reverse=True)
    assert all(type(k) is int for k in rep["acc_vs_removed"])
    assert rep["k_chance"] is None or type(rep["k_chance"]) is int
    assert rep["linear_acc"] > 0.85 and rep["acc_vs_removed"][0] == rep["linear_acc"]
    assert rep["effective_rank"] == round(rep["effective_rank"], 4) > 0
    assert rep["k_chance"] == k_chance(rep["acc_vs_removed"])
    # the mean shift is one extra-variance direction: the spectrum's top eigenvalue dominates
    assert rep["top_eigvals"][0] > 4 * rep["top_eigvals"][1]
