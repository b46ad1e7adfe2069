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
