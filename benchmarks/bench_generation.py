"""This project's generation against plain ``model.generate``, side by side in one run, at the same batch.

    python benchmarks/bench_generation.py --profile cpu [--batch 32] [--n 64] [--new-tokens 256] [--big-batch 64]

Workloads: the sweep's deciding pair on the harmful test prompts, i.e. the original model with notebook
01's direction ablated (mostly compliant: long completions) and the original itself (mostly refusals),
each generated greedily at ``--new-tokens`` tokens

* by plain ``model.generate`` (the reference),
* by our loop in full mode (static cache, ended rows dropped): its token ids are compared with generate's,
* by our loop in verdict mode (also stops a row at its first refusal marker, what the sweep runs for
  every verdict-only generation): its marker verdicts are compared with generate's completions'.

The speed is the same job's: the completion tokens generate delivers (up to EOS) divided by each wall
time, so ``ratio`` is generate's time over ours. ``generation`` in results/<profile>/bench.json holds
the verdict mode against generate over both workloads (and each workload, the full mode, and our loop at
``--big-batch``, reported apart). Other keys of bench.json are kept. Numbers vary by machine.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from refusal_rank import data as D
from refusal_rank.ablation import orthogonalized
from refusal_rank.activations import encode, length_batches
from refusal_rank.config import load_config, results_dir
from refusal_rank.generation import _eos_ids, greedy_kwargs, greedy_loop
from refusal_rank.metrics import is_refusal
from refusal_rank.models import load_model


def _cut(row, eos):
    return row[:next((i for i, t in enumerate(row) if t in eos), len(row))]


def run(bundle, prompts, batch, new_tokens, mode, cache):
    """(completions as id lists in prompt order, wall seconds, row-steps computed by our loop)."""
    eos = _eos_ids(bundle)
    out, stats = [None] * len(prompts), {}
    t = time.perf_counter()
    with torch.inference_mode():
        for idx in length_batches(bundle, prompts, batch):
            enc = encode(bundle, [prompts[i] for i in idx])
            if mode == "generate":
                rows = bundle.model.generate(**enc, **greedy_kwargs(bundle, new_tokens))[:, enc["input_ids"].shape[1]:].tolist()
                rows = [_cut(r, eos) for r in rows]
            else:
                rows = greedy_loop(bundle, enc, new_tokens, cache, stop_on_refusal=(mode == "verdict"), stats=stats)
            for i, r in zip(idx, rows):
                out[i] = r
    return out, time.perf_counter() - t, stats.get("steps_rows")


def workload(bundle, prompts, a, cache):
    dec = lambda ids: bundle.tokenizer.decode(ids, skip_special_tokens=True)
    ref, t_ref, _ = run(bundle, prompts, a.batch, a.new_tokens, "generate", cache)
    full, t_full, _ = run(bundle, prompts, a.batch, a.new_tokens, "full", cache)
    ver, t_ver, steps = run(bundle, prompts, a.batch, a.new_tokens, "verdict", cache)
    tokens = sum(len(r) for r in ref)
    v_ref = [is_refusal(dec(r)) for r in ref]
    v_ver = [is_refusal(dec(r)) for r in ver]
    res = {"n": len(prompts), "tokens": tokens, "generate_s": round(t_ref, 2), "ours_full_s": round(t_full, 2),
           "ours_verdict_s": round(t_ver, 2), "ours_verdict_row_steps": steps,
           "full_ids_equal": sum(a_ == b for a_, b in zip(full, ref)), "verdicts_equal": sum(a_ == b for a_, b in zip(v_ver, v_ref)),
           "refusal_rate": round(sum(v_ref) / len(v_ref), 4)}
    if a.big_batch:
        _, t_big, _ = run(bundle, prompts, a.big_batch, a.new_tokens, "verdict", cache)
        res["ours_verdict_big_batch_s"] = round(t_big, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None)
    ap.add_argument("--batch", type=int, default=None, help="default: the profile's eval.gen_batch_size")
    ap.add_argument("--n", type=int, default=None, help="harmful test prompts (default: 2 batches)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: the profile's eval.verdict_new_tokens")
    ap.add_argument("--big-batch", type=int, default=0, help="also time our verdict mode at this batch (0: skip)")
    a = ap.parse_args()
    cfg = load_config(a.profile)
    a.batch = a.batch or cfg["eval"]["gen_batch_size"]
    a.new_tokens = a.new_tokens or cfg["eval"]["verdict_new_tokens"]
    n = a.n or 2 * a.batch
    bundle = load_model(cfg)
    cache = cfg["eval"]["gen_cache"]
    prompts = [p.text for p in D.split_prompts("harmful_test", n // 2 + n % 2, cfg["seed"], per_source=True)][:n]
    from refusal_rank.results import load_artifact

    found = load_artifact(cfg, "direction.safetensors", "01_directions")
    u = (found["direction"] / found["direction"].norm()).double()[:, None]
    with torch.inference_mode():  # warm-up of both paths
        enc = encode(bundle, prompts[:2])
        bundle.model.generate(**enc, **greedy_kwargs(bundle, 4))
        greedy_loop(bundle, enc, 4, cache)
    loads = {}
    with orthogonalized(bundle, u):
        loads["k1_ablated"] = workload(bundle, prompts, a, cache)
    loads["original"] = workload(bundle, prompts, a, cache)
    tokens = sum(w["tokens"] for w in loads.values())
    t_gen = sum(w["generate_s"] for w in loads.values())
    t_ours = sum(w["ours_verdict_s"] for w in loads.values())
    t_full = sum(w["ours_full_s"] for w in loads.values())
    gen = {"ours_tokens_per_s": round(tokens / t_ours, 2), "generate_tokens_per_s": round(tokens / t_gen, 2),
           "ratio": round(t_gen / t_ours, 3), "batch": a.batch, "new_tokens": a.new_tokens, "n_per_workload": len(prompts),
           "cache": cache, "threads": torch.get_num_threads(),
           "verdicts_equal": sum(w["verdicts_equal"] for w in loads.values()), "verdicts": 2 * len(prompts),
           "full_mode": {"tokens_per_s": round(tokens / t_full, 2), "ratio": round(t_gen / t_full, 3),
                         "ids_equal": sum(w["full_ids_equal"] for w in loads.values())},
           "workloads": loads,
           "note": "same job for both: the completion tokens plain generate delivers up to EOS, over each wall time; "
                   "ours = verdict mode (ended rows dropped, rows stopped at their first refusal marker, static cache)"}
    if a.big_batch:
        t_big = sum(w["ours_verdict_big_batch_s"] for w in loads.values())
        gen["larger_batch"] = {"batch": a.big_batch, "ours_tokens_per_s": round(tokens / t_big, 2), "ratio": round(t_gen / t_big, 3)}
    path = results_dir(cfg["profile"]) / "bench.json"
    report = json.loads(path.read_text()) if path.is_file() else {"profile": cfg["profile"], "model": cfg["model"]["name"]}
    report["generation"] = gen
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(gen, indent=1))


if __name__ == "__main__":
    main()
