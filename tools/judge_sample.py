"""Write a seeded sample of cached completions for hand labelling (the judge's validation set).

    python tools/judge_sample.py --profile cpu --out /tmp/judge_sample.jsonl [--models base,k1]

Reads the completions of notebook 02 (original and K=1-ablated) from the generation cache by
re-deriving their cache keys (no generation happens if the cache is warm), samples per (model, set),
and writes rows {id, model, set, prompt_id, prompt, completion} without any judge verdict, so that the
labeller is blind to the markers.
"""
from __future__ import annotations

import argparse
import json
import random

from refusal_rank import pipeline as P
from refusal_rank.ablation import orthogonalized
from refusal_rank.config import load_config
from refusal_rank.models import load_model
from refusal_rank.results import load_artifact

PER = {"harmful": 60, "harmless": 40, "overrefusal": 20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = load_config(a.profile)
    bundle = load_model(cfg)
    found = load_artifact(cfg, "direction.pt", "01_directions")
    u = (found["direction"] / found["direction"].norm())[:, None]
    sets = P.test_sets(cfg)
    rows = []
    for model in ("original", "k1_ablated"):
        for name, prompts in sets.items():
            if model == "k1_ablated":
                with orthogonalized(bundle, u):
                    comps = P.completions(cfg, bundle, prompts)
            else:
                comps = P.completions(cfg, bundle, prompts)
            idx = list(range(len(prompts)))
            random.Random(f"judge-{model}-{name}").shuffle(idx)
            for i in idx[:PER[name]]:
                rows.append({"id": f"{model}:{prompts[i].id}", "model": model, "set": name, "prompt_id": prompts[i].id,
                             "prompt": prompts[i].text, "completion": comps[i]["text"]})
    with open(a.out, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(rows)} rows to {a.out}")


if __name__ == "__main__":
    main()
