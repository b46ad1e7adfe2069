"""Each term of the defense's objective: zero when it should be, growing with the gap, and (for the
covariance term) non-zero with a gradient on a real class-balanced batch of the tiny model."""
import pytest
import torch

from refusal_rank.defense import (Standardizer, cov_matching_loss, kd_loss, mean_matching_loss, pool_positions,
                                  prompt_lm_loss)


def _cov_naive(a, b):
    d = a.shape[-1]
    return sum(((torch.cov(a[:, l].T) - torch.cov(b[:, l].T)) ** 2).sum() / d**2 for l in range(a.shape[1])) / a.shape[1]


def test_cov_term_matches_explicit_covariances():
    torch.manual_seed(0)
    a, b = torch.randn(6, 3, 5, dtype=torch.float64), torch.randn(7, 3, 5, dtype=torch.float64) * 2
    assert cov_matching_loss(a, b).item() == pytest.approx(_cov_naive(a, b).item(), rel=1e-4)


def test_matching_terms_zero_for_equal_statistics_and_grow_with_gap():
    torch.manual_seed(1)
    x = torch.randn(16, 2, 8)
    assert cov_matching_loss(x, x.clone()).item() < 1e-8
    assert cov_matching_loss(x, x + 3.0).item() < 1e-6  # a shift changes the mean, not the covariance
    assert mean_matching_loss(x, x.clone()).item() == 0.0
    covs = [cov_matching_loss(x, x * s).item() for s in (1.0, 1.5, 2.0, 3.0)]
    means = [mean_matching_loss(x, x + g).item() for g in (0.0, 0.5, 1.0, 2.0)]
    assert covs == sorted(covs) and covs[-1] > covs[1] > 0
    assert means == sorted(means) and means[-1] == pytest.approx(4.0, rel=1e-5)


def test_cov_term_refuses_a_single_example_per_class():
    with pytest.raises(ValueError, match=">= 2 examples"):
        cov_matching_loss(torch.randn(1, 2, 4), torch.randn(1, 2, 4))


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
    class-balanced batch of the tiny model it must be non-zero and back-propagate into the weights."""
    from refusal_rank import data as D
    from refusal_rank.activations import encode

    harm = [p.text for p in D.split_prompts("harmful_train", 4, 0)]
    ok = [p.text for p in D.split_prompts("harmless_train", 4, 0)]
    model = tiny.model
    w = model.model.layers[1].mlp.down_proj.weight
    w.requires_grad_(True)
    try:
        enc = encode(tiny, harm + ok)
        out = model(**enc, output_hidden_states=True)
        pooled = torch.stack([pool_positions(h, tiny.n_post) for h in out.hidden_states[1:]], dim=1)  # (B, L, d)
        st = Standardizer.fit(pooled.detach())
        z = st(pooled)
        loss = cov_matching_loss(z[:4], z[4:])
        loss.backward()
        assert loss.item() > 1e-6
        assert w.grad is not None and w.grad.abs().sum().item() > 0
    finally:
        w.grad = None
        w.requires_grad_(False)
