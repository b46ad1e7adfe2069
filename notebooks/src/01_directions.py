# %% [markdown]
# # 01 · Direction discovery
#
# Arditi et al. (2024) found that an instruction-tuned model's refusal is mediated by one direction of
# the residual stream. This notebook finds that direction in the profile's model:
#
# 1. keep train/val prompts the model treats as expected (harmful ones it refuses, harmless ones it answers);
# 2. read the residual stream (block input of every layer) at every post-instruction position of the chat
#    template, through `nnsight`, and take the **difference in means** harmful − harmless (float64);
# 3. select one (layer, position) candidate by Arditi et al.'s rule: drop the last 20% of layers, require
#    first-token KL ≤ 0.1 on harmless val when the direction is ablated and a positive refusal score when it
#    is *added* to harmless prompts, then take the candidate whose ablation lowers harmful-val refusal most.
#
# The refusal score of a prompt is $\log p_R - \log(1-p_R)$ at the last prompt position, $p_R$ the
# next-token probability of the family's refusal first tokens (e.g. "I", "As").

# %% tags=["parameters"]
profile = None  # None: $REFUSAL_RANK_PROFILE or "cpu"

# %%
import time

import pandas as pd

from refusal_rank import pipeline as P
from refusal_rank import plotting
from refusal_rank.config import load_config
from refusal_rank.models import load_model
from refusal_rank.results import timing, save_artifact, update_summary

t0 = time.perf_counter()
cfg = load_config(profile)
bundle = load_model(cfg)
print(f"profile={cfg['profile']}  model={cfg['model']['name']}  layers={bundle.n_layers}  d={bundle.d_model}  "
      f"dtype={bundle.dtype}  post-instruction tokens={bundle.post_tokens}")

# %% [markdown]
# ## 1 · Train and validation prompts
# Harmful train: AdvBench; harmful val: HarmBench val (standard); harmless: the project's own set
# (`data/harmless.jsonl`). The split is fixed by id in `data/splits.json`.

# %%
tv = P.filtered_train_val(cfg, bundle)
pd.DataFrame(tv.report).T

# %% [markdown]
# ## 2 · Difference in means and selection
# One candidate direction per (layer, position). The heatmap shows the harmful-val refusal score when each
# candidate is ablated from every layer (lower = refusal removed); the box marks the selected candidate.

# %%
sel, dirs = P.discover_direction(cfg, bundle, tv)
stride = cfg["directions"]["layer_stride"]
max_layer = int(bundle.n_layers * (1 - cfg["directions"]["drop_last_frac"]))
fig = plotting.score_heatmap(sel.scores, bundle.n_layers, bundle.post_tokens, (sel.layer, sel.position),
                             len(tv.harmful_val), max_layer=max_layer, layer_stride=stride)
plotting.save(fig, cfg, "01_2_refusal_score_heatmap")

# %%
print(f"selected layer {sel.layer}, position {sel.position} ({bundle.post_tokens[sel.position]!r}); "
      f"ablation refusal score {sel.refusal_score:.2f}, KL {sel.kl_harmless:.3f}, induce score {sel.induce_score:.2f}"
      + ("  [FALLBACK: no candidate passed both filters]" if sel.fallback else ""))
pd.DataFrame(sel.checked)

# %% [markdown]
# ## 3 · Where the difference lives
# The norm of the difference in means, relative to the norm of the harmless mean at the same layer and
# position (the residual stream itself grows with depth): where the harmful/harmless distinction is
# written into the stream. The star marks the selected candidate.

# %%
stream = P.mean_residuals(cfg, bundle, tv.harmless_train, "harmless train acts").norm(dim=-1)  # cached in section 2
fig = plotting.direction_norms(dirs, bundle.post_tokens, len(tv.harmful_train), (sel.layer, sel.position), stream)
plotting.save(fig, cfg, "01_3_direction_norms")

# %% [markdown]
# ## 4 · Save the direction and measure speed
# The selected direction goes to `results/<profile>/direction.safetensors` for the next notebooks. The throughput of
# the batched forward pass (all layers read through nnsight) is reported against the machine's own
# matrix-product peak in the dtype the model runs in (bf16 where the CPU multiplies it natively, else fp32),
# measured now: machines of one kind differ by up to 5x.

# %%
save_artifact(cfg, "direction.safetensors", {"layer": sel.layer, "position": sel.position, "direction": sel.direction,
                                             "all_directions": dirs.float(), "harmless_mean_norm": stream.float()})
speed = P.forward_throughput(cfg, bundle, tv.harmful_train[:cfg["eval"]["fwd_batch_size"]])
print(speed)

# %%
base_scores = {k: round(v, 4) for k, v in {"harmful_val": P.scores_cached(cfg, bundle, tv.harmful_val).mean().item(),
                                           "harmless_val": P.scores_cached(cfg, bundle, tv.harmless_val).mean().item()}.items()}
update_summary(cfg,
               direction={"layer": sel.layer, "position": sel.position, "position_token": bundle.post_tokens[sel.position],
                          "kl_harmless": round(sel.kl_harmless, 5), "refusal_score_val_ablated": round(sel.refusal_score, 4),
                          "induce_score_val": round(sel.induce_score, 4), "fallback": sel.fallback,
                          "base_refusal_score_val": base_scores, "n_candidates": len(sel.scores),
                          "layer_stride": stride, "filter": tv.report},
               throughput={"forward_residuals": speed},
               **timing("01_directions", t0))
print(f"01 done in {time.perf_counter() - t0:.0f} s")
