"""Probe splits: train and held-out test prompts drawn from the same sources, recorded by id.

Why a split of its own: a probe trained on AdvBench and tested on HarmBench + StrongREJECT measures a
dataset shift as much as geometry (the first cpu run read exactly 0.750 for every model at early
layers: one whole test source misclassified). Here every source is split in two, so a probe is tested
on held-out prompts of the very sources it was trained on; transfer from one source to another is
measured apart and labelled as such.

The pools come from ``data/splits.json`` (which this module only reads): AdvBench from
``harmful_train``, HarmBench from ``harmful_val`` and the HarmBench part of ``harmful_test``,
StrongREJECT from the rest of ``harmful_test``, harmless from ``harmless_train``/``_val``/``_test``, and
the over-refusal set as a transfer-only test. The defense's training prompts (``*_defense``) are never
used: a trained model has fitted them, so a probe on them would measure that fit. Each pool is shuffled
once by seed and cut in half (train first); a profile takes the first n of each half, so a smaller
profile's probe prompts are a subset of a larger one's. ``data/probe_splits.json`` is the contract:
regenerating it must give the same bytes (a test checks this).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from . import data as D

PROBE_SPLITS_PATH = D.DATA_DIR / "probe_splits.json"
HARMFUL_SOURCES = ("advbench", "harmbench", "strongreject")
HARMLESS_SOURCE = "harmless"
TRANSFER_ONLY = ("overrefusal",)


def source_pools(splits: dict[str, list[str]]) -> dict[str, list[str]]:
    """Ids per source from the main split contract, in its order, the defense's prompts left out."""
    by_prefix = lambda ids, prefix: [i for i in ids if i.startswith(prefix + "-")]
    return {
        "advbench": by_prefix(splits["harmful_train"], "advbench"),
        "harmbench": by_prefix(splits["harmful_val"] + splits["harmful_test"], "harmbench"),
        "strongreject": by_prefix(splits["harmful_test"], "strongreject"),
        "harmless": splits["harmless_train"] + splits["harmless_val"] + splits["harmless_test"],
        "overrefusal": list(splits["overrefusal_test"]),
    }


def make_probe_splits(seed: int = 0, splits: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """{"seed", "sources": {source: {"train": ids, "test": ids}}, "transfer_only": {source: ids}}."""
    pools = source_pools(D.read_splits() if splits is None else splits)
    out: dict[str, Any] = {"seed": seed, "sources": {}, "transfer_only": {}}
    for src, ids in pools.items():
        ids = sorted(ids)
        random.Random(f"{seed}-probe-{src}").shuffle(ids)
        if src in TRANSFER_ONLY:
            out["transfer_only"][src] = ids
        else:
            half = len(ids) // 2
            out["sources"][src] = {"train": ids[:half], "test": ids[half:]}
    return out


def render(obj: dict[str, Any]) -> str:
    """The file's exact bytes (one id list per line keeps diffs readable)."""
    return json.dumps(obj, indent=1) + "\n"


def write_probe_splits(seed: int = 0) -> Path:
    PROBE_SPLITS_PATH.write_text(render(make_probe_splits(seed)))
    return PROBE_SPLITS_PATH


def read_probe_splits() -> dict[str, Any]:
    if not PROBE_SPLITS_PATH.is_file():
        raise D.DataError(f"{PROBE_SPLITS_PATH} is missing: run `python -m refusal_rank.probe_splits` to write it.")
    return json.loads(PROBE_SPLITS_PATH.read_text())


def probe_prompts(part: str, n_per_source: int, sources: tuple[str, ...] = HARMFUL_SOURCES,
                  n_harmless: int | None = None) -> tuple[list[D.Prompt], list[D.Prompt]]:
    """(harmful, harmless) prompts of the ``train`` or ``test`` half: the first ``n_per_source`` of each
    harmful source, and as many harmless prompts as harmful ones in all (``n_harmless`` overrides), so
    that the classes are balanced and chance is 0.5."""
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    rec = read_probe_splits()["sources"]
    pool = D.load_all_prompts()
    harmful = [pool[i] for s in sources for i in rec[s][part][:n_per_source]]
    n_ok = len(harmful) if n_harmless is None else n_harmless
    harmless = [pool[i] for i in rec[HARMLESS_SOURCE][part][:n_ok]]
    if not harmful or len(harmless) < n_ok:
        raise D.DataError(f"probe split {part}: {len(harmful)} harmful, {len(harmless)} of {n_ok} harmless prompts: "
                          "lower probes.n_train_per_source / n_test_per_source")
    return harmful, harmless


def transfer_prompts(source: str, n: int) -> list[D.Prompt]:
    """The first ``n`` prompts of a transfer-only set (over-refusal: benign prompts that look edgy)."""
    pool = D.load_all_prompts()
    return [pool[i] for i in read_probe_splits()["transfer_only"][source][:n]]


if __name__ == "__main__":
    print(f"wrote {write_probe_splits()}")
