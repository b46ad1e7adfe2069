"""Write the figure values of an older run, one whose notebooks ran before figures kept their values in
``results/<profile>/figure_data/``, from what that run did keep: ``summary.json`` and the direction file.

    python tools/figure_data_from_summary.py --profile cpu

Then ``refusal-rank figures --profile cpu`` redraws them. Figures whose values the summary does not hold
(notebook 01's candidate scores, notebook 03's loss histories) are listed and left alone: rerunning those
notebooks writes them. Differences from the notebook's own figure are said in each figure (05_2 has the
top 8 eigenvalues of each spectrum the summary keeps; 01_3 shows raw norms when the direction file has no
stream norms). A summary of the older notebook 05 (effective rank and k_chance, no whitened class
difference) gives 05_3 only; its 05_1 and 05_2 values, if saved, still redraw (plotting's older kinds).
"""
from __future__ import annotations

import argparse
import sys

import matplotlib

matplotlib.use("Agg")

from refusal_rank import plotting  # noqa: E402
from refusal_rank.config import load_config, results_dir  # noqa: E402
from refusal_rank.probe_run import by_source_rows  # noqa: E402
from refusal_rank.results import load_artifact, read_summary  # noqa: E402


def k1_rows(s: dict) -> list[dict]:
    """Notebook 02's bars: the original and the K=1 ablation on three sets, activation addition and subtraction."""
    rows = []
    keys = ("rate", "lo", "hi", "n")
    for model, res in (("original", s["base"]), ("K=1 ablated", s["attack_k1"])):
        for name, key in (("harmful", "refusal_rate_harmful"), ("harmless", "refusal_rate_harmless"), ("over-refusal", "overrefusal_rate")):
            rows.append({"model": model, "set": name, **{k: res[key][k] for k in keys}})
    rows.append({"model": "act. addition (+r)", "set": "harmless", **{k: s["actadd"]["refusal_rate_harmless"][k] for k in keys}})
    rows.append({"model": "act. subtraction (-r)", "set": "harmful", **{k: s["actsub"]["refusal_rate_harmful"][k] for k in keys}})
    return rows


def post_tokens(cfg: dict, n_post: int, d: dict) -> list[str]:
    """The post-instruction tokens as notebook 01 shows them: from the tokenizer of the cached checkpoint
    when there is one (no weights are loaded), else by index, with the selected one named by the summary."""
    from refusal_rank.config import cache_root
    from refusal_rank.models import template_n_post

    m = cfg["model"]
    ckpt = cache_root() / "models" / f"{m['name']}-{m.get('gguf_sha256', '')[:12]}"
    if (ckpt / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ckpt))
        n_rule, post = template_n_post(tok, m)  # the rule every reader of cached positions uses
        if n_rule == n_post:
            return [tok.decode([t]) for t in post[-n_post:]]
        print(f"the direction file holds {n_post} positions but the profile reads {n_rule}: positions shown by index")
    names = [f"pos {i}" for i in range(n_post)]
    names[d["position"]] = d["position_token"]
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    a = ap.parse_args(argv)
    cfg = load_config(a.profile)
    s = read_summary(a.profile)
    wrote, skipped = [], []

    def save(name, fig):
        plotting.save(fig, cfg, name)
        wrote.append(name)

    d = s.get("direction")
    if d and (results_dir(a.profile) / "direction.safetensors").is_file():
        found = load_artifact(cfg, "direction.safetensors", "01_directions")
        post = post_tokens(cfg, found["all_directions"].shape[1], d)
        save("01_3_direction_norms", plotting.direction_norms(
            found["all_directions"], post, d["filter"]["harmful_train"]["used"], (d["layer"], d["position"]),
            found.get("harmless_mean_norm")))
    skipped.append("01_2_refusal_score_heatmap (candidate scores: rerun notebook 01)")
    if all(k in s for k in ("base", "attack_k1", "actadd", "actsub")):
        title = f"Refusal rates, {cfg['model']['name']} (greedy {cfg['eval']['max_new_tokens']} tokens, 95% CI)"
        save("02_4_refusal_rates", plotting.rate_bars(k1_rows(s), title))
    skipped.append("03_1_training_curves (loss histories: rerun notebook 03)")
    if "sweep_details" in s:
        n = next(iter(next(iter(next(iter(s["sweep_details"].values())).values()))["per_k"].values()))["refusal_rate_harmful"]["n"]
        save("04_1_refusal_vs_k", plotting.sweep_curves(s["sweep_details"], s["sweep_config"]["threshold"], n,
                                                        plotting.unattacked_rates(s)))
    if "probes" in s and "probes_site" in s:
        pc, n = cfg["probes"], s["probes_n"]
        site = {m: v["layer"] for m, v in s["probes_site"].items()}
        at_site = {m: s["probes"][m][str(site[m])] for m in site}
        save("05_3_probe_vs_removed", plotting.removal_curves({m: v["removal"] for m, v in s["probes_site"].items()},
                                                              pc["threshold"], n))
        if all("whitened" in r for by in s["probes"].values() for r in by.values()):
            save("05_1_probes_per_layer", plotting.probes_per_layer(s["probes"], s.get("probes_last_token") or {},
                                                                    pc["threshold"], n))
            save("05_2_spectra", plotting.probe_spectra({m: r["top_eigvals"] for m, r in at_site.items()},
                                                        {m: {"vals": r["whitened"]["top"], "edge": r["whitened"]["edge"]}
                                                         for m, r in at_site.items()}, site, n["train"]))
        else:
            skipped.append("05_1_probes_per_layer, 05_2_spectra (the summary is of the older notebook 05, without the "
                           "whitened class difference: rerun notebook 05)")
        if all("attack_share" in v for v in s["probes_site"].values()):
            save("05_4_attack_share", plotting.attack_share({m: v["attack_share"] for m, v in s["probes_site"].items()}, n))
        else:
            skipped.append("05_4_attack_share (not in the older notebook 05's summary: rerun notebook 05)")
        if all("by_source" in r and "transfer" in r for r in at_site.values()):
            save("05_5_by_source", plotting.probes_by_source({m: by_source_rows(r) for m, r in at_site.items()}, site, n))
        else:
            skipped.append("05_5_by_source (not in the older notebook 05's summary: rerun notebook 05)")
    print("wrote the values of: " + ", ".join(wrote))
    print("not in the summary: " + "; ".join(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
