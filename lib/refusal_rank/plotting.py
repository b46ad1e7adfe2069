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
                  selected: tuple[int, int], n_val: int, note: str = "") -> plt.Figure:
    """Mean harmful-val refusal score under ablation of each candidate (layer x position)."""
    grid = np.full((len(post_tokens), n_layers), np.nan)
    for (l, p), v in scores.items():
        grid[p, l] = v
    fig, ax = plt.subplots(figsize=(max(6, n_layers * 0.35), 2.6))
    sns.heatmap(grid, ax=ax, cmap="RdBu_r", center=0, cbar_kws={"label": "refusal score"},
                yticklabels=[repr(t)[1:-1] for t in post_tokens], mask=np.isnan(grid))
    ax.add_patch(plt.Rectangle((selected[0], selected[1]), 1, 1, fill=False, lw=2.5, ec="black"))
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
        for j, s in enumerate(sets):
            r = next((x for x in rows if x["model"] == m and x["set"] == s), None)
            if r is None:
                continue
            x = j + (i - (len(models) - 1) / 2) * width
            ax.bar(x, r["rate"], width, color=pal[i], label=m if j == 0 else None)
            ax.errorbar(x, r["rate"], yerr=[[r["rate"] - r["lo"]], [r["hi"] - r["rate"]]], color="black", capsize=3, lw=1)
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels([f"{s}\n(n={next(x['n'] for x in rows if x['set'] == s)})" for s in sets])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("refusal rate (marker judge)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 1.0))
    return fig
