import math

import numpy as np
import pytest
import torch

from refusal_rank import metrics as M


def test_refusal_score_matches_definition():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(5, 50) * 3, -1)
    ids = [3, 7]
    p = lp.exp()[:, ids].sum(-1).double()
    expected = torch.log(p) - torch.log1p(-p)
    assert torch.allclose(M.refusal_score(lp, ids).double(), expected, atol=1e-4)


def test_refusal_score_stable_at_extremes():
    lp = torch.full((1, 4), -1e4)
    lp[0, 0] = 0.0  # all mass on the refusal token
    assert 1000 < M.refusal_score(lp, [0]).item() < float("inf")  # p_R rounds to 1: still finite
    assert M.refusal_score(lp, [1]).item() < -1000


def test_marker_judge():
    assert M.is_refusal("I'm sorry, but I can't help with that.")
    assert M.is_refusal("I\u2019m sorry")  # curly apostrophe
    assert not M.is_refusal("Sure! Here is a haiku about the sea.")
    assert M.refusal_labels(["I cannot do that", "Sure"]).tolist() == [1.0, 0.0]


def test_kl_zero_for_identical_and_positive_otherwise():
    lp = torch.log_softmax(torch.randn(3, 10), -1)
    assert M.kl_rows(lp, lp).abs().max() < 1e-6
    assert (M.kl_rows(lp, torch.log_softmax(torch.randn(3, 10), -1)) > 0).all()


def test_bootstrap_ci_brackets_and_is_deterministic():
    x = np.r_[np.ones(30), np.zeros(70)]
    r, lo, hi = M.bootstrap_ci(x, n_boot=500, seed=1)
    assert r == pytest.approx(0.3) and lo < 0.3 < hi and 0.15 < lo and hi < 0.45
    assert M.bootstrap_ci(x, n_boot=500, seed=1) == (r, lo, hi)
    with pytest.raises(ValueError):
        M.bootstrap_ci([])


def test_point_biserial_and_judge_agreement():
    assert M.point_biserial([1, 2, 3, 4], [0, 0, 1, 1]) > 0.8
    assert math.isnan(M.point_biserial([1, 2], [1, 1]))
    agree = M.judge_agreement([True, True, False, False], [True, False, True, False])
    assert agree == {"precision": 0.5, "recall": 0.5, "n": 4, "labelled_refusals": 2, "marker_refusals": 2}
    none = M.judge_agreement([False, False], [True, False])  # the markers flag nothing: precision undefined
    assert math.isnan(none["precision"]) and none["recall"] == 0 and none["labelled_refusals"] == 1


def test_judge_report_keeps_dtypes_apart():
    """One checkpoint name trained in two dtypes is two models: their labels are scored apart, and rows
    without a recorded dtype keep the bare name."""
    from refusal_rank.judge import judge_report

    refuse, comply = "I'm sorry, but I can't help with that.", "Sure, here are the steps."
    rows = [{"id": "a", "model": "v@1x attacked", "completion": comply, "refusal": False, "reason": "r"},
            {"id": "b", "model": "v@1x attacked", "completion": refuse, "refusal": True, "reason": "r"},
            {"id": "c", "model": "v@1x attacked", "dtype": "bfloat16", "completion": comply, "refusal": True,
             "reason": "r"}]
    rep = judge_report(rows)
    assert set(rep["by_model"]) == {"v@1x attacked", "v@1x attacked [bfloat16]"}
    assert rep["by_model"]["v@1x attacked"]["recall"] == 1.0
    assert rep["by_model"]["v@1x attacked [bfloat16]"]["recall"] == 0.0
    assert rep["n"] == 3 and len(rep["disagreements"]) == 1
