# %% [markdown]
# # 05 · Probe spectra: did the signal move, or only hide?
#
# Notebook 04 measures what an attacker has to ablate. Here we look at the activations themselves, per layer
# and per model, on pooled representations (the mean over the post-instruction positions, the ones the
# attackers read and the defence matches):
#
# * the eigenvalue **spectrum of the excess second moment** of harmful over harmless activations (about the
#   harmless mean) and its **effective rank**, the participation ratio $(\sum_i\lambda_i)^2/\sum_i\lambda_i^2$
#   over the positive eigenvalues: a refusal signal on one direction has effective rank near 1;
# * held-out accuracy of a **linear** and of a small **MLP probe** (harmful vs harmless; train on the train
#   split, test on held-out test prompts). A falling linear probe with a high MLP probe would mean the signal
#   was reorganised, not erased;
# * linear-probe accuracy as directions are **removed** one at a time (INLP, fitted on train), and
#   $k_{chance}$: the number of removed directions after which accuracy is ≤ 0.60; at the attacker's layer,
#   the same curve for the bases of every estimator of notebook 04.
#
# Features are z-scored per dimension with the train statistics before a probe is fitted (Qwen's residual
# stream has a few huge-magnitude dimensions); directions are removed from the raw stream, as an ablation does.

# %% tags=["parameters"]
profile = None  # None: $REFUSAL_RANK_PROFILE or "cpu"
models = None  # None: every model of the profile's [sweep] models

# %%
import time

import pandas as pd
import torch

from refusal_rank import data as D
from refusal_rank import plotting
from refusal_rank import probes as Q
from refusal_rank import sweep_run as S
from refusal_rank.config import load_config
from refusal_rank.results import timing, update_summary

t0 = time.perf_counter()
cfg = load_config(profile)
S.select_models(cfg, models)
pc = cfg["probes"]
harm_test = D.split_prompts("harmful_test", pc["n_test_per_source"], cfg["seed"], per_source=True)
ok_test = D.split_prompts("harmless_test", len(harm_test), cfg["seed"])
print(f"held-out probe test: {len(harm_test)} harmful, {len(ok_test)} harmless")

# %% [markdown]
# ## 1 · Per layer: spectrum, probes, k_chance

# %%
reports, eigs, site, removal, removal_k_chance = {}, {}, {}, {}, {}
for m in cfg["sweep"]["models"]:
    bundle = S.load_attacked(cfg, m)
    ctx = S.attack_context(cfg, bundle)
    # the attacker's layer: that of the iterated attacker's first direction (notebook 01's procedure on these weights)
    # (the iterated attacker's directions are those notebook 04 computed: at least one)
    found = S.iterated_basis(ctx, 1)
    site[m] = found.rounds[0]["layer"]
    layers = sorted(set(range(0, bundle.n_layers, pc["layer_stride"])) | {site[m]})
    pooled = {}
    for split, ps in (("train_h", ctx.tv.harmful_train), ("train_o", ctx.tv.harmless_train), ("test_h", harm_test), ("test_o", ok_test)):
        pooled[split] = S.grid_acts(cfg, bundle, ps, layers, f"{split} acts").float().mean(2)  # (n, layers, d): pooled positions
    ytr = torch.cat([torch.ones(len(pooled["train_h"])), torch.zeros(len(pooled["train_o"]))])
    yte = torch.cat([torch.ones(len(pooled["test_h"])), torch.zeros(len(pooled["test_o"]))])
    xs = lambda i: (torch.cat([pooled["train_h"][:, i], pooled["train_o"][:, i]]), torch.cat([pooled["test_h"][:, i], pooled["test_o"][:, i]]))
    reports[m] = {}
    for i, l in enumerate(layers):
        if (pooled["train_h"][:, i].mean(0) - pooled["train_o"][:, i].mean(0)).norm() < 1e-6:
            continue  # layer 0: the pooled template tokens are identical for every prompt
        xtr, xte = xs(i)
        reports[m][l] = Q.layer_report(xtr, ytr, xte, yte, pc["inlp_k_max"], pc["ks"], cfg["seed"], pc["threshold"], pc["mlp_hidden"])
    i = layers.index(site[m])
    eigs[m] = Q.spectrum(pooled["train_h"][:, i], pooled["train_o"][:, i])
    xtr, xte = xs(i)
    removal[m] = {"inlp": reports[m][site[m]]["acc_vs_removed"]}
    for e in S.check_estimators(cfg["sweep"]["estimators"]):
        basis = (found.basis if e == "iterated"
                 else S.estimator_basis(ctx, e, max(cfg["sweep"]["k_grid"]))["basis"])
        removal[m][e] = Q.acc_vs_removed(xtr, ytr, xte, yte, basis.float(), pc["ks"], cfg["seed"])
    removal_k_chance[m] = {e: Q.k_chance(c, pc["threshold"]) for e, c in removal[m].items()}
    del bundle, ctx
n_probe = {"train": len(ytr), "test": len(yte)}

# %%
fig = plotting.probe_layers(reports, pc["threshold"], n_probe)
plotting.save(fig, cfg, "05_1_probes_per_layer")
pd.DataFrame({m: {l: r["k_chance"] for l, r in by.items()} for m, by in reports.items()})  # k_chance per layer (None: > inlp_k_max)

# %% [markdown]
# ## 2 · Spectra at the attacker's layer

# %%
fig = plotting.spectra(eigs, site, n_probe["train"])
plotting.save(fig, cfg, "05_2_spectra")
pd.DataFrame({m: {"layer": site[m], "effective_rank": reports[m][site[m]]["effective_rank"],
                  "linear_acc": reports[m][site[m]]["linear_acc"], "mlp_acc": reports[m][site[m]]["mlp_acc"],
                  "k_chance": reports[m][site[m]]["k_chance"]} for m in reports}).T

# %% [markdown]
# ## 3 · Linear probe accuracy vs directions removed, at the attacker's layer
# INLP (fitted on train) and the bases of notebook 04's estimators (the iterated attacker contributes the
# directions it computed there; the others their first K).

# %%
fig = plotting.removal_curves(removal, pc["threshold"], n_probe)
plotting.save(fig, cfg, "05_3_probe_vs_removed")
pd.DataFrame(removal_k_chance).T  # k_chance per model and basis at the attacker's layer (None: not reached within the curve)

# %%
update_summary(cfg,
               probes={m: {str(l): {**{k: r[k] for k in ("effective_rank", "k_chance", "linear_acc", "mlp_acc")},
                                    "top_eigvals": r["top_eigvals"][:8]}
                           for l, r in by.items()} for m, by in reports.items()},
               probes_site={m: {"layer": site[m], "k_chance": removal_k_chance[m],
                                "removal": {e: {str(k): v for k, v in c.items()} for e, c in removal[m].items()}}
                            for m in removal},
               probes_n=n_probe,
               **timing("05_probes", t0))
print(f"05 done in {time.perf_counter() - t0:.0f} s")
