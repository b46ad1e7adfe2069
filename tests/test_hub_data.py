"""Harmless prompts from a hub dataset (the paper profile's Alpaca): an unreachable hub is one sentence
before any model loads, and the selection is a pure, seeded function of the rows. No network: the loader
is replaced by fakes."""
import copy

import pytest

import refusal_rank.config as C
from refusal_rank import data as D
from refusal_rank import models as Mo
from refusal_rank.config import ProfileError, load_config

HUB = "tatsu-lab/alpaca"


@pytest.fixture(autouse=True)
def fresh_hub_cache():
    D.hub_harmless.cache_clear()
    yield
    D.hub_harmless.cache_clear()


def _rows(n: int) -> list[dict[str, str]]:
    """Alpaca-layout rows: every third has an input, one text repeats (in another case and spacing)."""
    rows = [{"instruction": f"Describe thing number {i}.", "input": "some input" if i % 3 == 0 else "", "output": "x"}
            for i in range(n)]
    rows[5]["instruction"] = "  describe THING number 4  "  # the same normalised text as row 4
    return rows


def test_paper_profile_names_alpaca_and_the_others_keep_the_local_file():
    assert load_config("paper")["data"]["harmless_hub"] == HUB
    for name in ("tiny", "cpu", "cpu-small"):
        assert not load_config(name)["data"].get("harmless_hub")


def test_bad_hub_id_stops_at_load(tmp_path, monkeypatch):
    tiny = (C.CONFIG_DIR / "tiny.toml").read_text()
    d = tmp_path / "configs"
    d.mkdir()
    (d / "tiny.toml").write_text(tiny.replace("[data]\n", '[data]\nharmless_hub = "alpaca"\n', 1))
    monkeypatch.setattr(C, "CONFIG_DIR", d)
    with pytest.raises(ProfileError, match=r"data\.harmless_hub = \"alpaca\" .*owner/name"):
        load_config("tiny")


def test_unreachable_hub_is_one_sentence_before_any_model_loads(monkeypatch, tiny_cfg):
    def offline(hub_id):
        raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub (ConnectError)")

    for var in D.HUB_OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(Mo, "hub_reachable", lambda *a, **k: True)  # the hub seems up, the loader fails anyway
    monkeypatch.setattr(D, "_hub_rows", offline)
    monkeypatch.setattr(Mo, "checkpoint_dir", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = copy.deepcopy(tiny_cfg)
    cfg["data"]["harmless_hub"] = HUB
    with pytest.raises(D.DataError) as e:
        Mo.load_model(cfg, log=lambda *_: None)
    text = str(e.value)
    assert HUB in text and "unreachable" in text and "data/harmless.jsonl" in text and "harmless_hub" in text
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0  # one sentence
    with pytest.raises(D.DataError, match="unreachable"):  # the prompts themselves fail the same way
        D.profile_split(cfg, "harmless_train", 4)

    # a hub that does not answer: the same sentence at once, the loader (which retries) never called
    monkeypatch.setattr(Mo, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(D, "_hub_rows", lambda hub_id: pytest.fail("the loader was called"))
    with pytest.raises(D.DataError, match="unreachable"):
        D.load_hub_rows(HUB)

    # another failure while the hub answers is the real error, not the sentence
    def missing(hub_id):
        raise FileNotFoundError("no such dataset")

    monkeypatch.setattr(Mo, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(D, "_hub_rows", missing)
    with pytest.raises(FileNotFoundError, match="no such dataset"):
        D.load_hub_rows(HUB)


def test_hub_selection_is_deterministic_and_drops_rows_with_an_input(monkeypatch, tiny_cfg):
    rows = _rows(1200)
    monkeypatch.setattr(Mo, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(D, "_hub_rows", lambda hub_id: copy.deepcopy(rows))
    prompts = D.hub_prompts(rows, HUB)
    kept = {int(p.id.split("-")[1]) for p in prompts}
    assert not any(i % 3 == 0 for i in kept) and 5 not in kept and 4 in kept  # inputs and the duplicate dropped
    assert all(p.id.startswith("alpaca-") and p.source == "alpaca" and p.text == p.text.strip() for p in prompts)
    assert len(prompts) == len({D.normalise(p.text) for p in prompts})

    splits, pool = D.hub_harmless(HUB)
    assert splits == D.split_harmless([p.id for p in prompts], D.splits_seed())  # the local path's function and seed
    ids = [i for s in splits.values() for i in s]
    assert len(ids) == len(set(ids)) == len(prompts)  # disjoint and complete
    assert len(splits["harmless_defense"]) == D.N_DEFENSE_HARMLESS

    cfg = copy.deepcopy(tiny_cfg)
    cfg["data"]["harmless_hub"] = HUB
    first = D.profile_split(cfg, "harmless_test", 8)
    D.hub_harmless.cache_clear()  # read again, as another process would
    assert D.profile_split(cfg, "harmless_test", 8) == first
    assert all(p.id in splits["harmless_test"] and rows[int(p.id.split("-")[1])]["input"] == "" for p in first)
    # the other splits, and every profile without the key, keep the local files
    assert D.profile_split(cfg, "harmful_train", 4) == D.split_prompts("harmful_train", 4, cfg["seed"])
    assert all(p.source == "harmless" for p in D.profile_split(tiny_cfg, "harmless_test", 8))


def test_local_harmless_splits_are_the_shared_function():
    """The refactor kept the recorded contract: split_harmless on the local ids gives data/splits.json's."""
    local = [p.id for p in D.load_jsonl(D.DATA_DIR / "harmless.jsonl", "harmless")]
    recorded = D.read_splits()
    assert D.split_harmless(local, D.splits_seed()) == {k: recorded[k] for k in
                                                        ("harmless_train", "harmless_defense", "harmless_val", "harmless_test")}
