"""Profiles: one TOML file per profile under ``configs/``, every knob of a run in it.

Why TOML: it is in the standard library (``tomllib``), allows comments that say *why* a knob has
its value, and maps onto plain dicts. A profile is selected by name (``tiny``, ``cpu``,
``cpu-small``, ``paper``), by the ``REFUSAL_RANK_PROFILE`` environment variable, or defaults to
``cpu``. Nothing in ``lib`` hard-codes a number that a profile could want to change.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_PROFILE = "cpu"
PROFILE_ENV = "REFUSAL_RANK_PROFILE"
CACHE_ENV = "REFUSAL_RANK_CACHE"


class ProfileError(ValueError):
    """Raised for an unknown or malformed profile."""


def available_profiles() -> list[str]:
    """Names of the profiles that have a config file."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def resolve_profile_name(name: str | None = None) -> str:
    """Explicit name > environment variable > default ``cpu``."""
    return name or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE


def load_config(name: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load a profile's config as a dict; unknown names fail with the list of known ones. ``name`` may
    also be the path of a ``.toml`` file (a test's synthetic profile). The file is validated against
    :mod:`refusal_rank.config_schema` before anything else reads it: a typo, a wrong type, an
    out-of-range value or a size larger than its pool is a :class:`ProfileError` of one sentence naming
    the file, the dotted key and what is allowed."""
    from .config_schema import validate

    if isinstance(name, os.PathLike) or (isinstance(name, str) and name.endswith(".toml")):
        path = Path(name)
        if not path.is_file():
            raise ProfileError(f"Config file {path} does not exist.")
        name = None
    else:
        name = resolve_profile_name(name)
        path = CONFIG_DIR / f"{name}.toml"
        if not path.is_file():
            raise ProfileError(
                f"Unknown profile {name!r}: choose one of {', '.join(available_profiles())} "
                f"(config files live in {CONFIG_DIR})."
            )
    try:
        with path.open("rb") as fh:
            cfg = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path} is not valid TOML: {str(e).rstrip('.')}.") from None
    if name is not None and cfg.get("profile") != name:
        raise ProfileError(f"{path} declares profile={cfg.get('profile')!r}, expected {name!r}.")
    validate(cfg, path)  # a ConfigError (a ProfileError) of one sentence
    cfg["_path"] = str(path)
    if cfg.get("model", {}).get("dtype") == "auto":
        from .bench import preferred_cpu_dtype

        # the concrete dtype replaces "auto", so that every cache key names what was computed
        cfg["model"]["dtype"] = preferred_cpu_dtype() if not cfg["model"].get("device", "cpu").startswith("cuda") else "bfloat16"
        cfg["model"]["dtype_requested"] = "auto"
    return cfg


def config_hash(cfg: dict[str, Any], *sections: str) -> str:
    """Stable short hash of the given config sections (or all), for cache keys."""
    part = {k: cfg[k] for k in sections} if sections else {k: v for k, v in cfg.items() if not k.startswith("_")}
    blob = json.dumps(part, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_root() -> Path:
    """Where converted checkpoints and run caches live (``$REFUSAL_RANK_CACHE`` or ``~/.cache/refusal_rank``)."""
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "refusal_rank"))
    root.mkdir(parents=True, exist_ok=True)
    return root


RESULTS_ENV = "REFUSAL_RANK_RESULTS"   # tests point these two elsewhere (run_all.sh reads them too)
FIGURES_ENV = "REFUSAL_RANK_FIGURES"


def results_dir(profile: str) -> Path:
    d = Path(os.environ.get(RESULTS_ENV) or REPO_ROOT / "results") / profile
    d.mkdir(parents=True, exist_ok=True)
    return d


def figures_dir(profile: str) -> Path:
    d = Path(os.environ.get(FIGURES_ENV) or REPO_ROOT / "figures") / profile
    d.mkdir(parents=True, exist_ok=True)
    return d


def override(cfg: dict[str, Any], **updates: Any) -> dict[str, Any]:
    """Copy of ``cfg`` with dotted keys replaced, e.g. ``override(cfg, **{"data.n_train": 8})``."""
    out = copy.deepcopy(cfg)
    for dotted, value in updates.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out
