"""Compare two summary.json files of the same profile, ignoring what legitimately differs between runs
(creation time, commit, wall times, throughput). Exit 1 and name every differing key otherwise.

    python tools/compare_summaries.py A.json B.json            # bitwise (the tiny profile)
    python tools/compare_summaries.py A.json B.json --rtol 0.02 # numbers within a relative tolerance
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

VOLATILE = {"created", "commit", "timings_s", "timings_fresh", "throughput", "seconds", "tokens_per_s", "bench",
            "peak_gflops", "fraction_of_peak", "effective_fraction_of_peak", "achieved_gflops",
            "median_step_s"}  # speeds measured in the run


def diff(a: Any, b: Any, rtol: float, path: str = "") -> list[str]:
    """Paths where ``a`` and ``b`` differ (numbers within ``rtol``, volatile keys skipped)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in VOLATILE:
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'second' if k not in a else 'first'}")
            else:
                out += diff(a[k], b[k], rtol, f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, rtol, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        same = a == b or (rtol > 0 and math.isclose(a, b, rel_tol=rtol, abs_tol=rtol))
        return [] if same else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def _load(path: str) -> Any:
    try:
        with open(path) as fh:
            return json.load(fh)
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror.lower() if e.strerror else type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rtol", type=float, default=0.0)
    args = ap.parse_args()
    if args.rtol < 0:
        ap.error(f"--rtol {args.rtol}: a tolerance is >= 0")
    d = diff(_load(args.a), _load(args.b), args.rtol)
    if d:
        print(f"{len(d)} difference(s) between {args.a} and {args.b}:", *d[:50], sep="\n  ")
        return 1
    print(f"summaries agree ({'bitwise' if args.rtol == 0 else f'rtol {args.rtol}'}, volatile keys ignored)")
    return 0


if __name__ == "__main__":
    from refusal_rank.errors import run_main

    sys.exit(run_main("compare_summaries.py", main))
