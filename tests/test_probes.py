"""Spectra, probes and removal curves on synthetic data with planted harmful-vs-harmless signals."""
import json

import pytest
import torch
from threadpoolctl import threadpool_limits

from refusal_rank import attacks, probes
from refusal_rank.ablation import orthonormalize
from refusal_rank.probes import (Whitened, acc_vs_removed, attack_share, by_source, choose_C, effective_rank, erase_curve,
                                 fisher_separability, inlp_curve, k_chance, k_erase, layer_report, leace_accuracies,
                                 linear_probe_acc, mlp_probe_acc, spectrum, standardize, whitened_summary)

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

    def fake_probe(a, ya, b, yb, seed=0, **_):
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


def _varied(seed=0, n=300, a=(1.0,), b=(2.0,), d=D, noise=1.0):
    """Train and test splits with a planted k-dim signal (k = len(a)): inside a random orthonormal k-dim
    subspace S, harmful coordinate i is a_i + b_i g_i (g standard normal), harmless 0; noise ``noise``
    everywhere in both classes. So harmful prompts differ from harmless ones only in S, in mean and spread."""
    g = _gen(seed)
    k = len(a)
    S = orthonormalize(torch.randn(d, k, generator=g, dtype=F64))
    at, bt = torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64)

    def split():
        h = (at + bt * torch.randn(n, k, generator=g, dtype=F64)) @ S.T + noise * torch.randn(n, d, generator=g, dtype=F64)
        o = noise * torch.randn(n, d, generator=g, dtype=F64)
        return torch.cat([h, o]), torch.cat([torch.ones(n), torch.zeros(n)])

    return S, (*split(), *split())


# --- the whitened class difference -------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 6])
def test_whitened_spectrum_counts_a_planted_k_dim_difference(k):
    _, (xtr, ytr, _, _) = _varied(k, a=(1.0,) * k, b=(1.5,) * k)
    w = whitened_summary(xtr, ytr, dim=D, n_perm=4)
    assert w["n_sig"] == k
    assert w["dim"] == D and w["top"] == sorted(w["top"], reverse=True)
    assert 1.0 <= w["rank"] <= k + 1e-9 and (k == 1 or w["rank"] > 1.5)


def test_whitened_spectrum_in_a_reduced_frame_with_fewer_prompts_than_dimensions():
    """d = 200 > n = 2 x 120: the frame keeps the top 24 principal components and still reads k = 3
    (the count is conservative: with fewer prompts per frame dimension it can read less, never more)."""
    _, (xtr, ytr, _, _) = _varied(1, n=120, a=(1.5,) * 3, b=(2.0,) * 3, d=200)
    w = whitened_summary(xtr, ytr, dim=24, n_perm=8)
    assert w["dim"] == 24 and w["n_sig"] == 3
    assert 1 <= whitened_summary(xtr, ytr, dim=40, n_perm=8)["n_sig"] <= 3
    g = _gen(9)
    noise = torch.randn(240, 200, generator=g, dtype=F64)
    assert whitened_summary(noise, torch.cat([torch.ones(120), torch.zeros(120)]), dim=40, n_perm=8)["n_sig"] == 0


def test_whitened_measures_ignore_scale_unwhitened_spectrum_does_not():
    """A defence that shrinks every activation by 5x leaves every scale-free measure as it was."""
    _, (xtr, ytr, xte, yte) = _varied(2, a=(1.0, 1.0), b=(3.0, 1.0))
    c = 0.2
    w1, w2 = Whitened(xtr, ytr, D), Whitened(c * xtr, ytr, D)
    assert abs(w1.vals - w2.vals).max() < 1e-8
    assert erase_curve(xtr, ytr, xte, yte, range(4), D) == erase_curve(c * xtr, ytr, c * xte, yte, range(4), D)
    assert fisher_separability(xtr, ytr, xte, yte, D) == pytest.approx(fisher_separability(c * xtr, ytr, c * xte, yte, D), rel=1e-8)
    h, o = xtr[ytr == 1], xtr[ytr == 0]
    assert float(spectrum(c * h, c * o)[0]) == pytest.approx(c ** 2 * float(spectrum(h, o)[0]), rel=1e-10)


# --- k_erase -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("b", [(8.0, 1.5), (8.0, 4.0, 1.5), (12.0, 8.0, 4.0, 1.5)])
def test_k_erase_reads_k_for_independently_varying_directions(b):
    """Each of k directions carries part of the mean shift and harmful prompts vary along each on their
    own (by different amounts, so that the whitened class difference has k distinct directions): erasing
    k - 1 of them leaves a readable copy, so the held-out probe reaches chance at exactly k."""
    k = len(b)
    _, split = _varied(10 + k, n=400, a=(2.5,) * k, b=b)
    curve = erase_curve(*split, ks=range(8), dim=D, stop_at_chance=False)
    assert k_erase(curve) == k
    assert curve[0] > 0.8 and max(curve[j] for j in range(k, 8)) < 0.57


def test_k_erase_is_one_for_a_mean_shift_however_many_directions_it_spans():
    """LEACE's theorem: a binary label's linear information is one oblique direction, even when the mean
    shift spans several directions (with the same spread along each)."""
    _, spread = _spread(0)  # the shift spans 8 directions, with anisotropic class-shared noise
    assert k_erase(erase_curve(*spread, ks=range(6), dim=D)) == 1
    _, iso = _varied(3, n=400, a=(1.0,) * 4, b=(1.5,) * 4)
    assert k_erase(erase_curve(*iso, ks=range(6), dim=D)) == 1


def test_k_erase_zero_without_signal_and_none_past_its_budget():
    g = _gen(8)
    x = torch.randn(400, D, generator=g, dtype=F64)
    y = torch.cat([torch.ones(100), torch.zeros(100), torch.ones(100), torch.zeros(100)])
    assert k_erase(erase_curve(x[:200], y[:200], x[200:], y[200:], ks=range(3), dim=D)) == 0
    _, split = _varied(12, n=400, a=(1.5,) * 3, b=(4.0, 2.5, 1.0))
    curve = erase_curve(*split, ks=[0, 1, 2], dim=D)
    assert sorted(curve) == [0, 1, 2] and k_erase(curve) is None


def test_erase_curve_stops_at_chance_and_skips_ks_beyond_the_frame():
    _, split = _varied(13, n=200, a=(2.0,), b=(1.0,), d=8)
    full = erase_curve(*split, ks=range(12), dim=8, stop_at_chance=False)
    assert max(full) == 8  # the frame has 8 directions
    stopped = erase_curve(*split, ks=range(12), dim=8)
    assert max(stopped) == k_erase(full) == 1 and all(stopped[j] == full[j] for j in stopped)


def test_leace_erases_the_linear_signal_and_an_mlp_reads_what_remains():
    """Mean shift plus a larger spread of harmful prompts in two directions: after rank-1 LEACE the
    linear probe is at chance, the MLP still reads the spread."""
    _, split = _varied(14, n=400, a=(1.0, 0.0), b=(0.0, 3.0), d=8)
    r = leace_accuracies(*split, dim=8)
    assert r["linear_acc"] <= 0.6 and r["mlp_acc"] > 0.7


# --- separability and what an attack removes -----------------------------------------------------

def test_fisher_separability_is_additive_over_planted_directions():
    _, one = _planted(20, n=400, shift=(1.0,))
    _, four = _planted(20, n=400, scales=(0.0,) * 4, shift=(1.0,) * 4)
    s1, s4 = fisher_separability(*one, D), fisher_separability(*four, D)
    assert s1 == pytest.approx(1.0, abs=0.3) and s4 == pytest.approx(4.0, rel=0.25)
    g = _gen(21)
    x = torch.randn(400, D, generator=g, dtype=F64)
    y = torch.cat([torch.ones(100), torch.zeros(100)] * 2)
    assert fisher_separability(x[:200], y[:200], x[200:], y[200:], D) < 0.2


def test_attack_share_reads_a_planted_k_dim_signal_as_k():
    """A mean shift spread evenly over 4 directions: an attacker holding them in order has j/4 of the
    separability in its top j and nothing remains after 4."""
    S, split = _planted(22, n=500, scales=(0.0,) * 4, shift=(1.0,) * 4)
    basis = orthonormalize(torch.cat([S, torch.randn(D, 4, generator=_gen(23), dtype=F64)], dim=1))
    sh = attack_share(*split, basis, [1, 2, 4, 8, 16], D)
    assert sorted(sh) == [1, 2, 4, 8]  # k beyond the basis skipped
    for j in (1, 2):
        assert sh[j]["held"] == pytest.approx(j / 4, abs=0.12) and sh[j]["remains"] == pytest.approx(1 - j / 4, abs=0.12)
    assert sh[4]["held"] > 0.85 and sh[4]["remains"] < 0.1 and sh[8]["remains"] < 0.1
    # a basis orthogonal to the signal holds none of it and leaves all of it
    R = torch.randn(D, 2, generator=_gen(24), dtype=F64)
    other = attack_share(*split, orthonormalize(R - S @ (S.T @ R)), [2], D)
    assert other[2]["held"] < 0.1 and other[2]["remains"] > 0.85


# --- probes, per source -----------------------------------------------------------------------------

def test_choose_C_picks_from_the_grid_and_regularises_noise():
    _, (xtr, ytr, _, _) = _planted(30, n=60, shift=(3.0,))
    assert choose_C(xtr, ytr, [0.01, 0.1, 1.0]) in (0.01, 0.1, 1.0)


def test_by_source_splits_correctness_by_source_in_order():
    r = by_source([1, 1, 0, 1, 0, 0], ["b", "b", "a", "a", "c", "c"], n_boot=100)
    assert list(r) == ["b", "a", "c"]
    assert r["b"]["acc"] == 1.0 and r["a"]["acc"] == 0.5 and r["c"]["acc"] == 0.0
    assert r["a"]["n"] == 2 and r["a"]["lo"] <= 0.5 <= r["a"]["hi"]


def test_layer_report_keys_and_json():
    _, (xtr, ytr, xte, yte) = _planted(0, n=100, shift=(3.0,))
    src = ["advbench"] * 100 + ["harmless"] * 100
    rep = layer_report(xtr, ytr, xte, yte, sources_te=src, C=1.0, inlp_k_max=6, ks=[0, 1, 2, 4, 6],
                       erase_ks=[0, 1, 2, 4], whiten_dim=16, n_perm=2, n_boot=100)
    assert {"effective_rank", "top_eigvals", "linear_acc", "linear_ci", "mlp_acc", "acc_vs_removed", "k_chance", "k_erase",
            "k_erase_budget", "erase_curve", "by_source", "whitened", "leace", "separability", "C"} <= set(rep)
    json.dumps(rep)
    assert len(rep["top_eigvals"]) == D and rep["top_eigvals"] == sorted(rep["top_eigvals"], reverse=True)
    assert all(type(k) is int for k in rep["acc_vs_removed"]) and all(type(k) is int for k in rep["erase_curve"])
    assert rep["k_chance"] is None or type(rep["k_chance"]) is int
    assert rep["linear_acc"] > 0.85 and rep["acc_vs_removed"][0] == pytest.approx(rep["linear_acc"], abs=1e-4)
    assert rep["linear_ci"]["lo"] <= rep["linear_acc"] <= rep["linear_ci"]["hi"] and rep["linear_ci"]["n"] == 200
    assert set(rep["by_source"]) == {"advbench", "harmless"}
    assert rep["k_erase"] == 1 and rep["k_erase_budget"] == 4 and rep["whitened"]["n_sig"] >= 1
    assert rep["effective_rank"] == round(rep["effective_rank"], 4) > 0
    assert rep["k_chance"] == k_chance(rep["acc_vs_removed"])
    assert rep["top_eigvals"][0] > 4 * rep["top_eigvals"][1]
