"""Train one defense variant outside the notebook (same cache, same checkpoints, same export):

    python tools/train_variant.py --profile cpu --variant defended

Notebook 03 then finds the finished export and reuses it; an interrupted run resumes from its last
checkpoint. Useful for long CPU runs in the background (log to a file).
"""
from __future__ import annotations

import argparse

from refusal_rank import defense_run as R
from refusal_rank import pipeline as P
from refusal_rank.config import load_config
from refusal_rank.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None)
    ap.add_argument("--variant", required=True)
    a = ap.parse_args()
    cfg = load_config(a.profile)
    if a.variant not in cfg["defense"]["variants"]:
        raise SystemExit(f"unknown variant {a.variant!r}: the profile defines {', '.join(cfg['defense']['variants'])}")
    base = load_model(cfg)
    tv = P.filtered_train_val(cfg, base)
    base_lp_val = P.logprobs_cached(cfg, base, tv.harmless_val, desc="base harmless val")
    del base
    record = R.train_variant(cfg, a.variant, evaluate_factory=R.periodic_eval(cfg, tv, base_lp_val))
    print({k: record[k] for k in ("steps", "seconds", "tokens", "tokens_per_s")}, record["evals"][-1:] )


if __name__ == "__main__":
    main()
