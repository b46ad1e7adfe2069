import json

import pytest

from refusal_rank import data as D


def test_splits_file_is_stable():
    """Regenerating the split contract from the pinned packages and data/ gives the committed file."""
    recorded = json.loads(D.SPLITS_PATH.read_text())
    assert D.make_splits(recorded["seed"]) == recorded["splits"]


def test_splits_disjoint_by_id_and_text():
    splits = D.read_splits()
    pool = D.load_all_prompts()
    seen_ids, seen_text = {}, {}
    for name, ids in splits.items():
        assert ids, f"{name} is empty"
        assert len(ids) == len(set(ids)), f"{name} repeats an id"
        for i in ids:
            assert i not in seen_ids, f"{i} in {name} and {seen_ids.get(i)}"
            seen_ids[i] = name
            key = D.normalise(pool[i].text)
            assert key not in seen_text or seen_text[key] == name, f"{i} duplicates a prompt of {seen_text.get(key)}"
            seen_text[key] = name


def test_split_sizes_and_sources():
    s = D.read_splits()
    assert len(s["harmful_train"]) + len(s["harmful_defense"]) == 520 and len(s["harmful_val"]) == 41
    # the defense's training prompts and the attackers' pool (notebook 01, notebook 04) share nothing
    assert len(s["harmful_defense"]) == 256 and len(s["harmless_defense"]) == 250
    assert len(s["harmful_train"]) >= 200 and len(s["harmless_train"]) >= 200
    assert 400 < len(s["harmful_test"]) <= 159 + 313
    assert sum(len(s[k]) for k in ("harmless_train", "harmless_defense", "harmless_val", "harmless_test")) >= 800
    assert len(s["overrefusal_test"]) >= 150
    sources = {p.source for p in D.split_prompts("harmful_test")}
    assert sources == {"harmbench", "strongreject"}


def test_subsample_deterministic_and_per_source():
    a = D.split_prompts("harmful_test", 5, seed=3, per_source=True)
    b = D.split_prompts("harmful_test", 5, seed=3, per_source=True)
    c = D.split_prompts("harmful_test", 5, seed=4, per_source=True)
    assert [p.id for p in a] == [p.id for p in b]
    assert [p.id for p in a] != [p.id for p in c]
    assert sum(p.source == "harmbench" for p in a) == 5


def test_project_sets_are_unique_and_nonempty():
    for name in ("harmless.jsonl", "overrefusal.jsonl"):
        rows = D.load_jsonl(D.DATA_DIR / name, name)
        texts = [D.normalise(p.text) for p in rows]
        assert len(texts) == len(set(texts)) and all(texts)


def test_clear_errors():
    with pytest.raises(D.DataError, match="Unknown split"):
        D.split_prompts("nope")
    with pytest.raises(D.DataError, match="empty"):
        D.split_prompts("harmful_val", 0)
    with pytest.raises(D.DataError, match="not installed"):
        D.package_file("no-such-package-xyz", "1.0", "x.csv")


def test_loading_through_datasets_keeps_every_id_and_text():
    """The prompt sets go through datasets.load_dataset; read with the csv and json modules instead, every
    id and text is the same, in the same order."""
    import csv

    for key, (dist, version, rel) in D.HARMFUL_FILES.items():
        path = D.package_file(dist, version, rel)
        with path.open(newline="", encoding="utf-8") as fh:
            plain = list(csv.DictReader(fh))
        assert D.read_table(path) == plain, key
    for name in ("harmless.jsonl", "overrefusal.jsonl"):
        plain = [json.loads(l) for l in (D.DATA_DIR / name).read_text(encoding="utf-8").splitlines() if l.strip()]
        assert D.read_table(D.DATA_DIR / name) == plain, name
