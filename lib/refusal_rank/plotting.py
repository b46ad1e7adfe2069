"""Figures of the series, drawn the same way in a notebook, from the command line and in a test.

Every figure function takes the numbers a notebook has at hand, reduces them to the plain (JSON) values
the figure shows, and draws from those values only. :func:`save` writes the figure as a 300 dpi PNG and
a PDF with embedded TrueType fonts to ``figures/<profile>/``, and the values beside the summary in
``results/<profile>/figure_data/<name>.json``: :func:`redraw` draws every figure again from that folder
alone, with no model (``refusal-rank figures``). Names start with the notebook and section that draw
them (``01_2_refusal_score_heatmap``); every figure states its n.

Style, fixed once for every figure: the Okabe-Ito palette (distinguishable with the common colour-vision
deficiencies), and one colour and one marker per model and per estimator, the same in every figure, so
that "defended" is the same blue square wherever it appears. Widths are those of a printed page: one
column (3.35 in) or two (6.9 in).

No backend is forced: in a Jupyter kernel figures are shown inline where they are saved; a process
without a display falls back to matplotlib's Agg by itself.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

ONE_COLUMN = 3.35  # inches: one column of a two-column page
TWO_COLUMNS = 6.9  # inches: the full text width
DPI = 300

STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "0.88",
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "figure.dpi": 110,  # inline display in a notebook; files use DPI
    "savefig.dpi": DPI,
    "pdf.fonttype": 42,  # TrueType, embedded: text stays text in the PDF (Type 3 otherwise)
    "ps.fonttype": 42,
    "svg.fonttype": "none",
}
mpl.rcParams.update(STYLE)

# Okabe & Ito (2008), "Color Universal Design"
BLACK, ORANGE, SKY, GREEN, YELLOW, BLUE, VERMILLION, PURPLE, GREY = (
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999")


@dataclass(frozen=True)
class Look:
    color: str
    marker: str


MODEL_LOOK = {
    "base": Look(BLACK, "o"),
    "defended": Look(BLUE, "s"),
    "kl_only": Look(ORANGE, "^"),
    "ablation_aware": Look(GREEN, "D"),
    "mean_matched": Look(PURPLE, "v"),
    "paper_mean": Look(SKY, "h"),
    "K=1 ablated": Look(VERMILLION, "X"),
    "act. addition (+r)": Look(YELLOW, "P"),  # only notebook 02 draws it (bars, dark edges)
    "act. subtraction (-r)": Look(GREY, "*"),
}
MODEL_ALIASES = {"original": "base"}
ESTIMATOR_LOOK = {
    "iterated": Look(BLACK, "o"),
    "dim-svd": Look(ORANGE, "s"),
    "pca-centered": Look(SKY, "^"),
    "cov-diff": Look(GREEN, "D"),
    "inlp": Look(VERMILLION, "v"),
    "optimized": Look(PURPLE, "P"),
}
_SPARE = (Look(BLUE, "h"), Look(YELLOW, "p"), Look(GREY, "<"), Look(SKY, ">"))


def _stable_spare(name: str) -> Look:
    return _SPARE[sum(name.encode()) % len(_SPARE)]


def model_look(name: str) -> Look:
    """The fixed colour and marker of a model (an unknown name gets a spare one, stable across runs)."""
    return MODEL_LOOK.get(MODEL_ALIASES.get(name, name)) or _stable_spare(name)


def estimator_look(name: str) -> Look:
    return ESTIMATOR_LOOK.get(name) or _stable_spare(name)


def token_label(i: int, token: str) -> str:
    """A post-instruction token as a tick label: its index and the token with whitespace made visible."""
    shown = token.replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u2423")
    return f"{i}: {shown}" if shown.strip() else f"{i}: (space)"


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and ip.__class__.__name__ == "ZMQInteractiveShell"


class SavedFigure(list):
    """The paths :func:`save` wrote; in a notebook the figure itself is shown, and this only names the files."""

    def _ipython_display_(self) -> None:
        if self:
            from .config import REPO_ROOT

            stem = Path(self[0]).with_suffix("")
            shown = stem.relative_to(REPO_ROOT) if stem.is_relative_to(REPO_ROOT) else stem
            print(f"saved {shown}.png and .pdf")


# ----------------------------------------------------------------------------------------------
# saving and redrawing

_DRAW: dict[str, Callable[..., plt.Figure]] = {}


def _figure(kind: str):
    """Register ``fn`` as the drawer of figure ``kind``; a drawn figure remembers the values it was drawn from."""

    def wrap(fn: Callable[..., plt.Figure]) -> Callable[..., plt.Figure]:
        def draw(**values: Any) -> plt.Figure:
            values = json.loads(json.dumps(values, default=_jsonable))  # exactly what redraw will read back
            fig = fn(**values)
            fig.refusal_rank_data = {"figure": kind, "values": values}
            return fig

        _DRAW[kind] = draw
        return draw

    return wrap


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def figure_data_dir(profile: str) -> Path:
    from .config import results_dir

    d = results_dir(profile) / "figure_data"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_files(fig: plt.Figure, stem: Path) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        p = stem.with_suffix(f".{ext}")
        # fixed metadata, so that a redraw of the same values gives the same bytes
        meta = {"Software": None} if ext == "png" else {"Creator": None, "Producer": None, "CreationDate": None}
        fig.savefig(p, dpi=DPI, bbox_inches="tight", pad_inches=0.03, metadata=meta)
        paths.append(str(p))
    return paths


def save(fig: plt.Figure, cfg: dict[str, Any], name: str) -> SavedFigure:
    """Write ``figures/<profile>/<name>.png|pdf`` and the figure's values to
    ``results/<profile>/figure_data/<name>.json``; in a notebook, show the figure here."""
    from .results import figure_path

    profile = cfg["profile"]
    data = getattr(fig, "refusal_rank_data", None)
    if data is not None:
        p = figure_data_dir(profile) / f"{name}.json"
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data) + "\n")  # key order is drawing order
        os.replace(tmp, p)
    paths = SavedFigure(_write_files(fig, figure_path(cfg, name)))
    if _in_kernel():
        from IPython.display import display

        display(fig)
    plt.close(fig)
    return paths


def redraw(profile: str, out_dir: Path | None = None, names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Draw every figure of ``profile`` again from ``results/<profile>/figure_data/`` alone (no model, no
    cache) into ``figures/<profile>/`` (or ``out_dir``). Returns {name: paths written}."""
    from .config import figures_dir

    src = figure_data_dir(profile)
    out = Path(out_dir) if out_dir is not None else figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, list[str]] = {}
    for p in sorted(src.glob("*.json")):
        if names and p.stem not in names:
            continue
        data = json.loads(p.read_text())
        if data.get("figure") not in _DRAW:
            raise ValueError(f"{p} names an unknown figure kind {data.get('figure')!r}")
        fig = _DRAW[data["figure"]](**data["values"])
        done[p.stem] = _write_files(fig, out / p.stem)
        plt.close(fig)
    return done


def missing_data(profile: str) -> list[str]:
    """Figures in ``figures/<profile>/`` that have no values in ``results/<profile>/figure_data/``."""
    from .config import figures_dir

    have = {p.stem for p in figure_data_dir(profile).glob("*.json")}
    return sorted({p.stem for p in figures_dir(profile).glob("*.png")} - have)


def _model_handles(names: Sequence[str], **kw: Any) -> list[Line2D]:
    return [Line2D([], [], color=model_look(n).color, marker=model_look(n).marker, label=n, **kw) for n in names]


# ----------------------------------------------------------------------------------------------
# notebook 01


def score_heatmap(scores: dict[tuple[int, int], float], n_layers: int, post_tokens: Sequence[str],
                  selected: tuple[int, int], n_val: int, note: str = "", max_layer: int | None = None,
                  layer_stride: int = 1) -> plt.Figure:
    """Mean harmful-val refusal score under ablation of each candidate (layer x position). Only the layers
    that were candidates get a column (on the CPU grid every ``layer_stride``-th layer)."""
    cells = sorted([int(l), int(p), float(v)] for (l, p), v in scores.items())
    return _score_heatmap(cells=cells, n_layers=int(n_layers), post_tokens=list(post_tokens),
                          selected=[int(selected[0]), int(selected[1])], n_val=int(n_val),
                          max_layer=None if max_layer is None else int(max_layer), layer_stride=int(layer_stride))


@_figure("score_heatmap")
def _score_heatmap(cells, n_layers, post_tokens, selected, n_val, max_layer, layer_stride) -> plt.Figure:
    layers = sorted({c[0] for c in cells})
    grid = np.full((len(post_tokens), len(layers)), np.nan)
    for l, p, v in cells:
        grid[p, layers.index(l)] = v
    fig, ax = plt.subplots(figsize=(TWO_COLUMNS, 0.9 + 0.28 * len(post_tokens)), layout="constrained")
    lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    im = ax.imshow(grid, cmap="PuOr_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.grid(False)
    if selected[0] in layers:
        ax.add_patch(plt.Rectangle((layers.index(selected[0]) - 0.5, selected[1] - 0.5), 1, 1, fill=False, lw=1.8, ec="black"))
    step = max(1, math.ceil(len(layers) / 16))
    ax.set_xticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
    ax.set_yticks(range(len(post_tokens)), [token_label(i, t) for i, t in enumerate(post_tokens)])
    grid_note = f"every {layer_stride}th layer" if layer_stride > 2 else ("every 2nd layer" if layer_stride == 2 else "every layer")
    cut = f"; layers >= {max_layer} of {n_layers} not candidates" if max_layer is not None and max_layer < n_layers else ""
    ax.set_xlabel(f"layer (block input; candidates: {grid_note}{cut})")
    ax.set_ylabel("post-instruction token")
    cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.04)
    cb.set_label("refusal score\n(log-odds of refusal tokens)")
    ax.set_title(f"Harmful-val refusal score under ablation of each candidate (n={n_val}; box: selected, "
                 f"layer {selected[0]}, position {selected[1]}; lower = refusal removed)")
    return fig


def direction_norms(dirs, post_tokens: Sequence[str], n_train: int, selected: tuple[int, int] | None = None,
                    stream_norms=None) -> plt.Figure:
    """Norm of the difference in means per layer, one line per post-instruction position. With
    ``stream_norms`` (layers x positions, the norm of the harmless mean there) the norm is divided by it:
    the residual stream grows with depth, so a raw norm mostly shows that growth."""
    norms = np.asarray(dirs.norm(dim=-1) if hasattr(dirs, "norm") else dirs, dtype=float)
    rel = None
    if stream_norms is not None:
        s = np.asarray(stream_norms, dtype=float)
        rel = np.where(s > 0, norms / np.maximum(s, 1e-30), np.nan)
    return _direction_norms(norms=(rel if rel is not None else norms).tolist(), relative=rel is not None,
                            post_tokens=list(post_tokens), n_train=int(n_train),
                            selected=None if selected is None else [int(selected[0]), int(selected[1])])


@_figure("direction_norms")
def _direction_norms(norms, relative, post_tokens, n_train, selected) -> plt.Figure:
    a = np.array(norms, dtype=float)  # (layers, positions)
    fig, ax = plt.subplots(figsize=(ONE_COLUMN, 3.1), layout="constrained")
    cmap = mpl.colormaps["cividis"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for p, t in enumerate(post_tokens):
        ax.plot(range(a.shape[0]), a[:, p], marker=markers[p % len(markers)], ms=2.5, lw=1,
                color=cmap(p / max(1, len(post_tokens) - 1)), label=token_label(p, t))
    if selected is not None:
        l, p = selected
        ax.plot([l], [a[l, p]], marker="*", ms=11, mfc="none", mec=VERMILLION, mew=1.3, ls="none",
                label=f"selected (layer {l})")
    ax.set_xlabel("layer (block input)")
    ax.set_ylabel("||mean(harmful) - mean(harmless)||" + ("\n/ ||mean(harmless)||" if relative else " (raw)"))
    ax.set_title(f"Difference in means per layer (n={n_train} per class)")
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    fig.legend(title="post-instruction position", ncol=3, loc="outside lower center", handlelength=1.5, columnspacing=0.8)
    ax.set_ylim(bottom=0)
    return fig


# ----------------------------------------------------------------------------------------------
# notebook 02


def rate_bars(rows: list[dict[str, Any]], title: str) -> plt.Figure:
    """Grouped bars of refusal rates with 95% bootstrap intervals.
    rows: [{"model": ..., "set": ..., "rate": r, "lo": lo, "hi": hi, "n": n}]"""
    keep = ("model", "set", "rate", "lo", "hi", "n")
    return _rate_bars(rows=[{k: r[k] for k in keep} for r in rows], title=title)


@_figure("rate_bars")
def _rate_bars(rows, title) -> plt.Figure:
    models = list(dict.fromkeys(r["model"] for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(TWO_COLUMNS, 2.6), layout="constrained")
    for i, m in enumerate(models):
        look = model_look(m)
        for j, s in enumerate(sets):
            r = next((x for x in rows if x["model"] == m and x["set"] == s), None)
            if r is None:
                continue
            x = j + (i - (len(models) - 1) / 2) * width
            ax.bar(x, r["rate"], width * 0.92, color=look.color, alpha=0.85, edgecolor="black", linewidth=0.5)
            # the model's marker at the bar's top: a zero-height bar stays visible
            ax.plot([x], [r["rate"]], marker=look.marker, color=look.color, mec="black", mew=0.5, ms=4.5, ls="none", zorder=4)
            ax.errorbar(x, r["rate"], yerr=[[r["rate"] - r["lo"]], [r["hi"] - r["rate"]]], color="black", capsize=2, lw=0.8, zorder=3)
            ax.text(x, max(r["hi"], r["rate"]) + 0.03, f"{r['rate']:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(sets)), [f"{s}\n(n={next(x['n'] for x in rows if x['set'] == s)})" for s in sets])
    ax.set_ylim(-0.02, 1.15)
    ax.set_ylabel("refusal rate (marker judge)")
    ax.set_title(title)
    ax.grid(axis="x", visible=False)
    fig.legend(handles=_model_handles(models, ls="none", mec="black", mew=0.5), loc="outside right upper")
    return fig


# ----------------------------------------------------------------------------------------------
# notebook 03

LOG_TERMS = ("cov", "mean", "abl", "kd")
EVAL_TERMS = ("val_refusal_score", "val_kl_harmless", "k1_best_ablated_score")


def training_curves(records: dict[str, dict[str, Any]]) -> plt.Figure:
    """Every loss term per step, one panel per term, one line per variant (and the periodic val evals)."""
    slim = {name: {"history": [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in r["history"]],
                   "evals": [{k: v for k, v in e.items() if k == "step" or k in EVAL_TERMS} for e in r.get("evals", [])]}
            for name, r in records.items()}
    return _training_curves(records=slim)


@_figure("training_curves")
def _training_curves(records) -> plt.Figure:
    terms = sorted({k for r in records.values() for h in r["history"] for k in h if k != "step"})
    panels = [(t, "history") for t in terms] + [(t, "evals") for t in EVAL_TERMS
                                                if any(t in e for r in records.values() for e in r["evals"])]
    cols = 4
    nrows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(TWO_COLUMNS, 1.55 * nrows + 0.45), squeeze=False, layout="constrained")
    for ax, (term, src) in zip(axes.flat, panels):
        for name, r in records.items():
            pts = [(h["step"], h[term]) for h in r[src] if term in h and h[term] is not None]
            if not pts:
                continue
            look = model_look(name)
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=look.color, lw=1, marker=look.marker, ms=3 if src == "evals" else 2.5,
                    markevery=None if src == "evals" else max(1, len(xs) // 6))
        ax.set_title(term + (" (val)" if src == "evals" else ""))
        if term in LOG_TERMS:
            ax.set_yscale("symlog", linthresh=1e-4)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.legend(handles=_model_handles(list(records)), loc="outside lower center", ncol=len(records),
               title="variant (the same colour in every panel)")
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


# ----------------------------------------------------------------------------------------------
# notebook 04


def unattacked_rates(summary: dict[str, Any] | str) -> dict[str, dict[str, Any]]:
    """Each model's harmful refusal without an attack (K = 0), from the summary's notebook 02/03 sections
    (``summary``: the summary itself or a profile name)."""
    if isinstance(summary, str):
        from .results import read_summary

        summary = read_summary(summary)
    out = {}
    if (summary.get("base") or {}).get("refusal_rate_harmful"):
        out["base"] = summary["base"]["refusal_rate_harmful"]
    sections = {"defended": summary.get("defended") or {}, **(summary.get("controls") or {}), **(summary.get("named_variants") or {})}
    for name, res in sections.items():
        if (res or {}).get("refusal_rate_harmful"):
            out[name] = res["refusal_rate_harmful"]
    return out


def sweep_curves(sweeps: dict[str, dict[str, dict[str, Any]]], threshold: float, n: int,
                 unattacked: dict[str, dict[str, Any]] | None = None, note: str = "") -> plt.Figure:
    """Harmful refusal vs K, one panel per model, one line per estimator: the score proxy (share of prompts
    with a positive refusal score, dashed) and the generated, marker-judged rate with its interval (points).
    ``unattacked``: each model's rate without an attack, drawn at K = 0. Panels share the K axis;
    estimators are offset slightly along it so that equal values stay visible. ``note`` (the attack grid)
    is printed under the title, part of the figure's saved values."""
    point = lambda v: {"score_rate": v.get("score_rate"),
                       **({"refusal_rate_harmful": {k: v["refusal_rate_harmful"][k] for k in ("rate", "lo", "hi", "n")}}
                          if "refusal_rate_harmful" in v else {})}
    slim = {m: {e: {str(k): point(v) for k, v in r["per_k"].items()} for e, r in by.items()} for m, by in sweeps.items()}
    k0 = {m: {k: v[k] for k in ("rate", "lo", "hi", "n")} for m, v in (unattacked or {}).items() if m in sweeps}
    return _sweep_curves(per_k=slim, threshold=float(threshold), n=int(n), unattacked=k0, note=note)


def _log_offsets(keys: Sequence[str], step: float) -> dict[str, float]:
    """A factor per series, centred on 1 and ``step`` octaves apart: series that share a value on a log-2
    axis are drawn side by side instead of on top of one another."""
    return {k: 2 ** (step * (i - (len(keys) - 1) / 2)) for i, k in enumerate(keys)}


def _pow2_ticks(top: float) -> list[int]:
    """1, 2, 4, ... up to ``top`` (at most 128): the ticks of every axis that counts directions or K."""
    return [2 ** i for i in range(8) if 2 ** i <= top]


class _PlainLogFormatter(mpl.ticker.LogFormatter):
    """Labels of a log axis as plain numbers ("20", "0.3"), never "2 x 10^1" or "3e-01": which ticks get a
    label is matplotlib's own choice (minor ticks only where the axis spans few decades)."""

    def __init__(self, minor: bool = False) -> None:
        super().__init__(labelOnlyBase=not minor, minor_thresholds=(2, 0.4))

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _plain_log_labels(axis: mpl.axis.Axis) -> None:
    """Plain-number labels on a log-scaled axis (see :class:`_PlainLogFormatter`)."""
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter(minor=True))


def _title_with_note(title: str, note: str, width: int = 110) -> str:
    """A suptitle with a note wrapped under it: constrained layout makes room for a suptitle, never for a
    free ``fig.text``, which would overlap a legend below the axes."""
    import textwrap

    return title + "".join("\n" + line for line in textwrap.wrap(note, width)) if note else title


@_figure("sweep_curves")
def _sweep_curves(per_k, threshold, n, unattacked, note="") -> plt.Figure:
    models = list(per_k)
    ests = list(dict.fromkeys(e for m in models for e in per_k[m]))
    shift = _log_offsets(ests, 0.08)
    k_all = sorted({int(k) for m in models for r in per_k[m].values() for k in r} or {1})
    ncol = min(len(models), 4)
    nrow = math.ceil(len(models) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(TWO_COLUMNS, 2.0 * nrow + 0.8), sharey=True, sharex=True,
                             squeeze=False, layout="constrained")
    k0_x = 0.5  # K = 0 sits one octave left of K = 1 on the log axis
    for ax, m in zip(axes.flat, models):
        if m in unattacked:
            u = unattacked[m]
            ax.errorbar([k0_x], [u["rate"]], yerr=[[u["rate"] - u["lo"]], [u["hi"] - u["rate"]]], fmt=model_look(m).marker,
                        color="0.35", mfc="white", ms=4.5, capsize=2, lw=0.8)
        for e, res in per_k[m].items():
            look = estimator_look(e)
            ks = sorted(res, key=int)
            x = lambda kk: [int(k) * shift[e] for k in kk]
            if ks:
                ax.plot(x(ks), [np.nan if res[k]["score_rate"] is None else res[k]["score_rate"] for k in ks],
                        lw=0.9, alpha=0.7, color=look.color, ls="--")
            gk = [k for k in ks if "refusal_rate_harmful" in res[k]]
            if gk:
                r = [res[k]["refusal_rate_harmful"] for k in gk]
                y = np.array([v["rate"] for v in r])
                err = np.array([[v["rate"] - v["lo"] for v in r], [v["hi"] - v["rate"] for v in r]])
                ax.errorbar(x(gk), y, yerr=err, fmt=look.marker, color=look.color, ms=3.5, capsize=1.5, lw=0.8)
        ax.axhline(threshold, color="black", lw=0.8, ls=":")
        ax.axvline(math.sqrt(k0_x), color="0.8", lw=0.6)  # separates the unattacked point from K >= 1
        ax.set_xscale("log", base=2)
        ax.set_xlim(0.38, max(k_all) * 1.4)
        ticks = _pow2_ticks(max(k_all))
        ax.set_xticks([k0_x] + ticks, ["0"] + [str(k) for k in ticks])
        ax.minorticks_off()
        ax.set_title(m, color=model_look(m).color)
        ax.set_ylim(-0.03, 1.03)
    for ax in axes[-1]:
        ax.set_xlabel("K (directions ablated)")
    for ax in axes[:, 0]:
        ax.set_ylabel("harmful refusal (test)")
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    k0_n = {u["n"] for u in unattacked.values()}
    handles = [Line2D([], [], color=estimator_look(e).color, marker=estimator_look(e).marker, ls="none", label=e) for e in ests]
    handles += [Line2D([], [], color="0.3", ls="--", label="share with refusal score > 0"),
                Line2D([], [], color="0.3", marker="o", ls="none", label="generated rate, 95% CI"),
                Line2D([], [], color="0.35", marker="o", mfc="white", ls="none",
                       label="K = 0: unattacked" + (f" (all {k0_n.pop()} test prompts)" if len(k0_n) == 1 else " (all test prompts)")),
                Line2D([], [], color="black", ls=":", label=f"broken below {threshold}")]
    fig.legend(handles=handles, loc="outside lower center", ncol=4)
    fig.suptitle(_title_with_note(f"Rank-K ablation as a weight edit, {n} harmful test prompts", note), fontsize=8)
    return fig


def optimized_loss_curves(curves: dict[str, dict[int, dict[str, list[float]]]], steps: int, batch_per_class: int) -> plt.Figure:
    """The optimised attacker's training loss per step, one panel per model: one line per K (line style) and
    trained start (the colour of the estimator it started from; ``warm``: the previous K's basis extended)."""
    return _optimized_loss_curves(curves=curves, steps=int(steps), batch_per_class=int(batch_per_class))


@_figure("optimized_loss")
def _optimized_loss_curves(curves, steps, batch_per_class) -> plt.Figure:
    models = list(curves)
    ncol = min(max(len(models), 1), 3)  # six panels in one row collapse under constrained layout
    nrow = math.ceil(max(len(models), 1) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(min(TWO_COLUMNS, ONE_COLUMN * ncol), 2.0 * nrow + 0.7),
                             squeeze=False, sharey=True, layout="constrained")
    styles = ("-", "--", ":", "-.")
    handles: dict[str, Line2D] = {}
    for ax, m in zip(axes.flat, models):
        by_k = sorted(curves[m].items(), key=lambda kv: int(kv[0]))
        for i, (k, by_start) in enumerate(by_k):
            for start, loss in by_start.items():
                look = Look("0.35", "o") if start == "warm" else estimator_look(start)
                (line,) = ax.plot(range(1, len(loss) + 1), loss, lw=0.9, ls=styles[i % len(styles)], color=look.color,
                                  label=f"K={k} from {start}")
                handles.setdefault(line.get_label(), line)
        ax.set_title(m, color=model_look(m).color)
        ax.set_yscale("log")
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    for ax in list(axes.flat)[:len(models)]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss (one batch a step)")
    if handles:  # one legend for every panel: the same K and start draw alike in each
        fig.legend(handles=list(handles.values()), loc="outside lower center", ncol=min(len(handles), 4), fontsize=6)
    fig.suptitle(f"Optimised attacker: {steps} steps per K and trained start, batch {batch_per_class} + {batch_per_class}",
                 fontsize=8)
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


# ----------------------------------------------------------------------------------------------
# notebook 05


def _by_layer(by_layer: dict[Any, Any]) -> list[str]:
    return sorted((str(l) for l in by_layer), key=int)


def _at(by_layer: dict[Any, Any], l: str) -> Any:
    """A layer's entry under an int key (a notebook's reports) or a str one (the summary)."""
    return by_layer[l] if l in by_layer else by_layer[int(l)]


def probes_per_layer(reports: dict[str, dict[Any, dict[str, Any]]], last_token: dict[str, dict[str, Any]],
                     threshold: float, n: dict[str, Any]) -> plt.Figure:
    """Per layer and model: the held-out linear probe (95% bootstrap band), the MLP probe and the linear
    probe on the last prompt token; held-out separability (squared d'); the whitened class difference's
    eigenvalues above its noise edge (participation ratio and number); k_erase, with an open marker at the
    budget where it was not reached. ``reports``: {model: {layer: layer report or its summary}};
    ``last_token``: {model: {"by_layer": {layer: accuracy}}}; ``n``: {"train", "test"}."""
    slim = {}
    for m, by in reports.items():
        rows = {}
        for l in _by_layer(by):
            r = _at(by, l)
            ci = r.get("linear_ci") or {}
            rows[l] = {"linear": float(r["linear_acc"]), "lo": ci.get("lo"), "hi": ci.get("hi"),
                       "mlp": r.get("mlp_acc"), "separability": r.get("separability"),
                       "rank": (r.get("whitened") or {}).get("rank"), "n_sig": (r.get("whitened") or {}).get("n_sig"),
                       "k_erase": r.get("k_erase"), "budget": r.get("k_erase_budget")}
        slim[m] = rows
    last = {m: {str(l): float(v) for l, v in ((last_token.get(m) or {}).get("by_layer") or {}).items()} for m in reports}
    return _probes_per_layer(reports=slim, last_token=last, threshold=float(threshold),
                             n={"train": int(n["train"]), "test": int(n["test"])})


SEPARABILITY_FLOOR = 1e-3  # a held-out squared d' of 0 (test difference the other way) drawn here on the log axis


@_figure("probes_per_layer")
def _probes_per_layer(reports, last_token, threshold, n) -> plt.Figure:
    fig, axes = plt.subplots(2, 2, figsize=(TWO_COLUMNS, 4.4), sharex=True, layout="constrained")
    acc, sep, wh, ke = axes.flat
    nan = lambda v: np.nan if v is None else float(v)
    for i, (m, by) in enumerate(reports.items()):
        look = model_look(m)
        ls = sorted(by, key=int)
        x = [int(l) for l in ls]
        kw = dict(color=look.color, marker=look.marker, ms=3, lw=1)
        shift = 0.06 * (i - (len(reports) - 1) / 2)  # k_erase is a small integer: models offset along the layer axis stay visible
        acc.plot(x, [by[l]["linear"] for l in ls], **kw)
        if all(by[l]["lo"] is not None for l in ls):
            acc.fill_between(x, [by[l]["lo"] for l in ls], [by[l]["hi"] for l in ls], color=look.color, alpha=0.07, lw=0)
        acc.plot(x, [nan(by[l]["mlp"]) for l in ls], **{**kw, "ls": "--", "mfc": "white", "lw": 0.9})
        lt = last_token.get(m) or {}
        if lt:
            lk = sorted(lt, key=int)
            acc.plot([int(l) for l in lk], [lt[l] for l in lk], color=look.color, ls=":", lw=1.1)
        sep.plot(x, [np.nan if by[l]["separability"] is None else max(by[l]["separability"], SEPARABILITY_FLOOR) for l in ls], **kw)
        wh.plot(x, [nan(by[l]["rank"]) for l in ls], **kw)
        wh.plot(x, [nan(by[l]["n_sig"]) for l in ls], **{**kw, "ls": "--", "mfc": "white", "lw": 0.9})
        ke.plot([xi + shift for xi in x], [nan(by[l]["k_erase"]) for l in ls], **kw)
        miss = [(xi + shift, by[l]["budget"]) for xi, l in zip(x, ls) if by[l]["k_erase"] is None and by[l]["budget"] is not None]
        if miss:  # drawn over the top spine when needed, never clipped
            ke.plot(*zip(*miss), ls="none", marker=look.marker, mfc="white", mec=look.color, ms=5.5, mew=1, clip_on=False)
    acc.axhline(threshold, color="black", lw=0.8, ls=":")
    acc.set_ylabel("held-out accuracy")
    acc.set_title("linear probe (band: 95% CI), MLP (dashed),\nlinear on the last token (dotted)")
    sep.set_yscale("log")
    _plain_log_labels(sep.yaxis)
    sep.set_ylabel("held-out separability (d'$^2$)")
    sep.set_title(f"Fisher separability (0 drawn at {SEPARABILITY_FLOOR:g})")
    wh.set_ylabel("whitened class difference")
    wh.set_title("eigenvalues above the noise edge: participation\nratio (solid), number (dashed)")
    wh.set_ylim(0, max(1.05, wh.get_ylim()[1]))  # none above the edge: a flat 0 on a readable scale
    ke.set_ylabel("k_erase")
    ke.set_title(f"directions erased until linear acc. <= {threshold}\n(open marker at the budget: not reached)")
    # k_erase is a small count where it is reached and the whole budget (48 on cpu) where it is not: a
    # symmetric log axis keeps 1-5 apart and the budget on the same panel
    top = max([1] + [by[l]["budget"] or 0 for by in reports.values() for l in by])
    ke.set_yscale("symlog", base=2, linthresh=1, linscale=0.5)
    ke.set_ylim(-0.15, top * 1.25)
    ticks = [0] + _pow2_ticks(top * 0.8) + [top]  # the budget labelled by itself, no power of two crowding it
    ke.set_yticks(ticks, [str(k) for k in ticks])
    ke.yaxis.set_minor_locator(mpl.ticker.NullLocator())
    for ax in axes[-1]:
        ax.set_xlabel("layer (block input)")
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True, steps=[1, 2, 4, 5, 10]))
    handles = _model_handles(list(reports), ms=3)
    handles.append(Line2D([], [], color="black", ls=":", lw=0.8, label=f"at chance: accuracy <= {threshold}"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4))  # six models: two rows
    fig.suptitle(f"Per layer, pooled post-instruction activations (probe train n={n['train']}, held-out test "
                 f"n={n['test']}, same sources)", fontsize=8)
    return fig


def probe_spectra(raw: dict[str, Any], whitened: dict[str, dict[str, Any]], layer_of: dict[str, int], n: int,
                  top: int = 64) -> plt.Figure:
    """At each model's attacker layer: the unwhitened excess second moment's leading eigenvalues over its
    largest (scale removed, shape only), and the whitened class difference's eigenvalues with the noise
    edge (from random halves of the harmless prompts). ``whitened``: {model: {"vals", "edge"}}."""
    r = {m: [max(float(v), 0.0) for v in list(ev)[:top]] for m, ev in raw.items()}
    w = {m: {"vals": [float(v) for v in list(whitened[m]["vals"])[:top]], "edge": float(whitened[m]["edge"])} for m in raw}
    return _probe_spectra(raw=r, whitened=w, layer_of={m: int(layer_of[m]) for m in raw}, n=int(n))


SPECTRUM_FLOOR = 1e-9  # probe_spectra: the unwhitened axis ends here (float round-off below; a rank-deficient tail)


@_figure("probe_spectra")
def _probe_spectra(raw, whitened, layer_of, n) -> plt.Figure:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(TWO_COLUMNS, 2.6), layout="constrained")
    top = max((len(v) for v in raw.values()), default=0)
    for m, ev in raw.items():
        look = model_look(m)
        ev = np.array(ev, dtype=float)
        kw = dict(color=look.color, marker=look.marker, ms=2.5, lw=1, markevery=max(1, len(ev) // 12))
        ax.plot(np.arange(1, len(ev) + 1), ev / max(ev[0] if len(ev) else 1.0, 1e-12), **kw)
        vals = np.array(whitened[m]["vals"], dtype=float)
        ax2.plot(np.arange(1, len(vals) + 1), vals, **{**kw, "markevery": max(1, len(vals) // 12)})
        ax2.axhline(whitened[m]["edge"], color=look.color, lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], SPECTRUM_FLOOR))
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue / largest")
    ax.set_title(f"excess second moment (unwhitened; below {SPECTRUM_FLOOR:g}: numerically 0)")
    ax2.set_yscale("symlog", linthresh=0.1)
    ax2.set_xlabel("eigenvalue index")
    ax2.set_ylabel("extra harmful energy\n/ harmless spread")
    ax2.set_title("whitened class difference (dotted: its noise edge)")
    for a in (ax, ax2):
        a.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    handles = [Line2D([], [], color=model_look(m).color, marker=model_look(m).marker, ms=3, label=f"{m} (layer {layer_of[m]})")
               for m in raw]
    handles.append(Line2D([], [], color="0.3", ls=":", lw=0.8, label="noise edge"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4))
    fig.suptitle(f"At each model's attacker layer, top {top} eigenvalues (probe train split, pooled, n={n})", fontsize=8)
    return fig


K_COLORS = (SKY, BLUE, VERMILLION, ORANGE, GREEN, PURPLE, GREY)  # attack_share: the i-th smallest k, in every panel


def attack_share(shares: dict[str, dict[str, dict[Any, dict[str, float]]]], n: dict[str, Any]) -> plt.Figure:
    """Per model at its attacker's layer: the share of held-out separability in each attacker's top k
    directions (solid) and what remains once they are projected out (hatched). Both are held-out estimates
    over the separability of all features: either can exceed 1, and the two need not sum to 1.
    ``shares``: {model: {estimator: {k: {"held", "remains"}}}}; ``n``: {"train", "test"}."""
    slim = {m: {e: {str(k): {"held": float(v["held"]), "remains": float(v["remains"])} for k, v in by_k.items()}
                for e, by_k in by_e.items()} for m, by_e in shares.items()}
    return _attack_share(shares=slim, n={"train": int(n["train"]), "test": int(n["test"])})


@_figure("attack_share")
def _attack_share(shares, n) -> plt.Figure:
    from matplotlib.patches import Patch

    models = list(shares)
    ks = sorted({int(k) for m in models for e in shares[m] for k in shares[m][e]})
    color = {k: K_COLORS[i % len(K_COLORS)] for i, k in enumerate(ks)}
    ncol = max(1, min(len(models), 3))
    nrow = max(1, math.ceil(len(models) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(TWO_COLUMNS, 2.1 * nrow + 0.8), sharey=True, squeeze=False,
                             layout="constrained")
    width = 0.8 / max(1, 2 * len(ks))
    for ax, m in zip(axes.flat, models):
        ests = list(shares[m])
        for i, e in enumerate(ests):
            for j, k in enumerate(ks):
                r = shares[m][e].get(str(k))
                if not r:
                    continue
                x0 = i - 0.4 + 2 * j * width + width / 2
                ax.bar(x0, r["held"], width, color=color[k], edgecolor=color[k], linewidth=0.5)
                ax.bar(x0 + width, r["remains"], width, color="white", edgecolor=color[k], hatch="////", linewidth=0.5)
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_xticks(range(len(ests)), ests, rotation=35, ha="right")
        for t, e in zip(ax.get_xticklabels(), ests):
            t.set_color(estimator_look(e).color)
        ax.grid(axis="x", visible=False)
        ax.set_title(m, color=model_look(m).color)
        if not ests or not any(shares[m][e] for e in ests):
            ax.text(0.5, 0.5, "no held-out separability", transform=ax.transAxes, ha="center", va="center", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of held-out separability")
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    handles = []
    for k in ks:
        handles += [Patch(facecolor=color[k], edgecolor=color[k], label=f"top {k}: held"),
                    Patch(facecolor="white", edgecolor=color[k], hatch="////", label=f"top {k}: remains")]
    handles.append(Line2D([], [], color="black", ls=":", lw=0.8, label="1 = all of it"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(ks) + 1, title="the attacker's top k directions")
    fig.suptitle(f"Held-out separability each attack's top k directions hold, and what remains without them "
                 f"(probe train n={n['train']}, test n={n['test']})\nno bar: the attack computed fewer than k "
                 f"directions", fontsize=8)
    return fig


TRANSFER_PREFIXES = ("transfer", "over")  # probes_by_source: labels drawn hatched, apart from the same-source ones


def probes_by_source(rows: dict[str, dict[str, dict[str, Any]]], layer_of: dict[str, int], n: dict[str, Any]) -> plt.Figure:
    """Per model at its attacker's layer: held-out accuracy per source (the same-source probe) and, labelled
    apart and hatched, cross-source transfer (a probe trained on AdvBench vs harmless) and the share of
    over-refusal prompts called harmless; 95% bootstrap intervals. ``rows``: {model: {label: {acc, lo, hi,
    n}}} (:func:`refusal_rank.probe_run.by_source_rows`); labels starting with "transfer" or "over" are
    the transfer ones."""
    keep = ("acc", "lo", "hi", "n")
    slim = {m: {lab: {k: r[k] for k in keep} for lab, r in by.items()} for m, by in rows.items()}
    return _probes_by_source(rows=slim, layer_of={m: int(layer_of[m]) for m in rows},
                             n={"train": int(n["train"]), "test": int(n["test"])})


@_figure("probes_by_source")
def _probes_by_source(rows, layer_of, n) -> plt.Figure:
    from matplotlib.patches import Patch

    models = list(rows)
    labels = list(dict.fromkeys(k for m in models for k in rows[m]))
    same = [lab for lab in labels if not lab.startswith(TRANSFER_PREFIXES)]
    labels = same + [lab for lab in labels if lab.startswith(TRANSFER_PREFIXES)]  # same-source first, then transfer
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(TWO_COLUMNS, 2.9), layout="constrained")
    for i, m in enumerate(models):
        look = model_look(m)
        for j, lab in enumerate(labels):
            r = rows[m].get(lab)
            if not r:
                continue
            x = j + (i - (len(models) - 1) / 2) * width
            transfer = lab.startswith(TRANSFER_PREFIXES)
            ax.bar(x, r["acc"], width * 0.92, color="white" if transfer else look.color, alpha=1 if transfer else 0.85,
                   edgecolor=look.color if transfer else "black", hatch="////" if transfer else None, linewidth=0.5)
            ax.plot([x], [r["acc"]], marker=look.marker, color=look.color, mec="black", mew=0.5, ms=3.5, ls="none", zorder=4)
            ax.errorbar(x, r["acc"], yerr=[[r["acc"] - r["lo"]], [r["hi"] - r["acc"]]], color="black", capsize=1.5, lw=0.7, zorder=3)
    if same and len(same) < len(labels):
        ax.axvline(len(same) - 0.5, color="0.5", lw=0.8)
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    shown = lambda lab: lab.replace(": ", ":\n", 1).replace("over-refusal as harmless", "over-refusal\nas harmless")
    ax.set_xticks(range(len(labels)), [f"{shown(lab)}\n(n={next(rows[m][lab]['n'] for m in models if lab in rows[m])})"
                                       for lab in labels])
    ax.grid(axis="x", visible=False)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Linear probe per source at each model's attacker layer (probe train n={n['train']}, test n={n['test']}; "
                 "95% CI)")
    handles = [Line2D([], [], color=model_look(m).color, marker=model_look(m).marker, mec="black", mew=0.5, ls="none",
                      label=f"{m} (layer {layer_of[m]})") for m in models]
    handles += [Patch(facecolor="white", edgecolor="0.3", hatch="////", label="transfer: AdvBench-trained probe;\n"
                                                                               "over-refusal called harmless"),
                Line2D([], [], color="black", ls=":", lw=0.8, label="chance (0.5)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4))
    return fig


def removal_curves(curves: dict[str, dict[str, dict[int, float]]], threshold: float, n: dict[str, int]) -> plt.Figure:
    """Linear probe accuracy vs directions removed, one panel per model, one line per basis."""
    slim = {m: {b: {str(k): float(v) for k, v in c.items()} for b, c in by.items()} for m, by in curves.items()}
    return _removal_curves(curves=slim, threshold=float(threshold), n={"train": int(n["train"]), "test": int(n["test"])})


@_figure("removal_curves")
def _removal_curves(curves, threshold, n) -> plt.Figure:
    models = list(curves)
    bases = list(dict.fromkeys(b for m in models for b in curves[m]))
    ncol = min(len(models), 4)
    nrow = math.ceil(len(models) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(TWO_COLUMNS, 1.9 * nrow + 0.7), sharey=True, sharex=True,
                             squeeze=False, layout="constrained")
    for ax, m in zip(axes.flat, models):
        for b, c in curves[m].items():
            look = estimator_look(b)
            ks = sorted(c, key=int)
            ax.plot([int(k) for k in ks], [c[k] for k in ks], color=look.color, marker=look.marker, ms=2.5, lw=1)
        ax.axhline(threshold, color="black", lw=0.8, ls=":")
        ax.set_xscale("symlog", base=2, linthresh=1)
        k_max = max((int(k) for c in curves[m].values() for k in c), default=1)
        ticks = [0] + [2 ** i for i in range(0, 12) if 2 ** i <= k_max]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(m, color=model_look(m).color)
    for i, ax in enumerate(list(axes.flat)[:len(models)]):
        if i + ncol >= len(models):  # no panel below this one: it shows the axis
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("directions removed")
    for ax in axes[:, 0]:
        ax.set_ylabel("linear probe accuracy\n(held out)")
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    handles = [Line2D([], [], color=estimator_look(b).color, marker=estimator_look(b).marker, label=b) for b in bases]
    handles.append(Line2D([], [], color="black", ls=":", label=f"at chance: accuracy <= {threshold} (k_erase, k_chance)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), title="basis removed")
    fig.suptitle(f"Linear probe at the attacker's layer as directions are removed (train n={n['train']}, test n={n['test']})", fontsize=8)
    return fig


def term_vs_floor(records: dict[str, dict[str, Any]]) -> plt.Figure:
    """Each moment variant's matched term per step beside its noise floor (the same term on two halves of
    the harmless class), one panel per variant: a term that falls into the band of its floor has matched
    the classes as far as its estimate can tell."""
    rows = []
    for name, r in records.items():
        v = r["variant"]
        if not (v.get("lambda_cov") or v.get("lambda_mean")):
            continue
        key = "cov" if v.get("lambda_cov") else "mean"
        h = [x for x in r["history"] if key in x]
        hn = [x for x in h if f"{key}_null" in x]
        rows.append({"name": name, "key": key, "steps": [x["step"] for x in h], "term": [x[key] for x in h],
                     "null_steps": [x["step"] for x in hn], "null": [x[f"{key}_null"] for x in hn]})
    return _term_vs_floor(rows=rows)


@_figure("term_vs_floor")
def _term_vs_floor(rows) -> plt.Figure:
    n = max(1, len(rows))
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(TWO_COLUMNS if n > 1 else ONE_COLUMN, 1.9 * nrow + 0.6),
                             squeeze=False, layout="constrained")
    for ax, r in zip(axes.flat, rows):
        look = model_look(r["name"])
        ax.plot(r["steps"], r["term"], color=look.color, marker=look.marker, ms=2.5, lw=1,
                markevery=max(1, len(r["steps"]) // 6))
        ax.plot(r["null_steps"], r["null"], color=GREY, lw=0.9, ls="--")
        ax.axhline(0, color="0.3", lw=0.6)
        ax.set_title(f"{r['name']}: L_{r['key']}", color=look.color)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    if rows:
        fig.legend(handles=[Line2D([], [], color="0.2", marker="o", ms=2.5, label="the term: harmful vs harmless"),
                            Line2D([], [], color=GREY, ls="--", label="same term, two halves of harmless (noise floor)")],
                   loc="outside lower center", ncol=2)
    return fig


def _screen_k_low(screen: dict[str, Any]) -> int | None:
    """The smallest K at which the screen's K_break could lie, given the K each of its estimators generated:
    an estimator that skipped a K below the break might have broken the model there. K=1 is always tried
    (the re-selected K=1 attack). None without a break; the break itself when nothing below it was skipped."""
    kb = screen.get("k_break")
    if not kb:
        return None
    # the screen names its own estimators (beside the re-selected K=1 attack) in k_skipped
    gaps = [next((j for j in range(2, kb) if str(j) not in screen[e]), kb) for e in screen.get("k_skipped", {}) if screen.get(e)]
    return min(gaps, default=kb)


def screen_vs_budget(budget: dict[str, dict[str, dict[str, Any]]], threshold: float,
                     paper_k: dict[str, float]) -> plt.Figure:
    """Per variant, the attack screen against prompt passes: the re-selected K=1 attack's generated harmful
    refusal rate beside the unattacked one (left), and the screen's K_break with the paper's K values as
    reference lines (right)."""
    series = {}
    for name in sorted(budget):
        pts = sorted(budget[name].values(), key=lambda e: e["prompt_passes"])
        top = max((max(e["screen"]["k_screened"]) for e in pts if e.get("screen")), default=1)
        series[name] = {
            "passes": [e["prompt_passes"] for e in pts],
            "k1": [e["screen"]["k1_reselected"]["refusal_rate_harmful"]["rate"] if e.get("screen") else None for e in pts],
            "unattacked": [(e.get("refusal_rate_harmful") or {}).get("rate") for e in pts],
            "k_break": [(e.get("screen") or {}).get("k_break") for e in pts],
            "k_low": [_screen_k_low(e.get("screen") or {}) for e in pts], "top": top}
    return _screen_vs_budget(series=series, threshold=float(threshold), paper_k={k: float(v) for k, v in paper_k.items()})


@_figure("screen_vs_budget")
def _screen_vs_budget(series, threshold, paper_k) -> plt.Figure:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(TWO_COLUMNS, 2.6), layout="constrained")
    nan = lambda v: np.nan if v is None else v
    names = list(series)
    # most variants share a K_break of 1 at every budget: offset them slightly along the (log) budget axis
    shift = _log_offsets(names, 0.05)
    for name, d in series.items():
        look = model_look(name)
        x = [p * shift[name] for p in d["passes"]]
        ax.plot(x, [nan(v) for v in d["k1"]], color=look.color, marker=look.marker, ms=3.5, lw=1)
        ax.plot(x, [nan(v) for v in d["unattacked"]], color=look.color, marker=look.marker, mfc="white",
                ms=3.5, lw=0.9, ls=":")
        ax2.plot(x, [k if k is not None else d["top"] + 1 for k in d["k_break"]], color=look.color,
                 marker=look.marker, ms=3.5, lw=1)
        for xi, k, low in zip(x, d["k_break"], d.get("k_low") or []):
            if k is not None and low is not None and low < k:  # K skipped below the break: it may lie as low as this
                ax2.vlines(xi, low, k, color=look.color, lw=3, alpha=0.3)
    passes = sorted({p for d in series.values() for p in d["passes"]})
    for a in (ax, ax2):  # ticks at the budgets trained, labelled with their multiple of the smallest
        a.set_xscale("log", base=2)
        a.set_xticks(passes, [f"{p}\n({p / passes[0]:g}x)" for p in passes] if passes else [])
        a.xaxis.set_minor_locator(mpl.ticker.NullLocator())
        if passes:
            a.set_xlim(passes[0] / 1.35, passes[-1] * 1.35)
        a.set_xlabel("prompt passes (budget)")
    ax.axhline(threshold, color="0.3", ls="--", lw=0.8)
    ax.set_ylabel("harmful refusal (generated)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"re-selected K = 1 attack (dashed: broken below {threshold})")
    for label, k in paper_k.items():
        ax2.axhline(k, color="0.6", ls=":", lw=0.8)
        ax2.annotate(label, (0.99, k), xycoords=("axes fraction", "data"), fontsize=6, color="0.35", va="bottom", ha="right")
    ax2.set_yscale("log", base=2)
    top = max([1.0, *paper_k.values()] + [d["top"] + 1 for d in series.values()])
    ticks = _pow2_ticks(top)
    ax2.set_yticks(ticks, [str(k) for k in ticks])
    ax2.yaxis.set_minor_locator(mpl.ticker.NullLocator())
    ax2.set_ylim(0.8, top * 1.25)
    ax2.set_ylabel("screen K_break (top: none broke)")
    ax2.set_title("cheapest K that broke the model in the screen\n(band: down to the lowest K it skipped)")
    handles = _model_handles(names) + [
        Line2D([], [], color="0.3", marker="o", label="under the attack"),
        Line2D([], [], color="0.3", marker="o", mfc="white", ls=":", label="unattacked")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4))  # five models: two rows
    return fig


# ----------------------------------------------------------------------------------------------
# figure data of older runs
#
# Notebook 05 once drew effective rank, probe accuracy and k_chance per layer ("probe_layers") and the
# unwhitened spectrum alone ("spectra"), from a summary layout it no longer writes. No notebook draws these
# kinds any more; their drawers stay so that figure data saved by such a run (results/cpu/figure_data until
# notebook 05 is rerun there) still redraws with `refusal-rank figures`, to the same bytes.


@_figure("probe_layers")
def _legacy_probe_layers(reports, threshold, n) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(TWO_COLUMNS, 2.3), layout="constrained")
    for m, by_layer in reports.items():
        look = model_look(m)
        ls = sorted(by_layer, key=int)
        x = [int(l) for l in ls]
        kw = dict(color=look.color, marker=look.marker, ms=2.5, lw=1)
        axes[0].plot(x, [by_layer[l]["effective_rank"] for l in ls], **kw)
        axes[1].plot(x, [by_layer[l]["linear_acc"] for l in ls], **kw)
        axes[1].plot(x, [by_layer[l]["mlp_acc"] for l in ls], ls="--", mfc="white", **{k: v for k, v in kw.items()})
        kc = [by_layer[l]["k_chance"] for l in ls]
        axes[2].plot(x, [np.nan if k is None else k for k in kc], **kw)
    axes[0].set_ylabel("effective rank\n(participation ratio)")
    axes[1].set_ylabel("held-out probe accuracy")
    axes[1].axhline(threshold, color="black", lw=0.8, ls=":")
    axes[2].set_ylabel("k_chance")
    axes[0].set_title("excess second moment")
    axes[1].set_title(f"probes (dotted: {threshold})")
    axes[2].set_title(f"INLP directions to accuracy <= {threshold}\n(no point: not reached in the INLP budget)")
    for ax in axes:
        ax.set_xlabel("layer (block input)")
    handles = _model_handles(list(reports)) + [Line2D([], [], color="0.3", label="linear probe"),
                                               Line2D([], [], color="0.3", ls="--", marker="o", mfc="white", label="MLP probe")]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
    fig.suptitle(f"Per layer, pooled post-instruction activations (train n={n['train']}, held-out test n={n['test']})", fontsize=8)
    return fig


@_figure("spectra")
def _legacy_spectra(eigs, layer_of, n) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(ONE_COLUMN, 2.5), layout="constrained")
    top = max((len(v) for v in eigs.values()), default=0)
    for m, ev in eigs.items():
        look = model_look(m)
        ev = np.array(ev, dtype=float)
        ax.plot(np.arange(1, len(ev) + 1), ev / max(ev[0], 1e-12), color=look.color, marker=look.marker, ms=2.5, lw=1,
                markevery=max(1, len(ev) // 12), label=f"{m} (layer {layer_of[m]})")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue / largest")
    ax.legend()
    ax.set_title(f"Excess second moment, top {top} eigenvalues\n(train split, pooled, n={n})")
    return fig
