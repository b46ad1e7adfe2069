"""A short pilot of the moment terms on the profile's real model, when the full budget cannot run:

    python tools/pilot_moments.py --profile cpu --variant defended --steps 10 --per-class 8 --diag 32

Trains ``variant`` for a few steps on the first prompts of the defense split (no prompt repeats: the
teacher is computed for exactly the prompts the steps use) and records, per step, the matched term beside
its noise floor, and on fixed prompts before and after: the term, its floor, the top eigenvalue of the
excess second moment and the total variance (``training.moment_diagnostics``). It answers one question a
budget run would answer too late: does the term start above its floor, and does it fall by matching or by
shrinking? Writes results/<profile>/pilot_moments.json. Not a defense result: a few steps, said as such.
"""
from __future__ import annotations

import argparse
import sys
import json
import tempfile
import time
from pathlib import Path

from refusal_rank import defense_run as R
from refusal_rank.config import load_config, results_dir
from refusal_rank.models import bundle_from_pretrained, checkpoint_dir
from refusal_rank.training import Variant, attach_lora, moment_diagnostics, teacher_cache, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None)
    ap.add_argument("--variant", default="defended")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--diag", type=int, default=32, help="fixed prompts per class for the diagnostics")
    a = ap.parse_args()
    cfg = load_config(a.profile)
    dc = cfg["defense"]
    t0 = time.perf_counter()
    harm, ok = R.defense_prompts(cfg)
    n = a.steps * a.per_class
    harm, ok = [p.text for p in harm[:n]], [p.text for p in ok[:n]]
    bundle = bundle_from_pretrained(checkpoint_dir(cfg), cfg, name="pilot-student")
    layers = R.defense_layers(cfg, bundle.n_layers)
    v = Variant.from_cfg(a.variant, dc["variants"][a.variant])
    teacher = teacher_cache(bundle, harm + ok, layers, 2 * a.per_class, per_position=v.moment_sites == "positions")
    attach_lora(bundle.model, dc["lora"], cfg["seed"])
    bundle._nnsight = None
    tcfg = dict(dc["train"], steps=a.steps, milestones=[a.steps], batch_per_class=a.per_class,
                diag_prompts=0, eval_every=10**9)
    diag = lambda: moment_diagnostics(bundle, v, teacher, layers, harm[:a.diag], ok[:a.diag], 2 * a.per_class)
    before = diag()
    with tempfile.TemporaryDirectory() as tmp:
        state = train(bundle, v, tcfg, harm, ok, teacher, layers, Path(tmp) / "pilot.pt")
    after = diag()
    key = "cov" if v.lambda_cov else "mean"
    out = {"profile": cfg["profile"], "dtype": cfg["model"]["dtype"], "variant": a.variant, "steps": a.steps,
           "per_class": a.per_class, "micro_batches": tcfg.get("micro_batches", 1),
           "lora_r": dc["lora"]["r"], "lr": tcfg["lr"], "warmup_steps": tcfg.get("warmup_steps", 0), "term": key,
           "history": state.history, "before": before, "after": after,
           "top_eig_ratio": round(after["top_eig"] / before["top_eig"], 4),
           "total_var_ratio": round(after["total_var"] / before["total_var"], 4),
           "tokens_per_s": round(state.tokens / state.seconds, 3), "wall_s": round(time.perf_counter() - t0, 1),
           "created": time.strftime("%Y-%m-%d %H:%M")}
    path = results_dir(cfg["profile"]) / "pilot_moments.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    from refusal_rank.errors import run_main

    sys.exit(run_main("pilot_moments.py", main))
