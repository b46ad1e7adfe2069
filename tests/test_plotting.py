"""Figures: one palette and one look per model and estimator, print sizes and formats, and every figure
redrawn from the values saved beside it (no model)."""
from __future__ import annotations

import json
import re
import struct

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
import torch  # noqa: E402

from refusal_rank import config as C  # noqa: E402
from refusal_rank import plotting as F  # noqa: E402

MODELS = ["base", "defended", "kl_only", "ablation_aware"]
ESTS = ["iterated", "dim-svd", "pca-centered", "cov-diff", "inlp", "optimized"]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Every figure drawn and saved once into a scratch repository root (the real figures/ and results/
    stay untouched), then redrawn from the saved values alone into ``again/``."""
    root = tmp_path_factory.mktemp("repo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "REPO_ROOT", root)
        figs = draw_all({"profile": "scratch"})
        again = F.redraw("scratch", out_dir=root / "again")
        missing = F.missing_data("scratch")
    return root, figs, again, missing


def rate(r, n=80):
    return {"rate": r, "lo": max(0.0, r - 0.1), "hi": min(1.0, r + 0.1), "n": n}


def draw_all(cfg) -> dict[str, object]:
    """Every figure of the series from synthetic values, saved the way the notebooks save them."""
    post = ["<|end|>", "\n", "<|assistant|>", "\n"]
    scores = {(l, p): float(l - p) / 3 for l in range(0, 6, 2) for p in range(4)}
    dirs = torch.arange(8 * 4 * 5, dtype=torch.float32).reshape(8, 4, 5) / 50
    rows = [{"model": m, "set": s, **rate(v)} for m in ("original", "K=1 ablated")
            for s, v in (("harmful", 0.6 if m == "original" else 0.0), ("harmless", 0.02), ("over-refusal", 0.1))]
    rows.append({"model": "act. addition (+r)", "set": "harmless", **rate(0.9)})
    hist = lambda s: [{"step": i, "loss": 1.0 / (i + 1) + s, "kd": 0.01 * i, "cov": 1e-3 * s} for i in range(6)]
    records = {m: {"history": hist(j), "evals": [{"step": 0, "val_refusal_score": 1.0 - j, "k1_best_candidate": [2, 1]},
                                                 {"step": 5, "val_refusal_score": 0.5}]} for j, m in enumerate(MODELS[1:])}
    per_k = lambda b: {1: {"score_rate": 0.1 * b, "refusal_rate_harmful": rate(0.1 * b)}, 2: {"score_rate": 0.05}}
    sweeps = {m: {e: {"per_k": per_k(i)} for i, e in enumerate(ESTS)} for m in MODELS}
    reports = {m: {l: {"effective_rank": 1.0 + l, "linear_acc": 0.9, "mlp_acc": 0.8, "k_chance": None if l else 3,
                       "top_eigvals": [1.0]} for l in (0, 2, 4)} for m in MODELS}
    moments = {m: {"variant": {"lambda_cov": 1.0} if j else {"lambda_mean": 1.0},
                   "history": [{"step": i, "cov": 1 / (i + 1), "cov_null": 0.1, "mean": 0.5, "mean_null": 0.2} for i in range(5)]}
               for j, m in enumerate(MODELS[1:])}
    screen = lambda r, kb: {"k1_reselected": {"refusal_rate_harmful": rate(r)}, "k_screened": [1, 4, 16], "k_break": kb}
    budget = {m: {"1x": {"prompt_passes": 64, "refusal_rate_harmful": rate(0.7), "screen": screen(0.1, 1)},
                  "2x": {"prompt_passes": 128, "refusal_rate_harmful": rate(0.72), "screen": screen(0.4, None)}} for m in MODELS[1:]}
    figs = {
        "01_2_refusal_score_heatmap": F.score_heatmap(scores, 8, post, (2, 1), 12, max_layer=6, layer_stride=2),
        "01_3_direction_norms": F.direction_norms(dirs, post, 16, (2, 1), dirs.norm(dim=-1) + 1),
        "02_4_refusal_rates": F.rate_bars(rows, "Refusal rates (test)"),
        "03_1_training_curves": F.training_curves(records),
        "03_2_terms_vs_floor": F.term_vs_floor(moments),
        "03_3_screen_vs_budget": F.screen_vs_budget(budget, 0.3, {"paper: instruct (1)": 1, "paper (16)": 16}),
        "04_1_refusal_vs_k": F.sweep_curves(sweeps, 0.3, 80, {m: rate(0.7) for m in MODELS}),
        "05_1_probes_per_layer": F.probe_layers(reports, 0.6, {"train": 32, "test": 16}),
        "05_2_spectra": F.spectra({m: torch.linspace(5, 0.1, 20) for m in MODELS}, {m: 2 for m in MODELS}, 32),
        "05_3_probe_vs_removed": F.removal_curves({m: {e: {0: 0.9, 1: 0.7, 4: 0.5} for e in ESTS} for m in MODELS},
                                                  0.6, {"train": 32, "test": 16}),
    }
    for name, fig in figs.items():
        F.save(fig, cfg, name)
    return figs


def png_dpi(path) -> float:
    data = path.read_bytes()
    i = data.index(b"pHYs")
    ppm_x, _, unit = struct.unpack(">IIB", data[i + 4:i + 13])
    assert unit == 1
    return ppm_x * 0.0254


def test_every_figure_is_redrawn_from_its_values_alone(drawn):
    repo, _, again, missing = drawn
    figs = repo / "figures" / "scratch"
    assert len(list((repo / "results" / "scratch" / "figure_data").glob("*.json"))) == 10
    assert sorted(again) == sorted(p.stem for p in figs.glob("*.png"))
    for name in again:
        for ext in ("png", "pdf"):
            assert (repo / "again" / f"{name}.{ext}").read_bytes() == (figs / f"{name}.{ext}").read_bytes(), (name, ext)
    assert missing == []


def test_files_are_print_ready(drawn):
    repo = drawn[0]
    for png in (repo / "figures" / "scratch").glob("*.png"):
        assert round(png_dpi(png)) == 300, png.name
        pdf = png.with_suffix(".pdf").read_bytes()
        assert b"/FontFile2" in pdf, f"{png.stem}: fonts not embedded as TrueType"
        assert not re.search(rb"/Subtype\s*/Type3", pdf), f"{png.stem}: Type 3 fonts"


def test_one_look_per_model_and_estimator_everywhere(drawn):
    for table in (F.MODEL_LOOK, F.ESTIMATOR_LOOK):
        looks = [(v.color, v.marker) for v in table.values()]
        assert len(set(c for c, _ in looks)) == len(looks) and len(set(m for _, m in looks)) == len(looks)
    assert F.model_look("original") == F.model_look("base")
    assert F.model_look("some_new_variant") == F.model_look("some_new_variant")
    figs = drawn[1]
    # the training curves: one legend for the whole figure with every variant, each line in its variant's colour
    tc = figs["03_1_training_curves"]
    assert len(tc.legends) == 1 and not any(ax.get_legend() for ax in tc.axes)
    assert [t.get_text() for t in tc.legends[0].get_texts()] == MODELS[1:]
    for ax in tc.axes:
        for line in ax.get_lines():
            assert matplotlib.colors.to_hex(line.get_color()) in {F.model_look(m).color.lower() for m in MODELS[1:]}
    # the sweep: each estimator keeps its colour in every panel
    sw = figs["04_1_refusal_vs_k"]
    labels = [t.get_text() for t in sw.legends[0].get_texts()]
    assert labels[:len(ESTS)] == ESTS and any("K = 0" in t for t in labels)


def test_zero_height_bars_stay_visible_and_labels_show_whitespace(drawn):
    figs = drawn[1]
    ax = figs["02_4_refusal_rates"].axes[0]
    markers_at_zero = [l for l in ax.get_lines() if l.get_marker() not in (None, "None", "") and list(l.get_ydata()) == [0.0]]
    assert markers_at_zero, "a zero rate has no marker"
    ticks = [t.get_text() for t in figs["01_2_refusal_score_heatmap"].axes[0].get_yticklabels()]
    assert all("\n" not in t for t in ticks) and "1: \u21b5" in ticks
    # only the candidate layers get a column (stride 2 on 8 layers, the last 20% cut: 0, 2, 4)
    assert [t.get_text() for t in figs["01_2_refusal_score_heatmap"].axes[0].get_xticklabels()] == ["0", "2", "4"]


def test_saved_values_are_plain_json(drawn):
    for p in (drawn[0] / "results" / "scratch" / "figure_data").glob("*.json"):
        data = json.loads(p.read_text())
        assert data["figure"] in F._DRAW and isinstance(data["values"], dict)


def test_committed_cpu_figures_redraw_from_results_alone(tmp_path):
    """`refusal-rank figures --profile cpu` draws what results/cpu/figure_data holds, with no model."""
    if not any((C.REPO_ROOT / "results" / "cpu" / "figure_data").glob("*.json")):
        pytest.skip("no committed cpu figure data")
    done = F.redraw("cpu", out_dir=tmp_path)
    committed = {p.stem for p in (C.REPO_ROOT / "figures" / "cpu").glob("*.png")}
    assert done and set(done) <= committed
    for name in done:
        assert (tmp_path / f"{name}.png").read_bytes() == (C.REPO_ROOT / "figures" / "cpu" / f"{name}.png").read_bytes(), name
