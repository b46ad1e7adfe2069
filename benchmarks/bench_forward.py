"""Throughput of the profile's model on this machine, against this machine's own matmul peak.

    python benchmarks/bench_forward.py --profile cpu [--batch 32] [--new-tokens 32]

Measures, in one run: the bf16 and fp32 matrix-product peak (GFLOP/s), tokens/s of the batched forward
pass (plain, and with every layer's residual read through nnsight), and tokens/s of batched greedy
generation; and copies the wall time of each notebook from the profile's last run (summary.json's
``timings_s``, with whether that run started from an empty cache). Writes results/<profile>/bench.json.
A benchmark, not a timed test: numbers vary by machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from refusal_rank import data as D
from refusal_rank.activations import collect_residuals, encode
from refusal_rank.bench import matmul_peak_gflops, throughput_report
from refusal_rank.config import load_config, results_dir
from refusal_rank.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    cfg = load_config(a.profile)
    bundle = load_model(cfg)
    dev = str(bundle.device)
    peak = matmul_peak_gflops(torch.bfloat16, device=dev)
    peak32 = matmul_peak_gflops(torch.float32, device=dev)
    prompts = [p.text for p in D.split_prompts("harmful_train", a.batch, cfg["seed"])]
    enc = encode(bundle, prompts)
    n_tok = int(enc["attention_mask"].sum())
    with torch.inference_mode():
        bundle.model(**enc)  # warm-up
        t = time.perf_counter()
        bundle.model(**enc)
        fwd = throughput_report(n_tok, time.perf_counter() - t, bundle.model, peak)
    t = time.perf_counter()
    collect_residuals(bundle, prompts, a.batch)
    nns = throughput_report(n_tok, time.perf_counter() - t, bundle.model, peak)
    with torch.inference_mode():
        t = time.perf_counter()
        out = bundle.model.generate(**enc, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                                    pad_token_id=bundle.tokenizer.pad_token_id)
        dt = time.perf_counter() - t
    gen_tokens = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    gen = throughput_report(gen_tokens, dt, bundle.model, peak)
    report = {"profile": cfg["profile"], "model": cfg["model"]["name"], "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "matmul_peak_gflops": {"bf16": round(peak, 1), "fp32": round(peak32, 1)},
              "batch": a.batch, "prompt_tokens": n_tok, "forward": fwd, "forward_nnsight_all_layers": nns,
              "generate": {**gen, "new_tokens_per_row": a.new_tokens, "note": "includes the prefill"}}
    from refusal_rank.results import read_summary

    summary = read_summary(cfg["profile"])
    report["notebook_wall_s"] = {"seconds": summary.get("timings_s", {}), "from_empty_cache": summary.get("timings_fresh", {}),
                                 "note": "from the last ./run_all.sh of this profile (summary.json)"}
    path = results_dir(cfg["profile"]) / "bench.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
