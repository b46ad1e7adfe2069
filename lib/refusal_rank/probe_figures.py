"""Notebook 05's figures (kept apart from :mod:`refusal_rank.plotting`, whose style they reuse: that
module's :func:`~refusal_rank.plotting.save` writes them). Every figure states its n."""
from __future__ import annotations

from typing import Any

import numpy as np

from .plotting import plt, sns  # noqa: F401  (plotting sets the theme and the Agg backend)


def _layers(by_layer: dict[Any, Any]) -> list:
    return sorted(by_layer, key=int)


def per_layer(reports: dict[str, dict[Any, dict[str, Any]]], last_token: dict[str, dict[str, Any]], threshold: float,
              n: dict[str, Any]) -> plt.Figure:
    """Per layer and model: held-out linear (95% CI band) and MLP probe, the last-token probe; held-out
    separability (squared d'); the whitened class difference's eigenvalues above its noise edge (number and
    participation ratio);
    k_erase (open marker at the budget: not reached)."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for m, by_layer in reports.items():
        ls = _layers(by_layer)
        x = [int(l) for l in ls]
        lin = axes[0].plot(x, [by_layer[l]["linear_acc"] for l in ls], marker="o", ms=3, label=f"{m} linear")[0]
        c = lin.get_color()
        ci = [by_layer[l].get("linear_ci") or {} for l in ls]
        if all("lo" in r for r in ci):
            axes[0].fill_between(x, [r["lo"] for r in ci], [r["hi"] for r in ci], color=c, alpha=0.12, lw=0)
        axes[0].plot(x, [by_layer[l]["mlp_acc"] for l in ls], marker="^", ms=3, ls="--", color=c, label=f"{m} MLP")
        lt = (last_token.get(m) or {}).get("by_layer") or {}
        if lt:
            lk = sorted(lt, key=int)
            axes[0].plot([int(l) for l in lk], [lt[l] for l in lk], ls=":", color=c, label=f"{m} last token")
        axes[1].plot(x, [max(by_layer[l]["separability"], 1e-3) for l in ls], marker="o", ms=3, color=c, label=m)
        axes[2].plot(x, [by_layer[l]["whitened"]["rank"] for l in ls], marker="o", ms=3, color=c, label=f"{m} ratio")
        axes[2].plot(x, [by_layer[l]["whitened"]["n_sig"] for l in ls], marker="s", ms=3, ls="--", color=c, label=f"{m} n_sig")
        ke = [by_layer[l]["k_erase"] for l in ls]
        axes[3].plot(x, [np.nan if k is None else k for k in ke], marker="o", ms=3, color=c, label=m)
        miss = [(xi, by_layer[l]["k_erase_budget"]) for xi, l, k in zip(x, ls, ke) if k is None]
        if miss:
            axes[3].plot(*zip(*miss), ls="none", marker="o", mfc="none", ms=6, color=c)
    axes[0].axhline(threshold, color="black", lw=1, ls=":")
    axes[0].set_ylabel("held-out accuracy")
    axes[0].legend(fontsize=5.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    axes[1].set_yscale("log")
    axes[1].set_ylabel("held-out separability (d'^2)")
    axes[2].set_ylabel("whitened class difference")
    axes[2].set_title("participation ratio (solid) and number (dashed) of\neigenvalues above the noise edge", fontsize=8)
    axes[2].legend(fontsize=5.5, ncol=2)
    axes[3].set_ylabel("k_erase")
    axes[3].set_title(f"directions erased until linear acc <= {threshold}\n(open marker at the budget: not reached)", fontsize=8)
    axes[3].legend(fontsize=6)
    for ax in axes:
        ax.set_xlabel("layer (block input)")
    fig.suptitle(f"Per layer, pooled post-instruction activations (probe train n={n['train']}, held-out test n={n['test']}, "
                 "same sources)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def spectra(raw: dict[str, Any], whitened: dict[str, dict[str, Any]], layer_of: dict[str, int], n: int, top: int = 64) -> plt.Figure:
    """At the attacker's layer: the unwhitened excess second moment's leading eigenvalues over its largest
    (scale removed, shape only) and the whitened class difference's eigenvalues with the noise edge."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
    for m, ev in raw.items():
        ev = np.clip(np.asarray(ev, dtype=float)[:top], 0, None)
        line = axes[0].plot(np.arange(1, len(ev) + 1), ev / max(ev[0], 1e-12), marker="o", ms=2.5,
                            label=f"{m} (layer {layer_of[m]})")[0]
        w = whitened[m]
        vals = np.asarray(w["vals"], dtype=float)[:top]
        axes[1].plot(np.arange(1, len(vals) + 1), vals, marker="o", ms=2.5, color=line.get_color(), label=m)
        axes[1].axhline(w["edge"], color=line.get_color(), lw=0.8, ls=":")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("eigenvalue index")
    axes[0].set_ylabel("eigenvalue / largest")
    axes[0].set_title(f"Excess second moment (unwhitened), train n={n}", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("symlog", linthresh=0.1)
    axes[1].set_xlabel("eigenvalue index")
    axes[1].set_ylabel("extra harmful energy / harmless spread")
    axes[1].set_title("Whitened class difference (dotted: the noise edge, from random halves of the harmless prompts)", fontsize=8)
    fig.tight_layout()
    return fig


def attack_share(shares: dict[str, dict[str, dict[str, dict[str, float]]]], n: dict[str, Any]) -> plt.Figure:
    """Per model at its attacker's layer: the share of held-out separability in each attacker's top k
    directions (solid) and what remains once they are projected out (hatched)."""
    models = list(shares)
    fig, axes = plt.subplots(1, len(models), figsize=(3.8 * len(models), 3.4), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], models):
        ests = list(shares[m])
        ks = sorted({int(k) for e in ests for k in shares[m][e]})
        width = 0.8 / max(1, 2 * len(ks))
        pal = sns.color_palette("deep", len(ks))
        for j, k in enumerate(ks):
            for i, e in enumerate(ests):
                r = shares[m][e].get(str(k)) or shares[m][e].get(k)
                if not r:
                    continue
                x0 = i + (2 * j - len(ks)) * width
                ax.bar(x0, r["held"], width, color=pal[j], label=f"top {k}: held" if i == 0 else None)
                ax.bar(x0 + width, r["remains"], width, color="white", edgecolor=pal[j], hatch="//",
                       label=f"top {k}: remains" if i == 0 else None)
        ax.set_xticks(range(len(ests)))
        ax.set_xticklabels(ests, rotation=35, ha="right", fontsize=7)
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_title(m)
    axes[0][0].set_ylabel("share of held-out separability")
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"What each attack's top directions hold against what remains (train n={n['train']}, test n={n['test']})",
                 fontsize=9)
    fig.tight_layout()
    return fig


def by_source(rows: dict[str, dict[str, dict[str, Any]]], layer_of: dict[str, int], n: dict[str, Any]) -> plt.Figure:
    """Per model at its attacker's layer: held-out accuracy per source (same-source probe) and, labelled
    apart, cross-source transfer (AdvBench-trained probe) and over-refusal called harmless; 95% intervals.
    rows: {model: {label: {acc, lo, hi, n}}}."""
    models = list(rows)
    labels = list(dict.fromkeys(k for m in models for k in rows[m]))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(labels), 3.6))
    pal = sns.color_palette("deep", len(models))
    for i, m in enumerate(models):
        for j, lab in enumerate(labels):
            r = rows[m].get(lab)
            if not r:
                continue
            x = j + (i - (len(models) - 1) / 2) * width
            ax.bar(x, r["acc"], width, color=pal[i], hatch="//" if lab.startswith(("transfer", "over")) else None,
                   edgecolor="white", label=f"{m} (layer {layer_of[m]})" if j == 0 else None)
            ax.errorbar(x, r["acc"], yerr=[[r["acc"] - r["lo"]], [r["hi"] - r["acc"]]], color="black", capsize=2, lw=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{lab}\n(n={next(rows[m][lab]['n'] for m in models if lab in rows[m])})" for lab in labels], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Linear probe per source (hatched: cross-source transfer, over-refusal called harmless)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
