# %% [markdown]
# # 03 · Defensive post-training
#
# The paper post-trains the instruct model so that refusal no longer lives on one direction. Inputs are
# prompt-only chat sequences (generation prompt added, no response), harmful and harmless, in
# class-balanced batches. The objective:
#
# $$\mathcal L = \mathcal L_{\text{lm}} + \lambda_{kd}\,T^2\,\mathrm{KL}\big(p^{T}_{\text{teacher}} \,\|\, p^{T}_{\text{student}}\big)
#   + \lambda_{cov}\,\mathcal L_{cov} + \lambda_{mean}\,\mathcal L_{mean}$$
#
# * $\mathcal L_{\text{lm}}$: next-token cross-entropy over the prompt tokens (keeps the prompt distribution in place);
# * KD at the last prompt position, where refuse-or-comply is decided; the teacher is the original model
#   (with LoRA: the same weights with adapters off), its logits computed once and cached.
#
# **The moment terms, as they now stand.** An earlier version standardised the pooled vectors by the
# teacher's *fixed* statistics and used plug-in class covariances from 16 prompts a class. Both choices let
# the optimiser win without matching anything: scaling every vector by $c$ scales that term by $c^4$, so it
# fell 600-fold while the activations shrank and the probes did not move; and its value for two samples of
# one distribution was a positive floor of about $2/(n-1)$. The terms are now
#
# * **scale-free**: per site (a layer, or a layer and position), the class gap is divided by the student's
#   *own current* spread, $\mathcal L_{mean} = \|\mu_h-\mu_o\|^2 / (\operatorname{tr}\Sigma_h+\operatorname{tr}\Sigma_o)$ and
#   $\mathcal L_{cov} = \|\Sigma_h-\Sigma_o\|_F^2 / \big(\tfrac12(\operatorname{tr}\Sigma_h+\operatorname{tr}\Sigma_o)\big)^2$, so a
#   common rescaling of the representations changes nothing (the teacher's per-dimension standardisation
#   stays, only to set units: without it Qwen's few huge dimensions would be the whole trace);
# * **unbiased**: every second-order quantity is a U-statistic over *distinct* prompts (the diagonal Gram
#   terms, which carry each prompt's own variance, are dropped; covariances use differences of prompt pairs,
#   so no class mean is estimated at all). Two samples of one distribution give 0 on average;
# * **estimated from the whole step's batch at the current weights**: a step first runs every micro-batch
#   of its 16 + 16 prompts but the first without a graph, then the micro-batches with gradients; once the
#   first has run, the terms and their gradient with respect to every row's site vectors are computed, and
#   each micro-batch receives that gradient through its own vectors (exact; three quarters of an extra
#   forward pass a step with four micro-batches). Rows are shuffled before the covariance term pairs them, over `moment_pairings`
#   random pairings;
# * **watched against their noise floor**: every step logs the same term on two halves of the harmless
#   class (figure 03_2).
#
# * **anchored in scale**: a ratio can still be lowered by inflating a spread both classes share, and the
#   optimiser did so (below), so every moment variant also pays `lambda_spread` x the mean over sites of
#   $\log(\operatorname{tr}\Sigma_{pooled}/\operatorname{tr}\Sigma^{teacher}_{pooled})^2$ on the batch's prompts, zero for the teacher.
#
# The moment diagnostics (the total variance, its ratio to the teacher's, and the top eigenvalue of the
# excess second moment on fixed prompts, before training and at every milestone) tell matching from
# shrinking or inflating.
#
# **Variants** (same budget, batches and adapters; `[defense.variants]`, shown below):
# `defended` (the paper's objective: covariance term, pooled over the post-instruction positions, every
# layer); `kl_only` (L_lm + KD: what the paper's published code trains, since its covariance term is
# identically zero at its micro-batch of 2); `paper_mean` (the paper's mean-matching row, its K = 11: class
# means pooled over every prompt token, every layer); `mean_matched` (ours: class means at every
# post-instruction position of every layer the attackers scan, i.e. the difference-in-means vectors the
# K = 1 attacker reads); `ablation_aware` (KD also under a random rank-$k \le k_{max}$ ablation of the current
# top singular directions of all per-layer difference-in-means vectors).
#
# One property of the objective decides what to expect. $\mathcal L_{cov}$ is unchanged when one class's
# activations are shifted by a constant vector: it compares the classes' spreads about their own means, so it
# puts no pressure on $\mu_h-\mu_o$, the difference in means that the K = 1 attacker reads. Under `defended`
# that direction can weaken only as a side effect; the variants that match means (`paper_mean`,
# `mean_matched`) are the ones that act on it directly.
#
# **Budget.** The base budget (1x) is the first milestone of `[defense.train]`; the budget-curve variants
# train on to the last (8x on `cpu`: the paper profile's 141 x 128 prompt passes). The rate warms up and then
# stays constant, so each snapshot is a model trained at one rate for that many passes. Long runs happen
# outside the notebook (`python tools/train_variant.py --plan`, resumable); this notebook reuses them.

# %% tags=["parameters"]
profile = None  # None: $REFUSAL_RANK_PROFILE or "cpu"
variants = None  # None: the profile's [defense] run (else every variant of [defense.variants])

# %%
import json
import time

import matplotlib.pyplot as plt
import pandas as pd

from refusal_rank import defense_run as R
from refusal_rank import paper
from refusal_rank import pipeline as P
from refusal_rank import plotting
from refusal_rank.config import load_config, results_dir
from refusal_rank.judge import judge_report
from refusal_rank.models import load_model
from refusal_rank.results import timing, read_summary, update_summary

t0 = time.perf_counter()
cfg = load_config(profile)
dc = cfg["defense"]
variants = list(variants or R.default_variants(cfg))
print(json.dumps({k: dc[k] for k in ("method", "n_train_per_class", "lora", "train")}, indent=1))
pd.DataFrame(dc["variants"]).T

# %% [markdown]
# ## 1 · Training
# Every variant to 1x, then the budget-curve variants milestone by milestone (the order of the background
# queue). A finished milestone is reused and an interrupted run resumes from its last checkpoint. Every
# `eval_every` steps and at every milestone the current weights are evaluated on val: harmful refusal score,
# first-token KL on harmless prompts, the strongest K=1 attack on a coarse grid, and the moment diagnostics.

# %%
base = load_model(cfg)
tv = P.filtered_train_val(cfg, base)
base_lp_val = P.logprobs_cached(cfg, base, tv.harmless_val, desc="base harmless val")
factory = R.periodic_eval(cfg, tv, base_lp_val)
del base
records = {}
for name, until in R.train_plan(cfg, variants):
    records[name] = R.train_variant(cfg, name, evaluate_factory=factory, until=until)
for name, r in records.items():
    print(f"{name}: {r['steps']} steps, {r['seconds'] / 60:.1f} min, {r['tokens_per_s']:.1f} tokens/s")

# %%
fig = plotting.training_curves(records)
plotting.save(fig, cfg, "03_1_training_curves")

# %% [markdown]
# ### Each moment term against its noise floor
# The grey line is the same term computed on two halves of the harmless class: what the estimate reads
# when there is no class difference at all (from half as many prompts, so an upper bound on the floor).

# %%
fig = plotting.term_vs_floor(records)
plotting.save(fig, cfg, "03_2_terms_vs_floor")

# %%
moments = {n: R.moments_entry(r) for n, r in records.items()}
pd.DataFrame({n: m for n, m in moments.items() if m}).T

# %% [markdown]
# `top_eig` is the top eigenvalue of the excess second moment of harmful over harmless on fixed prompts
# (standardised units), `total_var` the mean per-site variance, `spread` the pooled total variance against the
# teacher's on the same prompts (1: unchanged; the anchor holds it near 1). Matching, not shrinking or
# inflating, reads as a falling term and top eigenvalue at a spread that stays near 1 (a fall of the top
# eigenvalue by more than 2x with the spread falling alike is shrinkage; a term falling as the spread grows
# is inflation).
#
# For a mean-matching variant the top eigenvalue falls for a reason of its own: the excess second moment is
# $\Sigma_h-\Sigma_o+(\mu_h-\mu_o)(\mu_h-\mu_o)^\top$, and the variant removes the second part. Its two parts
# are measured apart (`top_eig_cov`, the covariance difference alone; `gap_sq`, the unbiased squared mean
# gap): matching lowers `gap_sq` with `top_eig_cov` in place, shrinking lowers both. Checkpoints trained before
# the parts were recorded are remeasured on the same prompts by `tools/moment_decomposition.py` (the background
# queue runs it), into `results/<profile>/moment_decomposition.json`, shown here when it exists.

# %%
decomp_path = results_dir(cfg["profile"]) / "moment_decomposition.json"
if decomp_path.is_file():
    decomp = json.loads(decomp_path.read_text())["variants"]
    show = pd.DataFrame([{"variant": n, "step": int(st), **{k: d.get(k) for k in ("top_eig", "top_eig_cov", "gap_sq", "total_var", "spread")}}
                         for n, v in decomp.items() for st, d in v["steps"].items()])
else:
    show = "no moment decomposition yet (tools/moment_decomposition.py)"
show

# %% [markdown]
# ## 2 · Every checkpoint: utility and the attack screen
# Each variant at each milestone it reached, on the test sets against the original: refusal rates (harmful,
# harmless, over-refusal), first-token KL and CE on the original's harmless completions; and the attack
# screen (`[defense.screen]`) on the checkpoint's own weights: the re-selected K = 1 attack, the first rounds
# of the paper's iterated attacker and dim-svd at a few K, each a generated harmful refusal rate. With
# `stop_after_break` a K at or above the lowest K that already broke the model (in any estimator, the
# re-selected K = 1 attack first) is not generated (listed under `k_skipped`): the screen reads the lowest K
# that breaks, which such a K cannot lower. A checkpoint that the K = 1 attack breaks is screened at K = 1
# only; notebook 04 attacks the final checkpoints with every estimator. `k1_fallback` says that notebook 01's
# selection found no candidate that both passed its KL filter and made harmless prompts refused when added
# (Arditi et al.'s induce check); the attack then ablates the checked candidate with the lowest ablated refusal
# score plus KL, even when that candidate failed the KL filter: `k1_kl` is the first-token KL on harmless val
# of the ablation the attack used, what the break costs the attacker. A defense that leaves the ablation
# working but breaks the induce check has moved part of what the difference in means carries, not all of it.
#
# Which variants go on to 8x is `[defense] budget_curve`: `kl_only`, `defended`, and the moment variant that
# resisted the re-selected K = 1 attack best at 1x (its harmful refusal rate under the attack, then its ablated
# val score), chosen from the 1x screens before any longer run started; on `cpu` also `ablation_aware`, the
# one variant the K = 1 attack left above the threshold at 1x, so that the curve asks whether budget raises K
# where K is above 1. The config's comment names them and why.
#
# A milestone below a variant's last that an earlier run measured on bitwise the same weights, under the same
# measurement config and test prompts, is not measured again: the committed `results/<profile>/queue_progress.json`
# names each measurement's cache file, whose key holds all of these, and an entry whose name matches is carried
# from that file, marked `carried_from_commit` (`defense_run.milestone_budget`). A new machine retrains every
# checkpoint; this keeps it from re-measuring the ones it reproduced exactly, about half an hour each.

# %%
base = load_model(cfg)
sets = P.test_sets(cfg)
base_lp = P.logprobs_cached(cfg, base, sets.harmless, desc="base harmless")
base_eval = P.evaluate_model(cfg, base, sets, None, None, "original")
del base
committed = R.committed_progress(cfg)  # a milestone below the last, measured before on these very weights, is carried
budget, results, completions = {}, {}, {}
for name in variants:
    budget[name] = {}
    for step in R.reached_milestones(cfg, name):  # cached: the background queue may have measured it already
        entry, ev = R.milestone_budget(cfg, name, step, sets, lambda: (base_eval["completions"]["harmless"], base_lp), committed)
        budget[name][R.budget_label(cfg, step)] = entry
        if step == R.target_step(cfg, name):
            res = dict(ev["res"])
            completions[name] = res.pop("completions")
            results[name] = res
rows = []
for name, per in budget.items():
    for label, e in per.items():
        # the same headline numbers the queue's log and `refusal-rank progress` print (R.budget_headline);
        # k1_fallback: no candidate both kept the KL filter and induced refusal when added (see above);
        # k1_filter_fallback: the splits where too few prompts had a positive refusal score for the attacker's
        # filter, so it fitted on their most refusing prompts (pipeline.filtered_train_val)
        rows.append({"variant": name, "budget": label, "prompt passes": e["prompt_passes"], **R.budget_headline(e)})
pd.DataFrame(rows).set_index(["variant", "budget"])

# %%
fig = plotting.screen_vs_budget(budget, cfg["sweep"]["threshold"], paper.K_BREAK_LINES)
plotting.save(fig, cfg, "03_3_screen_vs_budget")

# %% [markdown]
# ### Before and after, at each variant's final checkpoint
# The same measurements at the checkpoint notebook 04 attacks (the last milestone for the budget curve,
# 1x for the others), beside the original.

# %%
summary = read_summary(cfg["profile"])
table = plotting.before_after_table({**summary.get("base", {}), "attack_k1": summary.get("attack_k1")}, results)
table

# %% [markdown]
# ### Against the targets
# Each trained model against the original (`[defense.targets]` of the profile): harmful refusal within 0.05,
# harmless and over-refusal not higher by more than 0.03, first-token KL ≤ 0.1, CE within 5%, and harmful
# refusal under the re-selected K=1 attack at least 0.80 of the model's own. Point estimates; the intervals
# are in the table above.

# %%
for name in results:
    results[name]["targets"] = R.target_checks(summary.get("base", {}), results[name], dc["targets"])
checks = pd.DataFrame({n: {k: ("met" if v["met"] else "missed") for k, v in results[n]["targets"].items()} for n in results})
checks

# %%
for name in results:
    missed = [k for k, v in results[name]["targets"].items() if not v["met"]]
    k1 = results[name]["targets"]["k1_attack_resisted"]
    print(f"{name}: {len(missed)} target(s) missed {missed}; harmful refusal {k1['model']} -> {k1['under_k1']} under the "
          f"re-selected K=1 direction (layer {results[name]['attack_k1']['direction']['layer']}, "
          f"position {results[name]['attack_k1']['direction']['position']})")

# %% [markdown]
# ### What was tried
# Everything here shares one budget and one set of batches and differs only in its terms. Before the
# moment terms were made scale-free and unbiased, `defended` at 1x was `kl_only` plus a shrinkage of the
# activations: its covariance term fell from its noise floor (0.13) to 2e-4 while the top eigenvalue of the
# excess second moment fell 17-180x and no probe moved, and every variant broke at K = 1. The tables above
# say whether matching the classes *for real* (terms at their floor, top eigenvalue falling at a steady
# total variance), pooling as the paper does, or more budget changes that; notebook 04 attacks the final
# checkpoints with every estimator.
#
# A second attempt (the scale-free, unbiased terms, but each micro-batch of 4 + 4 read beside a memory of
# the last 128 vectors of each class, detached and up to 8 steps old) was gamed through the memory. After 70
# steps its logged covariance term was 8e-4, but on the fixed diagnostic prompts the term was 0.044 (0.089
# before training, noise floor 0.010). Recomputed at step 70 on that step's real batch: 8e-4 with the real
# memory, 0.032 with the memory's prompts rerun at the current weights; the stale vectors had cosine 0.81
# with their current ones. Moving the current vectors away from the stale ones inflates the spread the term
# divides by. The rows had also been paired in length order, which hides part of the gap (0.063 against
# 0.091 for random pairings on the original model). A third attempt read the whole batch at the current
# weights, with no anchor: within 30 steps it inflated the standardised spread 2- to 1600-fold by layer
# (gradient norm 47 -> 3973, prompt LM loss 1.1 -> 2.9) and was stopped. Every fix is above; those runs
# were discarded and the moment variants here were trained with all of them (`results/cpu/forensics/`).
#
# **Speed.** A step is the unit of every budget, so its cost decides how far the curve reaches. On a CPU
# without native bf16 the step is float32 and compute-bound (about half the matmul peak), so only less work
# makes it faster. Every chat-formatted prompt starts with the same template tokens (on `cpu` 24 of ~42),
# and a causal model computes the same numbers for the same prefix: `share_prefix` runs it once a
# micro-batch and lets each row compute only its own tokens, with the same losses and gradients (tested
# against the full batch). `benchmarks/bench_training.py` times the earlier setup, the unshared one and the
# shared one side by side (results/<profile>/bench.json). While building it we found that the micro-batches
# had never been sorted by length (the length read from the chat template was the size of an encoding
# dict, 2 for every prompt); the variants here were all trained after that fix.

# %% [markdown]
# ## 3 · The marker judge against hand labels
# Completions were read and labelled by hand (`data/judge_labels.jsonl`, with a one-line reason each); the
# marker judge's precision and recall on them, per model that wrote the completions, with the counts they
# come from (the labelled set grows as trained models are added to it). "<variant>@1x attacked" are harmful
# completions of a checkpoint under the screen's re-selected K = 1 attack (`tools/judge_sample.py
# --from-screen`): the verdicts that decide a screen's K_break. A completion that writes the opposite of the
# request, or a lecture instead, is labelled a refusal; the markers rarely see those, so on an attacked model
# they read a lower refusal rate than a reader would.

# %%
judge = judge_report()
judge

# %%
# per-step histories (every loss term and its noise floor) beside the summary, so that figures 03_1 and
# 03_2 can be redrawn from results/ alone
(results_dir(cfg["profile"]) / "training_history.json").write_text(
    json.dumps({n: {"variant": r["variant"], "history": r["history"]} for n, r in records.items()}) + "\n")
update_summary(cfg,
               defended=results.get("defended", {}),
               controls={n: results[n] for n in results if n in ("kl_only", "ablation_aware")},
               named_variants={n: results[n] for n in results if n not in ("defended", "kl_only", "ablation_aware")},
               training={n: {**R.training_entry(r, r.get("peak_gflops"), r.get("flops_per_token")), "evals": r["evals"]}
                         for n, r in records.items()},
               budget=budget,
               moments={n: m for n, m in moments.items() if m},
               judge=judge,
               **timing("03_defense", t0))
print(f"03 done in {time.perf_counter() - t0:.0f} s")
