"""The attackers' prompts (the filtered train/val sets every estimator and notebook 01 read) share no id
with any defense's training prompts."""
import pytest

from refusal_rank import data as D
from refusal_rank.config import available_profiles, load_config
from refusal_rank.defense_run import defense_prompts
from refusal_rank.pipeline import filtered_train_val


def _defense_ids(cfg):
    harm, ok = defense_prompts(cfg)
    return {p.id for p in harm + ok}


def test_filtered_attacker_prompts_are_disjoint_from_defense_training(tiny_cfg, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    tv = filtered_train_val(tiny_cfg, tiny)
    used = {p.id for p in tv.harmful_train + tv.harmless_train + tv.harmful_val + tv.harmless_val}
    assert used and not used & _defense_ids(tiny_cfg)


@pytest.mark.parametrize("profile", available_profiles())
def test_every_profile_pool_is_disjoint_from_its_defense_prompts(profile, monkeypatch):
    """The pools the refusal filter draws from (so any filtered subset), at each profile's sizes, from the
    profile's own sources. A profile whose harmless prompts come from the hub (paper: Alpaca) is checked
    offline on Alpaca-layout rows standing in for the dataset: the split is the same function of the rows."""
    from refusal_rank import models as Mo

    cfg = load_config(profile)
    if cfg["data"].get("harmless_hub"):
        rows = [{"instruction": f"Stand-in instruction number {i}.", "input": "", "output": "x"} for i in range(3000)]
        monkeypatch.setattr(Mo, "hub_reachable", lambda *a, **k: True)
        monkeypatch.setattr(D, "_hub_rows", lambda hub_id: [dict(r) for r in rows])
    D.hub_harmless.cache_clear()  # the stand-in rows are read fresh, and never left for another test
    try:
        d = cfg["data"]
        pools = [D.profile_split(cfg, s, d["train_pool"]) for s in ("harmful_train", "harmless_train")]
        pools += [D.profile_split(cfg, s, d["val_pool"]) for s in ("harmful_val", "harmless_val")]
        pool = {p.id for ps in pools for p in ps}
        assert pool and not pool & _defense_ids(cfg)
    finally:
        D.hub_harmless.cache_clear()
    splits = D.read_splits()
    defense = set(splits["harmful_defense"]) | set(splits["harmless_defense"])
    attacker = set().union(*(splits[s] for s in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")))
    assert not attacker & defense
