"""Tables generated from ``results/<profile>/summary.json``, never typed by hand.

``python -m refusal_rank.report --profile cpu`` prints the headline tables; ``--write-readme``
replaces the block between ``<!-- results:PROFILE:begin -->`` and ``<!-- results:PROFILE:end -->``
in README.md with them (a test checks that the README's block is what the summary generates).
"""
from __future__ import annotations

import argparse
import re
from typing import Any

from .config import REPO_ROOT
from .results import read_summary


def fmt_rate(r: dict[str, Any] | None) -> str:
    if not r:
        return "n/a"
    return f"{r['rate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def fmt_mean(r: dict[str, Any] | float | None, digits: int = 3) -> str:
    if r is None:
        return "n/a"
    if isinstance(r, dict):
        return f"{r['mean']:.{digits}f} [{r['lo']:.{digits}f}, {r['hi']:.{digits}f}]"
    return f"{r:.{digits}f}"


def k1_table(s: dict[str, Any]) -> str:
    """Original vs K=1 attack vs activation addition (notebook 02)."""
    base, k1 = s.get("base", {}), s.get("attack_k1", {})
    add, sub = s.get("actadd", {}), s.get("actsub", {})
    n = lambda r: r.get("n", "?") if r else "?"
    lines = [
        "| model | harmful refusal | harmless refusal | over-refusal | first-token KL (harmless) | CE on original's harmless completions |",
        "|---|---|---|---|---|---|",
        f"| original | {fmt_rate(base.get('refusal_rate_harmful'))} | {fmt_rate(base.get('refusal_rate_harmless'))} | "
        f"{fmt_rate(base.get('overrefusal_rate'))} | 0 | {fmt_mean(base.get('ce_harmless'))} |",
        f"| K=1 ablation (weight edit) | {fmt_rate(k1.get('refusal_rate_harmful'))} | {fmt_rate(k1.get('refusal_rate_harmless'))} | "
        f"{fmt_rate(k1.get('overrefusal_rate'))} | {fmt_mean(k1.get('kl_harmless'))} | {fmt_mean(k1.get('ce_harmless'))} |",
        f"| activation addition (+r) | | {fmt_rate(add.get('refusal_rate_harmless'))} | | | |",
        f"| activation subtraction (-r) | {fmt_rate(sub.get('refusal_rate_harmful'))} | | | | |",
    ]
    hb = base.get("refusal_rate_harmful", {}).get("by_source", {})
    if hb:
        lines.append("")
        lines.append("Original model's harmful refusal by source: " + "; ".join(
            f"{src} {fmt_rate(r)} (n={r['n']})" for src, r in hb.items()) + ".")
    d = s.get("direction")
    if d:
        lines.append(f"Direction: layer {d['layer']}, post-instruction position {d['position']} "
                     f"({d.get('position_token', '')!r}), KL on harmless val {d['kl_harmless']}.")
    lines.append(f"n: harmful {n(base.get('refusal_rate_harmful'))}, harmless {n(base.get('refusal_rate_harmless'))}, "
                 f"over-refusal {n(base.get('overrefusal_rate'))}; rates are marker-judged greedy completions with 95% bootstrap intervals.")
    return "\n".join(lines)


def timings_line(s: dict[str, Any]) -> str:
    t = s.get("timings_s", {})
    if not t:
        return ""
    fresh = s.get("timings_fresh", {})
    parts = ", ".join(f"{k} {v / 60:.1f} min" + ("" if fresh.get(k) else " (warm cache)") for k, v in t.items())
    tp = s.get("throughput", {}).get("forward_residuals")
    extra = ""
    if tp:
        extra = (f" Batched forward pass with every layer read through nnsight: {tp['tokens_per_s']:.0f} tokens/s, "
                 f"{tp['fraction_of_peak']:.0%} of this machine's bf16 matmul peak ({tp['peak_gflops']:.0f} GFLOP/s, measured in the same run).")
    return f"Wall time: {parts}.{extra}"


def render(profile: str) -> str:
    s = read_summary(profile)
    if not s:
        return f"_No results for profile `{profile}` yet: run `./run_all.sh --profile {profile}`._"
    head = f"Profile `{profile}`, model `{s['model']}`, commit `{s['commit']}`, {s['created'][:10]}.\n\n"
    return head + k1_table(s) + "\n\n" + timings_line(s)


def write_readme(profile: str) -> bool:
    path = REPO_ROOT / "README.md"
    text = path.read_text()
    pat = re.compile(rf"(<!-- results:{re.escape(profile)}:begin -->\n).*?(<!-- results:{re.escape(profile)}:end -->)", re.S)
    if not pat.search(text):
        return False
    new = pat.sub(lambda m: m.group(1) + render(profile) + "\n" + m.group(2), text)
    path.write_text(new)
    return True


def readme_block(profile: str) -> str | None:
    text = (REPO_ROOT / "README.md").read_text()
    m = re.search(rf"<!-- results:{re.escape(profile)}:begin -->\n(.*?)<!-- results:{re.escape(profile)}:end -->", text, re.S)
    return m.group(1).removesuffix("\n") if m else None


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--write-readme", action="store_true")
    a = ap.parse_args()
    print(render(a.profile))
    if a.write_readme and not write_readme(a.profile):
        print(f"README.md has no results block for {a.profile}")
