"""Train defense variants outside the notebook (same cache, same checkpoints and snapshots):

    python tools/train_variant.py --profile cpu --variant defended            # to its target milestone
    python tools/train_variant.py --profile cpu --variant kl_only --until 2x  # to one milestone
    python tools/train_variant.py --profile cpu --plan                        # the whole queue, in order

``--plan`` trains every variant of ``[defense] run`` to 1x, then the ``budget_curve`` variants milestone by
milestone (2x, 4x, 8x), so that an interrupted queue leaves complete curves at lower budgets. Each variant
resumes from its last checkpoint; notebook 03 then finds the snapshots and reuses them. For long CPU runs:
``nohup python tools/train_variant.py --profile cpu --plan > train.log 2>&1 &``.
"""
from __future__ import annotations

import argparse
import sys

from refusal_rank import defense_run as R
from refusal_rank import pipeline as P
from refusal_rank.config import ProfileError, load_config
from refusal_rank.models import load_model
from refusal_rank.training import milestone_steps


def parse_until(cfg: dict, text: str | None) -> int | None:
    """'2x' or a step number -> a milestone step (None: the variant's target)."""
    if text is None:
        return None
    ms = milestone_steps(cfg["defense"]["train"])
    step = round(float(text[:-1]) * ms[0]) if text.endswith("x") else int(text)
    if step not in ms:
        raise SystemExit(f"--until {text}: not a milestone; the profile's are "
                         + ", ".join(f"{R.budget_label(cfg, m)} (step {m})" for m in ms))
    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=None)
    ap.add_argument("--variant", action="append", help="a variant of [defense.variants] (repeatable)")
    ap.add_argument("--until", default=None, help="a milestone: '1x', '2x', ... or its step")
    ap.add_argument("--plan", action="store_true", help="train the profile's whole queue (see above)")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.profile)
    except ProfileError as e:
        print(e, file=sys.stderr)
        return 2
    names = a.variant or (R.default_variants(cfg) if a.plan else None)
    if not names:
        print("name a variant (--variant NAME) or train the whole queue (--plan)", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in cfg["defense"]["variants"]]
    if unknown:
        print(f"unknown variant(s) {unknown}: the profile defines {', '.join(cfg['defense']['variants'])}", file=sys.stderr)
        return 2
    until = parse_until(cfg, a.until)
    plan = R.train_plan(cfg, names) if a.plan and until is None else [(n, until or R.target_step(cfg, n)) for n in names]
    base = load_model(cfg)
    tv = P.filtered_train_val(cfg, base)
    base_lp_val = P.logprobs_cached(cfg, base, tv.harmless_val, desc="base harmless val")
    del base
    factory = R.periodic_eval(cfg, tv, base_lp_val)
    for name, step in plan:
        print(f"== {name} until step {step} ({R.budget_label(cfg, step)})", flush=True)
        record = R.train_variant(cfg, name, evaluate_factory=factory, until=step)
        print({k: record[k] for k in ("steps", "seconds", "tokens", "tokens_per_s")}, record["evals"][-1:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
