"""Each term of the defense's objective: zero when it should be, growing with the gap, and (for the
covariance term) non-zero with a gradient on a real class-balanced batch of the tiny model."""
import math

import pytest
import torch

from refusal_rank.defense import (Standardizer, class_cov_gap, class_mean_gap, cov_matching_loss,
                                  excess_cov_top_eig, excess_top_eig, kd_loss, masked_mean, mean_matching_loss, plugin_cov_gap,
                                  pool_positions, prompt_lm_loss, shuffle_rows, spread_anchor_loss,
                                  spread_log_ratio)


def _cov_naive(a, b):
    d = a.shape[-1]
    return sum(((torch.cov(a[:, l].T) - torch.cov(b[:, l].T)) ** 2).sum() / d**2 for l in range(a.shape[1])) / a.shape[1]


def test_plugin_form_matches_explicit_covariances_and_is_scale_dependent():
    torch.manual_seed(0)
    a, b = torch.randn(6, 3, 5, dtype=torch.float64), torch.randn(7, 3, 5, dtype=torch.float64) * 2
    assert plugin_cov_gap(a, b).item() == pytest.approx(_cov_naive(a, b).item(), rel=1e-4)
    # the failure the scale-free terms fix: shrinking both classes by c shrinks the plug-in term by c^4
    assert plugin_cov_gap(0.2 * a, 0.2 * b).item() == pytest.approx(0.2**4 * plugin_cov_gap(a, b).item(), rel=1e-4)


@pytest.mark.parametrize("term", [mean_matching_loss, cov_matching_loss])
def test_terms_invariant_to_a_common_rescaling(term):
    torch.manual_seed(1)
    a = torch.randn(32, 3, 16) + 0.5 * torch.randn(1, 3, 16)
    b = torch.randn(32, 3, 16) * torch.linspace(0.5, 2, 16)
    ref = term(a, b).item()
    for c in (0.01, 0.2, 5.0, 300.0):
        assert term(c * a, c * b).item() == pytest.approx(ref, rel=1e-4, abs=1e-7)
    # and to a common translation (the estimators see only differences)
    shift = 7.0 * torch.randn(1, 3, 16)
    assert term(a + shift, b + shift).item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("term", [mean_matching_loss, cov_matching_loss])
def test_no_noise_floor_for_two_samples_of_one_distribution(term):
    """Unbiased: over many draws of two samples of one distribution the term averages ~0, far below
    its spread on one draw, where the plug-in forms sit at a positive floor."""
    g = torch.Generator().manual_seed(2)
    scale = torch.linspace(0.3, 3.0, 64)
    vals = torch.tensor([term(torch.randn(16, 2, 64, generator=g) * scale, torch.randn(16, 2, 64, generator=g) * scale).item()
                         for _ in range(300)])
    assert abs(vals.mean().item()) < 3 * vals.std().item() / 300**0.5 + 1e-3
    plugin = torch.tensor([plugin_cov_gap(torch.randn(16, 2, 64, generator=g), torch.randn(16, 2, 64, generator=g)).item()
                           for _ in range(50)])
    assert plugin.mean().item() > 10 * plugin.std().item() / 50**0.5  # the old floor is real


def test_planted_gaps_read_far_above_the_noise():
    g = torch.Generator().manual_seed(3)
    d, n = 64, 32
    null_m = torch.tensor([mean_matching_loss(torch.randn(n, 1, d, generator=g), torch.randn(n, 1, d, generator=g)).item()
                           for _ in range(100)])
    null_c = torch.tensor([cov_matching_loss(torch.randn(n, 1, d, generator=g), torch.randn(n, 1, d, generator=g)).item()
                           for _ in range(100)])
    u = torch.zeros(d)
    u[5] = 1.0
    h = torch.randn(n, 1, d, generator=g) + 3.0 * u  # a planted mean gap along one direction (population value 9/128)
    o = torch.randn(n, 1, d, generator=g)
    assert mean_matching_loss(h, o).item() > null_m.mean().item() + 8 * null_m.std().item()
    h2 = torch.randn(n, 1, d, generator=g)
    h2[:, 0, :8] *= 3.0  # a planted covariance gap in an 8-dimensional subspace, equal means
    assert cov_matching_loss(h2, o).item() > null_c.mean().item() + 8 * null_c.std().item()


def test_sorted_neighbours_hide_a_covariance_gap_that_shuffling_restores():
    """The covariance term pairs neighbouring rows. Rows sorted by a variable that carries variance (as
    length-sorted micro-batches are) make neighbours near-copies along it, and a gap there vanishes;
    ``shuffle_rows`` restores the unbiased reading. The mean term does not depend on the order."""
    g = torch.Generator().manual_seed(11)
    d, n = 32, 128
    length = torch.randn(n, generator=g) * 4.0  # a per-prompt variable only the harmful class's representation carries
    h = torch.randn(n, 1, d, generator=g)
    h[:, 0, 0] += length
    o = torch.randn(n, 1, d, generator=g)
    h_sorted = h[length.argsort()]
    null = torch.tensor([cov_matching_loss(torch.randn(n, 1, d, generator=g), torch.randn(n, 1, d, generator=g)).item()
                         for _ in range(50)])
    shuffled = torch.tensor([cov_matching_loss(shuffle_rows(h_sorted, g), shuffle_rows(o, g)).item() for _ in range(20)])
    assert cov_matching_loss(h_sorted, o).item() < null.mean().item() + 3 * null.std().item()  # the gap is hidden
    assert shuffled.mean().item() > null.mean().item() + 8 * null.std().item()  # and found again
    assert mean_matching_loss(h_sorted, o).item() == pytest.approx(mean_matching_loss(h, o).item(), rel=1e-5)


def test_shuffle_rows_permutes_rows_and_passes_gradients():
    z = torch.arange(24, dtype=torch.float32).reshape(6, 1, 4).requires_grad_(True)
    out = shuffle_rows(z, torch.Generator().manual_seed(0))
    assert sorted(out[:, 0, 0].tolist()) == z[:, 0, 0].tolist() and not torch.equal(out, z)
    (out * torch.arange(6.0).view(6, 1, 1)).sum().backward()
    assert sorted(z.grad[:, 0, 0].tolist()) == list(range(6))  # each row's weight reached its own source row


def test_spread_ratio_is_zero_at_the_teachers_units_and_log_c_squared_under_scaling():
    g = torch.Generator().manual_seed(12)
    h, o = torch.randn(400, 2, 32, generator=g), torch.randn(400, 2, 32, generator=g)  # standardised: 1 a dimension
    assert spread_log_ratio(h, o).abs().max().item() < 0.05
    for c in (0.1, 3.0):
        assert spread_log_ratio(c * h, c * o).mean().item() == pytest.approx(spread_log_ratio(h, o).mean().item() + 2 * math.log(c), abs=1e-4)
    assert spread_anchor_loss(0.5 * h, 0.5 * o).item() == pytest.approx(spread_anchor_loss(2 * h, 2 * o).item(), rel=0.1)


def test_inflating_a_shared_direction_does_not_pay_at_the_cpu_weights():
    """The loophole the anchor closes: a spread both classes share, inflated, lowers the scale-free covariance
    term without matching anything (measured: the cpu run did it). At the cpu profile's weights the anchor
    makes every inflation cost more than it gains; without it, inflating pays."""
    from refusal_rank.config import load_config

    v = load_config("cpu")["defense"]["variants"]["defended"]
    g = torch.Generator().manual_seed(13)
    d, n, draws = 64, 128, 100
    scale_h = torch.ones(d)
    scale_h[:4] = 1.6  # a planted covariance gap
    norm = ((scale_h**2).sum() / 2 + d / 2) ** 0.5 / d**0.5  # about the teacher's units: 1 a dimension pooled

    def draw(c):  # direction 10 inflated c-fold in both classes alike (a shared spread)
        h = torch.randn(n, 1, d, generator=g) * scale_h / norm
        o = torch.randn(n, 1, d, generator=g) / norm
        h[..., 10] *= c
        o[..., 10] *= c
        return h, o

    obj, bare = [], []
    for c in (1.0, 2.0, 4.0, 8.0):
        cov = anc = 0.0
        for _ in range(draws):
            h, o = draw(c)
            cov += cov_matching_loss(h, o).item() / draws
            anc += spread_anchor_loss(h, o).item() / draws
        bare.append(v["lambda_cov"] * cov)
        obj.append(v["lambda_cov"] * cov + v["lambda_spread"] * anc)
    assert bare[-1] < 0.5 * bare[0]  # the loophole is real without the anchor
    assert obj[0] == min(obj)  # and closed with it


def test_unbiased_estimates_match_population_values():
    """class_mean_gap / class_cov_gap against the population values of a known pair of Gaussians."""
    g = torch.Generator().manual_seed(4)
    d = 6
    mu = torch.tensor([1.0, -0.5, 0, 0, 0, 0])
    s_h, s_o = torch.linspace(0.5, 1.5, d), torch.ones(d)
    gaps, covs = [], []
    for _ in range(400):
        h = (torch.randn(12, 1, d, generator=g) * s_h + mu).double()
        o = (torch.randn(12, 1, d, generator=g) * s_o).double()
        gaps.append(class_mean_gap(h, o)[0].item())
        covs.append(class_cov_gap(h, o)[0].item())
    assert sum(gaps) / len(gaps) == pytest.approx(float(mu.pow(2).sum()), rel=0.1)
    assert sum(covs) / len(covs) == pytest.approx(float((s_h**2 - s_o**2).pow(2).sum()), rel=0.15)


def test_terms_refuse_too_few_examples_per_class():
    with pytest.raises(ValueError, match=">= 4 examples"):
        cov_matching_loss(torch.randn(3, 2, 4), torch.randn(8, 2, 4))
    with pytest.raises(ValueError, match=">= 2 examples"):
        mean_matching_loss(torch.randn(1, 2, 4), torch.randn(8, 2, 4))


def test_excess_top_eig_scales_with_c_squared():
    torch.manual_seed(5)
    h, o = torch.randn(40, 2, 8) * 2, torch.randn(40, 2, 8)
    e = excess_top_eig(h, o)
    assert e.shape == (2,) and (e > 0).all()
    assert torch.allclose(excess_top_eig(0.5 * h, 0.5 * o), 0.25 * e, rtol=1e-6)
    shift = 50.0 * torch.randn(1, 2, 8)  # a common drift of both classes changes nothing
    assert torch.allclose(excess_top_eig(h + shift, o + shift), e, rtol=1e-6)


def test_excess_cov_top_eig_splits_a_mean_gap_from_a_covariance_gap():
    """A planted shift of the harmful mean raises the excess second moment by about its squared norm and
    leaves the covariance part exactly as it was; a planted variance along one axis raises both; a common
    rescaling by c scales the covariance part by c^2 (so shrinking still shows)."""
    torch.manual_seed(6)
    h, o = torch.randn(400, 2, 8), torch.randn(400, 2, 8)
    shift = torch.zeros(1, 2, 8)
    shift[..., 3] = 4.0  # ||mu_h - mu_o||^2 = 16 at each site
    base_all, base_cov = excess_top_eig(h, o), excess_cov_top_eig(h, o)
    assert torch.allclose(excess_cov_top_eig(h + shift, o), base_cov, atol=1e-9)
    assert (excess_top_eig(h + shift, o) - base_all > 14).all()
    wide = h.clone()
    wide[..., 5] *= 3.0  # variance 9 against 1 along axis 5
    assert (excess_cov_top_eig(wide, o) > 6).all() and (base_cov < 1).all()
    assert torch.allclose(excess_cov_top_eig(0.5 * wide, 0.5 * o), 0.25 * excess_cov_top_eig(wide, o), rtol=1e-6)


def test_masked_mean_ignores_padding():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = masked_mean(h, mask)
    assert torch.allclose(out[0], h[0, 2:].mean(0)) and torch.allclose(out[1], h[1].mean(0))


def test_kd_zero_for_identical_and_temperature_scaling():
    torch.manual_seed(2)
    t = torch.randn(4, 50) * 2
    assert kd_loss(t, t.clone(), 1.0).item() == pytest.approx(0.0, abs=1e-6)
    s = t + 0.3 * torch.randn(4, 50)
    vals = [kd_loss(s, t, T).item() for T in (1.0, 4.0, 1000.0)]
    assert all(v > 0 for v in vals)
    # T^2 * KL tends to the logit-matching limit sum((ds - mean ds)^2) / (2V)
    ds = (s - t) - (s - t).mean(-1, keepdim=True)
    limit = (ds.pow(2).sum(-1) / (2 * t.shape[-1])).mean().item()
    assert vals[-1] == pytest.approx(limit, rel=2e-2)
    with pytest.raises(ValueError):
        kd_loss(s, t, 0.0)


def test_prompt_lm_loss_ignores_padding():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    full = prompt_lm_loss(logits, ids, mask)
    logits2 = logits.clone()
    logits2[0, :2] = 99.0  # padding positions must not matter
    assert prompt_lm_loss(logits2, ids, mask).item() == pytest.approx(full.item())


def test_standardizer_and_pooling():
    x = torch.randn(50, 3, 4) * torch.tensor([1.0, 10.0, 100.0, 1000.0]) + 5
    st = Standardizer.fit(x)
    z = st(x)
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0) - 1).abs().max() < 1e-3
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    assert torch.equal(pool_positions(h, 2), h[:, 2:].mean(1))


def test_cov_term_nonzero_with_gradient_on_real_batch(tiny):
    """The paper's pitfall: with one example per class the covariance term is identically zero. On a
    class-balanced batch of the tiny model both terms must be non-zero and back-propagate into the weights."""
    from refusal_rank import data as D
    from refusal_rank.activations import encode

    harm = [p.text for p in D.split_prompts("harmful_defense", 6, 0)]
    ok = [p.text for p in D.split_prompts("harmless_defense", 6, 0)]
    model = tiny.model
    w = model.model.layers[1].mlp.down_proj.weight
    w.requires_grad_(True)
    try:
        enc = encode(tiny, harm + ok)
        out = model(**enc, output_hidden_states=True)
        pooled = torch.stack([pool_positions(h, tiny.n_post) for h in out.hidden_states[1:]], dim=1)  # (B, L, d)
        st = Standardizer.fit(pooled.detach())
        z = st(pooled)
        loss = cov_matching_loss(z[:6], z[6:]) + mean_matching_loss(z[:6], z[6:])
        loss.backward()
        assert abs(loss.item()) > 1e-6
        assert w.grad is not None and w.grad.abs().sum().item() > 0
    finally:
        w.grad = None
        w.requires_grad_(False)


def test_spread_against_the_teachers_own_rows_is_zero_for_the_teacher_and_log_c_squared_for_c_times_it():
    g = torch.Generator().manual_seed(14)
    th, to = torch.randn(16, 3, 32, generator=g) * 0.5, torch.randn(16, 3, 32, generator=g) * 0.5  # a small batch
    assert spread_log_ratio(th, to, (th, to)).abs().max().item() < 1e-6  # exact on the batch, whatever d says
    assert spread_log_ratio(th, to).mean().item() < -1.0  # against d the same batch reads far below 0
    assert spread_log_ratio(3 * th, 3 * to, (th, to)).mean().item() == pytest.approx(2 * math.log(3), abs=1e-5)


def test_cov_term_is_blind_to_a_shift_of_one_class_mean_which_the_mean_term_sees():
    """Why `defended` does not act on the difference-in-means direction: moving every harmful vector by one
    constant vector (a pure mean gap, the K=1 attacker's signal) leaves the covariance term exactly as it was,
    while the mean term grows far above its value before the shift."""
    g = torch.Generator().manual_seed(3)
    h, o = torch.randn(16, 2, 32, generator=g, dtype=torch.float64), torch.randn(16, 2, 32, generator=g, dtype=torch.float64)
    shift = 3.0 * torch.randn(32, generator=g, dtype=torch.float64)
    assert float(cov_matching_loss(h + shift, o)) == pytest.approx(float(cov_matching_loss(h, o)), rel=1e-5)  # float32 inside
    assert float(mean_matching_loss(h + shift, o)) > 0.5 > abs(float(mean_matching_loss(h, o))) * 10
