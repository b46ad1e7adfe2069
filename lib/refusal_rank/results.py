"""Where a run's outputs go: ``results/<profile>/summary.json`` (committed), figures, and the run cache.

``summary.json`` follows the results contract of METHOD.md; each notebook merges its own keys into it
(read, update, write atomically), so notebooks can run in any order after their inputs exist and a
rerun of one notebook replaces only its part. Small tensors a later notebook needs (the selected
direction) are saved next to the summary; bulky intermediates (activations, completions, trained
checkpoints) go to the run cache (:func:`run_cache`).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from .config import REPO_ROOT, cache_root, figures_dir, results_dir


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def summary_path(profile: str) -> Path:
    return results_dir(profile) / "summary.json"


def progress_path(profile: str) -> Path:
    """The background queue's committed progress file (``refusal-rank progress --write``)."""
    return results_dir(profile) / "queue_progress.json"


def read_summary(profile: str) -> dict[str, Any]:
    p = summary_path(profile)
    return json.loads(p.read_text()) if p.is_file() else {}


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


MERGED_SECTIONS = ("timings_s", "timings_fresh", "throughput")


def update_summary(cfg: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """Write ``sections`` into the profile's summary.json. Each section replaces the one already there
    (so no key of an older run survives inside it), except the per-notebook sections
    (timings, throughput), which merge."""
    profile = cfg["profile"]
    summary = read_summary(profile)
    summary.update({"profile": profile, "model": cfg["model"]["name"], "commit": git_commit(),
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    new = _finite(json.loads(json.dumps(sections, default=_jsonable)))
    for key, value in new.items():
        if key in MERGED_SECTIONS and isinstance(summary.get(key), dict):
            _merge(summary[key], value)
        else:
            summary[key] = value
    p = summary_path(profile)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, p)
    log = os.environ.get(SECTIONS_ENV)
    if log:  # run_all.sh: the sections this notebook wrote are its outputs (resume checks they still exist)
        with open(log, "a") as fh:
            fh.write("".join(k + "\n" for k in new))
    return summary


SECTIONS_ENV = "REFUSAL_RANK_SECTIONS_LOG"


FRESH_ENV = "REFUSAL_RANK_FRESH"


def timing(name: str, t0: float) -> dict[str, Any]:
    """Summary entries for a notebook's wall time since ``t0`` (``time.perf_counter``), and whether the
    run started from an emptied cache (``run_all.sh --fresh`` sets ``REFUSAL_RANK_FRESH=1``): a warm
    rerun's time says little about the work, so the README marks which kind each time is."""
    import time

    return {"timings_s": {name: round(time.perf_counter() - t0, 1)},
            "timings_fresh": {name: os.environ.get(FRESH_ENV) == "1"}}


def _finite(x: Any) -> Any:
    """NaN/inf become null: summary.json stays strict JSON."""
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _jsonable(x: Any) -> Any:
    if type(x).__module__.startswith("torch") and hasattr(x, "tolist"):  # a tensor (torch is imported only where used)
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


ARTIFACT_SUFFIX = ".safetensors"


def save_artifact(cfg: dict[str, Any], name: str, obj: dict[str, Any]) -> Path:
    """Save a small dict beside the summary (e.g. the selected direction) as safetensors: its tensors as
    tensors, its other values (ints, strings, lists) as JSON in the file's metadata. A safetensors file
    holds no code, so loading a committed one runs none (a pickle would)."""
    import torch
    from safetensors.torch import save_file

    if not name.endswith(ARTIFACT_SUFFIX):
        raise ValueError(f"artifact {name!r}: results/ holds tensors as {ARTIFACT_SUFFIX} files")
    p = results_dir(cfg["profile"]) / name
    tensors = {k: v.detach().cpu().contiguous() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    tmp = p.with_name(p.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"values": json.dumps(values, sort_keys=True, default=_jsonable)})
    tmp.chmod(0o644)
    os.replace(tmp, p)
    return p


def load_artifact(cfg: dict[str, Any], name: str, produced_by: str) -> dict[str, Any]:
    """The dict :func:`save_artifact` wrote (tensors and values), read without unpickling anything."""
    from safetensors import safe_open

    p = results_dir(cfg["profile"]) / name
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: run notebook {produced_by} for profile {cfg['profile']!r} first.")
    with safe_open(str(p), framework="pt") as fh:
        out: dict[str, Any] = json.loads((fh.metadata() or {}).get("values", "{}"))
        out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


NOTEBOOK_ENV = "REFUSAL_RANK_NOTEBOOK"  # set by run_all.sh to the running notebook's name (e.g. 04_sweep)
PRODUCED_DIR = ".produced"
_NOTED: set[tuple[str, str]] = set()


def note_product(path: Path) -> None:
    """Record that the notebook now running (``$REFUSAL_RANK_NOTEBOOK``) created ``path`` in the run cache, in
    ``<cache>/runs/<profile>/.produced/<notebook>.txt``: ``run_all.sh --fresh --only NN`` empties exactly
    what the selected notebooks produced, so that the others' outputs (notebook 03's trained variants)
    survive. Outside run_all.sh (tests, tools, background training) nothing is recorded, and what such
    a run created is never emptied by a selective ``--fresh``."""
    nb = os.environ.get(NOTEBOOK_ENV)
    if not nb:
        return
    runs = (cache_root() / "runs").resolve()
    try:
        rel = Path(path).resolve().relative_to(runs)
    except ValueError:
        return
    if len(rel.parts) < 2 or rel.parts[1] == PRODUCED_DIR:
        return
    profile, inner = rel.parts[0], Path(*rel.parts[1:]).as_posix()
    manifest = runs / profile / PRODUCED_DIR / f"{nb}.txt"
    if (str(manifest), inner) in _NOTED:
        return
    _NOTED.add((str(manifest), inner))
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with manifest.open("a") as fh:
        fh.write(inner + "\n")


def run_cache(cfg: dict[str, Any], *parts: str) -> Path:
    """The per-profile run cache (``<cache root>/runs/<profile>/...``, outside the work tree so that it
    survives a fresh clone on the same machine; ``run_all.sh --fresh`` empties it, ``--fresh --only NN``
    only what notebook NN produced, see :func:`note_product`)."""
    d = run_cache_path(cfg, *parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_cache_path(cfg: dict[str, Any], *parts: str) -> Path:
    """:func:`run_cache`'s path without creating it: for code that only reads (a progress report run on a
    fresh machine must not leave empty folders behind)."""
    d = cache_root() / "runs" / cfg["profile"]
    for part in parts:
        d = d / part
    return d


def figure_path(cfg: dict[str, Any], name: str) -> Path:
    return figures_dir(cfg["profile"]) / name
