"""The reading of notebook 05 (which case each trained model is in), on synthetic summaries."""
import copy

import pytest

from refusal_rank.config import load_config
from refusal_rank.probe_run import probe_layers, reading

KNOBS = {"spread_factor": 1.5, "k_margin": 2, "share_drop": 0.2, "move_layers": 3, "move_factor": 2.0, "shrink_factor": 2.0}


def _layer(sep, top_eig=100.0, rank=1.2, k=1, acc=0.9, n_sig=3, total_var=1000.0):
    return {"separability": sep, "top_eigvals": [top_eig, 1.0], "whitened": {"rank": rank, "n_sig": n_sig}, "k_erase": k,
            "k_erase_budget": 64, "linear_acc": acc, "total_var": total_var}


def _base():
    probes = {str(l): _layer(sep) for l, sep in zip(range(0, 12, 2), (0.1, 0.5, 2.0, 4.0, 6.0, 5.0))}
    site = {"layer": 8, "attack_share": {"iterated": {"1": {"held": 0.8, "remains": 0.3}}}}
    return probes, site


def _case(model_probes, model_site, last=None):
    bp, bs = _base()
    out = reading({"base": bp, "m": model_probes}, {"base": bs, "m": model_site},
                  last or {"base": {"linear_acc": 0.99}, "m": {"linear_acc": 0.95}}, KNOBS)
    return out["m"]


def test_left_in_place_when_nothing_moves():
    bp, bs = _base()
    r = _case(copy.deepcopy(bp), copy.deepcopy(bs))
    assert r["case"] == "left in place" and not any(r["flags"].values())
    assert "last-token probe 0.990 -> 0.950" in r["sentence"] and r["sentence"].startswith("m: left in place")


def test_shrunk_when_only_the_scale_falls():
    bp, bs = _base()
    mp = {l: {**v, "top_eigvals": [v["top_eigvals"][0] / 10, 0.1], "total_var": v["total_var"] / 10} for l, v in bp.items()}
    r = _case(mp, bs)
    assert r["case"] == "shrunk" and r["flags"] == {"spread": False, "concentrated": False, "moved": False, "weakened": False, "shrunk": True}
    assert any(e.startswith("total variance x0.10") for e in r["evidence"])


def test_not_shrunk_when_only_the_class_difference_falls():
    """Mean matching lowers the excess second moment's top eigenvalue while the stream keeps its scale: not a
    change of scale."""
    bp, bs = _base()
    mp = {l: {**v, "top_eigvals": [v["top_eigvals"][0] / 10, 0.1]} for l, v in bp.items()}
    r = _case(mp, bs)
    assert not r["flags"]["shrunk"] and r["case"] == "left in place"
    assert any(e.startswith("unwhitened top eigenvalue x0.10") for e in r["evidence"])


def test_a_rising_participation_ratio_over_fewer_directions_is_not_spread():
    """The participation ratio rises when the top whitened eigenvalue alone falls; with fewer eigenvalues above
    the noise edge and a smaller k_erase, the signal sits on fewer directions, not more."""
    bp, bs = _base()
    bp["8"]["whitened"], bp["8"]["k_erase"] = {"rank": 1.7, "n_sig": 9}, 4
    mp = copy.deepcopy(bp)
    mp["8"]["whitened"], mp["8"]["k_erase"] = {"rank": 3.2, "n_sig": 4}, 1
    out = reading({"base": bp, "m": mp}, {"base": bs, "m": copy.deepcopy(bs)}, {}, KNOBS)["m"]
    assert not out["flags"]["spread"] and out["case"] == "concentrated", out["sentence"]
    assert "(x1.88, over fewer eigenvalues above the edge: not counted as spread)" in out["sentence"]
    mp["8"]["k_erase"] = None  # k_erase out of the budget says spread, the eigenvalue count says fewer: not read
    out = reading({"base": bp, "m": mp}, {"base": bs, "m": bs}, {}, KNOBS)["m"]
    assert not out["flags"]["spread"] and "the direction counts disagree (the eigenvalues above the edge fell)" in out["sentence"]
    mp["8"]["whitened"]["n_sig"] = 9  # as many above the edge, more evenly: spread unless k_erase fell
    mp["8"]["k_erase"] = 4
    assert reading({"base": bp, "m": mp}, {"base": bs, "m": bs}, {}, KNOBS)["m"]["case"] == "spread"


@pytest.mark.parametrize("change", ["rank", "n_sig", "k_erase", "k_none", "share"])
def test_spread_by_any_scale_free_count(change):
    bp, bs = _base()
    mp, ms = copy.deepcopy(bp), copy.deepcopy(bs)
    if change == "rank":
        mp["8"]["whitened"]["rank"] = 2.0
    elif change == "n_sig":
        mp["8"]["whitened"]["n_sig"] = 5
    elif change == "k_erase":
        mp["8"]["k_erase"] = 4
    elif change == "k_none":
        mp["8"]["k_erase"] = None
    else:
        ms["attack_share"]["iterated"]["1"]["held"] = 0.4
    r = _case(mp, ms)
    assert r["case"] == "spread", r["sentence"]
    if change == "k_none":
        assert "k_erase 1 -> > 64" in r["sentence"]


def test_spread_wins_over_shrunk_and_both_are_said():
    bp, bs = _base()
    mp = {l: {**v, "top_eigvals": [v["top_eigvals"][0] / 10, 0.1], "total_var": v["total_var"] / 10,
              "whitened": {"rank": 3.0, "n_sig": 3}} for l, v in bp.items()}
    r = _case(mp, bs)
    assert r["case"] == "spread" and r["flags"]["shrunk"] and "(also shrunk)" in r["sentence"]


def test_moved_when_the_peak_layer_moves():
    bp, bs = _base()
    mp = copy.deepcopy(bp)
    for l, sep in zip(range(0, 12, 2), (6.0, 5.0, 2.0, 0.5, 0.3, 0.2)):
        mp[str(l)]["separability"] = sep
    ms = {**copy.deepcopy(bs), "layer": 2}
    mp["2"] = {**mp["2"], "whitened": {"rank": 1.2}, "k_erase": 1}
    r = _case(mp, ms)
    assert r["case"] == "moved" and "peak separability at layer 8 -> 0" in r["sentence"]


def test_weakened_when_separability_falls_everywhere():
    bp, bs = _base()
    mp = {l: {**v, "separability": v["separability"] / 4} for l, v in bp.items()}
    r = _case(mp, bs)
    assert r["case"] == "weakened" and not r["flags"]["moved"] and "at the peak x0.25" in r["sentence"]


def test_reading_without_base_is_empty_and_base_is_not_read():
    bp, bs = _base()
    assert reading({"m": bp}, {"m": bs}, {}, KNOBS) == {}
    assert set(reading({"base": bp, "m": bp}, {"base": bs, "m": bs}, {}, KNOBS)) == {"m"}


def test_every_profile_has_the_reading_knobs_and_a_valid_erase_budget():
    for name in ("tiny", "cpu", "cpu-small", "paper"):
        pc = load_config(name)["probes"]
        assert set(KNOBS) <= set(pc["reading"])
        assert max(pc["erase_ks"]) <= pc["whiten_dim"] and 0 in pc["erase_ks"]
        assert pc["whiten_dim"] < 2 * 3 * pc["n_train_per_source"]


def test_probe_layers_include_the_last_layer_and_the_site():
    assert probe_layers(28, 2, [21]) == sorted(set(range(0, 28, 2)) | {21, 27})
    assert probe_layers(4, 1) == [0, 1, 2, 3]
