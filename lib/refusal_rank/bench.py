"""Machine-relative speed: the matrix-product peak of this machine in the dtype the model computes in (bf16
where the CPU multiplies it natively, fp32 on AVX2-only CPUs, which emulate bf16), measured in the same run.

Machines of one kind differ by up to 5x, so a bare tokens/s says little. Every speed this project
reports is put beside the peak GFLOP/s of a dense matmul measured here, and the model's achieved
GFLOP/s (2 x parameters x tokens / time, the standard forward-pass estimate) as a fraction of it.
"""
from __future__ import annotations

import time

import torch


def matmul_peak_gflops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 5,
                       device: str = "cpu") -> float:
    """Best-of-``repeats`` GFLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype``."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


_PREFERRED: str | None = None


def preferred_cpu_dtype(n: int = 256, repeats: int = 3) -> str:
    """'bfloat16' where this CPU multiplies bf16 faster than fp32 (AMX / AVX512-BF16: 3-4x faster),
    else 'float32'. Measured once a process: on a CPU with AVX2 only, bf16 matmuls are emulated and
    were measured about 50x *slower* than fp32 (0.85 against 45 GFLOP/s on 2 cores), which would make
    the cpu profile unusable rather than merely slow."""
    global _PREFERRED
    if _PREFERRED is None:
        bf = matmul_peak_gflops(torch.bfloat16, n=n, repeats=repeats)
        fp = matmul_peak_gflops(torch.float32, n=n, repeats=repeats)
        _PREFERRED = "bfloat16" if bf >= fp else "float32"
    return _PREFERRED


def forward_flops_per_token(model: torch.nn.Module) -> float:
    """2 x non-embedding parameters (+ the unembedding): FLOPs of one token's forward pass."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if getattr(model.config, "tie_word_embeddings", False):
        n += model.get_input_embeddings().weight.numel()
    return 2.0 * n


def throughput_report(tokens: int, seconds: float, model: torch.nn.Module, peak_gflops: float) -> dict[str, float]:
    """tokens/s and achieved GFLOP/s as a fraction of the measured matmul peak."""
    tps = tokens / seconds
    achieved = tps * forward_flops_per_token(model) / 1e9
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tps, 2),
            "achieved_gflops": round(achieved, 2), "peak_gflops": round(peak_gflops, 2),
            "fraction_of_peak": round(achieved / peak_gflops, 4)}
