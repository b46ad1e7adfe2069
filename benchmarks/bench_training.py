"""Training speed of the defense, against this machine's matmul peak, before and after, in one run.

    python benchmarks/bench_training.py --profile cpu [--steps 2] [--per-class 8]

Runs the same class-balanced batches of the `defended` variant through ``training.train`` under three
settings, side by side in one process, each after its own warm-up step: "before" (the earlier runs' setup:
LoRA r=16, the whole batch in one padded pass), "unshared" (the profile's ``[defense.lora]`` and
``[defense.train]``: its rank, length-sorted micro-batches of the profile's size, every row computed in
full) and "after" (the same with ``share_prefix``: the template
tokens every prompt starts with computed once a micro-batch). The micro-batched settings run today's
two-phase moment terms (a forward pass without a graph over every micro-batch but the first, then the
micro-batches with gradients); "before", one pass, computes them on its own graph.
It reports the rows' own tokens a second (as if each prompt ran alone: the unit of every training budget)
and the FLOPs of the positions actually computed (4 x parameters a token for LoRA: forward plus the
backward pass into the activations; 2 x for the moment terms' forward-only pass; padding included, a shared
prefix counted once) as a fraction of the matmul peak of the profile's dtype, measured at
the start and the end of the same run (the larger of the two is used), and around each setting's own
timed steps (its local peak: the machine's speed drifts within minutes, so the ``*_at_equal_peak``
speedups compare the settings' tokens a second each over its local peak). Writes ``training`` into
results/<profile>/bench.json. It also prints the moment terms of the first step beside their noise floor
on the real model. A benchmark, not a test: time only what runs alone.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from refusal_rank import defense_run as R
from refusal_rank.bench import forward_flops_per_token, matmul_peak_gflops
from refusal_rank.config import load_config, results_dir
from refusal_rank.models import bundle_from_pretrained, checkpoint_dir
from refusal_rank.training import Variant, attach_lora, teacher_cache, train


def run_setting(cfg, lora: dict, tcfg: dict, harm, ok, layers, steps: int, workdir: Path) -> dict:
    bundle = bundle_from_pretrained(checkpoint_dir(cfg), cfg, name="bench-student")
    teacher = teacher_cache(bundle, harm + ok, layers, 2 * tcfg["batch_per_class"])
    attach_lora(bundle.model, lora, cfg["seed"])
    bundle._nnsight = None
    v = Variant.from_cfg("defended", cfg["defense"]["variants"]["defended"])
    t = dict(tcfg, steps=steps + 1, milestones=[steps + 1], eval_every=10**9, ckpt_every=10**9, diag_prompts=0)
    ck = workdir / f"r{lora['r']}-m{t['micro_batches']}-s{int(bool(t.get('share_prefix')))}.pt"
    state = train(bundle, v, t, harm, ok, teacher, layers, ck, stop_at=1, log=lambda *_: None)  # warm-up step, not timed (checkpointed, then resumed)
    s0, tok0, pad0, comp0, mom0 = state.seconds, state.tokens, state.padded_tokens, state.computed_tokens, state.moment_tokens
    # this machine's speed drifts within minutes (a 758 -> 1006 GFLOP/s peak in one 4-minute run), so each
    # setting also gets the peak measured just before and after its own timed steps
    local = [matmul_peak_gflops(bundle.dtype, n=1024)]
    state = train(bundle, v, t, harm, ok, teacher, layers, ck, log=lambda *_: None)
    local.append(matmul_peak_gflops(bundle.dtype, n=1024))
    secs, toks, pads = state.seconds - s0, state.tokens - tok0, state.padded_tokens - pad0
    flops_tok = 2 * forward_flops_per_token(bundle.model)  # ~4 x parameters
    comp = state.computed_tokens - comp0
    mom = state.moment_tokens - mom0  # forward only: half the FLOPs a position
    return {"lora_r": lora["r"], "micro_batches": t["micro_batches"], "moment_pairings": t.get("moment_pairings", 1),
            "share_prefix": bool(t.get("share_prefix", False)),
            "steps_timed": steps, "seconds": round(secs, 2), "tokens": toks, "padded_tokens": pads, "computed_tokens": comp,
            "padding_share": round(1 - toks / max(pads, 1), 4), "tokens_per_s": round(toks / secs, 3),
            "seconds_per_step": round(secs / steps, 2), "moment_tokens": mom,
            "gflops": round((comp + mom / 2) / secs * flops_tok / 1e9, 2),
            "effective_gflops": round(toks / secs * flops_tok / 1e9, 2),
            "local_peak_gflops": round(sum(local) / 2, 2), "local_peak_before_after": [round(x, 2) for x in local],
            "first_step_terms": {k: round(v, 5) for k, v in state.history[0].items() if k in ("cov", "cov_null", "lm", "kd")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up step)")
    ap.add_argument("--per-class", type=int, default=8, help="prompts per class a step (the profile's: 16)")
    a = ap.parse_args()
    cfg = load_config(a.profile)
    dtype = getattr(torch, cfg["model"]["dtype"])
    peak0 = matmul_peak_gflops(dtype, n=1024)
    harm, ok = R.defense_prompts(cfg)
    n = (a.steps + 1) * a.per_class
    harm, ok = [p.text for p in harm[:n]], [p.text for p in ok[:n]]
    dc = cfg["defense"]
    with tempfile.TemporaryDirectory() as tmp:
        from refusal_rank.models import load_model

        n_layers = load_model(cfg).n_layers
        layers = R.defense_layers(cfg, n_layers)
        tc = dc["train"]
        # micro-batches of the profile's size (rows a class), whatever --per-class is
        rows = max(1, tc["batch_per_class"] // int(tc.get("micro_batches", 1)))
        base_t = dict(tc, batch_per_class=a.per_class, micro_batches=max(1, a.per_class // rows))
        before = run_setting(cfg, dict(dc["lora"], r=16, alpha=32),
                             dict(base_t, micro_batches=1, share_prefix=False),
                             harm, ok, layers, a.steps, Path(tmp))
        unshared = run_setting(cfg, dc["lora"], dict(base_t, share_prefix=False), harm, ok, layers, a.steps, Path(tmp))
        after = run_setting(cfg, dc["lora"], dict(base_t, share_prefix=True), harm, ok, layers, a.steps, Path(tmp))
    peak1 = matmul_peak_gflops(dtype, n=1024)
    peak = max(peak0, peak1)
    for r in (before, unshared, after):
        r["fraction_of_peak"] = round(r["gflops"] / peak, 4)  # of what was computed: the hardware's use
        r["effective_fraction_of_peak"] = round(r["effective_gflops"] / peak, 4)  # of the rows' own tokens
        r["effective_fraction_of_local_peak"] = round(r["effective_gflops"] / r["local_peak_gflops"], 4)
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").is_file() else ""
    machine = {"cpu": next((l.split(":", 1)[1].strip() for l in flags.splitlines() if l.startswith("model name")), "unknown"),
               "threads": torch.get_num_threads(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}
    out = {"machine": machine, "dtype": cfg["model"]["dtype"], "peak_gflops": round(peak, 2), "peak_start_end": [round(peak0, 2), round(peak1, 2)],
           "per_class": a.per_class, "before": before, "unshared": unshared, "after": after,
           "step_speedup": round(before["seconds_per_step"] / after["seconds_per_step"], 3),
           "share_prefix_speedup": round(unshared["seconds_per_step"] / after["seconds_per_step"], 3),
           # the same ratios with each setting's time scaled to one machine speed (its local peak)
           "step_speedup_at_equal_peak": round(after["effective_fraction_of_local_peak"] / before["effective_fraction_of_local_peak"], 3),
           "share_prefix_speedup_at_equal_peak": round(after["effective_fraction_of_local_peak"] / unshared["effective_fraction_of_local_peak"], 3),
           "created": time.strftime("%Y-%m-%d %H:%M")}
    path = results_dir(cfg["profile"]) / "bench.json"
    bench = json.loads(path.read_text()) if path.is_file() else {}
    bench["training"] = out
    path.write_text(json.dumps(bench, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
