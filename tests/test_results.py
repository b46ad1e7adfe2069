"""summary.json semantics: sections replace, per-notebook sections merge, NaN becomes null; the filter's
clear error when too few prompts survive it."""
import json

import pytest
import torch

from refusal_rank import results as Rs
from refusal_rank.config import override


def test_sections_replace_and_timings_merge(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(Rs, "results_dir", lambda profile: tmp_path)
    cfg = tiny_cfg
    Rs.update_summary(cfg, base={"a": 1, "old": 2}, timings_s={"01": 1.0})
    s = Rs.update_summary(cfg, base={"a": 3}, timings_s={"02": 2.0}, x=float("nan"))
    assert s["base"] == {"a": 3}  # no key of the older run survives inside a section
    assert s["timings_s"] == {"01": 1.0, "02": 2.0}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["x"] is None and on_disk["profile"] == "tiny"


def test_timing_records_fresh_flag(monkeypatch):
    monkeypatch.setenv(Rs.FRESH_ENV, "1")
    t = Rs.timing("01_directions", 0.0)
    assert t["timings_fresh"] == {"01_directions": True} and t["timings_s"]["01_directions"] > 0
    monkeypatch.setenv(Rs.FRESH_ENV, "0")
    assert Rs.timing("x", 0.0)["timings_fresh"] == {"x": False}


def test_refusal_filter_too_strict_is_a_clear_error(tiny_cfg, tiny, monkeypatch):
    from refusal_rank import data as D
    from refusal_rank import pipeline as P

    cfg = override(tiny_cfg, **{"data.filter_by_refusal": True})
    # a model that refuses nothing: every harmful prompt fails the filter
    monkeypatch.setattr(P, "scores_cached", lambda cfg, bundle, prompts, *a, **k: -torch.ones(len(prompts)))
    with pytest.raises(D.DataError, match="pass the refusal filter.*raise data.train_pool"):
        P.filtered_train_val(cfg, tiny)


def test_an_attacker_whose_filter_starves_keeps_the_most_refusing_prompts(tiny_cfg, tiny, monkeypatch):
    """Where the filter would stop notebook 01, an attacker keeps each short split's most refusing harmful
    (least refusing harmless) prompts, in pool order, and the report names the fallback; splits that pass
    are filtered as before."""
    from refusal_rank import pipeline as P

    cfg = override(tiny_cfg, **{"data.filter_by_refusal": True, "data.min_keep": 4})
    plain = P.filtered_train_val(override(tiny_cfg, **{"data.filter_by_refusal": False}), tiny)

    def scores(cfg, bundle, prompts, desc="", **k):  # harmful: one prompt above 0, the rest ranked by pool order
        if "harmful" in desc:
            return torch.tensor([1.0] + [-1.0 - i for i in range(1, len(prompts))])
        return -torch.ones(len(prompts))  # harmless: every prompt passes

    monkeypatch.setattr(P, "scores_cached", scores)
    tv = P.filtered_train_val(cfg, tiny, attacker=True)
    n = cfg["data"]["n_train"]
    assert [p.id for p in tv.harmful_train] == [p.id for p in plain.harmful_train][:n]  # the n highest scores
    assert tv.report["harmful_train"]["fallback"] == "top_scores" and tv.report["harmful_train"]["passed"] == 1
    assert "fallback" not in tv.report["harmless_train"]
    assert [p.id for p in tv.harmless_train] == [p.id for p in plain.harmless_train]


def test_corrupted_cache_file_is_detected_by_hash_and_rebuilt(tmp_path):
    from refusal_rank.pipeline import cached_value

    calls, logs = [], []
    make = lambda: calls.append(1) or torch.arange(5)
    p = tmp_path / "v.pt"
    assert torch.equal(cached_value(p, make, log=logs.append), torch.arange(5)) and len(calls) == 1
    assert torch.equal(cached_value(p, make, log=logs.append), torch.arange(5)) and len(calls) == 1  # from the cache
    raw = bytearray(p.read_bytes())
    raw[-10] ^= 0xFF  # one flipped byte
    p.write_bytes(bytes(raw))
    assert torch.equal(cached_value(p, make, log=logs.append), torch.arange(5)) and len(calls) == 2
    assert any("corrupted" in m for m in logs)


def _compare_summaries():
    """tools/compare_summaries.py as a module (a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("cmp", Path(__file__).resolve().parents[1] / "tools" / "compare_summaries.py")
    cmp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cmp)
    return cmp


def test_compare_summaries_ignores_volatile_keys_and_names_differences():
    cmp = _compare_summaries()
    a = {"created": "x", "timings_s": {"01": 5}, "base": {"rate": 0.5, "ci": [0.4, 0.6]}, "training": {"d": {"seconds": 3}}}
    b = {"created": "y", "timings_s": {"01": 9}, "base": {"rate": 0.5, "ci": [0.4, 0.6]}, "training": {"d": {"seconds": 4}}}
    assert cmp.diff(a, b, 0.0) == []
    b["base"]["ci"][1] = 0.61
    assert cmp.diff(a, b, 0.0) == ["/base/ci[1]: 0.6 vs 0.61"]
    assert cmp.diff(a, b, 0.05) == []


def test_compare_summaries_ignores_every_clock_in_a_training_entry():
    """Two runs of the same training differ only in their clocks; every timing key training_entry writes
    must be volatile, or the reproducibility check in run_tests.sh fails on a slower second run."""
    from refusal_rank.defense_run import training_entry

    cmp = _compare_summaries()

    def record(scale: float) -> dict:
        return {"steps": 3, "seconds": 3.0 * scale, "tokens": 300, "tokens_per_s": 100 / scale, "padded_tokens": 330,
                "history": [{"step": i, "loss": 1.0, "sec": scale * (1 + i)} for i in range(3)]}

    first, second = training_entry(record(1.0), 50.0, 4e8), training_entry(record(1.3), 61.0, 4e8)
    assert first["median_step_s"] != second["median_step_s"]  # the clocks did differ
    assert cmp.diff({"training": {"d": first}}, {"training": {"d": second}}, 0.0) == []
