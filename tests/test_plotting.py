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
from refusal_rank import probe_run as R  # noqa: E402

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


# notebook 05's numbers, shaped as probe_run.probe_model returns them (int layer keys; k_erase None where the
# budget was not enough)
PROBE_N = {"train": 48, "test": 36, "train_by_source": {"advbench": 8}, "overrefusal": 8}
ci = lambda a, n: {"acc": a, "lo": a - 0.1, "hi": min(1.0, a + 0.05), "n": n}
REPORTS = {m: {l: {"linear_acc": 0.9 - 0.02 * j, "linear_ci": {"acc": 0.9, "lo": 0.8, "hi": 0.95, "n": 36},
                   "mlp_acc": 0.85, "separability": 0.0 if l == 1 else 2.0 + l, "k_erase": None if l == 3 else 1,
                   "k_erase_budget": 4, "whitened": {"rank": 1.0 + 0.1 * l, "n_sig": l, "edge": 0.5, "top": [3.0, 1.0]},
                   "effective_rank": 1.5, "top_eigvals": [5.0, 1.0],
                   "by_source": {"advbench": ci(0.9, 6), "harmbench": ci(0.8, 6), "harmless": ci(0.95, 18)},
                   "transfer": {"by_source": {"harmbench": ci(0.7, 6), "harmless": ci(0.9, 18)},
                                "overrefusal_as_harmless": ci(0.6, 8)}} for l in (1, 2, 3)}
           for j, m in enumerate(MODELS)}
LAST_TOKEN = {m: {"linear_acc": 0.9, "by_layer": {str(l): 0.7 + 0.05 * l for l in (1, 2, 3)}} for m in MODELS}
SHARES = {m: {e: {str(k): {"held": 0.9 / k, "remains": 0.2 * k} for k in (1, 2, 4)} for e in ESTS} for m in MODELS}
BY_SOURCE = {m: R.by_source_rows(REPORTS[m][2]) for m in MODELS}


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
        "04_1_refusal_vs_k": F.sweep_curves(sweeps, 0.3, 80, {m: rate(0.7) for m in MODELS},
                                            note="Attack grid: every layer read; " + "a long note that wraps " * 12),
        "04_2_optimized_loss": F.optimized_loss_curves(
            {m: {1: {"cov-diff": [0.6, 0.3, 0.2], "pca-centered": [0.5, 0.4, 0.1]}, 2: {"warm": [0.3, 0.2, 0.15]}}
             for m in MODELS[:2]}, 3, 8),
        "05_1_probes_per_layer": F.probes_per_layer(REPORTS, LAST_TOKEN, 0.6, PROBE_N),
        "05_2_spectra": F.probe_spectra({m: torch.linspace(5, 0.1, 20) for m in MODELS},
                                        {m: {"vals": torch.linspace(3, -0.2, 16), "edge": 0.5} for m in MODELS},
                                        {m: 2 for m in MODELS}, 32),
        "05_3_probe_vs_removed": F.removal_curves({m: {e: {0: 0.9, 1: 0.7, 4: 0.5} for e in ESTS} for m in MODELS},
                                                  0.6, PROBE_N),
        "05_4_attack_share": F.attack_share(SHARES, PROBE_N),
        "05_5_by_source": F.probes_by_source(BY_SOURCE, {m: 2 for m in MODELS}, PROBE_N),
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
    assert len(list((repo / "results" / "scratch" / "figure_data").glob("*.json"))) == 13
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


def test_notebook_05_figures_keep_what_they_show(drawn):
    """Model colours, one figure-level legend, the CI band, open markers for k_erase not reached within the
    budget, hatched "remains" and transfer bars, same-source bars before the transfer ones."""
    figs = drawn[1]
    model_colors = {F.model_look(m).color.lower() for m in MODELS}
    for name in ("05_1_probes_per_layer", "05_2_spectra", "05_4_attack_share", "05_5_by_source"):
        fig = figs[name]
        assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes), name
        assert "n=" in (fig._suptitle.get_text() if fig._suptitle else "") + "".join(ax.get_title() for ax in fig.axes), name
    per_layer = figs["05_1_probes_per_layer"]
    acc, sep, wh, ke = per_layer.axes
    assert {matplotlib.colors.to_hex(l.get_color()) for l in acc.get_lines() if l.get_linestyle() != ":"} == model_colors
    assert len(acc.collections) == len(MODELS)  # one 95% band per model
    assert min(min(l.get_ydata()) for l in sep.get_lines()) == F.SEPARABILITY_FLOOR  # a 0 on the log axis
    per_layer.canvas.draw()  # tick labels are made at draw time: plain numbers, no "2 x 10^1" or "1e-03"
    sep_labels = [t.get_text() for t in sep.get_yticklabels(which="both") if t.get_text()]
    assert sep_labels and not any("$" in t or "e-" in t or "e+" in t for t in sep_labels), sep_labels
    open_at_budget = [l for l in ke.get_lines() if l.get_linestyle() == "None" and l.get_markerfacecolor() == "white"]
    assert len(open_at_budget) == len(MODELS) and all(list(l.get_ydata()) == [4] for l in open_at_budget)
    assert all(abs(l.get_xdata()[0] - 3) < 0.2 for l in open_at_budget)  # at layer 3, models offset a little
    wh_edge = figs["05_2_spectra"].axes[1]
    assert sum(l.get_linestyle() == ":" for l in wh_edge.get_lines()) == len(MODELS)  # one noise edge per model
    share = figs["05_4_attack_share"]
    for ax in share.axes[:len(MODELS)]:
        bars = ax.patches
        assert sum(b.get_hatch() == "////" for b in bars) == sum(not b.get_hatch() for b in bars) == len(ESTS) * 3
        held_colors = [matplotlib.colors.to_hex(b.get_facecolor()) for b in bars if not b.get_hatch()][:3]
        assert held_colors == [c.lower() for c in F.K_COLORS[:3]]  # the same k, the same colour, in every panel
    src = figs["05_5_by_source"].axes[0]
    ticks = [t.get_text().split("\n")[0] for t in src.get_xticklabels()]
    assert ticks == ["advbench", "harmbench", "harmless", "transfer:", "over-refusal"]
    hatched = [b for b in src.patches if b.get_hatch()]
    assert len(hatched) == 2 * len(MODELS) and all(b.get_x() > 2.5 for b in hatched)


def test_notebook_05_figures_read_a_summary_as_a_notebook(tmp_path):
    """tools/figure_data_from_summary.py passes the summary's str layer keys: the same values come out."""
    as_summary = {m: {str(l): r for l, r in by.items()} for m, by in REPORTS.items()}
    a = F.probes_per_layer(REPORTS, LAST_TOKEN, 0.6, PROBE_N).refusal_rank_data
    b = F.probes_per_layer(as_summary, LAST_TOKEN, 0.6, PROBE_N).refusal_rank_data
    assert a == b and list(a["values"]["reports"]["base"]) == ["1", "2", "3"]
    matplotlib.pyplot.close("all")


def test_older_figure_kinds_still_redraw(tmp_path, monkeypatch):
    """Figure data saved by a run of the older notebook 05 (kinds probe_layers and spectra) still redraws."""
    monkeypatch.setattr(C, "REPO_ROOT", tmp_path)
    d = F.figure_data_dir("old")
    layers = {"3": {"effective_rank": 2.0, "linear_acc": 0.9, "mlp_acc": 0.8, "k_chance": None}}
    (d / "05_1_probes_per_layer.json").write_text(json.dumps(
        {"figure": "probe_layers", "values": {"reports": {"base": layers}, "threshold": 0.6, "n": {"train": 8, "test": 4}}}))
    (d / "05_2_spectra.json").write_text(json.dumps(
        {"figure": "spectra", "values": {"eigs": {"base": [3.0, 1.0]}, "layer_of": {"base": 3}, "n": 8}}))
    assert sorted(F.redraw("old", out_dir=tmp_path / "out")) == ["05_1_probes_per_layer", "05_2_spectra"]


def _figure_data_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("figure_data_from_summary", C.REPO_ROOT / "tools" / "figure_data_from_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_figure_data_from_summary_reads_what_notebook_05_writes(tmp_path, monkeypatch, capsys):
    """The summary notebook 05 writes (probe_run.summary_layer per layer, probes_site, probes_last_token,
    probes_n) gives all five of its figures; an older notebook 05's summary gives 05_3 and says why not the rest."""
    tool = _figure_data_tool()
    monkeypatch.setattr(C, "REPO_ROOT", tmp_path)
    removal = {e: {"0": 0.9, "1": 0.7} for e in ESTS}
    summary = {"probes": {m: {str(l): R.summary_layer(r) for l, r in by.items()} for m, by in REPORTS.items()},
               "probes_site": {m: {"layer": 2, "k_chance": {}, "removal": removal, "attack_share": SHARES[m]} for m in MODELS},
               "probes_last_token": LAST_TOKEN, "probes_n": PROBE_N}
    d = tmp_path / "results" / "tiny"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))
    assert tool.main(["--profile", "tiny"]) == 0
    kinds = {p.stem: json.loads(p.read_text())["figure"] for p in (d / "figure_data").glob("05_*.json")}
    assert kinds == {"05_1_probes_per_layer": "probes_per_layer", "05_2_spectra": "probe_spectra",
                     "05_3_probe_vs_removed": "removal_curves", "05_4_attack_share": "attack_share",
                     "05_5_by_source": "probes_by_source"}
    for p in (d / "figure_data").glob("*.json"):
        p.unlink()
    old = {"probes": {m: {"3": {"effective_rank": 2.0, "k_chance": None, "linear_acc": 0.9, "mlp_acc": 0.8, "top_eigvals": [1.0]}}
                      for m in MODELS},
           "probes_site": {m: {"layer": 3, "k_chance": {}, "removal": removal} for m in MODELS}, "probes_n": PROBE_N}
    (d / "summary.json").write_text(json.dumps(old))
    assert tool.main(["--profile", "tiny"]) == 0
    assert [p.stem for p in (d / "figure_data").glob("05_*.json")] == ["05_3_probe_vs_removed"]
    assert "rerun notebook 05" in capsys.readouterr().out
    matplotlib.pyplot.close("all")


@pytest.mark.parametrize("n_models", range(1, 7))
def test_per_model_panels_keep_room_for_every_count_the_configs_sweep(n_models):
    """Notebook 04's figures draw one panel per model; the tiny profile sweeps six. Six in one row once
    collapsed the optimised attacker's panels (a layout warning in the executed notebook): every count
    from one to six must lay out."""
    import io
    import warnings

    models = ["base", "defended", "kl_only", "paper_mean", "mean_matched", "ablation_aware"][:n_models]
    loss = {k: {s: [0.9, 0.5, 0.3] for s in ("cov-diff", "pca-centered", "warm")} for k in (1, 2, 4)}
    sweeps = {m: {e: {"per_k": {1: {"score_rate": 0.2, "refusal_rate_harmful": rate(0.2)}}} for e in ESTS} for m in models}
    figs = [F.optimized_loss_curves({m: loss for m in models}, 3, 8),
            F.sweep_curves(sweeps, 0.3, 80, {m: rate(0.7) for m in models}, note="Attack grid: " + "words " * 40)]
    for fig in figs:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fig.savefig(io.BytesIO(), format="png", dpi=72, bbox_inches="tight")


def test_an_unreached_k_erase_sits_inside_its_panel_beside_the_small_ones():
    """k_erase is 1-5 where reached and the whole budget (48 on cpu) where not: the budget's open marker must
    lie inside the panel with its value as a tick, and 1 and 2 must stay apart (the linear axis once clipped
    the marker and squeezed every reached value into the bottom tenth)."""
    reports = {"base": {l: {**REPORTS["base"][1], "k_erase": None if l == 1 else l, "k_erase_budget": 48} for l in (1, 2, 3)}}
    fig = F.probes_per_layer(reports, {}, 0.6, PROBE_N)
    ke = fig.axes[3]
    lo, hi = ke.get_ylim()
    assert 48 < hi and lo < 1
    assert 48 in [round(t) for t in ke.get_yticks()]
    to_px = lambda y: ke.transData.transform((0, y))[1]
    panel = to_px(hi) - to_px(lo)
    assert (to_px(2) - to_px(1)) > 0.08 * panel


def test_budget_curve_ticks_are_the_budgets_trained():
    """03_3's budget axis is ticked at the prompt passes actually trained, each with its multiple of the
    first (a reader thinks in 1x, 2x, 4x, 8x, not in powers of two), and K_break's axis in plain integers."""
    e = lambda passes, kb: {"prompt_passes": passes, "refusal_rate_harmful": rate(0.6),
                            "screen": {"k1_reselected": {"refusal_rate_harmful": rate(0.1)}, "k_screened": [1, 2, 4], "k_break": kb}}
    budget = {"defended": {"1x": e(2240, 1), "2x": e(4480, 1), "4x": e(8960, None)}, "kl_only": {"1x": e(2240, 1)}}
    fig = F.screen_vs_budget(budget, 0.3, {"paper (16)": 16})
    left, right = fig.axes[:2]
    assert [t.get_text() for t in left.get_xticklabels()] == ["2240\n(1x)", "4480\n(2x)", "8960\n(4x)"]
    assert [t.get_text() for t in right.get_yticklabels()] == ["1", "2", "4", "8", "16"]


def test_screen_k_break_shows_how_low_the_break_may_lie():
    """A screen that broke the model at K=4 with dim-svd, which skipped K=2 and 3, bounds the break from above
    only: 03_3 draws a band from K=2 to 4. A break with every K below it tried has none."""
    est = {"k_skipped": {"iterated": [], "dim-svd": [16]}}  # a screen names its estimators here
    skipped = {"k_break": 4, "iterated": {"1": {}, "2": {}}, "dim-svd": {"1": {}, "4": {}}, **est}
    assert F._screen_k_low(skipped) == 2
    assert F._screen_k_low({"k_break": 2, "iterated": {"1": {}, "2": {}}, "dim-svd": {"1": {}}, **est}) == 2
    # an estimator the screen does not name is not read: only iterated's first untried K (3) counts, not dim-svd's 2
    assert F._screen_k_low({**skipped, "k_skipped": {"iterated": []}}) == 3
    assert F._screen_k_low({"k_break": 1}) == 1 and F._screen_k_low({"k_break": None}) is None
    e = lambda scr: {"prompt_passes": 64, "refusal_rate_harmful": rate(0.6),
                     "screen": {"k1_reselected": {"refusal_rate_harmful": rate(0.5)}, "k_screened": [1, 2, 4], **scr}}
    fig = F.screen_vs_budget({"mean_matched": {"4x": e(skipped)}, "kl_only": {"4x": e({"k_break": 1})}}, 0.3, {})
    bands = [c for c in fig.axes[1].collections if c.get_segments()]
    assert len(bands) == 1 and sorted(bands[0].get_segments()[0][:, 1].tolist()) == [2.0, 4.0]
