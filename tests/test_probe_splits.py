"""The probe split contract: same sources in train and test, disjoint, reproducible to the byte."""
from refusal_rank import data as D
from refusal_rank import probe_splits as PS


def test_probe_splits_file_regenerates_to_the_same_bytes():
    recorded = PS.PROBE_SPLITS_PATH.read_text()
    seed = PS.read_probe_splits()["seed"]
    assert PS.render(PS.make_probe_splits(seed)) == recorded


def test_probe_splits_same_sources_disjoint_and_off_the_defense_prompts():
    rec = PS.read_probe_splits()
    splits = D.read_splits()
    defense = set(splits["harmful_defense"]) | set(splits["harmless_defense"])
    pool = D.load_all_prompts()
    assert set(rec["sources"]) == {*PS.HARMFUL_SOURCES, PS.HARMLESS_SOURCE}
    seen = set()
    for src, parts in rec["sources"].items():
        assert parts["train"] and parts["test"]
        assert abs(len(parts["train"]) - len(parts["test"])) <= 1
        for part in ("train", "test"):
            ids = parts[part]
            assert {pool[i].source for i in ids} == {src}, (src, part)  # train and test from the same source
            assert not set(ids) & seen and not set(ids) & defense
            seen |= set(ids)
    over = rec["transfer_only"]["overrefusal"]
    assert {pool[i].source for i in over} == {"overrefusal"} and not set(over) & seen


def test_probe_prompts_balanced_and_nested():
    h, o = PS.probe_prompts("test", 5)
    assert len(h) == len(o) == 15 and [p.source for p in h] == ["advbench"] * 5 + ["harmbench"] * 5 + ["strongreject"] * 5
    h2, _ = PS.probe_prompts("test", 7)
    assert {p.id for p in h} <= {p.id for p in h2}  # a smaller profile's prompts are a subset of a larger one's
    ha, oa = PS.probe_prompts("train", 4, sources=("advbench",))
    assert len(ha) == len(oa) == 4 and {p.source for p in ha} == {"advbench"}
    tr, _ = PS.probe_prompts("train", 4)
    assert not {p.id for p in tr} & {p.id for p in h2}
    assert len(PS.transfer_prompts("overrefusal", 3)) == 3
