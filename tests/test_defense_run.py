"""Notebook 03's orchestration on tiny: the training plan, training to a milestone and on, loading a
variant at each milestone."""
import pytest
import torch

from refusal_rank import defense_run as R


@pytest.fixture()
def cfg(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    return tiny_cfg


def test_plan_trains_every_variant_to_1x_before_the_curve(tiny_cfg):
    plan = R.train_plan(tiny_cfg, ["defended", "kl_only", "paper_mean"])
    assert plan[:3] == [("defended", 1), ("kl_only", 1), ("paper_mean", 1)]
    # budget_curve only, in its order (tiny: kl_only, defended), milestone by milestone
    assert plan[3:] == [("kl_only", 2), ("defended", 2), ("kl_only", 4), ("defended", 4)]
    # the lower curve on record for both (a new machine): one variant at a time through it and the next milestone
    on_record = R.train_plan(tiny_cfg, ["defended", "kl_only", "paper_mean"], {"kl_only": [1, 2], "defended": [1, 2, 4]})
    assert on_record[3:] == [("kl_only", 2), ("kl_only", 4), ("defended", 2), ("defended", 4)]
    # on record for one variant only: the curve is not complete, the order stays milestone by milestone
    assert R.train_plan(tiny_cfg, ["defended", "kl_only", "paper_mean"], {"kl_only": [1, 2, 4]}) == plan
    assert sorted(on_record) == sorted(plan)  # the same steps, only reordered
    assert R.budget_label(tiny_cfg, 4) == "4x" and R.prompt_passes(tiny_cfg, 2) == 2 * 2 * tiny_cfg["defense"]["train"]["batch_per_class"]


def test_recorded_milestones_count_only_the_current_configuration(tiny_cfg):
    here = R.variant_dir_name(tiny_cfg, "kl_only")
    committed = {"variants": {"kl_only": {"dir": here, "budget": {"1x": {"step": 1}, "2x": {"step": 2}}},
                              "defended": {"dir": "defended-otherhash", "budget": {"1x": {"step": 1}}},
                              "retired": {"dir": "retired-h", "budget": {"1x": {"step": 1}}}}}
    assert R.recorded_milestones(tiny_cfg, committed) == {"kl_only": [1, 2]}
    assert R.recorded_milestones(tiny_cfg, None) == {}


def test_a_committed_measurement_of_the_same_checkpoint_is_carried_not_remeasured(cfg, monkeypatch):
    """A new machine retrains every checkpoint. A milestone below the variant's last whose committed entry
    names this checkpoint's own measurement file (snapshot sha256, config, prompts in one key) is carried and
    nothing is loaded or measured; another file name, or the variant's last milestone, is measured."""
    from refusal_rank import pipeline as P

    R.train_variant(cfg, "kl_only", until=2, log=lambda *_: None)  # kl_only is on tiny's budget curve: its last is 4
    sets = P.test_sets(cfg)
    path = R.checkpoint_eval_path(cfg, "kl_only", 1, sets)
    entry = {"step": 1, "prompt_passes": 8, "screen": {"k_break": 1}, "eval_file": path.name}
    committed = {"profile": "tiny", "read_at_commit": "abc1234",
                 "variants": {"kl_only": {"dir": path.parent.name, "budget": {"1x": entry}}}}
    assert R.carried_entry(cfg, "kl_only", 1, sets, committed) == {**entry, "carried_from_commit": "abc1234"}
    measured = []

    def fake_eval(cfg_, name, step, *a, **k):
        measured.append((name, step))
        return {"res": {"refusal_rate_harmful": {"rate": 0.5}, "completions": {}}, "screen": {"k_break": 2}}

    monkeypatch.setattr(R, "checkpoint_eval", fake_eval)
    original = lambda: (_ for _ in ()).throw(AssertionError("the original was loaded for a carried milestone"))
    got, ev = R.milestone_budget(cfg, "kl_only", 1, sets, original, committed, log=lambda *_: None)
    assert ev is None and got["carried_from_commit"] == "abc1234" and measured == []
    # the queue's measurer (train-variant --plan --evaluate) carries it too, loading no model
    from refusal_rank import cli
    from refusal_rank import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model loaded")))
    cli._checkpoint_measurer(cfg, committed)("kl_only", 1)
    assert measured == []
    # another measurement file (retrained weights not bitwise the same, or another config): measured
    other = {**committed, "variants": {"kl_only": {"dir": path.parent.name, "budget": {"1x": {**entry, "eval_file": "eval-00001-x.pt"}}}}}
    assert R.carried_entry(cfg, "kl_only", 1, sets, other) is None
    got, ev = R.milestone_budget(cfg, "kl_only", 1, sets, lambda: ([], None), other, log=lambda *_: None)
    assert measured == [("kl_only", 1)] and ev is not None and got["screen"] == {"k_break": 2}
    assert "completions" not in got and "carried_from_commit" not in got
    # another variant folder (configuration) never carries, whatever the file name
    moved = {**committed, "variants": {"kl_only": {"dir": "kl_only-otherhash", "budget": {"1x": entry}}}}
    assert R.carried_entry(cfg, "kl_only", 1, sets, moved) is None
    # the last milestone is always measured: later notebooks read its completions
    R.train_variant(cfg, "kl_only", until=4, log=lambda *_: None)
    last = R.checkpoint_eval_path(cfg, "kl_only", 4, sets)
    at_last = {**committed, "variants": {"kl_only": {"dir": last.parent.name, "budget": {"4x": {**entry, "step": 4, "eval_file": last.name}}}}}
    R.milestone_budget(cfg, "kl_only", 4, sets, lambda: ([], None), at_last, log=lambda *_: None)
    assert measured[-1] == ("kl_only", 4)


def test_train_to_a_milestone_then_on_and_load_each(cfg):
    rec1 = R.train_variant(cfg, "kl_only", until=1, log=lambda *_: None)
    assert rec1["steps"] == 1 and R.reached_milestones(cfg, "kl_only") == [1]
    assert R.train_variant(cfg, "kl_only", until=1, log=lambda *_: None)["steps"] == 1  # reused, not retrained
    rec = R.train_variant(cfg, "kl_only", until=4, log=lambda *_: None)  # resumes from the checkpoint
    assert rec["steps"] == 4 and R.reached_milestones(cfg, "kl_only") == [1, 2, 4]
    assert set(rec["milestones"]) == {"1x", "2x", "4x"}
    m1, m4 = R.load_variant(cfg, "kl_only", 1), R.load_variant(cfg, "kl_only", 4)
    w1 = dict(m1.model.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    w4 = dict(m4.model.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(w1, w4) and m1.name != m4.name  # different weights, different cache identities
    assert not any("lora" in n for n, _ in m4.model.named_parameters())  # merged: a plain model
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        R.load_variant(cfg, "defended", 1)
    with pytest.raises(ValueError, match="not a milestone"):
        R.train_variant(cfg, "kl_only", until=3, log=lambda *_: None)


def test_training_entry_counts_computed_and_trained_tokens_apart():
    """A shared prefix computes fewer positions than the rows hold: the hardware's share of the peak counts
    what was computed, the effective share the rows' own tokens (the unit of the budgets)."""
    rec = {"steps": 2, "seconds": 10.0, "tokens": 1000, "padded_tokens": 1200, "computed_tokens": 600,
           "tokens_per_s": 100.0}
    e = R.training_entry(rec, peak_gflops=100.0, flops_per_token=4e8)
    assert e["padding_share"] == pytest.approx(1 - 1000 / 1200, abs=1e-4)
    assert e["computed_per_token"] == pytest.approx(0.6)
    assert e["effective_fraction_of_peak"] == pytest.approx(100 * 4e8 / 1e9 / 100)
    assert e["fraction_of_peak"] == pytest.approx(0.6 * e["effective_fraction_of_peak"])
    old = dict(rec)
    del old["computed_tokens"]  # records from before computed_tokens: every padded position was computed
    assert R.training_entry(old, 100.0, 4e8)["computed_per_token"] == pytest.approx(1.2)
    assert "fraction_of_peak" not in R.training_entry(rec, None, None)
    assert "median_step_s" not in e  # records from before per-step seconds
    paused = dict(rec, history=[{"step": 0}, {"step": 1, "sec": 5.0}, {"step": 2, "sec": 1200.0}, {"step": 3, "sec": 6.0}])
    e = R.training_entry(paused, None, None)
    assert e["median_step_s"] == 6.0 and e["timed_steps"] == 3  # a step paused for 20 minutes does not move it


def test_checkpoint_eval_is_cached_by_snapshot_and_config(cfg, monkeypatch):
    """The background queue and notebook 03 share one measurement per checkpoint: computed once, reused,
    and computed again when the snapshot or a knob it reads changes."""
    import copy

    from refusal_rank import pipeline as P

    R.train_variant(cfg, "kl_only", until=1, log=lambda *_: None)
    calls = []
    monkeypatch.setattr(R, "load_variant", lambda c, n, s: calls.append((n, s)) or object())
    monkeypatch.setattr(P, "evaluate_model", lambda *a, **k: {"refusal_rate_harmful": {"rate": 0.5}, "completions": {}})
    monkeypatch.setattr(R, "attack_screen", lambda *a, **k: {"k1_reselected": {"x": 1}, "k_break": None})
    sets = P.test_sets(cfg)
    quiet = lambda *_: None
    ev = R.checkpoint_eval(cfg, "kl_only", 1, sets, [], torch.zeros(1), log=quiet)
    assert ev["res"]["attack_k1"] == {"x": 1} and ev["screen"]["k_break"] is None and len(calls) == 1
    assert R.checkpoint_eval(cfg, "kl_only", 1, sets, [], torch.zeros(1), log=quiet) == ev and len(calls) == 1
    other = copy.deepcopy(cfg)
    other["defense"]["screen"]["dim_svd_ks"] = [1]
    R.checkpoint_eval(other, "kl_only", 1, sets, [], torch.zeros(1), log=quiet)
    assert len(calls) == 2  # another screen: measured again
    snap = R.snapshot_path(R.variant_dir(cfg, "kl_only") / "ckpt.pt", 1)
    snap.with_suffix(".sha256").write_text("0" * 64 + "\n")  # another snapshot under the same name
    R.checkpoint_eval(cfg, "kl_only", 1, sets, [], torch.zeros(1), log=quiet)
    assert len(calls) == 3
    with pytest.raises(FileNotFoundError, match="no verified snapshot"):
        R.checkpoint_eval(cfg, "defended", 1, sets, [], torch.zeros(1), log=quiet)


def test_queue_progress_reads_what_was_measured_and_never_touches_the_cache(cfg, monkeypatch):
    """The progress report loads no model: a trained checkpoint is 'unmeasured' until checkpoint_eval has
    cached it, then carries notebook 03's entry with the snapshot's hash; a cache file it cannot verify (a
    queue between writing a sidecar and its file) is reported as unmeasured and left where it is."""
    from refusal_rank import pipeline as P

    sets = P.test_sets(cfg)
    R.train_variant(cfg, "kl_only", until=1, log=lambda *_: None)
    monkeypatch.setattr(R, "load_variant", lambda *a: pytest.fail("progress must not load a model"))
    p0 = R.queue_progress(cfg, sets, ["kl_only", "defended"])
    assert p0["kl_only"]["milestones"] == [1] and p0["kl_only"]["unmeasured"] == [1] and p0["kl_only"]["budget"] == {}
    assert p0["kl_only"]["training"]["steps"] == 1 and "term" not in p0["kl_only"]["moments"]  # diagnostics, no term
    assert p0["defended"] == {"dir": R.variant_dir(cfg, "defended").name, "dtype": cfg["model"]["dtype"],
                              "target_step": 4, "milestones": [], "budget": {}, "unmeasured": []}
    monkeypatch.setattr(R, "load_variant", lambda *a: object())
    monkeypatch.setattr(P, "evaluate_model", lambda *a, **k: {"refusal_rate_harmful": {"rate": 0.25}, "completions": {"x": []}})
    monkeypatch.setattr(R, "attack_screen", lambda *a, **k: {"k1_reselected": {"r": 0}, "k_break": 1})
    R.checkpoint_eval(cfg, "kl_only", 1, sets, [], torch.zeros(1), log=lambda *_: None)
    e = R.queue_progress(cfg, sets, ["kl_only"])["kl_only"]
    assert e["unmeasured"] == [] and set(e["budget"]) == {"1x"}
    b = e["budget"]["1x"]
    assert b["refusal_rate_harmful"] == {"rate": 0.25} and b["screen"]["k_break"] == 1 and "completions" not in b
    assert b["snapshot_sha256"] == R.snapshot_digest(R.snapshot_path(R.variant_dir(cfg, "kl_only") / "ckpt.pt", 1))
    path = R.checkpoint_eval_path(cfg, "kl_only", 1, sets)
    assert b["eval_file"] == path.name
    side = path.with_name(path.name + ".sha256")
    side.write_text("0" * 64)  # unverifiable now
    assert R.queue_progress(cfg, sets, ["kl_only"])["kl_only"]["unmeasured"] == [1]
    assert path.is_file() and side.is_file()  # left for the queue, which owns it


def test_screen_k1_completions_are_read_back_without_a_model(cfg, tiny):
    """The screen's K=1 attacked completions of a checkpoint, found from the caches alone, are exactly those
    the screen generated (the marker rate it recorded is checked inside); before the checkpoint is measured
    the reader says so instead of computing anything."""
    import copy

    from refusal_rank import pipeline as P

    c = copy.deepcopy(cfg)
    c["defense"]["screen"]["stop_after_break"] = True  # the K=1 attack only: all this test reads
    R.train_variant(c, "kl_only", until=1, log=lambda *_: None)
    sets = P.test_sets(c)
    with pytest.raises(FileNotFoundError, match="no cached measurement"):
        R.screen_k1_completions(c, "kl_only", 1, sets)
    base_lp = P.logprobs_cached(c, tiny, sets.harmless, desc="base harmless")
    base = P.evaluate_model(c, tiny, sets, None, None, "original")
    ev = R.checkpoint_eval(c, "kl_only", 1, sets, base["completions"]["harmless"], base_lp, log=lambda *_: None)
    got = R.screen_k1_completions(c, "kl_only", 1, sets)
    d = ev["screen"]["k1_reselected"]["direction"]  # the selection's filters, recorded with the direction
    assert d["candidates_checked"] >= 1
    assert d["fallback"] or (d["induce_score_val"] > 0 and d["kl_harmless"] <= c["directions"]["max_kl"])
    assert len(got) == len(sets.harmful)
    # the same completions as a fresh K=1 attack on the loaded checkpoint reads from the generation cache
    model = R.load_variant(c, "kl_only", 1)
    sel, _ = P.discover_direction(c, model, P.filtered_train_val(c, model))
    assert (sel.layer, sel.position) == (ev["screen"]["k1_reselected"]["direction"]["layer"],
                                         ev["screen"]["k1_reselected"]["direction"]["position"])
    from refusal_rank.ablation import orthogonalized

    with orthogonalized(model, sel.unit[:, None]):
        path = P.completions_path(c, model, sets.harmful)
    assert path.is_file() and P.read_completions(path, len(sets.harmful)) == got
    # tools/judge_sample.py draws from both: the screen's attacked completions, and the checkpoint's own
    # (a trained variant's stand-in carries the name load_variant gives it)
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("judge_sample", Path(__file__).resolve().parents[1] / "tools" / "judge_sample.py")
    js = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(js)
    rows = js.from_screen(c, 3, ["kl_only@1"])
    assert [r["model"] for r in rows] == ["kl_only@1x attacked"] * 3 and len({r["id"] for r in rows}) == 3
    assert {r["checkpoint"] for r in rows} == {model.name} and {r["dtype"] for r in rows} == {c["model"]["dtype"]}
    assert all(r["id"].startswith(f"kl_only@1x attacked:{model.name.rpartition(':')[2]}:") for r in rows)
    assert all(r["completion"] == got[[p.id for p in sets.harmful].index(r["prompt_id"])]["text"] for r in rows)
    # a budget-curve variant measured below its target is named by its step (kl_only@1)
    assert P.completions_path(c, js.stand_in(c, "kl_only@1", None), sets.harmless) == P.completions_path(c, model, sets.harmless)
    with pytest.raises(SystemExit, match="variant@step"):
        js.stand_in(c, "kl_only@1x", None)
    c["defense"]["budget_curve"] = []  # kl_only's target is then step 1, the checkpoint measured above
    own = P.completions_path(c, js.stand_in(c, "kl_only", None), sets.harmless)
    assert own == P.completions_path(c, model, sets.harmless) and own.is_file()


def test_checkpoint_moment_diagnostics_reproduce_what_training_recorded(cfg):
    """Recomputed on a trained checkpoint (and on the original for step 0), the diagnostics match those the
    training loop measured on the same prompts (step 0 exactly: the student before its first update is the
    original; a milestone up to merging the adapters), and carry the top eigenvalue's two parts."""
    rec = R.train_variant(cfg, "paper_mean", until=1, log=lambda *_: None)
    recorded = {e["step"]: e["moments"] for e in rec["evals"] if "moments" in e}
    for step in (0, 1):
        got = R.checkpoint_moment_diagnostics(cfg, "paper_mean", step)
        for k in ("mean", "top_eig", "total_var", "spread"):
            assert got[k] == pytest.approx(recorded[step][k], rel=1e-3, abs=1e-4), (step, k)
        assert got["top_eig_cov"] > 0 and "gap_sq" in got
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        R.checkpoint_moment_diagnostics(cfg, "paper_mean", 2)


def test_moment_decomposition_tool_writes_each_checkpoint_once(cfg, tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    from refusal_rank.config import RESULTS_ENV

    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "results"))
    R.train_variant(cfg, "paper_mean", until=1, log=lambda *_: None)
    spec = importlib.util.spec_from_file_location("md", Path(__file__).resolve().parents[1] / "tools" / "moment_decomposition.py")
    md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(md)
    assert "kl_only" not in md.moment_variants(cfg) and "paper_mean" in md.moment_variants(cfg)
    calls = []
    monkeypatch.setattr(md.R, "checkpoint_moment_diagnostics", lambda c, n, s: calls.append((n, s)) or {"top_eig": 1.0})
    monkeypatch.setattr(sys, "argv", ["moment_decomposition.py", "--profile", "tiny", "--variants", "paper_mean"])
    md.main()
    doc = json.loads((tmp_path / "results" / "tiny" / "moment_decomposition.json").read_text())
    assert calls == [("paper_mean", 0), ("paper_mean", 1)] and set(doc["variants"]["paper_mean"]["steps"]) == {"0", "1"}
    assert doc["variants"]["paper_mean"]["steps"]["0"]["snapshot_sha256"] == "original"
    md.main()  # resumes: nothing is recomputed for the same snapshots
    assert len(calls) == 2


def test_variant_key_moves_with_what_trains_its_weights(cfg):
    """A moment knob changes the key of a variant with moment terms only; a shared knob changes every key."""
    import copy

    def key(c, name):
        return R.variant_dir(c, name).name

    c2 = copy.deepcopy(cfg)
    c2["defense"]["train"]["moment_pairings"] = cfg["defense"]["train"].get("moment_pairings", 1) + 3
    assert key(c2, "defended") != key(cfg, "defended") and key(c2, "mean_matched") != key(cfg, "mean_matched")
    assert key(c2, "kl_only") == key(cfg, "kl_only") and key(c2, "ablation_aware") == key(cfg, "ablation_aware")
    c3 = copy.deepcopy(cfg)
    c3["defense"]["train"]["lr"] = cfg["defense"]["train"]["lr"] * 2
    assert all(key(c3, n) != key(cfg, n) for n in ("defended", "kl_only"))


def test_moments_entry_reads_the_term_its_floor_and_the_diagnostics():
    hist = [{"step": s, "cov": 0.1 - 0.01 * s, "cov_null": (-1) ** s * 0.01} for s in range(8)]
    diag = {"top_eig": 10.0, "total_var": 5.0, "cov": 0.09, "cov_null": 0.01, "sites": "pooled"}
    rec = {"variant": {"lambda_cov": 100.0}, "history": hist,
           "evals": [{"step": 0, "moments": dict(diag, spread=1.0)}, {"step": 8, "moments": dict(diag, cov=0.03, spread=1.02)}]}
    e = R.moments_entry(rec)
    assert e["term"] == "cov" and e["start"] == pytest.approx(0.095) and e["end"] == pytest.approx(0.035)
    assert e["noise_floor"] == pytest.approx(0.01) and e["diag_before"] == 0.09 and e["diag_after"] == 0.03
    assert e["spread_before"] == 1.0 and e["spread_after"] == 1.02
    assert "top_eig_cov_before" not in e  # diagnostics from before these keys: no parts reported
    rec["evals"][1]["moments"].update(top_eig_cov=4.0, gap_sq=0.5)  # a resumed run: the later milestone has them
    e = R.moments_entry(rec)
    assert e["top_eig_cov_before"] is None and e["top_eig_cov_after"] == 4.0 and e["gap_sq_after"] == 0.5
    assert R.moments_entry({"variant": {}, "history": [{"step": 0, "lm": 1.0}], "evals": []}) is None


def test_budget_headline_reads_each_number_and_tolerates_a_partial_entry():
    """The headline (queue log, progress, notebook 03's table) carries the K=1 attack's direction: whether it
    was a fallback and its own KL cost; an entry measured before some key existed reads None there."""
    entry = {"refusal_rate_harmful": {"rate": 0.725}, "refusal_rate_harmless": {"rate": 0.02},
             "overrefusal_rate": {"rate": 0.38}, "kl_harmless": {"mean": 0.15}, "ce_harmless": 0.43,
             "screen": {"k_break": 1, "k1_reselected": {"refusal_rate_harmful": {"rate": 0.106},
                                                        "direction": {"fallback": True, "kl_harmless": 0.51}}}}
    h = R.budget_headline(entry)
    assert h == {"harmful": 0.725, "harmless": 0.02, "overrefusal": 0.38, "kl": 0.15, "ce": 0.43,
                 "k1_reselected": 0.106, "k1_fallback": True, "k1_kl": 0.51, "k1_filter_fallback": None,
                 "screen_k_break": 1}
    entry["screen"]["k1_reselected"]["filter_fallback"] = {"harmful_val": 14}
    assert R.budget_headline(entry)["k1_filter_fallback"] == ["harmful_val"]
    del entry["screen"]["k1_reselected"]["direction"], entry["overrefusal_rate"]
    h = R.budget_headline(entry)
    assert h["k1_fallback"] is None and h["k1_kl"] is None and h["overrefusal"] is None and h["k1_reselected"] == 0.106


def test_screen_walk_skips_the_k_above_a_break_and_never_changes_the_lowest_one():
    """An estimator that breaks at K=4 of [1, 4, 16]: with stop_after_break, 16 is skipped (not measured),
    without it every K is measured; the lowest K below the threshold is 4 either way. A measure that has no
    K-th direction (None) ends the walk."""
    rates = {1: 0.9, 4: 0.1, 16: 0.5}  # non-monotone on purpose: a skipped K cannot lower the lowest break
    calls: list[int] = []

    def measure(k):
        calls.append(k)
        return {"refusal_rate_harmful": {"rate": rates[k]}}

    out, skipped = R.screen_walk([16, 1, 4], measure, 0.3, True)
    assert calls == [1, 4] and list(out) == ["1", "4"] and skipped == [16]
    calls.clear()
    out_all, skipped_all = R.screen_walk([1, 4, 16], measure, 0.3, False)
    assert calls == [1, 4, 16] and skipped_all == []
    lowest = lambda o: min(int(k) for k, r in o.items() if r["refusal_rate_harmful"]["rate"] < 0.3)
    assert lowest(out) == lowest(out_all) == 4
    out_none, skipped_none = R.screen_walk([1, 4, 16], lambda k: None if k > 1 else measure(k), 0.3, True)
    assert list(out_none) == ["1"] and skipped_none == []
    # a lower break elsewhere in the screen (another estimator, or the re-selected K=1 attack) bounds this walk:
    # K at or above it are skipped, never measured; without stop_after_break the bound is ignored
    calls.clear()
    out_b, skipped_b = R.screen_walk([1, 4, 16], measure, 0.3, True, below=4)
    assert calls == [1] and list(out_b) == ["1"] and skipped_b == [4, 16]
    calls.clear()
    out_1, skipped_1 = R.screen_walk([1, 4, 16], measure, 0.3, True, below=1)
    assert calls == [] and out_1 == {} and skipped_1 == [1, 4, 16]
    calls.clear()
    assert R.screen_walk([1, 4, 16], measure, 0.3, False, below=1)[1] == [] and calls == [1, 4, 16]


def test_a_screen_whose_k1_attack_broke_the_model_generates_nothing_more(tiny_cfg, monkeypatch):
    """K_break cannot go below 1: once the re-selected K=1 attack breaks the model, with stop_after_break the
    screen neither builds the attacker's activations nor generates any other K; without it every K is run.
    A screen whose K=1 attack holds walks each estimator, and dim-svd stops at the lowest K iterated broke."""
    from refusal_rank import pipeline, sweep_run as S

    class Basis:
        basis = torch.eye(4)

    calls: list[int] = []
    rates = {1: 0.9, 2: 0.1}  # iterated breaks at K=2 when K=1 holds; dim-svd never would

    def evaluate_k(cfg, bundle, U, prompts, limit):
        calls.append(U.shape[1])
        return {"refusal_rate_harmful": {"rate": rates.get(U.shape[1], 0.9)}, "mean_score": 0.0}

    monkeypatch.setattr(S, "sweep_test_set", lambda cfg: [])
    monkeypatch.setattr(S, "iterated_basis", lambda ctx, k: Basis)
    monkeypatch.setattr(S, "estimator_basis", lambda ctx, est, k: {"basis": torch.eye(4)})
    monkeypatch.setattr(S, "evaluate_k", evaluate_k)
    cfg = {**tiny_cfg, "defense": {**tiny_cfg["defense"], "screen": {**tiny_cfg["defense"]["screen"],
                                                                      "stop_after_break": True, "iterated_rounds": 2,
                                                                      "dim_svd_ks": [1, 2, 4]}}}

    def no_context(*a, **k):
        raise AssertionError("the attacker's activations were built for a screen that needed none")

    monkeypatch.setattr(pipeline, "reselected_k1", lambda cfg, b, s: {"refusal_rate_harmful": {"rate": 0.0}})
    monkeypatch.setattr(S, "attack_context", no_context)
    out = R.attack_screen(cfg, None, None)
    assert calls == [] and out["k_break"] == 1 and out["k_screened"] == [1]
    assert out["k_skipped"] == {"iterated": [1, 2], "dim-svd": [1, 2, 4]}

    monkeypatch.setattr(S, "attack_context", lambda cfg, b: object())
    monkeypatch.setattr(pipeline, "reselected_k1", lambda cfg, b, s: {"refusal_rate_harmful": {"rate": 0.9}})
    out = R.attack_screen(cfg, None, None)
    assert calls == [1, 2, 1] and out["k_break"] == 2 and out["k_skipped"] == {"iterated": [], "dim-svd": [2, 4]}

    calls.clear()
    off = {**cfg, "defense": {**cfg["defense"], "screen": {**cfg["defense"]["screen"], "stop_after_break": False}}}
    monkeypatch.setattr(pipeline, "reselected_k1", lambda cfg, b, s: {"refusal_rate_harmful": {"rate": 0.0}})
    out = R.attack_screen(off, None, None)
    assert calls == [1, 2, 1, 2, 4] and out["k_break"] == 1 and out["k_screened"] == [1, 2, 4]


def test_merge_progress_keeps_committed_measurements_a_new_cache_lacks():
    """A new machine's empty cache must not erase committed measurements: they are carried (and marked) when
    the variant's configuration hash (its folder name) is unchanged, dropped when it changed; where the
    cache has the same checkpoint measured, its entry wins and a differing snapshot hash is reported."""
    e1 = {"step": 70, "snapshot_sha256": "a" * 64, "screen": {"k_break": 1}}
    committed = {"read_at_commit": "abc1234", "variants": {
        "defended": {"dir": "defended-h1", "budget": {"1x": e1}, "training": {"tokens_per_s": 15.8}, "moments": {"end": 0.02}},
        "paper_mean": {"dir": "paper_mean-OLD", "budget": {"1x": e1}},
        "gone": {"dir": "gone-h", "budget": {"1x": e1}}}}
    empty = {"dir": "defended-h1", "target_step": 560, "milestones": [], "budget": {}, "unmeasured": []}
    current = {"defended": empty, "paper_mean": {**empty, "dir": "paper_mean-NEW"}}
    merged, notes = R.merge_progress(committed, current, {"paper_mean-OLD": "float32"})
    assert merged["defended"]["budget"]["1x"] == {**e1, "carried_from_commit": "abc1234"}
    assert merged["defended"]["training"] == {"tokens_per_s": 15.8} and merged["defended"]["moments"] == {"end": 0.02}
    assert "gone" not in merged  # a variant the profile does not run any more
    # trained under another configuration (dtype): not a measurement of this one, but kept apart, with its dtype
    assert merged["paper_mean"]["budget"] == {}
    assert merged["paper_mean"]["other_configurations"] == {
        "paper_mean-OLD": {"dtype": "float32", "read_at_commit": "abc1234", "budget": {"1x": e1}}}
    assert current["defended"]["budget"] == {} and "other_configurations" not in current["paper_mean"]  # inputs unchanged
    assert len(notes) == 4 and sum("carried" in n for n in notes) == 3 and "(float32)" in notes[-1]
    # written again, the kept run stays kept (not nested, not lost)
    again, _ = R.merge_progress({"read_at_commit": "x", "variants": merged}, current)
    assert again["paper_mean"]["other_configurations"] == merged["paper_mean"]["other_configurations"]
    # the cache measured it again: its entry wins; a different snapshot hash is reported, an equal one is not
    e2 = {"step": 70, "snapshot_sha256": "b" * 64}
    merged, notes = R.merge_progress(committed, {"defended": {**empty, "budget": {"1x": e2}, "training": {"tokens_per_s": 20.0}}})
    assert merged["defended"]["budget"]["1x"] == e2 and merged["defended"]["training"] == {"tokens_per_s": 20.0}
    assert any("not bitwise the same" in n for n in notes)
    _, notes = R.merge_progress(committed, {"defended": {**empty, "budget": {"1x": e1}, "training": {}, "moments": {}}})
    assert notes == []
    # a carried entry stays marked with the commit it was first measured at; budget labels stay in step order
    e4 = {"step": 280, "snapshot_sha256": "c" * 64}
    again = {"read_at_commit": "def5678", "variants": {"defended": {"dir": "defended-h1", "budget": {
        "4x": e4, "1x": {**e1, "carried_from_commit": "abc1234"}}}}}
    merged, _ = R.merge_progress(again, {"defended": empty})
    assert list(merged["defended"]["budget"]) == ["1x", "4x"]
    assert merged["defended"]["budget"]["1x"]["carried_from_commit"] == "abc1234"
    assert R.merge_progress(None, current)[0] == current


def test_dtype_change_is_one_sentence_only_when_the_dtypes_differ():
    """A queue on a CPU that resolves dtype = "auto" otherwise than the committed run would retrain everything
    in the other dtype: that is said in one sentence (naming both dtypes and the override); the same dtype, no
    committed file, or one without an original entry say nothing."""
    cfg = {"profile": "cpu", "model": {"dtype": "float32", "dtype_requested": "auto"}}
    said = R.dtype_change(cfg, {"original": {"dtype": "bfloat16"}})
    assert said is not None and said.count(". ") == 0 and said.endswith(".")
    assert "float32" in said and "bfloat16" in said and "--allow-dtype-change" in said and "auto" in said
    assert R.dtype_change(cfg, {"original": {"dtype": "float32"}}) is None
    assert R.dtype_change(cfg, None) is None and R.dtype_change(cfg, {"original": None}) is None


def test_original_rates_are_read_from_the_cached_completions_alone(cfg, tiny):
    """The progress file's reference: the original's rates, the same as its evaluation computed, read from
    the generation cache without a model; None while any of the three test sets is not cached."""
    from refusal_rank import pipeline as P

    sets = P.test_sets(cfg)
    assert R.original_rates(cfg, sets) is None
    res = P.evaluate_model(cfg, tiny, sets, None, None, "original")
    got = R.original_rates(cfg, sets)
    assert got["dtype"] == cfg["model"]["dtype"]
    for key in ("refusal_rate_harmful", "refusal_rate_harmless", "overrefusal_rate"):
        assert got[key] == res[key]
