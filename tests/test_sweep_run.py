"""Notebook 04's orchestration: the K walk, K_break, the estimators' grid and site choice, caching."""

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


# ---- every layer


def test_every_estimator_reads_every_layer(tiny_cfg, tiny, tmp_path, monkeypatch):
    """The attack grid holds the last 20% of layers: dim-svd stacks every layer and position, the one-layer
    estimators may choose a site there, and the paper's attacker keeps its own cutoff."""
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    ctx = S.attack_context(tiny_cfg, tiny)
    assert ctx.layers == list(range(tiny.n_layers))
    assert ctx.harm.shape[1] == tiny.n_layers and S.dim_stack(ctx).shape[0] == tiny.n_layers * tiny.n_post
    last = {l for l, _ in S.site_grid(tiny_cfg, tiny)}
    assert tiny.n_layers - 1 in last  # in the last 20%
    assert max(l for l, _ in S.iterated_candidates(tiny_cfg, tiny)) < int(tiny.n_layers * 0.8)
    (l, p), chosen = S.choose_site(ctx, "pca-centered")
    assert any(k.startswith(f"{tiny.n_layers - 1},") for k in chosen["val_scores"]) and chosen["kl_checked"]
    # the KL filter applies: with max_kl 0 every site fails it and the fallback (lowest score + KL) decides
    strict = S.attack_context(override(tiny_cfg, **{"directions.max_kl": 0.0}), tiny)
    _, ch = S.choose_site(strict, "pca-centered")
    assert ch["fallback"]


def test_cpu_profile_lets_every_estimator_read_the_last_layers():
    from refusal_rank.config import load_config
    from refusal_rank.directions import candidate_grid

    sc = load_config("cpu")["sweep"]
    n_layers, n_post = 28, 5  # Qwen2.5-1.5B
    assert sc["drop_last_frac"] == 0.0 and sc["layer_stride"] == 1
    sites = candidate_grid(n_layers, n_post, sc["drop_last_frac"], sc["site_layer_stride"], sc["site_positions"])
    assert max(l for l, _ in sites) >= int(n_layers * 0.8)
    it = candidate_grid(n_layers, n_post, sc["iterated_drop_last_frac"], sc["iterated_layer_stride"])
    assert sorted({l for l, _ in it}) == list(range(int(n_layers * 0.8)))  # every layer below the cutoff
    assert sc["optimized"]["steps"] >= 100


# ---- the walk never over-reports


class Curve:
    """A synthetic estimator: refusal rates at 64 and 256 tokens and a score proxy per K."""

    def __init__(self, r64, r256=None, proxy=None, gen_below=1.01, reach_max=None):
        self.r64, self.r256 = r64, r256 or {}
        self.proxy, self.gen_below, self.reach_max = proxy or {}, gen_below, reach_max
        self.per_k, self.calls = {}, []

    def reach(self, K):
        if self.reach_max is not None and K > self.reach_max:
            return False
        self.per_k[K] = {}
        if self.proxy.get(K, 0.0) < self.gen_below:
            self.generate_at(K)
        return True

    def generate_at(self, K):
        self.calls.append(("gen", K))
        self.per_k[K]["r64"] = self.r64[K]

    def read_long(self, K):
        self.calls.append(("long", K))
        if K:
            self.per_k[K]["r256"] = self.r256.get(K, self.r64[K])

    def rate(self, K):
        r = self.per_k[K]
        return r.get("r256", r.get("r64"))

    def walk(self, ks, stop=True):
        return S.walk_k(ks, self.reach, self.rate, self.generate_at, self.read_long, 0.3, stop)


def _check_no_over_report(c, w, thr=0.3):
    k = w["k_break"]
    if k is None:
        return
    assert c.rate(k) < thr
    for K in w["reached"]:
        if K < k:
            assert c.rate(K) is not None and c.rate(K) >= thr, (K, w)
    below = max([K for K in w["reached"] if K < k], default=0)
    assert below in w["long_reads"] and k in w["long_reads"]


def test_walk_finds_a_break_the_proxy_skipped_below_a_later_one():
    ks = [1, 2, 3, 4, 6, 8]
    # non-monotone: K=2 breaks, 3 holds, 6 breaks; the proxy wrongly says 1-4 hold, so only 6 and 8 are generated first
    c = Curve({1: 0.9, 2: 0.1, 3: 0.8, 4: 0.5, 6: 0.05, 8: 0.0}, proxy={1: 0.9, 2: 0.9, 3: 0.9, 4: 0.9, 6: 0.1, 8: 0.0},
              gen_below=0.6)
    w = c.walk(ks)
    assert w["k_break"] == 2 and w["screened_only"] == []
    _check_no_over_report(c, w)


def test_walk_rejects_a_candidate_that_refuses_at_256_tokens():
    ks = [1, 2, 3, 4]
    c = Curve({1: 0.9, 2: 0.2, 3: 0.1, 4: 0.0}, r256={2: 0.45})
    w = c.walk(ks)
    assert w["k_break"] == 3 and w["rejected"] == [2] and w["long_reads"] == [2, 3]
    _check_no_over_report(c, w)


def test_walk_reads_k0_for_a_first_k_break_and_confirms_not_broken_at_the_top():
    c = Curve({1: 0.1, 2: 0.0})
    w = c.walk([1, 2])
    assert w["k_break"] == 1 and w["long_reads"] == [0, 1] and ("long", 0) in c.calls
    c = Curve({1: 0.9, 2: 0.8, 3: 0.7}, proxy={1: 0.9, 2: 0.9, 3: 0.9}, gen_below=0.6)
    w = c.walk([1, 2, 3])
    assert w["k_break"] is None and c.rate(3) == 0.7 and w["screened_only"] == [1, 2]  # named, not hidden
    c = Curve({1: 0.9, 2: 0.8, 3: 0.1}, reach_max=2)
    assert c.walk([1, 2, 3])["k_break"] is None and c.walk([1, 2, 3])["reached"] == [1, 2]


def test_walk_never_over_reports_on_random_non_monotone_curves():
    import random

    rng = random.Random(0)
    ks = [1, 2, 3, 4, 6, 8]
    for trial in range(300):
        r64 = {K: rng.choice([0.0, 0.1, 0.25, 0.35, 0.6, 0.9]) for K in ks}
        r256 = {K: min(1.0, r + rng.choice([0.0, 0.0, 0.2])) for K, r in r64.items()}
        proxy = {K: rng.random() for K in ks}
        c = Curve(r64, r256, proxy, gen_below=rng.choice([0.3, 0.6, 1.01]))
        w = c.walk(ks, stop=rng.random() < 0.7)
        _check_no_over_report(c, w)
        # late refusals only add refusals (r256 >= r64 here), so the smallest K broken at 256 tokens is the truth
        truth = min((K for K in ks if r256[K] < 0.3), default=None)
        if w["k_break"] is not None:
            assert w["k_break"] == truth and r256[truth] < 0.3
        else:  # nothing broke among the generated K: a true break can only hide in a K named as screened only
            assert all(c.rate(K) is None or c.rate(K) >= 0.3 for K in w["reached"])
            assert truth is None or truth in w["screened_only"]


# ---- the sweep on tiny


def test_sweep_walks_the_grid_and_stops_at_the_break(tiny_cfg, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    prompts = S.sweep_test_set(tiny_cfg)
    ce_ref = (prompts[:2], [[1, 2], [3]])
    # the random tiny model refuses nothing: K=1 already breaks it, and with stop_after_break the walk ends there
    cfg = override(tiny_cfg, **{"sweep.stop_after_break": True, "sweep.gen_below": 1.01})
    ctx = S.attack_context(cfg, tiny)
    r = S.sweep_estimator(ctx, "dim-svd", prompts, ce_ref)
    assert r["k_break"] == 1 and list(r["per_k"]) == [1] and r["ce_k"] == 1
    assert r["per_k"][1]["refusal_rate_harmful"]["n"] == len(prompts)
    # the deciding generations were read at verdict_new_tokens: the break and the unattacked model (K=0)
    assert r["walk"]["long_reads"] == [0, 1] and r["per_k"][1]["long"]["tokens"] == cfg["eval"]["verdict_new_tokens"]
    assert r["k0_long"]["n"] == len(prompts) and len(r["judge_pool"]) == len(prompts)
    assert {(x["k"], x["held"]) for x in r["judge_pool"]} == {(1, False)}  # K=0 below it is the unattacked model
    assert r["ce_harmless_at_k"] == r["per_k"][1]["ce_harmless"]
    # a threshold nothing can pass: every K is scored, none breaks; gen_below 0 skips generation on the way,
    # "not broken" is confirmed by generating at the largest K reached, and the Ks only screened are named
    cfg = override(tiny_cfg, **{"sweep.threshold": 0.0, "sweep.gen_below": 0.0})
    ctx = S.attack_context(cfg, tiny)
    r = S.sweep_estimator(ctx, "dim-svd", prompts, ce_ref)
    top = max(r["per_k"])
    assert r["k_break"] is None and r["ce_k"] == top == r["info"]["k_reached"]
    assert [k for k, v in r["per_k"].items() if "refusal_rate_harmful" in v] == [top]
    assert r["walk"]["screened_only"] == [k for k in r["per_k"] if k != top]
    assert list(r["per_k"]) == [k for k in sorted(cfg["sweep"]["k_grid"]) if k <= top]
    # a proxy that skips every K, with a threshold everything passes: the break found at the largest K is
    # walked down to the first K (the random model refuses nothing at any K), and no K is left unread
    cfg = override(tiny_cfg, **{"sweep.threshold": 1.01, "sweep.gen_below": 0.0, "sweep.stop_after_break": True})
    r = S.sweep_estimator(S.attack_context(cfg, tiny), "dim-svd", prompts, ce_ref)
    assert r["k_break"] == 1 and all("refusal_rate_harmful" in v for v in r["per_k"].values())
    assert r["walk"]["screened_only"] == []


def test_iterated_is_extended_lazily_and_cached(tiny_cfg, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    ctx = S.attack_context(tiny_cfg, tiny)
    one = S.iterated_basis(ctx, 1)
    assert one.basis.shape[1] == 1
    two = S.iterated_basis(ctx, 2)
    assert two.basis.shape[1] >= 2 or two.stopped_early
    assert torch.allclose(two.basis[:, 0], one.basis[:, 0]) and two.rounds[0] == one.rounds[0]
    assert S.iterated_basis(ctx, 2).basis.shape == two.basis.shape  # from the cache


def test_optimized_walk_warm_starts_and_restarts(tiny_cfg, tiny, tmp_path, monkeypatch):
    """On tiny every target is "compliant": the optimised attacker trains K=1 from the restarts, then K=2
    from the K=1 result extended ("warm") and the restarts, and records its curves."""
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    from refusal_rank import data as D
    g = torch.Generator().manual_seed(0)
    pool = D.split_prompts("harmful_train", tiny_cfg["data"]["train_pool"], 0) + D.split_prompts("harmful_val", tiny_cfg["data"]["val_pool"], 0)
    targets = {p.id: torch.randint(10, 200, (4,), generator=g).tolist() for p in pool}
    ctx = S.attack_context(tiny_cfg, tiny, targets)
    one = S.optimized_basis(ctx, 1)
    assert "warm" not in one["info"]["screened"] and set(one["info"]["screened"]) == set(tiny_cfg["sweep"]["optimized"]["restarts"])
    two = S.optimized_basis(ctx, 2)
    assert "warm" in two["info"]["screened"] and two["basis"].shape == (tiny.d_model, 2)
    steps = tiny_cfg["sweep"]["optimized"]["steps"]
    assert all(len(t["history"]) == steps for t in two["info"]["trained"].values())
    r = S.sweep_estimator(ctx, "optimized", S.sweep_test_set(tiny_cfg), None)
    curves = S.optimized_curves({"base": {"optimized": r}})
    assert set(curves["base"]) == set(r["per_k"]) and all(curves["base"][k] for k in curves["base"])


def test_targets_come_from_the_k1_ablated_original_and_skip_refusals(tiny_cfg, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    u = torch.randn(tiny.d_model, generator=g, dtype=torch.float64)
    t = S.attack_targets(tiny_cfg, tiny, u)
    n = tiny_cfg["sweep"]["optimized"]["target_tokens"]
    assert t and all(0 < len(v) <= n for v in t.values())
    monkeypatch.setattr(S, "is_refusal", lambda text: True)
    assert S.attack_targets(tiny_cfg, tiny, 2 * u) == {}  # another direction: another cache entry


def test_summaries_count_long_verdicts_and_write_the_judge_pool(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    rate = lambda r: {"rate": r, "lo": r, "hi": r, "n": 4}
    long = lambda r, ch: {"refusal_rate_harmful": rate(r), "n": 4, "changed": ch, "tokens": 256, "full": True}
    k0 = {"refusal_rate_harmful": rate(0.75), "n": 4, "changed": 1, "tokens": 256, "full": False}
    res = lambda kb, ch: {"k_break": kb, "per_k": {1: {"score_rate": 1.0, "refusal_rate_harmful": rate(0.5)},
                                                   2: {"score_rate": 0.0, "refusal_rate_harmful": rate(0.0), "long": long(0.25, ch)}},
                          "k0_long": k0, "judge_pool": [{"prompt_id": "x", "prompt": "p", "completion": "c", "k": kb}],
                          "walk": {}, "info": {}, "ce_k": kb, "ce_harmless_at_k": None}
    sweeps = {"base": {"dim-svd": res(2, 1), "inlp": res(2, 0)}}
    v = S.verdicts_long(sweeps)
    assert v == {"n": 12, "changed": 2, "by_model": {"base": {"n": 12, "changed": 2}}}  # K=0 counted once per model
    assert S.sweep_long_summary(sweeps)["base"]["dim-svd"] == {"0": 0.75, "2": 0.25}
    assert S.k0_long_rates(sweeps)["base"]["refusal_rate_harmful"]["rate"] == 0.75
    import json
    rows = [json.loads(l) for l in S.write_judge_pool(tiny_cfg, sweeps).read_text().splitlines()]
    assert {r["model"] for r in rows} == {"base attacked"} and {r["attack"] for r in rows} == {"dim-svd K=2", "inlp K=2"}
    assert "refusal" not in rows[0]  # no verdict: the labeller reads blind


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
    kb["defended"] = {"iterated": None}
    assert "not broken in the grid (up to K = 16) (meets" in S.reading(kb, reached={"defended": {"iterated": 16}})[1]
    # not broken, but the walk stopped below the target: no claim either way
    assert "cannot tell" in S.reading(kb, reached={"defended": {"iterated": 4}})[1]
    assert "cannot tell" in S.reading(kb)[1]
    kb["base"] = {"iterated": 1, "optimized": 2}
    assert "larger than iterated (K = 1)" in S.reading(kb)[-1]
    assert S.optimized_check(kb) == {"k_break": 2, "others_min": 1, "strongest": False}
    kb["base"] = {"iterated": 1, "optimized": 1}
    assert "no larger than every other" in S.reading(kb)[-1] and S.optimized_check(kb)["strongest"]


def test_judge_sample_draws_attacked_completions_from_the_pool(tiny_cfg, tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    pool = lambda m, e, n: [{"prompt_id": f"{m}{e}{i}", "prompt": "p", "completion": "c", "k": 2} for i in range(n)] + \
        [{"prompt_id": f"{m}{e}{i}", "prompt": "p", "completion": "c", "k": 1, "held": True} for i in range(n)]
    sweeps = {m: {e: {"judge_pool": pool(m, e, 5)} for e in ("dim-svd", "inlp")} for m in ("base", "defended")}
    S.write_judge_pool(tiny_cfg, sweeps)
    spec = importlib.util.spec_from_file_location("judge_sample", Path(__file__).resolve().parents[1] / "tools" / "judge_sample.py")
    js = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(js)
    rows = js.from_sweep(tiny_cfg, 6, None)
    assert len(rows) == 6 and {r["model"] for r in rows} == {"defended attacked"}  # base is not an attacked trained model
    assert sum(r["attack"] == "dim-svd K=2" for r in rows) == 3  # taken in turn from each breaking attack
    assert len({r["id"] for r in rows}) == 6
    held = js.from_sweep(tiny_cfg, 4, ["defended"], held=True)  # the K below each break, which held at 256 tokens
    assert len(held) == 4 and {r["attack"] for r in held} == {"dim-svd K=1 (held)", "inlp K=1 (held)"}


def test_evaluate_k_outside_the_walk(tiny_cfg, tiny, tmp_path, monkeypatch):
    import math

    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    prompts = S.sweep_test_set(tiny_cfg)
    U = torch.linalg.qr(torch.randn(tiny.d_model, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    r = S.evaluate_k(tiny_cfg, tiny, U, prompts, math.inf, (prompts[:2], [[1, 2], [3]]))
    assert r["refusal_rate_harmful"]["n"] == len(prompts) and "ce_harmless" in r and tiny.edit == ""
    assert "refusal_rate_harmful" not in S.evaluate_k(tiny_cfg, tiny, U, prompts, -1.0)
