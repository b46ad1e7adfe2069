"""Write a seeded sample of cached completions for hand labelling (the judge's validation set).

    python tools/judge_sample.py --profile cpu --out /tmp/judge_sample.jsonl [--models original,k1_ablated]
    python tools/judge_sample.py --profile cpu --out /tmp/defended.jsonl --models defended --per 40,30,10
    python tools/judge_sample.py --profile cpu --out /tmp/mm.jsonl --models mean_matched@70 --per 0,0,30
    python tools/judge_sample.py --profile cpu --out /tmp/attacked.jsonl --from-sweep 40 [--models defended,kl_only]
    python tools/judge_sample.py --profile cpu --out /tmp/screen.jsonl --from-screen defended@70,paper_mean@70 --n 50

Reads the completions of notebook 02 (original and K=1-ablated) or of a trained variant of notebook 03
from the generation cache by re-deriving their cache keys (no model is loaded: it fails clearly if the
notebook that generates them has not run),
samples per (model, set),
and writes rows {id, model, set, prompt_id, prompt, completion} without any judge verdict, so that the
labeller is blind to the markers.

``--from-sweep N`` instead draws N completions per attacked model (its rows are named "<model> attacked",
with the attack beside them) from notebook 04's pool: the full 256-token completions at every K_break
(``sweep_run.write_judge_pool``); ``--models`` then selects attacked models by name (default: all but base), and
``--held`` draws from the K that held at 256 tokens instead (the K below each break, a rejected candidate).
``--from-screen variant@step,...`` draws ``--n`` harmful completions of each checkpoint under notebook 03's attack
screen (its re-selected K=1 attack), named "<variant>@<Nx> attacked".
"""
from __future__ import annotations

import argparse
import json
import random
import sys

from types import SimpleNamespace

from refusal_rank import pipeline as P
from refusal_rank.ablation import edit_tag
from refusal_rank.config import load_config
from refusal_rank.results import load_artifact

PER = {"harmful": 60, "harmless": 40, "overrefusal": 20}


def checkpoint_spec(spec: str, option: str) -> tuple[str, int | None]:
    """``variant@step`` as (variant, step), or (variant, None) without a step; ``option`` names the flag in
    the one-sentence error a malformed step gets."""
    name, at, step = spec.partition("@")
    if at and not step.isdigit():
        raise SystemExit(f"{option} takes variant@step (e.g. mean_matched@70), not {spec!r}")
    return name, int(step) if at else None


def stand_in(cfg: dict, model: str, u) -> SimpleNamespace:
    """The name and weight-edit tag under which each model's completions were cached (no model is loaded).
    A trained variant is read at its target milestone, or at ``variant@step`` (e.g. ``mean_matched@70``: a
    budget-curve variant measured at 1x before it reaches its target)."""
    from refusal_rank.defense_run import target_step, variant_model_name

    if model == "original":
        return SimpleNamespace(name=cfg["model"]["name"], edit="")
    if model == "k1_ablated":
        return SimpleNamespace(name=cfg["model"]["name"], edit=edit_tag(u))
    name, step = checkpoint_spec(model, "--models")
    return SimpleNamespace(name=variant_model_name(cfg, name, target_step(cfg, name) if step is None else step), edit="")


def from_sweep(cfg: dict, per_model: int, models: list[str] | None, held: bool = False) -> list[dict]:
    """A seeded sample of ``per_model`` rows per attacked model from notebook 04's judge pool, taken in turn
    from each attack (estimator, K) that broke it, or with ``held`` from each K that held at 256 tokens;
    ``models`` None: every attacked model but base."""
    from refusal_rank.sweep_run import HELD, judge_pool_path

    path = judge_pool_path(cfg)
    if not path.is_file() or not path.read_text().strip():
        raise SystemExit(f"{path} is missing or empty: run notebook 04 for profile {cfg['profile']!r} first.")
    pool = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    names = sorted({r["model"].removesuffix(" attacked") for r in pool})
    chosen = models if models is not None else [m for m in names if m != "base"]
    out = []
    for m in chosen:
        by_attack: dict[str, list[dict]] = {}
        for r in pool:
            if r["model"] == f"{m} attacked" and r["attack"].endswith(HELD) == held:
                by_attack.setdefault(r["attack"], []).append(r)
        queues = []
        for k in sorted(by_attack):
            random.Random(f"judge-sweep-{m}-{k}").shuffle(by_attack[k])
            queues.append(by_attack[k])
        picked: list[dict] = []
        while len(picked) < per_model and any(queues):  # in turn, so that every breaking attack is represented
            for q in queues:
                if q and len(picked) < per_model:
                    picked.append(q.pop(0))
        out.extend(picked)
    return out


def from_screen(cfg: dict, per_model: int, checkpoints: list[str]) -> list[dict]:
    """A seeded sample of ``per_model`` harmful-test completions of each checkpoint (``variant@step``, e.g.
    ``defended@70``) under the attack screen's re-selected K=1 attack, read from the caches
    (``defense_run.screen_k1_completions``); rows are named "<variant>@<Nx> attacked". Each row also names
    its ``checkpoint`` (the cache name, with the snapshot's digest) and ``dtype``, and its id carries the
    digest: a variant retrained elsewhere (bf16 instead of float32, say) is another model, whose rows never
    collide with the earlier ones."""
    from refusal_rank import defense_run as R

    sets = P.test_sets(cfg)
    out = []
    for spec in checkpoints:
        name, step = checkpoint_spec(spec, "--from-screen")
        if step is None:
            raise SystemExit(f"--from-screen takes variant@step (e.g. defended@70), not {spec!r}")
        comps = R.screen_k1_completions(cfg, name, step, sets)
        model = f"{name}@{R.budget_label(cfg, step)} attacked"
        checkpoint = R.variant_model_name(cfg, name, step)
        digest = checkpoint.rpartition(":")[2]
        idx = list(range(len(comps)))
        random.Random(f"judge-screen-{spec}").shuffle(idx)
        out += [{"id": f"{model}:{digest}:{sets.harmful[i].id}", "model": model, "checkpoint": checkpoint,
                 "dtype": cfg["model"]["dtype"], "set": "harmful", "attack": "k1_reselected",
                 "prompt_id": sets.harmful[i].id, "prompt": sets.harmful[i].text, "completion": comps[i]["text"]}
                for i in idx[:per_model]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="original,k1_ablated", help="original, k1_ablated and/or trained variant names")
    ap.add_argument("--per", default=None, help="rows per set, harmful,harmless,overrefusal (default 60,40,20)")
    ap.add_argument("--from-sweep", type=int, default=0, help="completions per attacked model from notebook 04's pool")
    ap.add_argument("--held", action="store_true", help="with --from-sweep: the K that held at 256 tokens, not the breaks")
    ap.add_argument("--from-screen", default=None, metavar="VARIANT@STEP,...",
                    help="harmful completions of these checkpoints under the screen's re-selected K=1 attack")
    ap.add_argument("--n", type=int, default=50, help="rows per checkpoint with --from-screen")
    a = ap.parse_args()
    cfg = load_config(a.profile)
    if a.from_sweep or a.from_screen:
        rows = (from_sweep(cfg, a.from_sweep, None if a.models == ap.get_default("models") else a.models.split(","), a.held)
                if a.from_sweep else from_screen(cfg, a.n, a.from_screen.split(",")))
        with open(a.out, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} rows to {a.out}")
        return
    per = dict(zip(PER, map(int, a.per.split(",")))) if a.per else PER
    found = load_artifact(cfg, "direction.safetensors", "01_directions")
    u = (found["direction"] / found["direction"].norm())[:, None]
    sets = P.test_sets(cfg)
    rows = []
    for model in a.models.split(","):
        who = stand_in(cfg, model, u)
        for name, prompts in sets.items():
            if not per[name]:
                continue  # no row wanted from this set: its completions need not exist
            comps = P.read_completions(P.completions_path(cfg, who, prompts), len(prompts))
            idx = list(range(len(prompts)))
            random.Random(f"judge-{model}-{name}").shuffle(idx)
            for i in idx[:per[name]]:
                rows.append({"id": f"{model}:{prompts[i].id}", "model": model, "set": name, "prompt_id": prompts[i].id,
                             "prompt": prompts[i].text, "completion": comps[i]["text"]})
    with open(a.out, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(rows)} rows to {a.out}")


if __name__ == "__main__":
    from refusal_rank.errors import run_main

    sys.exit(run_main("judge_sample.py", main))
