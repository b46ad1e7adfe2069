# %% [markdown]
# # 02 · The baseline attack: one direction (K = 1)
#
# With the direction $\hat r$ of notebook 01 we attack the original model three ways:
#
# * **directional ablation** of $\hat r$ from every residual write, as a *weight edit* ("abliteration"):
#   $W \leftarrow (I - \hat r \hat r^\top) W$ for the embedding and every attention/MLP output matrix. The edit
#   is exported as a plain Hugging Face checkpoint and reloaded with `from_pretrained` to check that it
#   equals run-time ablation through nnsight;
# * **activation addition** of $+r$ at the selected layer (induce refusal on harmless prompts);
# * **activation subtraction** of $r$ (bypass refusal on harmful prompts).
#
# Refusal rates use greedy completions judged by a marker list (`refusal_rank.metrics.REFUSAL_MARKERS`),
# each with a 95% bootstrap interval. Utility: first-token KL(original ‖ model) on harmless test prompts,
# and the cross-entropy of each model on the original model's own harmless completions.

# %% tags=["parameters"]
profile = None  # None: $REFUSAL_RANK_PROFILE or "cpu"

# %%
import time

import pandas as pd
import torch
from IPython.display import display  # a builtin in Jupyter only: the script also runs under plain Python

from refusal_rank import pipeline as P
from refusal_rank import plotting
from refusal_rank.ablation import orthogonalized
from refusal_rank.activations import ActAdd
from refusal_rank.config import load_config
from refusal_rank.metrics import refusal_labels, refusal_score
from refusal_rank.models import load_model
from refusal_rank.results import timing, load_artifact, run_cache, update_summary

t0 = time.perf_counter()
cfg = load_config(profile)
bundle = load_model(cfg)
found = load_artifact(cfg, "direction.safetensors", "01_directions")
r = found["direction"]
basis = (r / r.norm())[:, None]
sets = P.test_sets(cfg)
print(f"direction: layer {found['layer']}, position {found['position']};  test sets: "
      + ", ".join(f"{k} n={len(v)}" for k, v in sets.items()))

# %% [markdown]
# ## 1 · The original model

# %%
base_lp = P.logprobs_cached(cfg, bundle, sets.harmless, desc="base harmless")
base = P.evaluate_model(cfg, bundle, sets, None, None, "base")
base["ce_harmless"] = round(P.completion_ce(bundle, [p.text for p in sets.harmless],
                                            [c["ids"] for c in base["completions"]["harmless"]],
                                            cfg["eval"]["fwd_batch_size"]), 5)
{k: v for k, v in base.items() if k != "completions"}

# %% [markdown]
# ## 2 · Ablating the direction (weight orthogonalisation)

# %%
with orthogonalized(bundle, basis):
    k1 = P.evaluate_model(cfg, bundle, sets, base["completions"]["harmless"], base_lp, "K=1 ablated")
    k1_scores = {name: P.scores_cached(cfg, bundle, prompts, desc=f"K=1 {name}") for name, prompts in sets.items()}
{k: v for k, v in k1.items() if k != "completions"}

# %% [markdown]
# The exported checkpoint loads with plain `AutoModelForCausalLM.from_pretrained` and agrees with run-time
# ablation through nnsight on the original weights (differences are bf16 rounding on the CPU profile).

# %%
check = None
if cfg["eval"]["export_checkpoint"]:
    check = P.export_check(cfg, bundle, basis, sets.harmless[:8], run_cache(cfg, "export_k1"))
check

# %% [markdown]
# ## 3 · Activation addition and subtraction

# %%
add = ActAdd(found["layer"], r, cfg["eval"]["actadd_coeff"])
sub = ActAdd(found["layer"], r, -cfg["eval"]["actadd_coeff"])
induce = P.completions(cfg, bundle, sets.harmless, add, desc="actadd harmless")
bypass = P.completions(cfg, bundle, sets.harmful, sub, desc="actsub harmful")
actadd = {"refusal_rate_harmless": P.rates_by_source(cfg, sets.harmless, induce)}
actsub = {"refusal_rate_harmful": P.rates_by_source(cfg, sets.harmful, bypass)}
actadd, actsub

# %% [markdown]
# ## 4 · Refusal rates at a glance

# %%
rows = []
for model, res in [("original", base), ("K=1 ablated", k1)]:
    for s, key in [("harmful", "refusal_rate_harmful"), ("harmless", "refusal_rate_harmless"), ("over-refusal", "overrefusal_rate")]:
        rows.append({"model": model, "set": s, **{k: res[key][k] for k in ("rate", "lo", "hi", "n")}})
rows.append({"model": "act. addition (+r)", "set": "harmless", **{k: actadd["refusal_rate_harmless"][k] for k in ("rate", "lo", "hi", "n")}})
rows.append({"model": "act. subtraction (-r)", "set": "harmful", **{k: actsub["refusal_rate_harmful"][k] for k in ("rate", "lo", "hi", "n")}})
fig = plotting.rate_bars(rows, f"Refusal rates, {cfg['model']['name']} (greedy {cfg['eval']['max_new_tokens']} tokens, 95% CI)")
plotting.save(fig, cfg, "02_4_refusal_rates")
pd.DataFrame(rows)

# %% [markdown]
# ## 5 · Does the refusal score predict refusal?
# Point-biserial correlation between the refusal score (one forward pass) and the judged completion,
# pooled over the original and the ablated model on all test sets.

# %%
scores, labels = [], []
for name, prompts in sets.items():
    scores += P.scores_cached(cfg, bundle, prompts, desc=f"base {name}").tolist() + k1_scores[name].tolist()
    labels += refusal_labels([c["text"] for c in base["completions"][name]]).tolist()
    labels += refusal_labels([c["text"] for c in k1["completions"][name]]).tolist()
corr = P.correlation_report(scores, labels)
corr

# %% [markdown]
# Markers can mislead, so the judge is checked against completions labelled by reading them
# (`data/judge_labels.jsonl`: original and K=1-ablated models, harmful, harmless and over-refusal prompts,
# each with a one-line reason). Refusal is the positive class; the disagreements are listed.

# %%
from refusal_rank.judge import judge_report

judge = judge_report()
{k: v for k, v in judge.items() if k != "disagreements"}, pd.DataFrame(judge["disagreements"]) if judge["n"] else None

# %% [markdown]
# ## 6 · Examples, side by side

# %%
n = cfg["eval"]["n_examples"]
pd.set_option("display.max_colwidth", 200)
ex_harm = pd.DataFrame({"prompt": [p.text for p in sets.harmful[:n]],
                        "original": [c["text"] for c in base["completions"]["harmful"][:n]],
                        "K=1 ablated": [c["text"] for c in k1["completions"]["harmful"][:n]]})
ex_harmless = pd.DataFrame({"prompt": [p.text for p in sets.harmless[:n]],
                            "original": [c["text"] for c in base["completions"]["harmless"][:n]],
                            "act. addition": [c["text"] for c in induce[:n]]})
display(ex_harm)
display(ex_harmless)

# %%
strip = lambda res: {k: v for k, v in res.items() if k != "completions"}
update_summary(cfg,
               base=strip(base),
               attack_k1={**strip(k1), "export_check": check},
               actadd=actadd, actsub=actsub,
               refusal_score_vs_rate=corr,
               judge=judge,
               examples_02={"harmful": ex_harm.to_dict("records"), "harmless": ex_harmless.to_dict("records")},
               **timing("02_k1_attack", t0))
print(f"02 done in {time.perf_counter() - t0:.0f} s")
