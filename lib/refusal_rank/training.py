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
* Moment terms are scale-free and unbiased (``defense``) and read the whole step's batch at the current
  weights. When the batch is cut into micro-batches, a step runs in two phases: a forward pass without a graph
  gives the site vectors of every micro-batch but the first; the micro-batches then run with gradients, and
  once the first has run (its vectors now known, at the same weights) the terms and their gradient with
  respect to every row's vectors are computed, which each micro-batch receives through its own vectors (the
  exact gradient of the batch-level terms: tested against one pass over the whole batch). An earlier version read
  each micro-batch beside a memory of older, detached vectors; the optimiser lowered that estimate by moving
  the current vectors away from the stale ones (measured on ``cpu``, notebook 03), so no stale vector enters
  a term now. Every step also logs the terms on two random halves of the harmless class (``*_null``).
* The batch is split into ``micro_batches`` class-balanced micro-batches of similar length (gradients
  accumulate): the same prompts and the same update, with less padding computed.
* With ``share_prefix`` the template tokens every prompt of a micro-batch starts with are computed once
  (``prefix_share``): the same losses and gradients (tested), about half the positions on the cpu profile.
* The learning rate warms up linearly for ``warmup_steps`` and then stays constant, so that the snapshots
  kept at ``milestones`` (1x, 2x, 4x, 8x of the base budget) are each a model trained at the same rate for
  that many prompt passes, none favoured by a decay that ends on it.
* Checkpoints (trainable weights, optimiser, step, history) are written atomically every
  ``ckpt_every`` steps; a non-finite loss or a loss above ``diverge_factor`` x its first value stops
  training with a message naming the step and the last checkpoint.
"""
from __future__ import annotations

import functools
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from .progress import tqdm

from .activations import Ablation, chat_texts, encode, run_interventions
from .defense import (Standardizer, cov_matching_loss, kd_loss, mean_matching_loss, null_split, prompt_lm_loss, shuffle_rows,
                      spread_anchor_loss, spread_log_ratio)
from .models import ModelBundle
from .prefix_share import (SharedPass, common_prefix_len, last_logits, prompt_mean_hidden, shared_lm_loss,
                           shared_prefix_forward, tail_hidden)


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
    lambda_spread: float = 0.0  # holds the matched sites' spread at the teacher's (defense.spread_anchor_loss)
    lambda_lm: float = 1.0
    lambda_abl: float = 0.0  # ablation-aware distillation
    moment_sites: str = "pooled"  # "pooled": mean over post-instruction positions; "positions": each position;
    # "prompt": mean over every prompt token (the paper's pooling)
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
    prompt_standardizer: Standardizer | None = None  # per layer, of the mean over every prompt token: (L, d)
    # every prompt's own site vectors (float16, unstandardised), by moment_sites mode: "pooled" and "prompt"
    # (N, L, d), "positions" (N, L * n_post, d) with per_position. The spread anchor's reference on a batch
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()  # not inference_mode: these tensors enter the student's autograd graph as constants
def teacher_cache(bundle: ModelBundle, prompts: Sequence[str], layers: Sequence[int], batch_size: int,
                  per_position: bool = False) -> TeacherCache:
    """Last-position logits and pooled layer statistics of the (original) model on ``prompts`` (pooled over
    the post-instruction positions, and over every prompt token); with ``per_position`` also the statistics
    of every (layer, post-instruction position), accumulated in float64 sums (the (N, L, n_post, d)
    activations are never held at once)."""
    from .activations import length_batches
    from .defense import masked_mean

    lm = bundle.lm
    logits = torch.empty(len(prompts), bundle.model.config.vocab_size, dtype=torch.float16)
    pooled = torch.empty(len(prompts), len(layers), bundle.d_model, dtype=torch.float32)
    whole = torch.empty(len(prompts), len(layers), bundle.d_model, dtype=torch.float32)
    s1 = s2 = None
    per_pos_all = (torch.empty(len(prompts), len(layers) * bundle.n_post, bundle.d_model, dtype=torch.float16)
                   if per_position else None)
    for idx in tqdm(list(length_batches(bundle, prompts, batch_size)), desc="teacher", leave=False):
        enc = encode(bundle, [prompts[i] for i in idx])
        saved: list[Any] = []
        with lm.trace(enc, logits_to_keep=1):
            for layer in layers:
                saved.append(lm.model.layers[layer].output.save())
            saved.append(lm.lm_head.output[:, -1, :].save())
        logits[idx] = saved[-1].half().cpu()
        full = [s.double().cpu() for s in saved[:-1]]
        per_pos = torch.stack([h[:, -bundle.n_post:] for h in full], dim=1)  # (B, L, P, d)
        pooled[idx] = per_pos.mean(2).float()
        mask = enc["attention_mask"].cpu()
        whole[idx] = torch.stack([masked_mean(h, mask) for h in full], dim=1).float()
        if per_position:
            flat = per_pos.flatten(1, 2)
            per_pos_all[idx] = flat.half()
            s1 = flat.sum(0) if s1 is None else s1 + flat.sum(0)
            s2 = flat.pow(2).sum(0) if s2 is None else s2 + flat.pow(2).sum(0)
    pos = None
    if per_position:
        n = len(prompts)
        mean = s1 / n
        var = (s2 - n * mean.pow(2)) / max(n - 1, 1)
        pos = Standardizer(mean.float(), var.clamp_min(0).sqrt().clamp_min(1e-4).float())
    vectors = {"pooled": pooled.half(), "prompt": whole.half(), **({"positions": per_pos_all} if per_position else {})}
    return TeacherCache(logits, Standardizer.fit(pooled), position_standardizer=pos,
                        prompt_standardizer=Standardizer.fit(whole), vectors=vectors)


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
    tokens: int = 0          # prompt tokens trained on (every row's own, as if each were run alone)
    padded_tokens: int = 0   # positions of the left-padded batches those rows make
    computed_tokens: int = 0  # positions the forward passes computed (fewer with a shared prefix)
    moment_tokens: int = 0   # positions of the moment terms' extra forward passes (no backward)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _prev_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_checkpoint(path: Path, model, opt, state: TrainState, basis: torch.Tensor | None) -> None:
    """The rolling checkpoint, written atomically with a sha256 sidecar (``ckpt.sha256``); the previous good
    one is kept as ``ckpt.prev.pt`` (with its sidecar), the fallback if the newest turns out corrupted.
    Order: the new file and its digest are complete before anything is replaced, the sidecar is written
    before the checkpoint is renamed into place, so an interruption never leaves a checkpoint whose
    sidecar is missing or stale (only a missing checkpoint, and the previous one beside it)."""
    from .models import sha256_file

    tmp = path.with_suffix(".tmp")
    torch.save({"weights": trainable_state(model), "opt": opt.state_dict(), "state": state.__dict__, "basis": basis}, tmp)
    digest = sha256_file(tmp)
    side, prev = path.with_suffix(".sha256"), _prev_path(path)
    if path.is_file() and side.is_file():  # rotate the current one into the fallback: its digest first, then itself
        prev_side = prev.with_suffix(".sha256")
        prev_side.with_suffix(".sha256.tmp").write_text(side.read_text())
        os.replace(prev_side.with_suffix(".sha256.tmp"), prev_side)
        os.replace(path, prev)
    side_tmp = side.with_suffix(".sha256.tmp")
    side_tmp.write_text(digest + "\n")
    os.replace(side_tmp, side)
    tmp.replace(path)


def _read_checkpoint(path: Path, model, legacy_ok: bool) -> tuple[dict[str, Any] | None, str]:
    """(checkpoint, '') if ``path`` matches its sidecar and fits ``model``; else (None, why)."""
    from .models import sha256_file

    side = path.with_suffix(".sha256")
    if not path.is_file():
        return None, "is missing"
    if side.is_file():
        if side.read_text().strip() != sha256_file(path):
            return None, "does not match its sha256 sidecar (corrupted or cut)"
    elif not legacy_ok:
        return None, "has no sha256 sidecar (an interrupted write)"
    try:
        ck = torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a cut or foreign file, whatever the exception
        return None, f"cannot be read ({type(e).__name__})"
    params = dict(model.named_parameters())
    weights = ck.get("weights") if isinstance(ck, dict) else None
    if not isinstance(weights, dict) or any(n not in params or params[n].shape != w.shape for n, w in weights.items()):
        return None, "does not fit this model's trainable weights"
    if not all(torch.isfinite(w).all() for w in weights.values()):
        return None, "holds non-finite weights"
    return ck, ""


def load_checkpoint(path: Path, model, opt, log=print) -> tuple[TrainState, torch.Tensor | None]:
    """Resume state from the rolling checkpoint, checked against its digest. A corrupted, cut or unverified
    checkpoint is not loaded: the previous good one (``ckpt.prev.pt``) is, or training restarts from step 0,
    with one sentence saying which. A checkpoint from before checkpoints had sidecars (no sidecar, no
    previous one beside it) is loaded once its structure fits the model (it gets a digest at the next save)."""
    prev = _prev_path(path)
    legacy = not path.with_suffix(".sha256").exists() and not prev.exists()
    ck, why = _read_checkpoint(path, model, legacy_ok=legacy)
    if ck is None:
        ck, why_prev = _read_checkpoint(prev, model, legacy_ok=False)
        if ck is None:
            log(f"checkpoint {path} {why} and no good previous one exists ({prev.name} {why_prev}): training restarts from step 0")
            return TrainState(), None
        log(f"checkpoint {path} {why}: resuming from the previous one, {prev.name}, at step {ck['state']['step']}")
    elif legacy and path.is_file():
        log(f"checkpoint {path} predates checkpoint digests: loaded after a structural check")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in ck["weights"].items():
            params[n].copy_(w)
    opt.load_state_dict(ck["opt"])
    # fields a newer TrainState dropped (e.g. the moment memory of checkpoints before e3b05e6) are ignored
    known = {k: v for k, v in ck["state"].items() if k in TrainState.__dataclass_fields__}
    return TrainState(**known), ck["basis"]


def snapshot_path(ckpt_path: Path, step: int) -> Path:
    """Where the trainable weights at a milestone step are kept (beside the rolling checkpoint)."""
    return ckpt_path.parent / f"snapshot-{step:05d}.pt"


def snapshot_digest(path: Path) -> str | None:
    """A snapshot's recorded sha256 (its ``.sha256`` sidecar), or None without one: the snapshot's identity
    in cache keys and model names, and what ``load_snapshot`` checks the file against."""
    side = path.with_suffix(".sha256")
    return side.read_text().strip() if side.is_file() else None


def save_snapshot(path: Path, model) -> None:
    """Trainable weights, written atomically with a sha256 sidecar (checked on every load)."""
    from .models import sha256_file

    tmp = path.with_suffix(".tmp")
    torch.save(trainable_state(model), tmp)
    digest = sha256_file(tmp)
    tmp.replace(path)
    path.with_suffix(".sha256").write_text(digest + "\n")


def load_snapshot(path: Path, model) -> None:
    """Load a milestone's trainable weights into ``model`` (same adapters as when it was saved), after
    checking the file against its digest: a corrupted or unverified snapshot is never loaded."""
    from .models import sha256_file

    recorded = snapshot_digest(path)
    if recorded is None or recorded != sha256_file(path):
        raise ValueError(f"snapshot {path} does not match its sha256 sidecar (corrupted or incomplete): "
                         f"delete it and retrain from the rolling checkpoint.")
    weights = torch.load(path, weights_only=True)
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"snapshot {path} holds {len(missing)} weights this model lacks (e.g. {missing[0]})")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)


def lr_at(step: int, tcfg: dict[str, Any]) -> float:
    """Linear warm-up over ``warmup_steps``, then constant (see the module docstring for why)."""
    warm = int(tcfg.get("warmup_steps", 0))
    return tcfg["lr"] * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)


def milestone_steps(tcfg: dict[str, Any]) -> list[int]:
    """The steps whose weights are kept: ``milestones`` (multiples of the base budget), else the last step."""
    out = sorted({int(m) for m in tcfg.get("milestones") or [tcfg["steps"]]})
    if out[-1] != tcfg["steps"] or out[0] < 1:
        raise ValueError(f"defense.train.milestones {out} must be positive and end at steps = {tcfg['steps']}")
    return out


def token_rows(bundle: ModelBundle, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each chat-formatted prompt, unpadded: exactly the rows ``encode`` pads. (Their lengths
    sort the micro-batches; ``apply_chat_template`` returns an encoding dict in transformers 5, whose
    ``len`` is its number of keys, not of tokens.)"""
    texts = chat_texts(bundle.tokenizer, prompts, **bundle.template_kwargs)
    return [list(r) for r in bundle.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def micro_batches(h_idx: Sequence[int], o_idx: Sequence[int], h_len: Sequence[int], o_len: Sequence[int],
                  n_micro: int) -> list[tuple[list[int], list[int]]]:
    """Split one class-balanced batch into ``n_micro`` class-balanced micro-batches of similar length:
    each class is sorted by token length and cut into consecutive chunks, and the j-th chunks of the two
    classes form micro-batch j. The union is the batch (same prompts, same update), with less padding."""
    if n_micro < 1 or len(h_idx) % n_micro or len(o_idx) % n_micro:
        raise ValueError(f"micro_batches = {n_micro} must divide batch_per_class = {len(h_idx)}")
    hs = sorted(h_idx, key=lambda i: (h_len[i], i))
    os_ = sorted(o_idx, key=lambda i: (o_len[i], i))
    ch, co = len(hs) // n_micro, len(os_) // n_micro
    return [(hs[j * ch:(j + 1) * ch], os_[j * co:(j + 1) * co]) for j in range(n_micro)]


def _site_index(bundle: ModelBundle, variant: Variant, layers: Sequence[int]) -> tuple[list[int], list[int]]:
    """Indices into ``layers`` of the matched layers (below ``moment_depth``), and of the matched sites in the
    teacher's per-site tensors (the same, or layer x post-instruction position for "positions")."""
    m_idx = [i for i, l in enumerate(layers) if l < int(bundle.n_layers * variant.moment_depth)]
    if variant.moment_sites == "positions":
        return m_idx, [i * bundle.n_post + p for i in m_idx for p in range(bundle.n_post)]
    return m_idx, m_idx


def moment_sites(bundle: ModelBundle, variant: Variant, teacher: TeacherCache, layers: Sequence[int]) -> tuple[list[int], Standardizer]:
    """The decoder layers whose representations a variant matches, and the fixed per-dimension
    standardiser of those sites (the teacher's; it only sets units: the terms themselves are scale-free)."""
    m_idx, sites = _site_index(bundle, variant, layers)
    if variant.moment_sites == "positions":
        if teacher.position_standardizer is None:
            raise ValueError(f"variant {variant.name} matches moments per position: the teacher cache needs per_position=True")
        rows = torch.tensor(sites)
        std = Standardizer(teacher.position_standardizer.mean[rows], teacher.position_standardizer.std[rows])
    elif variant.moment_sites == "pooled":
        std = Standardizer(teacher.standardizer.mean[m_idx], teacher.standardizer.std[m_idx])
    elif variant.moment_sites == "prompt":
        if teacher.prompt_standardizer is None:
            raise ValueError(f"variant {variant.name} pools over the prompt: its teacher cache predates that statistic")
        std = Standardizer(teacher.prompt_standardizer.mean[m_idx], teacher.prompt_standardizer.std[m_idx])
    else:
        raise ValueError(f"moment_sites must be 'pooled', 'positions' or 'prompt', not {variant.moment_sites!r}")
    return [layers[i] for i in m_idx], std


def _save_sites(lm: Any, mode: str, m_layers: Sequence[int], n_post: int, saved: list) -> None:
    """Inside an nnsight trace: save what the moment terms read at each matched layer."""
    for layer in m_layers:
        out = lm.model.layers[layer].output
        saved.append((out if mode == "prompt" else out[:, -n_post:, :]).save())


def teacher_site_vectors(bundle: ModelBundle, variant: Variant, teacher: TeacherCache, layers: Sequence[int],
                         rows: Sequence[int], std: Standardizer) -> torch.Tensor:
    """The teacher's standardised site vectors of prompts ``rows`` (indices into the teacher's prompts), at the
    sites ``moment_sites`` chooses for ``variant``: (len(rows), S, d) float32, what the student's are compared to."""
    mode = variant.moment_sites
    if mode not in teacher.vectors:
        raise ValueError(f"the teacher cache holds no {mode!r} site vectors: rebuild it (per_position for 'positions')")
    return std(teacher.vectors[mode][list(rows)][:, _site_index(bundle, variant, layers)[1]].float())


def _site_vectors(saved: Sequence[torch.Tensor], mode: str, mask: torch.Tensor, std: Standardizer) -> torch.Tensor:
    """(B, S, d) standardised site vectors from what ``_save_sites`` saved."""
    from .defense import masked_mean

    if mode == "prompt":
        acts = torch.stack([masked_mean(h, mask) for h in saved], dim=1)
    elif mode == "pooled":
        acts = torch.stack([h.mean(1) for h in saved], dim=1)
    else:  # positions: (B, L, P, d) -> (B, L * P, d)
        acts = torch.stack(list(saved), dim=1).flatten(1, 2)
    return std(acts)


def _shared_site_vectors(sp: SharedPass, mode: str, m_layers: Sequence[int], n_post: int, std: Standardizer) -> torch.Tensor:
    """``_site_vectors`` from a prefix-shared pass: the same (B, S, d) standardised site vectors."""
    if mode == "prompt":
        acts = torch.stack([prompt_mean_hidden(sp, l) for l in m_layers], dim=1)
    elif mode == "pooled":
        acts = torch.stack([tail_hidden(sp, l, n_post).mean(1) for l in m_layers], dim=1)
    else:
        acts = torch.stack([tail_hidden(sp, l, n_post) for l in m_layers], dim=1).flatten(1, 2)
    return std(acts)


@torch.no_grad()
def moment_diagnostics(bundle: ModelBundle, variant: Variant, teacher: TeacherCache, layers: Sequence[int],
                       harmful: Sequence[str], harmless: Sequence[str], batch_size: int,
                       teacher_rows: tuple[Sequence[int], Sequence[int]] | None = None) -> dict[str, Any]:
    """At the current weights, on fixed prompts: the scale-free terms, their value on two halves of the
    harmless class (the noise floor), the top eigenvalue of the excess second moment and the total
    variance of the standardised representations, averaged over the matched sites, and the top eigenvalue's
    two parts (``top_eig_cov``: the covariance difference alone; ``gap_sq``: the unbiased squared mean gap).
    Shrinking shows as a falling total variance and top eigenvalue with unchanged terms; matching as falling
    terms and top eigenvalue at an unchanged total variance (for a mean-matching variant, a falling
    ``gap_sq`` with ``top_eig_cov`` in place)."""
    from .defense import (class_mean_gap, cov_matching_loss, excess_cov_top_eig, excess_top_eig, mean_matching_loss,
                          null_split)

    matched = bool(variant.lambda_cov or variant.lambda_mean)  # else: every layer, pooled (the default sites)
    mode = variant.moment_sites if matched else "pooled"
    v = Variant(variant.name, moment_sites=mode, moment_depth=variant.moment_depth if matched else 1.0)
    m_layers, std = moment_sites(bundle, v, teacher, layers)
    was = bundle.model.training
    bundle.model.eval()
    try:
        def vectors(texts: Sequence[str]) -> torch.Tensor:
            out = []
            for i in range(0, len(texts), batch_size):
                enc = encode(bundle, list(texts[i:i + batch_size]))
                saved: list[Any] = []
                with bundle.lm.trace(enc, logits_to_keep=1):
                    _save_sites(bundle.lm, mode, m_layers, bundle.n_post, saved)
                out.append(_site_vectors([t.float() for t in saved], mode, enc["attention_mask"], std).float().cpu())
            return torch.cat(out)
        h, o = vectors(harmful), vectors(harmless)  # the splits' order is a seeded random one: fit to pair
    finally:
        bundle.model.train(was)
    o1, o2 = null_split(o)
    gap, var = class_mean_gap(h, o)
    # the spread against the teacher's on the same prompts (``teacher_rows``: their indices in the teacher cache)
    ref = None
    if teacher_rows is not None and mode in teacher.vectors:
        ref = tuple(teacher_site_vectors(bundle, v, teacher, layers, r, std) for r in teacher_rows)
    return {"mean": round(float(mean_matching_loss(h, o)), 6), "mean_null": round(float(mean_matching_loss(o1, o2)), 6),
            "cov": round(float(cov_matching_loss(h, o)), 6), "cov_null": round(float(cov_matching_loss(o1, o2)), 6),
            "top_eig": round(float(excess_top_eig(h, o).mean()), 6), "total_var": round(float(var.mean() / 2), 4),
            # the excess second moment's two parts: the covariance difference alone, and the squared mean gap
            "top_eig_cov": round(float(excess_cov_top_eig(h, o).mean()), 6), "gap_sq": round(float(gap.mean()), 6),
            "spread": round(float(spread_log_ratio(h, o, ref).mean().exp()), 4),
            "sites": mode, "n_sites": int(h.shape[1]), "n": [int(h.shape[0]), int(o.shape[0])]}


def batch_moment_terms(z_harmful: torch.Tensor, z_harmless: torch.Tensor, variant: Variant,
                       generator: torch.Generator, pairings: int = 1,
                       reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A variant's moment terms on one step's batch, (n, S, d) site vectors per class, plus their noise floor
    on two random halves of the harmless class (``*_null``, no gradient). ``reference``: the teacher's site
    vectors of the same rows, against which the spread anchor compares (else the standardised units, d).

    The covariance term pairs rows (``defense.class_cov_gap``); the batch arrives length-sorted, so the rows
    are shuffled first, and the term is averaged over ``pairings`` random pairings: each is unbiased, and
    their mean uses more of the n(n-1)/2 row pairs, so the estimate is less noisy at no forward cost."""
    if pairings < 1:
        raise ValueError(f"defense.train.moment_pairings must be >= 1 (got {pairings})")
    terms: dict[str, torch.Tensor] = {}
    if variant.lambda_cov:
        terms["cov"] = sum(cov_matching_loss(shuffle_rows(z_harmful, generator), shuffle_rows(z_harmless, generator))
                           for _ in range(pairings)) / pairings
    if variant.lambda_mean:
        terms["mean"] = mean_matching_loss(z_harmful, z_harmless)
    if variant.lambda_spread:
        terms["spread"] = spread_anchor_loss(z_harmful, z_harmless, reference)
    with torch.no_grad():
        # the spread's log ratio, logged whatever its weight: exp of its mean over sites is the typical factor
        terms["log_spread"] = spread_log_ratio(z_harmful.detach(), z_harmless.detach(), reference).mean()
        o1, o2 = null_split(shuffle_rows(z_harmless.detach(), generator))
        if variant.lambda_cov and min(len(o1), len(o2)) >= 4:
            terms["cov_null"] = cov_matching_loss(o1, o2)
        if variant.lambda_mean and min(len(o1), len(o2)) >= 2:
            terms["mean_null"] = mean_matching_loss(o1, o2)
    return terms


def moment_objective(terms: dict[str, torch.Tensor], variant: Variant) -> torch.Tensor:
    """The weighted moment terms a variant trains on (``*_null`` floors and ``log_spread`` are logged, not trained)."""
    return (variant.lambda_cov * terms.get("cov", 0.0) + variant.lambda_mean * terms.get("mean", 0.0)
            + variant.lambda_spread * terms.get("spread", 0.0))


def _micro_batch_pass(bundle: ModelBundle, rows: Sequence[Sequence[int]], texts: Sequence[str], share: bool, mode: str,
                      m_layers: Sequence[int], z_std: Standardizer, moments: bool, logits: bool = True):
    """One micro-batch's forward pass: (prompt LM loss, last-position logits (B, V), standardised site vectors
    (B, S, d) or None, positions computed, the padded encoding or None when the prefix was shared).
    ``logits=False`` (the moment terms' pass without a graph): no vocabulary projection, and with a shared
    prefix no layer after the deepest matched one; LM loss and logits None."""
    n_post = bundle.n_post
    n_pre = common_prefix_len(rows, keep=n_post + 1) if share else 0
    if n_pre:
        sp = shared_prefix_forward(bundle.model, rows, m_layers if moments else [], n_pre, bundle.tokenizer.pad_token_id,
                                   logits=logits)
        z = _shared_site_vectors(sp, mode, m_layers, n_post, z_std) if moments else None
        if not logits:
            return None, None, z, n_pre + int(sp.ids.numel()), None
        return shared_lm_loss(sp), last_logits(sp), z, n_pre + int(sp.ids.numel()), None
    enc = encode(bundle, list(texts))
    saved: list[Any] = []
    with bundle.lm.trace(enc, **({} if logits else {"logits_to_keep": 1})):
        if moments:
            _save_sites(bundle.lm, mode, m_layers, n_post, saved)
        saved.append(bundle.lm.lm_head.output.save())
    out = saved[-1]
    z = _site_vectors(saved[:-1], mode, enc["attention_mask"], z_std) if moments else None
    if not logits:
        return None, None, z, int(enc["attention_mask"].numel()), enc
    return (prompt_lm_loss(out, enc["input_ids"], enc["attention_mask"]), out[:, -1, :], z,
            int(enc["attention_mask"].numel()), enc)


def _batch_term_gradient(parts: Sequence[torch.Tensor], n_harmful: Sequence[int], variant: Variant,
                         generator: torch.Generator, pairings: int,
                         ref) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], float]:
    """The two-phase step's middle: the batch-level moment terms on every micro-batch's site vectors (``parts``,
    detached, harmful rows first in each, ``n_harmful`` of them), and the gradient of their weighted sum with
    respect to the harmful and harmless vectors. Returns (g_harmful, g_harmless, the terms and their weighted
    sum, for the log)."""
    z_h = torch.cat([z[:c] for z, c in zip(parts, n_harmful)]).requires_grad_(True)
    z_o = torch.cat([z[c:] for z, c in zip(parts, n_harmful)]).requires_grad_(True)
    m_loss, logged = _moment_loss(z_h, z_o, variant, generator, pairings, ref)
    g_h, g_o = torch.autograd.grad(m_loss, [z_h, z_o])
    return g_h, g_o, logged, float(m_loss.detach())


def _moment_loss(z_h: torch.Tensor, z_o: torch.Tensor, variant: Variant, generator: torch.Generator, pairings: int,
                 ref) -> tuple[torch.Tensor, dict[str, float]]:
    """A step's weighted moment terms on the whole batch's site vectors, and every term (floors included) for the log."""
    mterms = batch_moment_terms(z_h, z_o, variant, generator, pairings, ref)
    return moment_objective(mterms, variant), {k: float(v.detach()) for k, v in mterms.items()}


@dataclass
class _StepContext:
    """What every training step of one run reads and nothing in it changes: the model, the variant, the
    prompts (harmful first, then harmless, as ``teacher.logits`` indexes them) as texts and unpadded token
    rows, and the moment terms' sites."""
    bundle: ModelBundle
    variant: Variant
    teacher: TeacherCache
    layers: Sequence[int]
    harmful: Sequence[str]
    harmless: Sequence[str]
    all_rows: list[list[int]]
    per_class: int
    n_micro: int
    share: bool
    m_layers: Sequence[int]
    z_std: Standardizer
    pairings: int

    @functools.cached_property
    def lengths(self) -> list[int]:  # each prompt's token count, for the length-sorted micro-batches
        return [len(r) for r in self.all_rows]

    @property
    def n_h(self) -> int:
        return len(self.harmful)

    @property
    def moments(self) -> bool:
        return bool(self.variant.lambda_cov or self.variant.lambda_mean)

    def forward(self, rows, texts, logits: bool = True):
        return _micro_batch_pass(self.bundle, rows, texts, self.share, self.variant.moment_sites, self.m_layers,
                                 self.z_std, self.moments, logits)


def _ablated_kd(ctx: _StepContext, basis: torch.Tensor, k_abl: int, texts: Sequence[str], enc, c: int,
                t_logits: torch.Tensor) -> torch.Tensor:
    """The ablation-aware term of one micro-batch of ``c`` + ``c`` rows: KD on the first ``a`` rows of each class
    run with the top ``k_abl`` directions of the current attack subspace ablated at every layer (nnsight)."""
    v = ctx.variant
    a = max(1, min(c, (v.abl_per_class or ctx.per_class) // ctx.n_micro))
    keep = list(range(a)) + list(range(c, c + a))
    enc2 = enc if (a == c and enc is not None) else encode(ctx.bundle, [texts[i] for i in keep])
    saved: list[Any] = []
    with ctx.bundle.lm.trace(enc2, logits_to_keep=1):
        run_interventions(ctx.bundle.lm, Ablation(basis[:, :k_abl]), ctx.bundle.n_layers)
        saved.append(ctx.bundle.lm.lm_head.output[:, -1, :].save())
    return kd_loss(saved[0], t_logits[keep], v.temperature)


def _accumulate_step(ctx: _StepContext, step: int, seed: int, basis: torch.Tensor | None, k_abl: int,
                     state: TrainState) -> tuple[float, dict[str, float]]:
    """One step's forward and backward passes over its micro-batches, gradients accumulated into the
    parameters (the optimiser step is the caller's); returns (the step's loss, its logged terms) and counts
    the tokens computed into ``state``. See the module docstring for the two phases of the moment terms."""
    v, n_h, per_class, lengths = ctx.variant, ctx.n_h, ctx.per_class, ctx.lengths
    hi, oi = batch_indices(step, seed, n_h, len(ctx.harmless), per_class)
    sums: dict[str, float] = {}
    value = 0.0
    mbs = micro_batches(hi, oi, lengths[:n_h], lengths[n_h:], ctx.n_micro)
    mb_rows = [[ctx.all_rows[i] for i in mh] + [ctx.all_rows[n_h + i] for i in mo] for mh, mo in mbs]
    mb_texts = [[ctx.harmful[i] for i in mh] + [ctx.harmless[i] for i in mo] for mh, mo in mbs]
    n_targets = [sum(len(r) - 1 for r in rows) for rows in mb_rows]  # next-token targets of each micro-batch
    g_h = g_o = None
    # the covariance term's pairings, drawn from (seed, step): a resumed run draws the same
    pairing = torch.Generator().manual_seed(int(seed) * 1_000_003 + step)
    two_phase = ctx.moments and len(mbs) > 1  # one micro-batch: the terms are computed on its own graph
    ref = None
    if ctx.moments:  # the teacher's vectors of the same rows, in the same order (the spread anchor's reference)
        ref = (teacher_site_vectors(ctx.bundle, v, ctx.teacher, ctx.layers, [i for mh, _ in mbs for i in mh], ctx.z_std),
               teacher_site_vectors(ctx.bundle, v, ctx.teacher, ctx.layers, [n_h + i for _, mo in mbs for i in mo], ctx.z_std))
    zs: list[tuple[torch.Tensor, int]] = []  # phase 1's (site vectors, positions computed) per micro-batch
    if two_phase:  # phase 1: the site vectors of every micro-batch but the first at the current weights (the
        # first's come from its own pass with gradients below, before anything is updated: the same weights)
        with torch.no_grad():  # keep each pass's site vectors and position count only (not its logits)
            zs = [ctx.forward(rows, texts, logits=False)[2:4] for rows, texts in zip(mb_rows[1:], mb_texts[1:])]
        state.moment_tokens += sum(n for _, n in zs)
    off_h = off_o = 0
    for (mh, mo), rows, texts, n_t in zip(mbs, mb_rows, mb_texts, n_targets):
        c = len(mh)
        w = c / per_class  # this micro-batch's share of the batch's rows (KD)
        w_lm = n_t / sum(n_targets)  # and of its LM targets: the accumulated LM loss is the whole batch's mean
        t_logits = torch.cat([ctx.teacher.logits[mh], ctx.teacher.logits[[n_h + i for i in mo]]]).float().to(ctx.bundle.device)
        terms: dict[str, torch.Tensor] = {}
        terms["lm"], last, z, n_computed, enc = ctx.forward(rows, texts)
        terms["kd"] = kd_loss(last, t_logits, v.temperature)
        state.computed_tokens += n_computed
        loss = w_lm * v.lambda_lm * terms["lm"] + w * v.lambda_kd * terms["kd"]
        value += float(loss.detach())
        if two_phase:  # phase 2: the batch-level terms' gradient, reaching the weights through these rows' vectors
            if g_h is None:  # the first micro-batch: every row's vectors are known now
                g_h, g_o, logged, m_value = _batch_term_gradient([z.detach()] + [zv for zv, _ in zs],
                                                                 [len(mh) for mh, _ in mbs], v, pairing,
                                                                 ctx.pairings, ref)
                value += m_value
                sums.update(logged)
                zs = []
            loss = loss + (z[:c] * g_h[off_h:off_h + c]).sum() + (z[c:] * g_o[off_o:off_o + len(mo)]).sum()
            off_h, off_o = off_h + c, off_o + len(mo)
        elif ctx.moments:  # the whole batch in this one pass
            m_loss, logged = _moment_loss(z[:c], z[c:], v, pairing, ctx.pairings, ref)
            sums.update(logged)
            value += float(m_loss.detach())
            loss = loss + m_loss
        loss.backward()
        if v.lambda_abl:  # KD again with the current attack subspace ablated, on the first a of each class
            terms["abl"] = _ablated_kd(ctx, basis, k_abl, texts, enc, c, t_logits)
            (w * v.lambda_abl * terms["abl"]).backward()
            value += w * v.lambda_abl * float(terms["abl"].detach())
        for k, t in terms.items():  # the per-micro-batch terms; the moment terms were logged once above
            sums[k] = sums.get(k, 0.0) + (w_lm if k == "lm" else w) * float(t.detach())
        state.tokens += sum(len(r) for r in rows)
        state.padded_tokens += len(rows) * max(len(r) for r in rows)
    return value, sums


def _check_loss(name: str, step: int, value: float, sums: dict[str, float], first_loss: float | None,
                diverge_factor: float, last: str) -> float:
    """Stop on a non-finite loss or one above ``diverge_factor`` x the first step's; returns the step's
    non-negative terms (LM, KD, ablation-aware KD), the yardstick of explosion: the unbiased moment terms
    are bounded ratios that may be negative on a draw, so the total loss is none."""
    positive = sum(v for k, v in sums.items() if k in ("lm", "kd", "abl"))
    if not math.isfinite(value) or (first_loss is not None and positive > diverge_factor * max(first_loss, 1e-3)):
        raise TrainingDiverged(f"{name}: loss {value:.4g} at step {step} (first {first_loss}); training stopped. "
                               f"{last}: lower defense.train.lr and rerun.")
    return positive


def train(bundle: ModelBundle, variant: Variant, tcfg: dict[str, Any], harmful: Sequence[str], harmless: Sequence[str],
          teacher: TeacherCache, layers: Sequence[int], ckpt_path: Path,
          evaluate: Callable[[int], dict[str, Any]] | None = None, stop_after: int | None = None,
          stop_at: int | None = None, log: Callable[[str], None] = print) -> TrainState:
    """Train ``bundle.model`` in place (its trainable parameters must already be set up).

    ``harmful``/``harmless`` texts index ``teacher.logits`` as harmful first, then harmless.
    ``stop_after`` ends the call after that many steps of this call (used to test resuming); ``stop_at``
    ends it once ``stop_at`` steps are done (to train a variant to one milestone and continue it later).
    """

    model = bundle.model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: attach LoRA adapters or enable full fine-tuning first")
    opt = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    state, basis = TrainState(), None
    if ckpt_path.is_file() or _prev_path(ckpt_path).is_file():
        state, basis = load_checkpoint(ckpt_path, model, opt, log=log)
        if state.step:
            log(f"resumed {variant.name} from step {state.step} ({ckpt_path})")
    saved_step = state.step if state.step else None  # the step of the checkpoint on disk, if any
    steps, per_class = tcfg["steps"], tcfg["batch_per_class"]
    end = min(steps, stop_at) if stop_at is not None else steps
    milestones = milestone_steps(tcfg)
    n_micro = int(tcfg.get("micro_batches", 1))
    n_h = len(harmful)
    first_loss = (sum(state.history[0].get(k, 0.0) for k in ("lm", "kd", "abl")) if state.history else None)
    abl_layers = list(range(int(bundle.n_layers * (1 - tcfg.get("drop_last_frac", 0.2)))))
    m_layers, z_std = moment_sites(bundle, variant, teacher, layers)
    # token ids exactly as ``encode`` makes them, unpadded: lengths for the micro-batches, rows for prefix sharing
    ctx = _StepContext(bundle, variant, teacher, layers, harmful, harmless, token_rows(bundle, list(harmful) + list(harmless)),
                       per_class, n_micro, bool(tcfg.get("share_prefix", False)), m_layers, z_std,
                       int(tcfg.get("moment_pairings", 1)))
    diag_n = int(tcfg.get("diag_prompts", 0))
    diag_rows = (list(range(min(diag_n, n_h))), [n_h + i for i in range(min(diag_n, len(harmless)))])
    diag = (lambda: moment_diagnostics(bundle, variant, teacher, layers, harmful[:diag_n], harmless[:diag_n],
                                       2 * per_class // n_micro, diag_rows)) if diag_n else None
    if diag is not None and state.step == 0 and not state.evals:
        state.evals.append({"step": 0, "moments": diag()})
    model.train()
    bar = tqdm(range(state.step, end), desc=f"train {variant.name}", initial=state.step, total=steps)
    done_here = 0
    for step in bar:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        k_abl = 0
        if variant.lambda_abl:
            if basis is None or step % variant.refresh_every == 0:
                sub_h = [harmful[i] for i in range(min(n_h, tcfg["subspace_prompts"]))]
                sub_o = [harmless[i] for i in range(min(len(harmless), tcfg["subspace_prompts"]))]
                basis = attack_subspace(bundle, sub_h, sub_o, variant.k_max, abl_layers, tcfg["batch_per_class"] * 2)
            k_abl = random.Random(f"{tcfg['seed']}-k-{step}").randint(1, basis.shape[1])
        value, sums = _accumulate_step(ctx, step, tcfg["seed"], basis, k_abl, state)
        last = (f"The last checkpoint is {ckpt_path} at step {saved_step}" if saved_step is not None else
                f"No last checkpoint was saved (a rerun starts from step 0)")
        positive = _check_loss(variant.name, step, value, sums, first_loss, tcfg["diverge_factor"], last)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tcfg["max_grad_norm"]))
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"{variant.name}: non-finite gradient at step {step}; training stopped before the update. "
                f"{last}: lower defense.train.lr and rerun.")
        opt.step()
        opt.zero_grad(set_to_none=True)
        first_loss = positive if first_loss is None else first_loss
        state.step = step + 1
        sec = time.perf_counter() - t0
        state.seconds += sec
        state.history.append({"step": step, "loss": value, "lr": lr_at(step, tcfg), "grad_norm": grad_norm,
                              "sec": round(sec, 2), **sums})
        bar.set_postfix({k: f"{v:.3g}" for k, v in sums.items() if not k.endswith("_null")})
        at_milestone = state.step in milestones
        if at_milestone:
            save_snapshot(snapshot_path(ckpt_path, state.step), model)
        if (evaluate is not None or diag is not None) and (state.step % tcfg["eval_every"] == 0 or at_milestone):
            model.eval()
            entry: dict[str, Any] = {"step": state.step}
            if evaluate is not None:
                entry.update(evaluate(state.step))
            if diag is not None:
                entry["moments"] = diag()
            state.evals.append(entry)
            model.train()
        if state.step % tcfg["ckpt_every"] == 0 or at_milestone or state.step == end:
            save_checkpoint(ckpt_path, model, opt, state, basis)
            saved_step = state.step
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
