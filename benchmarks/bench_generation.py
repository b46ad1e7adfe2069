"""This project's generation against plain ``model.generate``, side by side in one run, at the same batch.

    python benchmarks/bench_generation.py --profile cpu [--batch 32] [--n 80] [--new-tokens 256] [--big-batch 64]

Workloads: the sweep's deciding pair on the harmful test prompts, i.e. the original model with notebook
01's direction ablated (mostly compliant: long completions) and the original itself (mostly refusals),
each generated greedily at ``--new-tokens`` tokens

* by plain ``model.generate`` (the reference),
* by our loop in full mode (static cache, ended rows dropped): its token ids are compared with generate's,
* by our loop in verdict mode (also stops a row at its first refusal marker, what the sweep runs for
  every verdict-only generation): its marker verdicts are compared with generate's completions',
* by the refilled loop in verdict mode (``generation.greedy_refill``: a slot freed by an ended row takes
  the next prompt at once, so every decode step carries a full batch while prompts remain).

Our modes pack the linear layers' weights once (``models.packed_linears``) where the profile's
``eval.gen_pack_weights`` says so, as the sweep does; ``decode_step`` times one-token steps of a full
batch with and without packing, alternated in the same process, and checks their ids are equal.
``--modes`` runs a subset (generate is always run: it is the reference).

The default prompt count is the sweep's harmful test set (what it generates at every K).

The speed is the same job's: the completion tokens generate delivers (up to EOS) divided by each wall
time, so ``ratio`` is generate's time over ours. ``generation`` in results/<profile>/bench.json holds
the profile's engine (``eval.gen_engine``: the batch loop or refill) in verdict mode against generate
over both workloads, both engines apart (and each workload, the full mode, and our loop at
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
from refusal_rank.generation import _eos_ids, _make_cache, _prefill, greedy_kwargs, greedy_loop, greedy_refill
from refusal_rank.metrics import is_refusal
from refusal_rank.models import load_model, packed_linears


def _cut(row, eos):
    return row[:next((i for i, t in enumerate(row) if t in eos), len(row))]


def run(bundle, prompts, batch, new_tokens, mode, cache, pack=False):
    """(completions as id lists in prompt order, wall seconds, row-steps computed by our loop)."""
    eos = _eos_ids(bundle)
    out, stats = [None] * len(prompts), {}
    t = time.perf_counter()
    if mode == "refill":  # every prompt through one loop whose freed slots take the next prompt (verdict mode)
        with torch.inference_mode():
            out = greedy_refill(bundle, prompts, batch, new_tokens, stop_on_refusal=True, stats=stats, pack_weights=pack)
        return out, time.perf_counter() - t, stats.get("steps_rows")
    packing = packed_linears(bundle.model, pack and mode != "generate", batch)
    with torch.inference_mode(), packing:
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


def workload(bundle, prompts, a, cache, pack, engine):
    dec = lambda ids: bundle.tokenizer.decode(ids, skip_special_tokens=True)
    ref, t_ref, _ = run(bundle, prompts, a.batch, a.new_tokens, "generate", cache)
    tokens = sum(len(r) for r in ref)
    v_ref = [is_refusal(dec(r)) for r in ref]
    res = {"n": len(prompts), "tokens": tokens, "generate_s": round(t_ref, 2), "refusal_rate": round(sum(v_ref) / len(v_ref), 4)}
    agree = lambda rows: sum(is_refusal(dec(r)) == v for r, v in zip(rows, v_ref))
    if "full" in a.modes:
        full, t_full, _ = run(bundle, prompts, a.batch, a.new_tokens, "full", cache, pack)
        res.update(ours_full_s=round(t_full, 2), full_ids_equal=sum(a_ == b for a_, b in zip(full, ref)))
    if "verdict" in a.modes:
        ver, t_ver, steps = run(bundle, prompts, a.batch, a.new_tokens, "verdict", cache, pack)
        res.update(ours_verdict_s=round(t_ver, 2), ours_verdict_row_steps=steps, verdicts_equal=agree(ver))
    if "refill" in a.modes:
        rf, t_rf, steps_rf = run(bundle, prompts, a.batch, a.new_tokens, "refill", cache, pack)
        res.update(refill_verdict_s=round(t_rf, 2), refill_verdict_row_steps=steps_rf, refill_verdicts_equal=agree(rf))
    if a.big_batch:
        big, t_big, _ = run(bundle, prompts, a.big_batch, a.new_tokens, "refill" if engine == "refill" else "verdict",
                            cache, pack)
        res.update(ours_big_batch_s=round(t_big, 2), big_batch_verdicts_equal=agree(big))
    return res


def decode_step(bundle, prompts, batch, steps, rounds=3):
    """Seconds per one-token step of a full batch (the first ``batch`` prompts, a static cache), plain
    against packed linear layers, alternated ``rounds`` times in this process; and whether their ids agree."""
    enc = encode(bundle, prompts[:batch])
    times = {"plain": [], "packed": []}
    ids = {}
    for _ in range(rounds):
        for name in times:
            with torch.inference_mode(), packed_linears(bundle.model, name == "packed", batch):
                model = bundle.model
                kv = _make_cache(model, "static", enc["input_ids"].shape[1] + steps + 1)
                logits, last = _prefill(model, enc["input_ids"], enc["attention_mask"], kv)
                mask, seq = enc["attention_mask"], []
                t = time.perf_counter()
                for _ in range(steps):
                    nxt = logits.argmax(-1)
                    seq.append(nxt)
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                    last = last + 1
                    logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                                   past_key_values=kv, use_cache=True).logits[:, -1]
                times[name].append((time.perf_counter() - t) / steps)
                ids[name] = torch.stack(seq, 1)
    best = {k: min(v) for k, v in times.items()}
    return {"batch": batch, "steps": steps, "rounds": rounds, "plain_s": round(best["plain"], 4),
            "packed_s": round(best["packed"], 4), "speedup": round(best["plain"] / best["packed"], 3),
            "ids_equal": bool(torch.equal(ids["plain"], ids["packed"])),
            "note": "fastest of the alternated rounds; packing applies on CPU bf16 only (else both are plain)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None)
    ap.add_argument("--batch", type=int, default=None, help="default: the profile's eval.gen_batch_size")
    ap.add_argument("--n", type=int, default=None, help="harmful test prompts (default: the sweep's test set, 2 x sweep.n_test_per_source)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: the profile's eval.verdict_new_tokens")
    ap.add_argument("--big-batch", type=int, default=0, help="also time the profile's engine at this batch (0: skip)")
    ap.add_argument("--modes", default="full,verdict,refill", help="our modes to run beside generate (comma-separated)")
    ap.add_argument("--step-tokens", type=int, default=16, help="decode steps a round of the packed/plain step timing (0: skip)")
    a = ap.parse_args()
    a.modes = [m for m in a.modes.split(",") if m]
    unknown = sorted(set(a.modes) - {"full", "verdict", "refill"})
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}: choose from full, verdict, refill")
    cfg = load_config(a.profile)
    a.batch = a.batch or cfg["eval"]["gen_batch_size"]
    a.new_tokens = a.new_tokens or cfg["eval"]["verdict_new_tokens"]
    n = a.n or 2 * cfg["sweep"]["n_test_per_source"]  # the sweep's harmful test set: the job it runs at every K
    bundle = load_model(cfg)
    cache = cfg["eval"]["gen_cache"]
    prompts = [p.text for p in D.split_prompts("harmful_test", n // 2 + n % 2, cfg["seed"], per_source=True)][:n]
    from refusal_rank.results import load_artifact

    found = load_artifact(cfg, "direction.safetensors", "01_directions")
    u = (found["direction"] / found["direction"].norm()).double()[:, None]
    engine, pack = cfg["eval"]["gen_engine"], cfg["eval"]["gen_pack_weights"]
    ours = {"refill": "refill", "fast": "verdict"}.get(engine)
    if ours not in a.modes:
        ap.error(f"--modes must include the profile's engine ({ours}: eval.gen_engine = {engine!r})")
    with torch.inference_mode():  # warm-up of both paths
        enc = encode(bundle, prompts[:2])
        bundle.model.generate(**enc, **greedy_kwargs(bundle, 4))
        greedy_loop(bundle, enc, 4, cache, pack_weights=pack)
    loads, step = {}, None
    with orthogonalized(bundle, u):
        if a.step_tokens:
            step = decode_step(bundle, prompts, a.batch, a.step_tokens)
        loads["k1_ablated"] = workload(bundle, prompts, a, cache, pack, engine)
    loads["original"] = workload(bundle, prompts, a, cache, pack, engine)
    tokens = sum(w["tokens"] for w in loads.values())
    t_gen = sum(w["generate_s"] for w in loads.values())
    total = lambda key: sum(w[key] for w in loads.values())
    t_key, eq_key = {"refill": ("refill_verdict_s", "refill_verdicts_equal"),
                     "verdict": ("ours_verdict_s", "verdicts_equal")}[ours]
    t_ours = total(t_key)
    gen = {"engine": engine, "pack_weights": pack, "ours_tokens_per_s": round(tokens / t_ours, 2),
           "generate_tokens_per_s": round(tokens / t_gen, 2),
           "ratio": round(t_gen / t_ours, 3), "batch": a.batch, "new_tokens": a.new_tokens, "n_per_workload": len(prompts),
           "cache": cache, "threads": torch.get_num_threads(),
           "verdicts_equal": total(eq_key), "verdicts": 2 * len(prompts),
           "workloads": loads,
           "note": "same job for both: the completion tokens plain generate delivers up to EOS, over each wall time; "
                   "ours = the profile's engine in verdict mode (rows stopped at their first refusal marker, static cache): "
                   "batch_loop drops ended rows of a length-sorted batch, refill also gives each freed slot the next prompt"}
    if "verdict" in a.modes:
        gen["batch_loop"] = {"tokens_per_s": round(tokens / total("ours_verdict_s"), 2),
                             "ratio": round(t_gen / total("ours_verdict_s"), 3), "verdicts_equal": total("verdicts_equal")}
    if "refill" in a.modes:
        gen["refill"] = {"tokens_per_s": round(tokens / total("refill_verdict_s"), 2),
                         "ratio": round(t_gen / total("refill_verdict_s"), 3), "verdicts_equal": total("refill_verdicts_equal")}
    if "full" in a.modes:
        gen["full_mode"] = {"tokens_per_s": round(tokens / total("ours_full_s"), 2), "ratio": round(t_gen / total("ours_full_s"), 3),
                            "ids_equal": total("full_ids_equal")}
    if step is not None:
        gen["decode_step"] = step
    if a.big_batch:
        t_big = total("ours_big_batch_s")
        gen["larger_batch"] = {"batch": a.big_batch, "ours_tokens_per_s": round(tokens / t_big, 2), "ratio": round(t_gen / t_big, 3),
                               "verdicts_equal": total("big_batch_verdicts_equal")}
    path = results_dir(cfg["profile"]) / "bench.json"
    report = json.loads(path.read_text()) if path.is_file() else {"profile": cfg["profile"], "model": cfg["model"]["name"]}
    report["generation"] = gen
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(gen, indent=1))


if __name__ == "__main__":
    main()
