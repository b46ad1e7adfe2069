"""Tables generated from ``results/<profile>/summary.json``, never typed by hand.

``python -m refusal_rank.report --profile cpu`` prints the headline tables; ``--write-readme``
replaces the block between ``<!-- results:PROFILE:begin -->`` and ``<!-- results:PROFILE:end -->``
in README.md with them (a test checks that the README's block is what the summary generates).
"""
from __future__ import annotations

import argparse
import re
from typing import Any

from . import paper
from .config import REPO_ROOT
from .results import read_summary


_PEAK_NAME = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}

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
    parts = ", ".join(f"{k} {v / 60:.1f} min" + (" (from an emptied cache)" if fresh.get(k) else "") for k, v in t.items())
    tp = s.get("throughput", {}).get("forward_residuals")  # summaries before peak_dtype measured bf16
    extra = ""
    if tp:
        extra = (f" Batched forward pass with every layer read through nnsight: {tp['tokens_per_s']:.0f} tokens/s, "
                 f"{tp['fraction_of_peak']:.0%} of this machine's {_PEAK_NAME.get(tp.get('peak_dtype', 'bfloat16'), tp.get('peak_dtype'))} matmul peak ({tp['peak_gflops']:.0f} GFLOP/s, measured in the same run).")
    note = " Times not marked \"from an emptied cache\" reused whatever earlier runs had left in the cache."
    return f"Wall time of each notebook's last run: {parts}.{note}{extra}"


MODEL_ROWS = (("defended", "defended (covariance matching + KD)"), ("kl_only", "control: KL only (prompt LM + KD)"),
              ("ablation_aware", "control: ablation-aware KD"), ("paper_mean", "the paper's mean matching + KD (pooled)"),
              ("mean_matched", "named variant: per-position mean matching + KD"))
PAPER_K = paper.K_BREAK_TEXT  # the paper's column of the K_break table


def defense_table(s: dict[str, Any]) -> str:
    """Notebook 03's before/after table: the original and every trained model on the test sets."""
    base = s.get("base", {})
    rows = [("original", {**base, "attack_k1": s.get("attack_k1")})]
    section = lambda key: s.get("defended") if key == "defended" else (s.get("controls", {}).get(key) or s.get("named_variants", {}).get(key))
    rows += [(label, section(key)) for key, label in MODEL_ROWS]
    rows = [(label, r) for label, r in rows if r]
    if len(rows) < 2:
        return ""
    lines = ["| model | harmful refusal | harmless refusal | over-refusal | first-token KL (harmless) | CE on original's harmless completions | harmful refusal under re-selected K=1 |",
             "|---|---|---|---|---|---|---|"]
    for label, r in rows:
        k1 = (r.get("attack_k1") or {}).get("refusal_rate_harmful")
        kl = "0" if label == "original" else fmt_mean(r.get("kl_harmless"))
        lines.append(f"| {label} | {fmt_rate(r.get('refusal_rate_harmful'))} | {fmt_rate(r.get('refusal_rate_harmless'))} | "
                     f"{fmt_rate(r.get('overrefusal_rate'))} | {kl} | {fmt_mean(r.get('ce_harmless'))} | {fmt_rate(k1)} |")
    tr = s.get("training", {})
    if tr:
        lines.append("")
        lines.append("Training (LoRA, same steps and batches for every variant): " + "; ".join(
            f"{k} {v['seconds'] / 60:.1f} min of step time, {v['tokens_per_s']:.0f} tokens/s"
            + (f", median step {v['median_step_s']:.1f} s over {v['timed_steps']} timed steps" if "median_step_s" in v else "")
            for k, v in tr.items()) + " (the background run's clock: what ran beside it counts).")
    return "\n".join(lines)


def ce_at_star(details: dict[str, Any], star: int | None) -> str:
    """The lowest harmless CE among the estimators that break the model at K*_break (blank if unbroken)."""
    # an estimator that broke at K has its CE measured at K (``ce_k`` is its K_break)
    ces = [d["ce_harmless_at_k"] for d in details.values()
           if star is not None and d.get("k_break") == star and d.get("ce_harmless_at_k") is not None]
    return fmt_mean(min(ces)) if ces else "n/a"


def headline_table(s: dict[str, Any]) -> str:
    """K_break per model and estimator (notebook 04), K*_break in bold, the paper's figure beside it."""
    kb = s.get("k_break")
    if not kb:
        return ""
    ests = [e for e in ("iterated", "dim-svd", "pca-centered", "cov-diff", "inlp", "optimized")
            if any(e in v for m, v in kb.items() if not m.endswith("_star"))]
    det = s.get("sweep_details", {})
    reached = lambda m, e: det.get(m, {}).get(e, {}).get("info", {}).get("k_reached", "?")
    fmt = lambda k, m, e: f"> {reached(m, e)}" if k is None else str(k)
    ce0 = s.get("sweep_ce_no_ablation", {})
    lines = ["| model | " + " | ".join(ests) + " | **K\\*_break** | CE at K\\*_break (unattacked) | paper's K to break |",
             "|---|" + "---|" * (len(ests) + 3)]
    for m, v in kb.items():
        if m.endswith("_star"):
            continue
        star = kb.get(m + "_star")
        unbroken = [reached(m, e) for e, k in v.items() if k is None]
        short = [r for r in unbroken if isinstance(r, int) and star is not None and r < star]
        # an estimator that stopped unbroken below the cheapest break leaves K*_break anywhere up to it
        star_s = (f"<= {star}" if short or "?" in unbroken else str(star)) if star is not None else \
            f"> {min(unbroken, key=lambda r: (not isinstance(r, int), r if isinstance(r, int) else 0), default='?')}"
        lines.append(f"| {m} | " + " | ".join(fmt(v.get(e), m, e) if e in v else "" for e in ests)
                     + f" | **{star_s}** | {ce_at_star(det.get(m, {}), star)} ({fmt_mean(ce0.get(m))}) | {PAPER_K.get(m, '')} |")
    thr = s.get("sweep_config", {}).get("threshold", 0.30)
    lines.append("")
    lines.append(f"K_break: the smallest K whose generated harmful refusal rate (marker judge) is below {thr}; "
                 "\"> K\": not broken up to the largest K the estimator reached. CE: mean token cross-entropy of the "
                 "original model's greedy harmless completions under the attack (coherence), lowest over the estimators "
                 "that break at K\\*. Paper: Llama-3.2-1B-Instruct, iterated attacker only.")
    return "\n".join(lines)


def probes_line(s: dict[str, Any]) -> str:
    """Notebook 05 at each model's attacker layer, in one line: the held-out and last-token probes, the
    scale-free counts of directions, and the reading's case."""
    site = s.get("probes_site", {})
    pr = s.get("probes", {})
    last = s.get("probes_last_token", {})
    case = s.get("probes_reading", {})
    if not site:
        return ""
    parts = []
    for m, v in site.items():
        r = pr.get(m, {}).get(str(v["layer"]), {})
        if "k_erase" not in r:  # a summary written before notebook 05 measured k_erase: what it measured then
            parts.append(f"{m} (layer {v['layer']}): effective rank {r.get('effective_rank')}, linear probe {r.get('linear_acc')}, "
                         f"MLP probe {r.get('mlp_acc')}, k_chance {r.get('k_chance') if r.get('k_chance') is not None else '> INLP rounds'}")
            continue
        k = r["k_erase"] if r["k_erase"] is not None else f"> {r.get('k_erase_budget')}"
        lt = (last.get(m) or {}).get("linear_acc")
        parts.append(f"{m} (layer {v['layer']}): held-out linear probe {r.get('linear_acc')}"
                     + (f", last-token probe {lt}" if lt is not None else "")
                     + f", k_erase {k}, whitened eigenvalues above the noise edge {(r.get('whitened') or {}).get('n_sig')}"
                     + (f", read as {case[m]['case']}" if m in case else ""))
    return "Probes at the attacker's layer: " + "; ".join(parts) + "."


def gallery(profile: str) -> str:
    """Every figure of the profile, in notebook order, as Markdown image links."""
    from .results import figures_dir

    figs = sorted(figures_dir(profile).glob("*.png"))
    return "\n".join(f"- `{f.stem}`: ![{f.stem}]({f.relative_to(REPO_ROOT).as_posix()})" for f in figs)


def hand_count(labels: list[dict[str, Any]], checkpoint: str, attack: str = "k1_reselected") -> tuple[int, int] | None:
    """(refusals, n) among the hand labels of ``checkpoint``'s completions under ``attack`` (rows drawn by
    ``tools/judge_sample.py --from-screen``, which records the checkpoint's cache name), or None if none.
    Rows written before the tool's attack name lost its " (screen)" suffix count under the same attack."""
    rows = [r for r in labels if r.get("checkpoint") == checkpoint
            and (r.get("attack") or "").removesuffix(" (screen)") == attack]
    return (sum(bool(r["refusal"]) for r in rows), len(rows)) if rows else None


def _fix3(x: float | None) -> str:
    """Three decimals, halves rounded up as in the text (0.7625 = 122/160 reads 0.763, not float's 0.762)."""
    from decimal import ROUND_HALF_UP, Decimal

    return "" if x is None else str(Decimal(str(x)).quantize(Decimal("0.001"), ROUND_HALF_UP))


def _k1_direction(screen: dict[str, Any]) -> str:
    """How the re-selected K=1 attack found its direction: selected, or a fallback with its own KL; and the
    splits where the attacker's refusal filter kept too few prompts."""
    k1 = screen.get("k1_reselected") or {}
    d = k1.get("direction") or {}
    if not d:
        return ""
    text = (f"fallback (KL {_fix3(d['kl_harmless'])})" if d.get("fallback") else "selected") \
        + f", layer {d.get('layer')}"
    starved = k1.get("filter_fallback") or {}
    if starved:
        text += "; starved filter: " + ", ".join(f"{k} {v} passed" for k, v in sorted(starved.items()))
    return text


def _screen_k(screen: dict[str, Any]) -> str:
    """The screen's K_break with the K it generated when there were several ("4 (1, 2, 4)"). A K in the list
    was generated by at least one of the screen's estimators, not necessarily by the one that broke the model;
    a K missing from it by none: the screen's K_break is an upper bound, which notebook 04's walk settles."""
    ks = screen.get("k_screened") or []
    return f"{screen.get('k_break', '')}" + (f" ({', '.join(map(str, ks))})" if len(ks) > 1 else "")


def progress_table(doc: dict[str, Any], labels: list[dict[str, Any]]) -> str:
    """The budget curve as far as the background queue has measured it (``results/<profile>/
    queue_progress.json``): every measured checkpoint's rates, first-token KL, CE, what the re-selected K=1
    attack leaves (marker judge; hand labels of the same checkpoint's attacked completions where read) and
    the screen's K_break. Notebook 03 draws the same entries once the queue has finished."""
    from .defense_run import checkpoint_name

    variants = doc.get("variants") or {}
    if not variants:
        return ""
    orig = doc.get("original") or {}
    r = lambda e, k: _fix3((e.get(k) or {}).get("rate"))
    dtypes = {d for d in [orig.get("dtype")] + [v.get("dtype") for v in variants.values()] if d}
    one = len(dtypes) == 1
    tag = lambda d: "" if one else f" ({d})"
    lines = [f"Read at commit `{doc.get('read_at_commit')}` from the run cache (`refusal-rank progress --write`)"
             + (f", every model in {next(iter(dtypes))}" if one else "") + "; rates on the test sets, marker judge, "
             "with the hand-read count where completions were labelled.", "",
             "| model | budget (steps) | harmful refusal | harmless | over-refusal | first-token KL | CE | left under "
             "re-selected K=1 (markers; by hand) | K=1 direction | screen K_break (K tried) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if orig:
        lines.append(f"| original{tag(orig.get('dtype'))} | | {r(orig, 'refusal_rate_harmful')} | "
                     f"{r(orig, 'refusal_rate_harmless')} | {r(orig, 'overrefusal_rate')} | 0 | | | | |")
    for name, v in variants.items():
        for label, e in (v.get("budget") or {}).items():
            screen = e.get("screen") or {}
            k1 = (screen.get("k1_reselected") or {}).get("refusal_rate_harmful") or {}
            left = _fix3(k1.get("rate"))
            hand = hand_count(labels, checkpoint_name(v.get("dir"), e.get("step"), e.get("snapshot_sha256") or ""))
            if hand:
                left += f"; {hand[0]}/{hand[1]}"
            kl = (e.get("kl_harmless") or {}).get("mean")
            ce = e.get("ce_harmless")
            lines.append(f"| `{name}`{tag(v.get('dtype'))} | {label} ({e.get('step')}) | {r(e, 'refusal_rate_harmful')} | "
                         f"{r(e, 'refusal_rate_harmless')} | {r(e, 'overrefusal_rate')} | "
                         f"{_fix3(kl)} | {_fix3(ce)} | {left} | "
                         f"{_k1_direction(screen)} | {_screen_k(screen)} |")
    moments = [(name, v) for name, v in variants.items() if v.get("moments")]
    if moments:
        lines += ["", "Moment diagnostics on fixed defense prompts, read at the variant's sites, before training and at "
                  "each variant's last measured milestone; the matched term's value at the start and end of training "
                  "against its noise floor (the same term between two halves of the harmless class):", "",
                  "| model | at | sites | matched term: start -> end (noise floor) | class-mean gap² | total variance | "
                  "top eigenvalue of the excess second moment |", "|---|---|---|---|---|---|---|"]
        arrow = lambda m, k: f"{m[k + '_before']:.0f} -> {m[k + '_after']:.0f}" if k + "_before" in m else ""
        for name, v in moments:
            m = v["moments"]
            last = max(v.get("milestones") or [0])
            term = (f"{m['term']}: {_fix3(m['start'])} -> {_fix3(m['end'])} ({_fix3(m['noise_floor'])})"
                    if m.get("term") else "none")
            at = next((label for label, e in (v.get("budget") or {}).items() if e.get("step") == last), f"step {last}")
            lines.append(f"| `{name}` | {at} | {m.get('sites', '')} | {term} | {arrow(m, 'gap_sq')} | {arrow(m, 'total_var')} | "
                         f"{arrow(m, 'top_eig')} |")
    return "\n".join(lines)


def render_progress(profile: str) -> str:
    """:func:`progress_table` of the committed ``queue_progress.json`` and hand labels ("" without one)."""
    import json

    from .judge import load_labels
    from .results import progress_path

    path = progress_path(profile)
    if not path.is_file():
        return ""
    return progress_table(json.loads(path.read_text()), load_labels())


def render(profile: str) -> str:
    s = read_summary(profile)
    if not s:
        return f"_No results for profile `{profile}` yet: run `./run_all.sh --profile {profile}`._"
    head = f"Profile `{profile}`, model `{s['model']}`, commit `{s['commit']}`, {s['created'][:10]}.\n\n"
    parts = [headline_table(s), k1_table(s), defense_table(s), probes_line(s), timings_line(s)]
    return head + "\n\n".join(p for p in parts if p)


def _block(kind: str, profile: str) -> re.Pattern:
    return re.compile(rf"(<!-- {kind}:{re.escape(profile)}:begin -->\n).*?(<!-- {kind}:{re.escape(profile)}:end -->)", re.S)


def write_readme(profile: str, kinds: tuple[str, ...] = ("results", "gallery", "progress")) -> bool:
    """Replace the README's generated blocks for ``profile``: results (tables), gallery (figures) and
    progress (the background queue's measured checkpoints), each where the README has it. False if it has
    none of ``kinds``."""
    path = REPO_ROOT / "README.md"
    text = path.read_text()
    make = {"results": render, "gallery": gallery, "progress": render_progress}
    found = [k for k in kinds if _block(k, profile).search(text)]
    for kind in found:
        body = make[kind](profile)
        text = _block(kind, profile).sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    path.write_text(text)
    return bool(found)


def readme_block(profile: str, kind: str = "results") -> str | None:
    text = (REPO_ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {kind}:{re.escape(profile)}:begin -->\n(.*?)<!-- {kind}:{re.escape(profile)}:end -->", text, re.S)
    return m.group(1).removesuffix("\n") if m else None


if __name__ == "__main__":
    import sys

    from .cli import main as cli_main

    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--headline", action="store_true", help="print only the headline tables (run_all.sh's summary)")
    a = ap.parse_args()
    # the same command as `refusal-rank report` (one sentence and exit 2 for an unknown profile)
    sys.exit(cli_main(["report", "--profile", a.profile] + ["--write-readme"] * a.write_readme + ["--headline"] * a.headline))
