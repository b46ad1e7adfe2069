"""Figures of the series. Each function returns a matplotlib figure; :func:`save` writes PNG and PDF to
``figures/<profile>/`` under a name that starts with the notebook and section that draws it
(e.g. ``01_2_refusal_score_heatmap``). Every figure states its n."""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

from .results import figure_path  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def save(fig: plt.Figure, cfg: dict[str, Any], name: str) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        p = figure_path(cfg, f"{name}.{ext}")
        # fixed metadata so reruns give identical bytes where the content is identical
        meta = {"Software": None} if ext == "png" else {"Creator": None, "Producer": None, "CreationDate": None}
        fig.savefig(p, dpi=130, bbox_inches="tight", metadata=meta)
        paths.append(str(p))
    return paths


def score_heatmap(scores: dict[tuple[int, int], float], n_layers: int, post_tokens: Sequence[str],
                  selected: tuple[int, int], n_val: int, note: str = "", max_layer: int | None = None) -> plt.Figure:
    """Mean harmful-val refusal score under ablation of each candidate (layer x position)."""
    grid = np.full((len(post_tokens), n_layers), np.nan)
    for (l, p), v in scores.items():
        grid[p, l] = v
    fig, ax = plt.subplots(figsize=(max(6, n_layers * 0.35), 2.6))
    sns.heatmap(grid, ax=ax, cmap="RdBu_r", center=0, cbar_kws={"label": "refusal score"},
                yticklabels=[repr(t)[1:-1] for t in post_tokens], mask=np.isnan(grid))
    ax.add_patch(plt.Rectangle((selected[0], selected[1]), 1, 1, fill=False, lw=2.5, ec="black"))
    ax.grid(False)
    excluded = n_layers if max_layer is None else max_layer
    if excluded < n_layers:
        ax.axvspan(excluded, n_layers, color="0.92", zorder=0)
        ax.text((excluded + n_layers) / 2, len(post_tokens) / 2, "last 20%\nnot candidates", ha="center", va="center", fontsize=8)
    ax.set_xlabel("layer (block input)")
    ax.set_ylabel("post-instruction token")
    ax.set_title(f"Harmful val refusal score under ablation of each candidate (n={n_val}; box: selected){note}")
    return fig


def direction_norms(dirs: torch.Tensor, post_tokens: Sequence[str], n_train: int) -> plt.Figure:
    """Norm of the difference in means per layer, one line per post-instruction position."""
    norms = dirs.norm(dim=-1).numpy()  # (layers, positions)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for p, t in enumerate(post_tokens):
        ax.plot(norms[:, p], marker="o", ms=3, label=repr(t)[1:-1])
    ax.set_xlabel("layer (block input)")
    ax.set_ylabel("||mean(harmful) - mean(harmless)||")
    ax.set_title(f"Difference in means per layer (n={n_train} per class)")
    ax.legend(title="position", fontsize=8, ncol=2)
    return fig


def rate_bars(rows: list[dict[str, Any]], title: str) -> plt.Figure:
    """Grouped bars of refusal rates with 95% bootstrap intervals.
    rows: [{"model": ..., "set": ..., "rate": r, "lo": lo, "hi": hi, "n": n}]"""
    models = list(dict.fromkeys(r["model"] for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(sets), 3.4))
    pal = sns.color_palette("deep", len(models))
    for i, m in enumerate(models):
        labelled = False
        for j, s in enumerate(sets):
            r = next((x for x in rows if x["model"] == m and x["set"] == s), None)
            if r is None:
                continue
            x = j + (i - (len(models) - 1) / 2) * width
            ax.bar(x, r["rate"], width, color=pal[i], label=None if labelled else m)
            labelled = True
            ax.errorbar(x, r["rate"], yerr=[[r["rate"] - r["lo"]], [r["hi"] - r["rate"]]], color="black", capsize=3, lw=1)
            ax.text(x, r["hi"] + 0.02, f"{r['rate']:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels([f"{s}\n(n={next(x['n'] for x in rows if x['set'] == s)})" for s in sets])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("refusal rate (marker judge)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def training_curves(records: dict[str, dict[str, Any]]) -> plt.Figure:
    """Every loss term per step, one panel per term, one line per variant (and the periodic val evals)."""
    terms = sorted({k for r in records.values() for h in r["history"] for k in h if k not in ("step",)})
    evals = ["val_refusal_score", "val_kl_harmless", "k1_best_ablated_score"]
    n = len(terms) + len(evals)
    cols = 4
    rows_ = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 2.8 * rows_), squeeze=False)
    for ax, term in zip(axes.flat, terms + evals):
        for name, r in records.items():
            src = r["evals"] if term in evals else r["history"]
            xs = [h["step"] for h in src if term in h]
            ys = [h[term] for h in src if term in h]
            if xs:
                ax.plot(xs, ys, marker="o" if term in evals else None, ms=3, label=name)
        ax.set_title(term + (" (val)" if term in evals else ""))
        ax.set_xlabel("step")
        if term in ("cov", "mean", "abl", "kd"):
            ax.set_yscale("symlog", linthresh=1e-4)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def before_after_table(base: dict[str, Any], results: dict[str, dict[str, Any]]):
    """DataFrame: the original vs each trained model (rates with intervals, KL, CE, re-selected K=1 attack)."""
    import pandas as pd

    def rate(r):
        return f"{r['rate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]" if r else ""

    def mean(r):
        return f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]" if isinstance(r, dict) else (f"{r:.3f}" if r is not None else "")

    rows = []
    for name, r in [("original", base), *results.items()]:
        rows.append({"model": name, "harmful": rate(r.get("refusal_rate_harmful")), "harmless": rate(r.get("refusal_rate_harmless")),
                     "over-refusal": rate(r.get("overrefusal_rate")), "KL harmless": mean(r.get("kl_harmless")),
                     "CE harmless": mean(r.get("ce_harmless")),
                     "harmful under re-selected K=1": rate((r.get("attack_k1") or {}).get("refusal_rate_harmful"))})
    return pd.DataFrame(rows).set_index("model")


def sweep_curves(sweeps: dict[str, dict[str, dict[str, Any]]], threshold: float, n: int) -> plt.Figure:
    """Harmful refusal vs K, one panel per model, one line per estimator: the score proxy (share of prompts
    with a positive refusal score, dashed) and the generated, marker-judged rate with its interval (points).
    Panels share the K axis; estimators are offset slightly along it so that equal values stay visible."""
    models = list(sweeps)
    ests = list(dict.fromkeys(e for m in models for e in sweeps[m]))
    colors = dict(zip(ests, sns.color_palette("tab10")))
    shift = {e: 2 ** (0.07 * (i - (len(ests) - 1) / 2)) for i, e in enumerate(ests)}
    k_all = sorted({int(k) for m in models for r in sweeps[m].values() for k in r["per_k"]} or {1})
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.6), sharey=True, sharex=True, squeeze=False)
    for ax, m in zip(axes[0], models):
        for e, res in sweeps[m].items():
            ks = sorted(res["per_k"], key=int)
            c = colors[e]
            x = lambda kk: [int(k) * shift[e] for k in kk]
            if ks:
                ax.plot(x(ks), [res["per_k"][k]["score_rate"] for k in ks], lw=1, alpha=0.6, color=c, ls="--")
            gk = [k for k in ks if "refusal_rate_harmful" in res["per_k"][k]]
            if gk:
                r = [res["per_k"][k]["refusal_rate_harmful"] for k in gk]
                y = np.array([v["rate"] for v in r])
                err = np.array([[v["rate"] - v["lo"] for v in r], [v["hi"] - v["rate"] for v in r]])
                ax.errorbar(x(gk), y, yerr=err, fmt="o", color=c, ms=4, capsize=2, label=e)
            else:
                ax.plot([], [], "o", color=c, label=e)
        ax.axhline(threshold, color="black", lw=1, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlim(0.7, max(k_all) * 1.4)
        ticks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= max(k_all)]
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_xlabel("K (directions ablated)")
        ax.set_title(m)
        ax.set_ylim(-0.03, 1.03)
    axes[0][0].set_ylabel("harmful refusal (test)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(ests), fontsize=8, frameon=False)
    fig.suptitle(f"Rank-K ablation, weight edit (n={n} harmful test prompts; dashed: share with refusal score > 0, "
                 f"points: generated rate with 95% CI; dotted: broken below {threshold})", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def k_break_frame(k_break: dict[str, Any], estimators: Sequence[str], reached: dict[str, dict[str, int]]):
    """K_break table (models x estimators) as a DataFrame with K_break* beside it; an unbroken cell reads
    "> K" with the largest K that estimator reached."""
    import pandas as pd

    rows = {}
    for m, v in k_break.items():
        if m.endswith("_star"):
            continue
        rows[m] = {e: (v.get(e) if v.get(e) is not None else f"> {reached.get(m, {}).get(e, '?')}") for e in estimators}
        star = k_break.get(f"{m}_star")
        rows[m]["K_break*"] = star if star is not None else f"> {min(reached.get(m, {}).values(), default='?')}"
    return pd.DataFrame(rows).T


def probe_layers(reports: dict[str, dict[int, dict[str, Any]]], threshold: float, n: dict[str, int]) -> plt.Figure:
    """Per layer and model: effective rank of the excess second moment, linear and MLP probe accuracy, k_chance."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    for m, by_layer in reports.items():
        ls = sorted(by_layer, key=int)
        x = [int(l) for l in ls]
        line = axes[0].plot(x, [by_layer[l]["effective_rank"] for l in ls], marker="o", ms=3, label=m)[0]
        axes[1].plot(x, [by_layer[l]["linear_acc"] for l in ls], marker="o", ms=3, color=line.get_color(), label=f"{m} linear")
        axes[1].plot(x, [by_layer[l]["mlp_acc"] for l in ls], marker="^", ms=3, ls="--", color=line.get_color(), label=f"{m} MLP")
        kc = [by_layer[l]["k_chance"] for l in ls]
        axes[2].plot(x, [np.nan if k is None else k for k in kc], marker="o", ms=3, color=line.get_color(), label=m)
    axes[0].set_ylabel("effective rank (participation ratio)")
    axes[1].set_ylabel("held-out probe accuracy")
    axes[1].axhline(threshold, color="black", lw=1, ls=":")
    axes[2].set_ylabel("k_chance")
    axes[2].set_title(f"INLP directions until linear acc <= {threshold}\n(no point: not reached in the INLP budget)", fontsize=8)
    for ax in axes:
        ax.set_xlabel("layer (block input)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"Per layer, pooled post-instruction activations (train n={n['train']}, held-out test n={n['test']})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def spectra(eigs: dict[str, torch.Tensor], layer_of: dict[str, int], n: int, top: int = 64) -> plt.Figure:
    """Leading eigenvalues of the excess second moment (harmful over harmless), normalised by the largest."""
    fig, ax = plt.subplots(figsize=(5.5, 3.3))
    for m, ev in eigs.items():
        ev = ev[:top].clamp_min(0).numpy()
        ax.plot(np.arange(1, len(ev) + 1), ev / max(ev[0], 1e-12), marker="o", ms=2.5, label=f"{m} (layer {layer_of[m]})")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue / largest")
    ax.legend(fontsize=7)
    ax.set_title(f"Spectrum of the excess second moment (train split, pooled, n={n})", fontsize=9)
    fig.tight_layout()
    return fig


def removal_curves(curves: dict[str, dict[str, dict[int, float]]], threshold: float, n: dict[str, int]) -> plt.Figure:
    """Linear probe accuracy vs directions removed, one panel per model, one line per basis."""
    models = list(curves)
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.2), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], models):
        for name, c in curves[m].items():
            ks = sorted(c, key=int)
            ax.plot([int(k) for k in ks], [c[k] for k in ks], marker="o", ms=3, label=name)
        ax.axhline(threshold, color="black", lw=1, ls=":")
        ax.set_xscale("symlog", base=2, linthresh=1)
        ax.set_xlabel("directions removed")
        ax.set_title(m)
    axes[0][0].set_ylabel("linear probe accuracy (held out)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Linear probe at the attacker's layer as directions are removed (train n={n['train']}, test n={n['test']})", fontsize=9)
    fig.tight_layout()
    return fig


def term_vs_floor(records: dict[str, dict[str, Any]]) -> plt.Figure:
    """Each moment variant's matched term per step beside its noise floor (the same term on two halves of
    the harmless class), one panel per variant: a term that falls into the band of its floor has matched
    the classes as far as its estimate can tell."""
    rows = [(n, r, "cov" if r["variant"].get("lambda_cov") else "mean") for n, r in records.items()
            if r["variant"].get("lambda_cov") or r["variant"].get("lambda_mean")]
    fig, axes = plt.subplots(1, max(1, len(rows)), figsize=(4.2 * max(1, len(rows)), 3.0), squeeze=False)
    for ax, (name, r, key) in zip(axes.flat, rows):
        h = [x for x in r["history"] if key in x]
        ax.plot([x["step"] for x in h], [x[key] for x in h], label=f"L_{key} (harmful vs harmless)")
        hn = [x for x in h if f"{key}_null" in x]
        ax.plot([x["step"] for x in hn], [x[f"{key}_null"] for x in hn], color="0.55", lw=0.8,
                label="same term, two halves of harmless (noise floor)")
        ax.axhline(0, color="0.3", lw=0.6)
        ax.set_title(f"{name}: L_{key}")
        ax.set_xlabel("step")
    if not rows:
        axes.flat[0].axis("off")
    else:
        axes.flat[0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def screen_vs_budget(budget: dict[str, dict[str, dict[str, Any]]], threshold: float,
                     paper_k: dict[str, float]) -> plt.Figure:
    """Per variant, the attack screen's generated harmful refusal rate against prompt passes: the
    re-selected K=1 attack, each iterated round and each dim-svd K (left), and the screen's K_break with
    the paper's K values as reference lines (right)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    names = sorted(budget)
    for i, name in enumerate(names):
        pts = sorted(budget[name].values(), key=lambda e: e["prompt_passes"])
        xs = [e["prompt_passes"] for e in pts]
        ys = [e["screen"]["k1_reselected"]["refusal_rate_harmful"]["rate"] if e.get("screen") else np.nan for e in pts]
        ax.plot(xs, ys, marker="o", label=f"{name}: K=1 re-selected", color=f"C{i}")
        own = [e.get("refusal_rate_harmful", {}).get("rate", np.nan) for e in pts]
        ax.plot(xs, own, ls=":", color=f"C{i}", label=f"{name}: unattacked")
        kb = [(e["screen"] or {}).get("k_break") for e in pts]
        top = max((max(e["screen"]["k_screened"]) for e in pts if e.get("screen")), default=1)
        ax2.plot(xs, [k if k is not None else top + 1 for k in kb], marker="s", color=f"C{i}", label=name)
    ax.axhline(threshold, color="0.3", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt passes")
    ax.set_ylabel("harmful refusal (generated)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, ncol=2)
    for label, k in paper_k.items():
        ax2.axhline(k, color="0.5", ls=":", lw=0.8)
        ax2.annotate(label, (0.01, k), xycoords=("axes fraction", "data"), fontsize=7, color="0.35", va="bottom")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log", base=2)
    ax2.set_xlabel("prompt passes")
    ax2.set_ylabel("screen K_break (top: none broke)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig
