"""The moment diagnostics of trained checkpoints, recomputed with the current library, into
results/<profile>/moment_decomposition.json:

    python tools/moment_decomposition.py --profile cpu                       # every moment variant of [defense] run
    python tools/moment_decomposition.py --profile cpu --variants paper_mean  # one, at step 0 and each milestone

For each variant with a moment term: the original (step 0, the student before its first update) and every
milestone trained so far, on the fixed prompts and sites training measured them on
(``defense_run.checkpoint_moment_diagnostics``). It exists for the checkpoints trained before the top
eigenvalue of the excess second moment was split into its parts (``top_eig_cov``, the covariance difference
alone; ``gap_sq``, the squared mean gap): a mean-matching variant lowers the top eigenvalue by removing the
mean gap, which is matching, not shrinking, and these two say which it was. An entry already written for the
same snapshot is kept (the file resumes); one model job, a few minutes per checkpoint on the cpu model.
"""
from __future__ import annotations

import argparse
import json
import sys

from refusal_rank import defense_run as R
from refusal_rank.config import load_config, results_dir
from refusal_rank.results import git_commit
from refusal_rank.training import snapshot_digest, snapshot_path


def moment_variants(cfg: dict) -> list[str]:
    """The variants of ``[defense] run`` that train a moment term."""
    vs = cfg["defense"]["variants"]
    return [n for n in R.default_variants(cfg) if vs[n].get("lambda_cov") or vs[n].get("lambda_mean")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None)
    ap.add_argument("--variants", default=None, help="comma-separated (default: every moment variant of [defense] run)")
    a = ap.parse_args()
    cfg = load_config(a.profile)
    names = a.variants.split(",") if a.variants else moment_variants(cfg)
    unknown = [n for n in names if n not in cfg["defense"]["variants"]]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: the profile defines {', '.join(cfg['defense']['variants'])}")
    out_path = results_dir(cfg["profile"]) / "moment_decomposition.json"
    doc = json.loads(out_path.read_text()) if out_path.is_file() else {"profile": cfg["profile"], "variants": {}}
    for name in names:
        vdir = R.variant_path(cfg, name)
        entry = doc["variants"].setdefault(name, {"dir": vdir.name, "steps": {}})
        for step in [0, *R.reached_milestones(cfg, name)]:
            digest = snapshot_digest(snapshot_path(vdir / "ckpt.pt", step)) if step else "original"
            if entry["steps"].get(str(step), {}).get("snapshot_sha256") == digest:
                continue
            print(f"== {name} at step {step}", flush=True)
            entry["steps"][str(step)] = {"snapshot_sha256": digest, **R.checkpoint_moment_diagnostics(cfg, name, step)}
            doc["read_at_commit"] = git_commit()
            out_path.write_text(json.dumps(doc, indent=1) + "\n")  # after every checkpoint: nothing lost on interruption
            print(entry["steps"][str(step)], flush=True)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    from refusal_rank.errors import run_main

    sys.exit(run_main("moment_decomposition.py", main))
