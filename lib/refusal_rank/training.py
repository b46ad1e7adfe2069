"""Defensive post-training (notebook 03): LoRA on the CPU, full fine-tuning selectable on a GPU.

Design:
* The teacher is the original model. Everything the loss needs from it is fixed, so it is computed once
  before training and cached (keyed by model, prompts and config): last-prompt-position logits of every
  training prompt (float16) and the per-layer pooled statistics that standardise the moment terms.
  With LoRA the student *is* the original model plus adapters, so no second copy is held in memory.
* Batches are class-balanced (``batch_per_class`` harmful + the same number harmless) and are a pure
  function of (seed, step): resuming from a checkpoint replays exactly the batches an uninterrupted run
  would have seen, so the final weights are the same (tested).
* Every activation read and patch goes through nnsight (gradients flow through its traces): pooled
  decoder-layer outputs for the moment terms, and run-time ablation for the ablation-aware term.
* Checkpoints (trainable weights, optimiser, step, history) are written atomically every
  ``ckpt_every`` steps; a non-finite loss or a loss above ``diverge_factor`` x its first value stops
  training with a message naming the step and the last checkpoint.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .activations import Ablation, encode, run_interventions
from .defense import Standardizer, cov_matching_loss, kd_loss, mean_matching_loss, pool_positions, prompt_lm_loss
from .models import ModelBundle


class TrainingDiverged(RuntimeError):
    """Raised when the loss becomes NaN/inf or explodes."""


@dataclass
class Variant:
    """One trained model: which terms are on and with what weight."""

    name: str
    lambda_kd: float = 1.0
    temperature: float = 1.0
    lambda_cov: float = 0.0
    lambda_mean: float = 0.0
    lambda_lm: float = 1.0
    lambda_abl: float = 0.0  # ablation-aware distillation
    moment_sites: str = "pooled"  # "pooled": mean over post-instruction positions; "positions": each position
    moment_depth: float = 1.0  # match moments at layers below this fraction of depth (0.8: where attackers look)
    k_max: int = 16
    refresh_every: int = 10
    abl_per_class: int = 0  # prompts of each class run under ablation (0: the whole batch)

    @classmethod
    def from_cfg(cls, name: str, d: dict[str, Any]) -> "Variant":
        return cls(name=name, **d)


@dataclass
class TeacherCache:
    """Fixed teacher outputs for the training prompts."""

    logits: torch.Tensor  # (N, V) float16, last prompt position
    standardizer: Standardizer  # per layer, of the pooled representations: (L, d)
    ids: list[str] = field(default_factory=list)
    position_standardizer: Standardizer | None = None  # per (layer, position), flattened: (L * n_post, d)


def pooled_layer_outputs(lm: Any, n_layers: int, n_post: int, layers: Sequence[int], saved: list) -> None:
    """Inside an nnsight trace: save the pooled (mean over post-instruction positions) output of each layer."""
    for layer in layers:
        saved.append(lm.model.layers[layer].output[:, -n_post:, :].mean(1).save())


def position_layer_outputs(lm: Any, n_post: int, layers: Sequence[int], saved: list) -> None:
    """Inside an nnsight trace: save each layer's output at every post-instruction position, (B, n_post, d)."""
    for layer in layers:
        saved.append(lm.model.layers[layer].output[:, -n_post:, :].save())


@torch.no_grad()  # not inference_mode: these tensors enter the student's autograd graph as constants
def teacher_cache(bundle: ModelBundle, prompts: Sequence[str], layers: Sequence[int], batch_size: int,
                  per_position: bool = False) -> TeacherCache:
    """Last-position logits and pooled layer statistics of the (original) model on ``prompts``; with
    ``per_position`` also the statistics of every (layer, post-instruction position), accumulated in
    float64 sums (the (N, L, n_post, d) activations are never held at once)."""
    from .activations import length_batches

    lm = bundle.lm
    logits = torch.empty(len(prompts), bundle.model.config.vocab_size, dtype=torch.float16)
    pooled = torch.empty(len(prompts), len(layers), bundle.d_model, dtype=torch.float32)
    s1 = s2 = None
    for idx in tqdm(list(length_batches(bundle, prompts, batch_size)), desc="teacher", leave=False):
        enc = encode(bundle, [prompts[i] for i in idx])
        saved: list[Any] = []
        with lm.trace(enc, logits_to_keep=1):
            position_layer_outputs(lm, bundle.n_post, layers, saved)
            saved.append(lm.lm_head.output[:, -1, :].save())
        logits[idx] = saved[-1].half().cpu()
        per_pos = torch.stack([s.double().cpu() for s in saved[:-1]], dim=1)  # (B, L, P, d)
        pooled[idx] = per_pos.mean(2).float()
        if per_position:
            flat = per_pos.flatten(1, 2)
            s1 = flat.sum(0) if s1 is None else s1 + flat.sum(0)
            s2 = flat.pow(2).sum(0) if s2 is None else s2 + flat.pow(2).sum(0)
    pos = None
    if per_position:
        n = len(prompts)
        mean = s1 / n
        var = (s2 - n * mean.pow(2)) / max(n - 1, 1)
        pos = Standardizer(mean.float(), var.clamp_min(0).sqrt().clamp_min(1e-4).float())
    return TeacherCache(logits, Standardizer.fit(pooled), position_standardizer=pos)


def batch_indices(step: int, seed: int, n_harm: int, n_ok: int, per_class: int) -> tuple[list[int], list[int]]:
    """Class-balanced batch for ``step``: epochs of seeded permutations, a pure function of (seed, step)."""
    def take(n: int, tag: str) -> list[int]:
        start = step * per_class
        out = []
        while len(out) < per_class:
            epoch, offset = divmod(start + len(out), n)
            perm = list(range(n))
            random.Random(f"{seed}-{tag}-{epoch}").shuffle(perm)
            out.append(perm[offset])
        return out
    return take(n_harm, "harm"), take(n_ok, "ok")


def attack_subspace(bundle: ModelBundle, harmful: Sequence[str], harmless: Sequence[str], k: int,
                    layers: Sequence[int], batch_size: int) -> torch.Tensor:
    """Top-``k`` right singular vectors of the stacked, normalised difference-in-means vectors of every
    given layer and post-instruction position, from the bundle's *current* weights: (d, k) float64."""
    from .activations import collect_residuals

    from .attacks import dim_svd

    was_training = bundle.model.training
    bundle.model.eval()
    try:
        with torch.no_grad():
            h = collect_residuals(bundle, harmful, batch_size, layers=layers, desc="subspace").double().mean(0)
            b = collect_residuals(bundle, harmless, batch_size, layers=layers, desc="subspace").double().mean(0)
    finally:
        bundle.model.train(was_training)
    return dim_svd(h - b, k)  # the same estimator the dim-svd attacker uses


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, opt, state: TrainState, basis: torch.Tensor | None) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"weights": trainable_state(model), "opt": opt.state_dict(), "state": state.__dict__, "basis": basis}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model, opt) -> tuple[TrainState, torch.Tensor | None]:
    ck = torch.load(path, weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in ck["weights"].items():
            params[n].copy_(w)
    opt.load_state_dict(ck["opt"])
    return TrainState(**ck["state"]), ck["basis"]


def train(bundle: ModelBundle, variant: Variant, tcfg: dict[str, Any], harmful: Sequence[str], harmless: Sequence[str],
          teacher: TeacherCache, layers: Sequence[int], ckpt_path: Path,
          evaluate: Callable[[int], dict[str, Any]] | None = None, stop_after: int | None = None,
          log: Callable[[str], None] = print) -> TrainState:
    """Train ``bundle.model`` in place (its trainable parameters must already be set up).

    ``harmful``/``harmless`` texts index ``teacher.logits`` as harmful first, then harmless.
    ``stop_after`` ends the call after that many steps of this call (used to test resuming).
    """
    model = bundle.model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: attach LoRA adapters or enable full fine-tuning first")
    opt = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    state, basis = TrainState(), None
    if ckpt_path.is_file():
        state, basis = load_checkpoint(ckpt_path, model, opt)
        log(f"resumed {variant.name} from step {state.step} ({ckpt_path})")
    steps, per_class = tcfg["steps"], tcfg["batch_per_class"]
    lm, n_post = bundle.lm, bundle.n_post
    n_h = len(harmful)
    first_loss = state.history[0]["loss"] if state.history else None
    abl_layers = list(range(int(bundle.n_layers * (1 - tcfg.get("drop_last_frac", 0.2)))))
    # the layers (indices into ``layers``) whose moments are matched, and the standardiser of those sites
    m_idx = [i for i, l in enumerate(layers) if l < int(bundle.n_layers * variant.moment_depth)]
    if variant.moment_sites == "positions":
        if teacher.position_standardizer is None:
            raise ValueError(f"variant {variant.name} matches moments per position: the teacher cache needs per_position=True")
        rows = torch.tensor([i * n_post + p for i in m_idx for p in range(n_post)])
        z_std = Standardizer(teacher.position_standardizer.mean[rows], teacher.position_standardizer.std[rows])
    elif variant.moment_sites == "pooled":
        z_std = Standardizer(teacher.standardizer.mean[m_idx], teacher.standardizer.std[m_idx])
    else:
        raise ValueError(f"moment_sites must be 'pooled' or 'positions', not {variant.moment_sites!r}")
    m_layers = [layers[i] for i in m_idx]
    moments = bool(variant.lambda_cov or variant.lambda_mean)
    model.train()
    bar = tqdm(range(state.step, steps), desc=f"train {variant.name}", initial=state.step, total=steps)
    done_here = 0
    for step in bar:
        t0 = time.perf_counter()
        hi, oi = batch_indices(step, tcfg["seed"], n_h, len(harmless), per_class)
        texts = [harmful[i] for i in hi] + [harmless[i] for i in oi]
        t_logits = torch.cat([teacher.logits[hi], teacher.logits[[n_h + i for i in oi]]]).float().to(bundle.device)
        enc = encode(bundle, texts)
        saved: list[Any] = []
        with lm.trace(enc):
            if moments and variant.moment_sites == "positions":
                position_layer_outputs(lm, n_post, m_layers, saved)
            elif moments:
                pooled_layer_outputs(lm, bundle.n_layers, n_post, m_layers, saved)
            saved.append(lm.lm_head.output.save())
        logits = saved[-1]
        terms: dict[str, torch.Tensor] = {}
        terms["lm"] = prompt_lm_loss(logits, enc["input_ids"], enc["attention_mask"])
        terms["kd"] = kd_loss(logits[:, -1, :], t_logits, variant.temperature)
        if moments:
            acts = torch.stack(saved[:-1], dim=1)  # (B, L, d) pooled or (B, L, P, d)
            z = z_std(acts.flatten(1, 2) if acts.dim() == 4 else acts)
            if variant.lambda_cov:
                terms["cov"] = cov_matching_loss(z[:per_class], z[per_class:])
            if variant.lambda_mean:
                terms["mean"] = mean_matching_loss(z[:per_class], z[per_class:])
        loss = (variant.lambda_lm * terms["lm"] + variant.lambda_kd * terms["kd"]
                + variant.lambda_cov * terms.get("cov", 0.0) + variant.lambda_mean * terms.get("mean", 0.0))
        loss.backward()
        if variant.lambda_abl:
            if basis is None or step % variant.refresh_every == 0:
                sub_h = [harmful[i] for i in range(min(n_h, tcfg["subspace_prompts"]))]
                sub_o = [harmless[i] for i in range(min(len(harmless), tcfg["subspace_prompts"]))]
                basis = attack_subspace(bundle, sub_h, sub_o, variant.k_max, abl_layers, tcfg["batch_per_class"] * 2)
            k = random.Random(f"{tcfg['seed']}-k-{step}").randint(1, basis.shape[1])
            a = min(per_class, variant.abl_per_class or per_class)  # the first a of each class
            rows = list(range(a)) + list(range(per_class, per_class + a))
            enc2 = enc if a == per_class else encode(bundle, [texts[i] for i in rows])
            saved2: list[Any] = []
            with lm.trace(enc2, logits_to_keep=1):
                run_interventions(lm, Ablation(basis[:, :k]), bundle.n_layers)
                saved2.append(lm.lm_head.output[:, -1, :].save())
            terms["abl"] = kd_loss(saved2[0], t_logits[rows], variant.temperature)
            (variant.lambda_abl * terms["abl"]).backward()
            loss = loss + variant.lambda_abl * terms["abl"].detach()
        value = float(loss.detach())
        if not math.isfinite(value) or (first_loss is not None and value > tcfg["diverge_factor"] * max(first_loss, 1e-3)):
            raise TrainingDiverged(
                f"{variant.name}: loss {value:.4g} at step {step} (first {first_loss}); training stopped. "
                f"The last checkpoint is {ckpt_path} at step {state.step}: lower defense.train.lr and rerun.")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tcfg["max_grad_norm"]))
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"{variant.name}: non-finite gradient at step {step}; training stopped before the update. "
                f"The last checkpoint is {ckpt_path} at step {state.step}: lower defense.train.lr and rerun.")
        opt.step()
        opt.zero_grad(set_to_none=True)
        first_loss = value if first_loss is None else first_loss
        state.step = step + 1
        state.seconds += time.perf_counter() - t0
        state.tokens += int(enc["attention_mask"].sum())
        state.history.append({"step": step, "loss": value, **{k: float(v.detach()) for k, v in terms.items()}})
        bar.set_postfix({k: f"{float(v.detach()):.3g}" for k, v in terms.items()})
        if evaluate is not None and (state.step % tcfg["eval_every"] == 0 or state.step == steps):
            model.eval()
            state.evals.append({"step": state.step, **evaluate(state.step)})
            model.train()
        if state.step % tcfg["ckpt_every"] == 0 or state.step == steps:
            save_checkpoint(ckpt_path, model, opt, state, basis)
        done_here += 1
        if stop_after is not None and done_here >= stop_after:
            break
    model.eval()
    return state


def attach_lora(model: torch.nn.Module, lcfg: dict[str, Any], seed: int) -> Any:
    """Wrap ``model`` with LoRA adapters (peft); returns the PeftModel. The underlying model keeps its
    module paths, so nnsight code written for the original works unchanged."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=lcfg["r"], lora_alpha=lcfg["alpha"], target_modules=list(lcfg["targets"]),
                     lora_dropout=0.0, bias="none")
    return get_peft_model(model, cfg)
