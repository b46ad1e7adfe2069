"""Profiles: one TOML file per profile under ``configs/``, every knob of a run in it.

Why TOML: it is in the standard library (``tomllib``), allows comments that say *why* a knob has
its value, and maps onto plain dicts. A profile is selected by name (``tiny``, ``cpu``,
``cpu-small``, ``paper``), by the ``REFUSAL_RANK_PROFILE`` environment variable, or defaults to
``cpu``. Nothing in ``lib`` hard-codes a number that a profile could want to change.

Which clone a run uses (:data:`REPO_ROOT`: its configs/, data/, results/, figures/). Two clones may share
one virtual environment (a symlinked ``.venv``, or one clone's venv activated in the other); its editable
install imports the library of whichever clone ran ``pip install -e``, and a root taken from the package's
location alone would silently read and write *that* clone's files. So:

* ``$REFUSAL_RANK_ROOT``, when set, is the root. ``run_all.sh`` sets it to its own clone and puts that
  clone's ``lib/`` first on ``PYTHONPATH``, so that papermill's kernel and every tool it starts import the
  library of the clone being run, whichever clone's ``.venv`` runs them.
* Otherwise the root is the clone the imported package lives in.
* :func:`check_clone`, called by :func:`load_config` and by the ``refusal-rank`` CLI (and so by every tool)
  before any compute, stops with one sentence when that root is not a clone, when the current directory
  lies inside a *different* clone than the root, or when the library was imported from another clone than
  the root: which clone was meant cannot be known there, and a guess would be silent. The sentence names
  both paths and the fix (that clone's own ``.venv``, or ``PYTHONPATH=<clone>/lib REFUSAL_RANK_ROOT=<clone>``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any

ROOT_ENV = "REFUSAL_RANK_ROOT"


class ProfileError(ValueError):
    """Raised for an unknown or malformed profile."""


class CloneError(ProfileError):
    """This process would use another clone's configs, data and results than the one it runs from."""


# where the imported package lives; the root is this clone unless $REFUSAL_RANK_ROOT says otherwise (module docstring)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def is_clone(path: Path, *, script: bool = False) -> bool:
    """Whether ``path`` holds this project's configs/ and lib/refusal_rank/ (and run_all.sh, with ``script``)."""
    return ((path / "configs").is_dir() and (path / "lib" / "refusal_rank").is_dir()
            and (not script or (path / "run_all.sh").is_file()))


def clone_of(path: Path) -> Path | None:
    """The clone of this project that ``path`` lies in (the nearest one upwards), or None."""
    path = Path(path).resolve()
    return next((d for d in (path, *path.parents) if is_clone(d, script=True)), None)


def _root() -> tuple[Path, str | None]:
    env = os.environ.get(ROOT_ENV)
    if not env:
        return PACKAGE_ROOT, None
    root = Path(env).expanduser().resolve()
    if is_clone(root):
        return root, None
    # kept as the root all the same: a path that fails loudly, never another clone's files
    return root, (f"{ROOT_ENV}={env} is not a clone of this project (it has no configs/ and lib/refusal_rank/): "
                  f"point it at the clone to run, or unset it.")


REPO_ROOT, _ROOT_PROBLEM = _root()
CONFIG_DIR = REPO_ROOT / "configs"


def check_clone(cwd: str | os.PathLike | None = None) -> Path:
    """The root this process uses (:data:`REPO_ROOT`), or a :class:`CloneError` of one sentence when it may
    not be the clone meant (see the module docstring)."""
    if _ROOT_PROBLEM:
        raise CloneError(_ROOT_PROBLEM)
    if not is_clone(REPO_ROOT):  # a test's scratch root (monkeypatched); a bad $REFUSAL_RANK_ROOT stopped above
        return REPO_ROOT
    try:
        here = clone_of(Path.cwd() if cwd is None else Path(cwd))
    except OSError:  # a current directory that was deleted lies in no clone
        here = None
    fix = "use that clone's own .venv, or run with PYTHONPATH={c}/lib REFUSAL_RANK_ROOT={c} (run_all.sh sets both)"
    if here is not None and here != REPO_ROOT:
        raise CloneError(f"The current directory is in the clone {here}, but refusal_rank would use the configs, data "
                         f"and results of the clone {REPO_ROOT} (its library was imported from {PACKAGE_ROOT / 'lib'}): "
                         + fix.format(c=here) + ".")
    if PACKAGE_ROOT != REPO_ROOT and is_clone(PACKAGE_ROOT):  # only a stale $REFUSAL_RANK_ROOT, or it set alone
        raise CloneError(f"{ROOT_ENV} is {REPO_ROOT}, but the refusal_rank library was imported from another clone, "
                         f"{PACKAGE_ROOT / 'lib'}: " + fix.format(c=REPO_ROOT) + ".")
    return REPO_ROOT


DEFAULT_PROFILE = "cpu"
PROFILE_ENV = "REFUSAL_RANK_PROFILE"
CACHE_ENV = "REFUSAL_RANK_CACHE"


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

    check_clone()  # another clone's configs would be read silently
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


# knobs that choose a kernel and change outputs at most at bf16 rounding, as a batch's make-up does (on which no
# generation cache keys either): no cache keys on them, so turning one on or off reuses every cached result.
# gen_pack_weights: bit for bit on tiny and in most cpu-model shapes (models.packed_linears says where not)
HASH_EXEMPT: dict[str, frozenset[str]] = {"eval": frozenset({"gen_pack_weights"})}


def config_hash(cfg: dict[str, Any], *sections: str) -> str:
    """Stable short hash of the given config sections (or all, :data:`HASH_EXEMPT` left out), for cache keys."""
    part = {k: cfg[k] for k in sections} if sections else {k: v for k, v in cfg.items() if not k.startswith("_")}
    part = {k: ({kk: vv for kk, vv in v.items() if kk not in HASH_EXEMPT[k]} if k in HASH_EXEMPT and isinstance(v, dict)
                else v) for k, v in part.items()}
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
