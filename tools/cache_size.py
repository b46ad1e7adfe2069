"""The cache's real size, measured: bytes per kind of cached value for one profile, written to
results/<profile>/cache_size.json and printed (the README's disk estimate comes from here).

    python tools/cache_size.py --profile cpu
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from refusal_rank.config import cache_root, load_config, results_dir
from refusal_rank.errors import run_main


def tree_bytes(path: Path) -> int:
    """Bytes of every regular file under ``path`` (links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def child_bytes(path: Path, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """``tree_bytes`` of each sub-folder of ``path`` (none if ``path`` is missing), those in ``skip`` left out."""
    if not path.is_dir():
        return {}
    return {d.name: tree_bytes(d) for d in sorted(path.iterdir()) if d.is_dir() and d.name not in skip}


def measure(profile: str) -> dict:
    """Sizes of the profile's run caches (one entry per kind: defense, gen, acts...) and of the models."""
    root = cache_root()
    kinds = child_bytes(root / "runs" / profile)
    models = child_bytes(root / "models")
    shared = child_bytes(root, skip=("runs", "models"))  # every profile's: downloaded parts, audit exports, prompt sets
    gib = lambda b: round(b / 2**30, 3)
    return {"profile": profile, "measured": time.strftime("%Y-%m-%d %H:%M"),
            "runs_gib": {k: gib(v) for k, v in kinds.items()}, "runs_total_gib": gib(sum(kinds.values())),
            "models_gib": {k: gib(v) for k, v in models.items()}, "models_total_gib": gib(sum(models.values())),
            "other_gib": {k: gib(v) for k, v in shared.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None)
    a = ap.parse_args()
    cfg = load_config(a.profile)
    out = measure(cfg["profile"])
    path = results_dir(cfg["profile"]) / "cache_size.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(run_main("cache_size.py", main))
