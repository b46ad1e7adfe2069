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
