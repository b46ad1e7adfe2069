"""Notebook 04's orchestration: the K walk, K_break, the estimators' site choice, caching."""
import pytest
import torch

from refusal_rank import sweep_run as S
from refusal_rank.config import override


def test_k_break_table_takes_the_minimum_and_keeps_unbroken():
    sweeps = {"base": {"iterated": {"k_break": 1}, "dim-svd": {"k_break": 2}},
              "defended": {"iterated": {"k_break": None}, "dim-svd": {"k_break": 8}},
              "kl_only": {"iterated": {"k_break": None}}}
    kb = S.k_break_table(sweeps)
    assert kb["base_star"] == 1 and kb["defended_star"] == 8 and kb["kl_only_star"] is None
    assert kb["defended"] == {"iterated": None, "dim-svd": 8}


def test_unknown_estimator_and_model_are_clear(tiny_cfg):
    with pytest.raises(ValueError, match="unknown estimator"):
        S.check_estimators(["iterated", "magic"])
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        S.load_attacked(tiny_cfg, "nope")


def test_select_models_overrides_the_config_and_rejects_unknown(tiny_cfg):
    import copy
    cfg = copy.deepcopy(tiny_cfg)
    assert S.select_models(cfg, None) == list(tiny_cfg["sweep"]["models"])
    assert S.select_models(cfg, ["base"]) == ["base"] and cfg["sweep"]["models"] == ["base"]
    with pytest.raises(ValueError, match="unknown or empty"):
        S.select_models(cfg, ["base", "nope"])
    with pytest.raises(ValueError, match="unknown or empty"):
        S.select_models(cfg, [])


@pytest.mark.parametrize("name", S.ONE_LAYER)
def test_one_layer_estimators_recover_a_planted_direction(name):
    g = torch.Generator().manual_seed(0)
    d, n = 24, 200
    u = torch.zeros(d)
    u[5] = 1.0
    ok = torch.randn(n, d, generator=g)
    harm = torch.randn(n, d, generator=g) + 4.0 * u + 3.0 * torch.randn(n, 1, generator=g) * u
    B = S.one_layer_basis(name, harm, ok, 3)
    assert torch.allclose(B.T @ B, torch.eye(B.shape[1], dtype=B.dtype), atol=1e-8)
    # a logistic probe's weight is tilted away from u by the extra variance along u (Sigma^-1 delta-mu)
    assert abs(B[:, 0] @ u.double()) > (0.7 if name == "inlp" else 0.9)


def test_sweep_walks_the_grid_and_stops_at_the_break(tiny_cfg, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    prompts = S.sweep_test_set(tiny_cfg)
    # the random tiny model refuses nothing: K=1 already breaks it, and with stop_after_break the walk ends there
    cfg = override(tiny_cfg, **{"sweep.stop_after_break": True, "sweep.gen_below": 1.01})
    ctx = S.attack_context(cfg, tiny)
    r = S.sweep_estimator(ctx, "dim-svd", prompts, (prompts[:2], [[1, 2], [3]]))
    assert r["k_break"] == 1 and list(r["per_k"]) == [1] and r["ce_k"] == 1
    assert r["per_k"][1]["refusal_rate_harmful"]["n"] == len(prompts)
    # a threshold nothing can pass: every K is scored, none breaks; gen_below 0 skips generation on the way,
    # and "not broken" is confirmed by generating at the largest K reached
    cfg = override(tiny_cfg, **{"sweep.threshold": 0.0, "sweep.gen_below": 0.0})
    ctx = S.attack_context(cfg, tiny)
    r = S.sweep_estimator(ctx, "dim-svd", prompts, (prompts[:2], [[1, 2], [3]]))
    top = max(r["per_k"])
    assert r["k_break"] is None and r["ce_k"] == top == r["info"]["k_reached"]
    assert [k for k, v in r["per_k"].items() if "refusal_rate_harmful" in v] == [top]
    assert r["ce_harmless_at_k"] == r["per_k"][top]["ce_harmless"]
    assert list(r["per_k"]) == [k for k in sorted(cfg["sweep"]["k_grid"]) if k <= top]
    # a proxy that skips every K, with a threshold everything passes: the break found at the largest K is
    # walked down to the first K (the random model refuses nothing at any K)
    cfg = override(tiny_cfg, **{"sweep.threshold": 1.01, "sweep.gen_below": 0.0, "sweep.stop_after_break": True})
    r = S.sweep_estimator(S.attack_context(cfg, tiny), "dim-svd", prompts, (prompts[:2], [[1, 2], [3]]))
    assert r["k_break"] == 1 and all("refusal_rate_harmful" in v for v in r["per_k"].values())


def test_iterated_is_extended_lazily_and_cached(tiny_cfg, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    ctx = S.attack_context(tiny_cfg, tiny)
    one = S.iterated_basis(ctx, 1)
    assert one.basis.shape[1] == 1
    two = S.iterated_basis(ctx, 2)
    assert two.basis.shape[1] >= 2 or two.stopped_early
    assert torch.allclose(two.basis[:, 0], one.basis[:, 0]) and two.rounds[0] == one.rounds[0]
    assert S.iterated_basis(ctx, 2).basis.shape == two.basis.shape  # from the cache


def test_reading_follows_the_table():
    kb = {"base": {"iterated": 1}, "base_star": 1, "defended": {"iterated": 20}, "defended_star": 20,
          "kl_only": {"iterated": 1}, "kl_only_star": 1}
    lines = S.reading(kb)
    assert lines[0] == "base: K*_break = 1"
    assert "meets" in lines[1] and "raises" in lines[-1]
    kb.update(defended_star=1)
    lines = S.reading(kb)
    assert "misses" in lines[1] and "does not raise" in lines[-1]
    kb.update(defended_star=None)
    assert "not broken in the grid (meets" in S.reading(kb)[1]
