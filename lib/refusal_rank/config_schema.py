"""The profile schema: every key a profile may set, its type and its allowed range, in one place.

:func:`validate` is called by :func:`refusal_rank.config.load_config` on the file as written (before any
default is filled in and before any model loads), so that a typo (``iterated_kmax``), a wrong type, an
out-of-range value (a negative batch size, a threshold outside (0, 1), an empty or unsorted grid), a size
larger than its pool, an unknown estimator or an unknown variant name stops the run at load with one
sentence naming the file, the dotted key and what is allowed, instead of hours later deep in a notebook.

The schema was derived from the four profiles in ``configs/`` (tiny, cpu, cpu-small, paper): a key every
profile sets is required, a key only some set is optional (the library has a default for it). Nothing
here changes the config: validation only reads it, so no cache key moves.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

ESTIMATORS = ("iterated", "dim-svd", "pca-centered", "cov-diff", "inlp", "optimized")
MODEL_SOURCES = ("tiny", "pypi_gguf", "hub")
DTYPES = ("auto", "float32", "bfloat16", "float16")
GEN_ENGINES = ("fast", "refill", "hf")
GEN_CACHES = ("static", "dynamic")
MOMENT_SITES = ("pooled", "positions", "prompt")
SIGNATURES = ("identical", "different_architecture", "abliteration", "rank1_projection", "low_rank", "dense")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


from . import config as _config  # its REPO_ROOT read at call time: a root set later (a test's scratch one) is seen
from .config import ProfileError


class ConfigError(ProfileError):
    """A profile that does not satisfy the schema (one sentence: file, dotted key, allowed range)."""


# ---- field kinds ------------------------------------------------------------------------------


@dataclass
class Spec:
    required: bool = True

    def check(self, value: Any) -> str | None:  # None: fine; else what is allowed
        raise NotImplementedError


@dataclass
class Num(Spec):
    """A number within optional bounds, each closed or open; ``allowed`` says the range in words."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    noun: ClassVar[str] = "a number"

    def _fmt(self, x: float) -> str:
        return f"{x:g}"

    def _is_kind(self, value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and value == value  # NaN is no number

    def allowed(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return (f"{self.noun} in {'(' if self.lo_open else '['}{self._fmt(lo)}, "
                    f"{self._fmt(hi)}{')' if self.hi_open else ']'}")
        if lo is not None:
            return f"{self.noun} {'>' if self.lo_open else '>='} {self._fmt(lo)}"
        if hi is not None:
            return f"{self.noun} {'<' if self.hi_open else '<='} {self._fmt(hi)}"
        return self.noun

    def check(self, value: Any) -> str | None:
        if not self._is_kind(value):
            return self.allowed()
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return self.allowed()
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return self.allowed()
        return None


@dataclass
class Int(Num):
    """An integer within optional bounds (the range logic of ``Num``; a float or a bool is refused)."""
    noun: ClassVar[str] = "an integer"

    def _fmt(self, x: float) -> str:
        return str(x)

    def _is_kind(self, value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, int)


@dataclass
class Bool(Spec):
    def check(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "true or false"


@dataclass
class Str(Spec):
    choices: tuple[str, ...] | None = None
    nonempty: bool = True

    def check(self, value: Any) -> str | None:
        if self.choices is not None:
            return None if value in self.choices else "one of " + ", ".join(repr(c) for c in self.choices)
        if not isinstance(value, str) or (self.nonempty and not value.strip()):
            return "a non-empty string"
        return None


@dataclass
class HubId(Spec):
    """A Hugging Face hub repository id, ``owner/name`` (e.g. ``tatsu-lab/alpaca``)."""

    def check(self, value: Any) -> str | None:
        ok = isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", value)
        return None if ok else "a hub id of the form owner/name (e.g. 'tatsu-lab/alpaca')"


@dataclass
class List(Spec):
    item: Spec = field(default_factory=Spec)
    min_len: int = 0
    increasing: bool = False  # strictly increasing (sorted, no repeats)
    unique: bool = False

    def check(self, value: Any) -> str | None:
        what = ("a strictly increasing list" if self.increasing else "a list") + \
               (f" of at least {self.min_len} item{'s' if self.min_len > 1 else ''}" if self.min_len else "")
        if not isinstance(value, list) or len(value) < self.min_len:
            return f"{what}, each {self._item_allowed()}"
        for v in value:
            if self.item.check(v) is not None:
                return f"{what}, each {self._item_allowed()} ({json.dumps(v, default=str)} is not)"
        if self.increasing and any(b <= a for a, b in zip(value, value[1:])):
            return f"{what}, each {self._item_allowed()}"
        if self.unique and len(set(map(repr, value))) != len(value):
            return f"{what} without repeats, each {self._item_allowed()}"
        return None

    def _item_allowed(self) -> str:
        it = self.item
        if isinstance(it, (Int, Num)):
            return it.allowed()
        return it.check(object()) or "a value"


@dataclass
class Section(Spec):
    fields: dict[str, Spec] = field(default_factory=dict)
    open_map: Spec | None = None  # a table whose keys are names (e.g. [defense.variants]): each value this spec


def opt(spec: Spec) -> Spec:
    """An optional copy of ``spec`` (the shared constants below stay required)."""
    import copy

    out = copy.deepcopy(spec)
    out.required = False
    return out


def partial(section: Section) -> Section:
    """The same table with every key optional (an override table such as [audit.fast.data])."""
    import copy

    out = copy.deepcopy(section)
    out.required = False
    for f in out.fields.values():
        f.required = False
    return out


# ---- the schema -------------------------------------------------------------------------------

POS = Int(lo=1)          # a count or a size that must be positive
NONNEG = Int(lo=0)
FRAC_OPEN = Num(lo=0, hi=1, lo_open=True, hi_open=True)   # a threshold strictly inside (0, 1)
RATE = Num(lo=0, hi=1)                                     # a rate or a fraction in [0, 1]
POSITIONS = List(item=Int(), unique=True)                  # post-instruction positions (negative: from the end)
KS = lambda lo=1, min_len=1: List(item=Int(lo=lo), min_len=min_len, increasing=True)

MODEL = Section(fields={
    "name": Str(), "source": Str(choices=MODEL_SOURCES), "dtype": Str(choices=DTYPES), "device": Str(),
    "refusal_words": List(item=Str(), min_len=1),
    # source = "tiny": the random small Llama's shape
    "vocab_size": opt(Int(lo=8)), "d_model": opt(POS), "d_mlp": opt(POS), "n_layers": opt(POS), "n_heads": opt(POS),
    "n_kv_heads": opt(POS), "init_scale": opt(Num(lo=0, lo_open=True)),
    # source = "hub" / "pypi_gguf"
    "hub_id": opt(Str()), "gated": opt(Bool()), "template_kwargs": opt(Section(open_map=Str(nonempty=False))),
    "package_prefix": opt(Str()), "package_version": opt(Str()), "n_parts": opt(POS), "gguf_sha256": opt(Str()),
})
MODEL_NEEDS = {"tiny": ("vocab_size", "d_model", "d_mlp", "n_layers", "n_heads", "n_kv_heads"),
               "pypi_gguf": ("hub_id", "package_prefix", "package_version", "n_parts", "gguf_sha256"),
               "hub": ("hub_id",)}

DATA = Section(fields={
    "train_pool": POS, "n_train": POS, "val_pool": POS, "n_val": POS, "min_keep": POS, "filter_by_refusal": Bool(),
    "n_test_harmful_per_source": POS, "n_test_harmless": POS, "n_test_overrefusal": POS,
    # harmless prompts from this hub dataset (Alpaca's layout) instead of data/harmless.jsonl
    "harmless_hub": opt(HubId()),
})
DIRECTIONS = Section(fields={
    "drop_last_frac": Num(lo=0, hi=1, hi_open=True), "layer_stride": POS, "positions": POSITIONS,
    "max_kl": Num(lo=0, lo_open=True), "max_checks": POS,
})
EVAL = Section(fields={
    "fwd_batch_size": POS, "gen_batch_size": POS, "max_new_tokens": POS, "n_boot": POS, "n_examples": NONNEG,
    "actadd_coeff": Num(), "export_checkpoint": Bool(), "gen_engine": Str(choices=GEN_ENGINES),
    "gen_cache": Str(choices=GEN_CACHES), "verdict_new_tokens": POS, "gen_pack_weights": Bool(),
})
VARIANT = Section(fields={
    "lambda_kd": opt(Num(lo=0)), "temperature": opt(Num(lo=0, lo_open=True)), "lambda_cov": opt(Num(lo=0)),
    "lambda_mean": opt(Num(lo=0)), "lambda_spread": opt(Num(lo=0)), "lambda_lm": opt(Num(lo=0)), "lambda_abl": opt(Num(lo=0)),
    "moment_sites": opt(Str(choices=MOMENT_SITES)), "moment_depth": opt(Num(lo=0, hi=1, lo_open=True)),
    "k_max": opt(POS), "refresh_every": opt(POS), "abl_per_class": opt(NONNEG),
})
DEFENSE = Section(fields={
    "method": Str(choices=("lora", "full")), "n_train_per_class": POS, "layers": List(item=Int(lo=0), increasing=True),
    "run": opt(List(item=Str(), min_len=1, unique=True)), "budget_curve": opt(List(item=Str(), unique=True)),
    "lora": Section(fields={"r": POS, "alpha": Num(lo=0, lo_open=True),
                            "targets": List(item=Str(choices=LORA_TARGETS), min_len=1, unique=True)}),
    "train": Section(fields={
        "steps": POS, "milestones": opt(KS()), "warmup_steps": opt(NONNEG), "batch_per_class": POS,
        "micro_batches": opt(POS), "share_prefix": opt(Bool()), "moment_pairings": opt(POS), "diag_prompts": opt(NONNEG),
        "lr": Num(lo=0, lo_open=True), "weight_decay": Num(lo=0), "max_grad_norm": Num(lo=0, lo_open=True),
        "eval_every": POS, "ckpt_every": POS, "diverge_factor": Num(lo=1, lo_open=True), "subspace_prompts": POS,
        "drop_last_frac": Num(lo=0, hi=1, hi_open=True), "seed": NONNEG,
    }),
    "eval": Section(fields={"n_dim_prompts": POS, "layer_stride": POS, "positions": POSITIONS}),
    "screen": Section(fields={"iterated_rounds": POS, "iterated_layer_stride": POS, "dim_svd_ks": KS(),
                              "stop_after_break": opt(Bool())}),
    "targets": Section(fields={"harmful_within": RATE, "benign_rise": RATE, "max_kl": Num(lo=0, lo_open=True),
                               "ce_rel": Num(lo=0, lo_open=True), "k1_fraction": RATE}),
    "variants": Section(open_map=VARIANT),
})
SWEEP = Section(fields={
    "models": List(item=Str(), min_len=1, unique=True), "estimators": List(item=Str(choices=ESTIMATORS), min_len=1, unique=True),
    "k_grid": KS(), "threshold": FRAC_OPEN, "gen_below": Num(lo=0, lo_open=True), "stop_after_break": Bool(),
    "drop_last_frac": Num(lo=0, hi=1, hi_open=True), "layer_stride": POS, "site_layer_stride": POS,
    "site_positions": opt(POSITIONS), "inlp_max_iter": POS, "iterated_k_max": opt(POS),
    "iterated_drop_last_frac": Num(lo=0, hi=1, hi_open=True), "iterated_layer_stride": opt(POS),
    "iterated_positions": opt(POSITIONS), "iterated_score_split": Str(choices=("train", "val")), "iterated_n_score": POS,
    "iterated_min_norm_frac": Num(lo=0, hi=1, hi_open=True), "n_test_per_source": POS, "n_ce_harmless": POS,
    "optimized": Section(fields={
        "k_max": POS, "steps": POS, "n_train_starts": POS,
        "restarts": List(item=Str(choices=tuple(e for e in ESTIMATORS if e != "optimized")), unique=True),
        "lr": Num(lo=0, lo_open=True), "lambda_kl": Num(lo=0), "lambda_score": Num(lo=0), "batch_per_class": POS,
        "target_tokens": POS,
    }),
})
PROBES = Section(fields={
    "layer_stride": POS, "n_train_per_source": POS, "n_test_per_source": POS, "n_overrefusal": POS,
    "Cs": List(item=Num(lo=0, lo_open=True), min_len=1, increasing=True), "cv_folds": Int(lo=2), "whiten_dim": POS,
    "n_perm": POS, "erase_ks": KS(lo=0), "attack_ks": KS(), "inlp_k_max": POS, "ks": KS(lo=0), "threshold": FRAC_OPEN,
    "mlp_hidden": POS,
    "reading": Section(fields={"spread_factor": Num(lo=1, lo_open=True), "k_margin": POS, "share_drop": FRAC_OPEN,
                               "move_layers": POS, "move_factor": Num(lo=1, lo_open=True),
                               "shrink_factor": Num(lo=1, lo_open=True)}),
})
AUDIT_SCREEN = Section(fields={"ks": KS(), "gen_below": Num(lo=0, lo_open=True)})
AUDIT_DIFF = Section(fields={
    "rel_change": Num(lo=0, lo_open=True), "rel_tol": FRAC_OPEN, "tail_factor": Num(lo=0, lo_open=True),
    "edge_factor": Num(lo=0, lo_open=True), "probe": POS, "same_direction": Num(lo=0, hi=1, lo_open=True),
    "projection_tol": Num(lo=0, lo_open=True), "low_rank_max": POS,
})
_AUDIT_SCALARS = {
    "min_harmful_refusal": RATE, "max_harmless_refusal": RATE, "max_overrefusal": RATE, "max_harmful_drop": RATE,
    "max_benign_rise": RATE, "min_refusal_under_rank1": RATE, "enforce_fragility": Bool(), "require_pinned": Bool(),
    "failing_signatures": List(item=Str(choices=SIGNATURES), unique=True), "n_ce_harmless": POS, "run_screen": Bool(),
    "keep_exports": Bool(),
}
AUDIT = Section(required=False, fields={
    **_AUDIT_SCALARS, "screen": AUDIT_SCREEN, "diff": AUDIT_DIFF,
    "fast": opt(Section(fields={**partial(Section(fields=_AUDIT_SCALARS)).fields,
                                "data": partial(DATA), "eval": partial(EVAL), "directions": partial(DIRECTIONS),
                                "screen": partial(AUDIT_SCREEN), "diff": partial(AUDIT_DIFF)})),
})

SCHEMA = Section(fields={
    "profile": Str(), "seed": NONNEG, "threads": NONNEG,
    "model": MODEL, "data": DATA, "directions": DIRECTIONS, "eval": EVAL, "defense": DEFENSE, "sweep": SWEEP,
    "probes": PROBES, "audit": AUDIT,
})


# ---- walking a config against the schema -----------------------------------------------------


def _fail(path: str | Path, key: str, value: Any, allowed: str) -> ConfigError:
    shown = json.dumps(value, default=str)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigError(f"{path}: {key} = {shown} is not allowed: it must be {allowed}.")


def _walk(spec: Section, node: Any, prefix: str, path: str | Path) -> None:
    where = prefix or "the top level"
    if not isinstance(node, dict):
        raise _fail(path, prefix, node, "a table")
    if spec.open_map is not None:
        for name, value in node.items():
            _check(spec.open_map, value, f"{prefix}.{name}", path)
        return
    unknown = [k for k in node if k not in spec.fields]
    if unknown:
        k = unknown[0]
        near = _nearest(k, spec.fields)
        raise ConfigError(f"{path}: unknown key {_dotted(prefix, k)}"
                          + (f" (did you mean {_dotted(prefix, near)}?)" if near else "")
                          + f": {where} allows {', '.join(spec.fields)}.")
    for name, sub in spec.fields.items():
        if name not in node:
            if sub.required:
                raise ConfigError(f"{path}: {_dotted(prefix, name)} is missing: every profile sets it "
                                  f"({_describe(sub)}).")
            continue
        _check(sub, node[name], _dotted(prefix, name), path)


def _check(spec: Spec, value: Any, key: str, path: str | Path) -> None:
    if isinstance(spec, Section):
        _walk(spec, value, key, path)
        return
    problem = spec.check(value)
    if problem is not None:
        raise _fail(path, key, value, problem)


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(spec: Spec) -> str:
    if isinstance(spec, Section):
        return "a table"
    if isinstance(spec, (Int, Num)):
        return spec.allowed()
    return spec.check(object()) or "a value"


def _nearest(word: str, choices) -> str | None:
    import difflib

    got = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return got[0] if got else None


# ---- relations between keys (sizes against pools, names against what is configured) ----------


def _split_sizes() -> dict[str, int]:
    """Sizes of the recorded splits (data/splits.json), read as plain JSON: cheap, no prompt set loaded."""
    try:
        splits = json.loads((_config.REPO_ROOT / "data" / "splits.json").read_text())["splits"]
        return {k: len(v) for k, v in splits.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _probe_sizes() -> dict[str, int]:
    """The smallest per-source train and test halves of data/probe_splits.json, and the over-refusal set."""
    try:
        ps = json.loads((_config.REPO_ROOT / "data" / "probe_splits.json").read_text())
        harmful = [v for s, v in ps["sources"].items() if s != "harmless"]
        ok = ps["sources"]["harmless"]
        over = ps["transfer_only"]
        # harmless: as many prompts in all as the harmful sources together
        return {"train": min(min(len(v["train"]) for v in harmful), len(ok["train"]) // len(harmful)),
                "test": min(min(len(v["test"]) for v in harmful), len(ok["test"]) // len(harmful)),
                "overrefusal": sum(len(v) for v in over.values()) if isinstance(over, dict) else len(over)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _relations(cfg: dict[str, Any], path: str | Path) -> None:
    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise _fail(path, key, value, allowed)

    m = cfg["model"]
    for k in MODEL_NEEDS[m["source"]]:
        if k not in m:
            raise ConfigError(f"{path}: model.{k} is missing: a model with source = {m['source']!r} needs "
                              f"{', '.join('model.' + n for n in MODEL_NEEDS[m['source']])}.")
    if m["source"] == "tiny":
        need(m["d_model"] % m["n_heads"] == 0, "model.n_heads", m["n_heads"], f"a divisor of model.d_model = {m['d_model']}")
        need(m["n_heads"] % m["n_kv_heads"] == 0, "model.n_kv_heads", m["n_kv_heads"],
             f"a divisor of model.n_heads = {m['n_heads']}")

    sizes = _split_sizes()
    d = cfg["data"]
    for n, pool in (("n_train", "train_pool"), ("n_val", "val_pool")):
        need(d[n] <= d[pool], f"data.{n}", d[n], f"an integer in [1, data.{pool} = {d[pool]}] (it is taken from that pool)")
    for n, splits in (("n_train", ("harmful_train", "harmless_train")), ("n_val", ("harmful_val", "harmless_val"))):
        have = [sizes[s] for s in splits if s in sizes]
        if have:
            need(d[n] <= min(have), f"data.{n}", d[n],
                 f"an integer in [1, {min(have)}] (data/splits.json holds {min(have)} prompts in its smaller split of "
                 f"{' / '.join(splits)})")
    need(d["min_keep"] <= d["n_train"], "data.min_keep", d["min_keep"], f"an integer in [1, data.n_train = {d['n_train']}]")

    dc = cfg["defense"]
    have = [sizes[s] for s in ("harmful_defense", "harmless_defense") if s in sizes]
    if have:
        need(dc["n_train_per_class"] <= min(have), "defense.n_train_per_class", dc["n_train_per_class"],
             f"an integer in [1, {min(have)}] (data/splits.json's harmful_defense / harmless_defense)")
    t = dc["train"]
    need(t["batch_per_class"] <= dc["n_train_per_class"], "defense.train.batch_per_class", t["batch_per_class"],
         f"an integer in [1, defense.n_train_per_class = {dc['n_train_per_class']}]")
    if "milestones" in t:
        need(t["milestones"][-1] == t["steps"], "defense.train.milestones", t["milestones"],
             f"a strictly increasing list of positive steps ending at defense.train.steps = {t['steps']}")
    if "micro_batches" in t:
        need(t["micro_batches"] <= t["batch_per_class"], "defense.train.micro_batches", t["micro_batches"],
             f"an integer in [1, defense.train.batch_per_class = {t['batch_per_class']}]")
    variants = list(dc["variants"])
    need(bool(variants), "defense.variants", {}, "at least one [defense.variants.NAME] table")
    for name, v in dc["variants"].items():
        if "abl_per_class" in v:
            need(v["abl_per_class"] <= t["batch_per_class"], f"defense.variants.{name}.abl_per_class", v["abl_per_class"],
                 f"an integer in [0, defense.train.batch_per_class = {t['batch_per_class']}]")
    names = "one of " + ", ".join(repr(v) for v in variants)
    for key in ("run", "budget_curve"):
        for n in dc.get(key) or []:
            need(n in variants, f"defense.{key}", dc[key], f"a list of configured variants, {names} ({n!r} is not)")
    for n in cfg["sweep"]["models"]:
        need(n == "base" or n in variants, "sweep.models", cfg["sweep"]["models"],
             f"a list of 'base' or configured variants, {names} ({n!r} is not)")

    pz = _probe_sizes()
    p = cfg["probes"]
    for k, part in (("n_train_per_source", "train"), ("n_test_per_source", "test"), ("n_overrefusal", "overrefusal")):
        if part in pz:
            need(p[k] <= pz[part], f"probes.{k}", p[k], f"an integer in [1, {pz[part]}] (data/probe_splits.json)")
    need(p["cv_folds"] <= p["n_train_per_source"], "probes.cv_folds", p["cv_folds"],
         f"an integer in [2, probes.n_train_per_source = {p['n_train_per_source']}]")


def validate(cfg: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`ConfigError` (one sentence) if the profile at ``path`` breaks the schema."""
    _walk(SCHEMA, cfg, "", path)
    _relations(cfg, path)
