# %% [markdown]
# # 05 · Probes: was the signal spread, shrunk, moved, or left in place?
#
# Notebook 04 measures what an attacker has to ablate. Here we look at the activations themselves, per layer
# and per model, and ask which of four things the defence did to the harmful-vs-harmless signal:
#
# * **spread** it over more directions (what the paper claims: more directions to ablate);
# * **shrunk** it (every activation scaled down: an ablation removes a unit direction, so scale buys nothing);
# * **moved** it to other layers (the attacker's layer changes, the signal does not spread);
# * **left it in place**;
# * or, not one of the paper's cases but possible, **concentrated** it on fewer directions than before (the
#   opposite of spread), or **weakened** it: fainter at every layer.
#
# The first cpu run could not tell these apart: its probes trained on AdvBench and tested on HarmBench +
# StrongREJECT (a dataset shift: 0.750 at every early layer, one whole source misclassified), 16 INLP rounds
# never reached chance, and the excess second moment's spectrum is dominated by the mean-difference outer
# product, whose scale the covariance term shrank 17-180x without changing its shape. So:
#
# * **Probe splits by source** (`data/probe_splits.json`): every source (AdvBench, HarmBench, StrongREJECT,
#   harmless) is cut in two, the probe trains on one half of each and is tested on the other half of each,
#   with accuracy **per source**. Transfer from AdvBench alone to the other sources, and the over-refusal
#   prompts (benign but edgy, label harmless), are reported apart and labelled as transfer. The same prompts
#   serve every model, not filtered by its refusals, and none of the defence's training prompts are used.
# * **Regularised probes**: about 192 prompts per class in 1536 dimensions are linearly separable under any
#   labelling, so an unregularised logistic probe fits noise. The L2 strength is chosen by cross-validation on
#   the probe-train split only (at the attacker's layer, then used at every layer of that model), features
#   z-scored with train statistics (Qwen's stream has a few huge dimensions).
# * **Scale-free measures**, unchanged when every activation is multiplied by a constant:
#   - the **whitened class difference** $M = C_0^{-1/2}(S_h - C_0)C_0^{-1/2}$ (harmful second moment about the
#     harmless mean over the harmless covariance, in the top principal components of the probe-train split,
#     Ledoit–Wolf-shrunk): its eigenvalues are the harmful class's extra energy per direction in units of the
#     harmless spread; we report how many exceed a noise edge (from random halves of the harmless prompts)
#     and their participation ratio;
#   - **$k_{erase}$**: closed-form linear erasure in the LEACE sense, extended to $k$ directions: the
#     eigenvectors of $M$, in order of their share of the whitened mean difference, are erased obliquely
#     ($x \to x - C_0^{1/2}VV^\top C_0^{-1/2}x$), a linear probe is refitted on the erased train split and tested on
#     the erased held-out split, and $k_{erase}$ is the first $k$ at which it is at chance (≤ 0.60); null when
#     the budget (the whole frame) never gets there. For a binary label, one oblique direction erases all linear
#     information *in the population* (LEACE's theorem), so $k_{erase} > 1$ says the mean shift is carried by
#     several directions along which harmful prompts vary independently, or that the train estimate does not
#     carry over to held-out prompts. Beside it, the held-out linear and MLP accuracy after rank-1 LEACE: an MLP
#     still above chance there reads a signal that is not linear;
#   - **held-out separability** (squared $d'$ of a train-fitted shrinkage LDA) and the **share of it held by each
#     attacker's top 1, 4 and 16 directions**, against what remains once they are projected out of the raw stream;
# * the paper's lens: a **linear probe at the last prompt token** (the paper: 0.991 for the instruct model,
#   0.955 after its defence), and, for continuity, the unwhitened spectrum, the MLP probe and INLP's
#   $k_{chance}$ (INLP removes probe weights, not the mean difference, so it is slow even on a one-direction
#   signal; its budget is a lower bound).
#
# Representations are pooled (the mean over the post-instruction positions, which the attackers read and the
# defence matches) at every probed layer, the last 20% included; the last-token probe reads the final template
# token alone.

# %% tags=["parameters"]
profile = None  # None: $REFUSAL_RANK_PROFILE or "cpu"
models = None  # None: every model of the profile's [sweep] models

# %%
import time

import pandas as pd
from IPython.display import Markdown

from refusal_rank import plotting
from refusal_rank import probe_run as R
from refusal_rank import sweep_run as S
from refusal_rank.config import load_config
from refusal_rank.results import timing, update_summary

t0 = time.perf_counter()
cfg = load_config(profile)
S.select_models(cfg, models)
pc = cfg["probes"]
sets = R.probe_sets(pc)
n_probe = R.probe_n(sets)
pd.DataFrame({"train": n_probe["train_by_source"], "held-out test": n_probe["test_by_source"]})  # probe prompts per source

# %% [markdown]
# ## 1 · Every model, every probed layer

# %%
out = {}
for m in cfg["sweep"]["models"]:
    out[m] = R.probe_model(cfg, m, sets)
reports = {m: o["reports"] for m, o in out.items()}
site = {m: o["site"] for m, o in out.items()}
last_token = {m: o["last_token"] for m, o in out.items()}

# %%
fig = plotting.probes_per_layer(reports, last_token, pc["threshold"], n_probe)
plotting.save(fig, cfg, "05_1_probes_per_layer")
pd.DataFrame({m: {l: r["k_erase"] if r["k_erase"] is not None else f"> {r['k_erase_budget']}" for l, r in by.items()}
              for m, by in reports.items()})  # k_erase per layer and model

# %%
pd.DataFrame({m: {l: f"{r['linear_acc']:.3f} [{r['linear_ci']['lo']:.2f}, {r['linear_ci']['hi']:.2f}]" for l, r in by.items()}
              for m, by in reports.items()})  # held-out linear probe per layer, 95% bootstrap interval

# %% [markdown]
# ## 2 · Spectra at the attacker's layer
# Left: the unwhitened excess second moment over its largest eigenvalue (its scale, which the covariance term
# can shrink, divided out). Right: the whitened class difference with its noise edge (dotted).

# %%
fig = plotting.probe_spectra({m: o["spectra"]["raw"] for m, o in out.items()},
                             {m: o["spectra"]["whitened"] for m, o in out.items()}, site, n_probe["train"])
plotting.save(fig, cfg, "05_2_spectra")
pd.DataFrame({m: {"layer": site[m], "effective_rank (unwhitened)": reports[m][site[m]]["effective_rank"],
                  "top eigenvalue (unwhitened)": reports[m][site[m]]["top_eigvals"][0],
                  "whitened rank": reports[m][site[m]]["whitened"]["rank"], "whitened n_sig": reports[m][site[m]]["whitened"]["n_sig"],
                  "k_erase": reports[m][site[m]]["k_erase"], "linear_acc": reports[m][site[m]]["linear_acc"],
                  "after LEACE: linear": reports[m][site[m]]["leace"]["linear_acc"],
                  "after LEACE: MLP": reports[m][site[m]]["leace"]["mlp_acc"], "mlp_acc": reports[m][site[m]]["mlp_acc"],
                  "last-token probe": last_token[m]["linear_acc"]} for m in reports}).T

# %% [markdown]
# ## 3 · Linear probe accuracy vs directions removed, at the attacker's layer
# The whitened eraser (the curve that defines $k_{erase}$), INLP (fitted on train) and the bases of notebook
# 04's estimators, projected out of the raw stream (the iterated attacker contributes the directions it
# computed there; the others their first K).

# %%
fig = plotting.removal_curves({m: o["removal"] for m, o in out.items()}, pc["threshold"], n_probe)
plotting.save(fig, cfg, "05_3_probe_vs_removed")
pd.DataFrame({m: o["site_summary"]["k_chance"] for m, o in out.items()}).T  # first k at chance per basis (None: not within the curve)

# %% [markdown]
# ## 4 · What each attack removes against what remains
# The share of held-out separability in each attacker's top 1, 4 and 16 directions (features projected on
# them), and what remains once they are projected out. A signal an attack can break with one direction has
# most of its separability in that direction; a spread one keeps most of it after the attack's top directions
# are gone.

# %%
fig = plotting.attack_share({m: o["shares"] for m, o in out.items()}, n_probe)
plotting.save(fig, cfg, "05_4_attack_share")
pd.DataFrame({(m, e): {f"top {k}": f"{v['held']:.2f} / {v['remains']:.2f}" for k, v in sh.items()}
              for m, o in out.items() for e, sh in o["shares"].items()}).T  # held / remains

# %% [markdown]
# ## 5 · Per source, and transfer across sources (labelled apart)
# Same-source: the probe trained on every source's train half, tested on every source's held-out half.
# Transfer: a probe trained on AdvBench vs harmless only, tested on held-out HarmBench and StrongREJECT; and
# the same-source probe on over-refusal prompts (the share it calls harmless).

# %%
rows = {m: R.by_source_rows(by[site[m]]) for m, by in reports.items()}
fig = plotting.probes_by_source(rows, site, n_probe)
plotting.save(fig, cfg, "05_5_by_source")
pd.DataFrame({m: {k: f"{v['acc']:.2f} [{v['lo']:.2f}, {v['hi']:.2f}] (n={v['n']})" for k, v in r.items()} for m, r in rows.items()})

# %% [markdown]
# ## 6 · Reading
# Computed from the numbers above (`probe_run.reading`, thresholds in the profile's `[probes.reading]`): for
# each trained model against the original, whether its signal was spread, concentrated, moved to other
# layers, weakened, shrunk, or left in place, and the numbers that decide it.

# %%
summary_probes = {m: {str(l): R.summary_layer(r) for l, r in by.items()} for m, by in reports.items()}
summary_site = {m: o["site_summary"] for m, o in out.items()}
verdict = R.reading(summary_probes, summary_site, last_token, pc["reading"])
Markdown("\n".join(f"- {v['sentence']}" for v in verdict.values()) or "_No trained model to compare with the base._")

# %%
update_summary(cfg,
               probes=summary_probes,
               probes_site=summary_site,
               probes_last_token=last_token,
               probes_n=n_probe,
               probes_reading={m: {k: v[k] for k in ("case", "flags", "sentence")} for m, v in verdict.items()},
               **timing("05_probes", t0))
print(f"05 done in {time.perf_counter() - t0:.0f} s")
