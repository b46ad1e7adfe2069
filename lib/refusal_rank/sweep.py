"""The two model-in-the-loop attackers of notebook 04, and the helpers they share.

* ``iterated`` (the paper's own attacker): K rounds of notebook 01's selection; round k re-extracts the
  difference-in-means candidates with the k-1 directions found so far ablated, picks one by the same
  KL / induce / lowest-refusal rule (fallback: lowest refusal + KL), and orthonormalises the set. It
  stops early when the chosen difference in means falls under ``min_norm_frac`` of the first one.
* ``optimized`` (the adaptive attacker, in the spirit of Wollschlager et al. 2025): a d x K matrix,
  orthonormalised by QR at every step, trained by gradient descent to minimise the harmful refusal
  score under its ablation plus ``lambda_kl`` x first-token KL on harmless prompts. With several K
  values it trains nested subspaces in one run ("matryoshka"): each step scores the first k columns for
  a k drawn from the grid, so that every prefix is itself an attack.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from .progress import tqdm

from .ablation import orthonormalize
from .activations import Ablation, ActAdd, collect_residuals, encode, length_batches, run_interventions
from .directions import select_direction
from .metrics import kl_rows, refusal_score
from .models import ModelBundle


@dataclass
class IteratedResult:
    basis: torch.Tensor  # (d, K) float64
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    first_norm: float | None = None  # round 1's difference-in-means norm (the early-stop reference)


def iterated(bundle: ModelBundle, harmful_train: Sequence[str], harmless_train: Sequence[str],
             candidates: Sequence[tuple[int, int]], k_max: int,
             score: Callable[[torch.Tensor], float], kl: Callable[[torch.Tensor], float],
             induce: Callable[[torch.Tensor, int, torch.Tensor], float],
             batch_size: int, max_kl: float = 0.1, max_checks: int | None = None, min_norm_frac: float = 0.01,
             means: Callable[[torch.Tensor, Sequence[str], Sequence[int]], torch.Tensor] | None = None,
             progress: bool = True, start: IteratedResult | None = None) -> IteratedResult:
    """The paper's attacker. ``score(U)``: mean harmful-val refusal score with span(U) ablated;
    ``kl(U)``: first-token KL on harmless val; ``induce(U_prev, layer, v)``: harmless-val refusal score with
    U_prev ablated and v added at ``layer``. ``means(U_prev, prompts, layers)`` (optional, for caching)
    returns mean block-input residuals (len(layers), n_post, d) with U_prev ablated. ``start`` continues
    an earlier result (its rounds are kept) up to ``k_max`` rounds in all."""
    layers = sorted({l for l, _ in candidates})
    d = bundle.d_model

    def default_means(U_prev: torch.Tensor, prompts: Sequence[str], ls: Sequence[int]) -> torch.Tensor:
        iv = Ablation(U_prev) if U_prev.shape[1] else None
        return collect_residuals(bundle, prompts, batch_size, layers=ls, intervention=iv, desc="iterated acts").double().mean(0)

    means = means or default_means
    found = torch.zeros(d, 0, dtype=torch.float64)
    result = IteratedResult(found)
    first_norm = None
    if start is not None:
        found, first_norm = start.basis.clone(), start.first_norm
        result = IteratedResult(found, list(start.rounds), start.stopped_early, first_norm)
        if start.stopped_early:
            return result
    for k in tqdm(range(found.shape[1], k_max), desc="iterated rounds", disable=not progress, leave=False):
        h = means(found, harmful_train, layers)
        o = means(found, harmless_train, layers)
        dirs = torch.zeros(max(layers) + 1, h.shape[1], d, dtype=torch.float64)
        dirs[layers] = h - o
        if found.shape[1]:  # numerically remove what is already ablated
            dirs = dirs - (dirs @ found) @ found.T
        prev = found
        sel = select_direction(
            dirs, candidates,
            ablation_score=lambda u: score(torch.cat([prev, u[:, None]], 1)),
            kl_under_ablation=lambda u: kl(torch.cat([prev, u[:, None]], 1)),
            induce_score=lambda layer, v: induce(prev, layer, v),
            max_kl=max_kl, max_checks=max_checks, progress=False)
        norm = sel.direction.norm().item()
        if first_norm is None:
            first_norm = result.first_norm = norm
        if k > 0 and norm < min_norm_frac * first_norm:
            result.stopped_early = True
            break
        found = orthonormalize(torch.cat([found, sel.unit[:, None]], 1))
        result.rounds.append({"k": k + 1, "layer": sel.layer, "position": sel.position, "norm": round(norm, 5),
                              "refusal_score_val": round(sel.refusal_score, 4), "kl": round(sel.kl_harmless, 5),
                              "fallback": sel.fallback})
    result.basis = found
    return result


def _logprobs_with_grad(bundle: ModelBundle, texts: Sequence[str], basis: torch.Tensor) -> torch.Tensor:
    """Last-position log-probs under run-time ablation of ``basis``, differentiable w.r.t. ``basis``."""
    lm = bundle.lm
    enc = encode(bundle, texts)
    saved: list[Any] = []
    with lm.trace(enc, logits_to_keep=1):
        run_interventions(lm, Ablation(basis), bundle.n_layers)
        saved.append(lm.lm_head.output[:, -1, :].save())
    return torch.log_softmax(saved[0].float(), dim=-1)


def optimized(bundle: ModelBundle, harmful: Sequence[str], harmless: Sequence[str], base_lp_harmless: torch.Tensor,
              init: torch.Tensor, ks: Sequence[int], steps: int, lr: float, lambda_kl: float, batch_per_class: int,
              seed: int = 0, progress: bool = True) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """The adaptive attacker: returns an orthonormal (d, max(ks)) basis whose every prefix in ``ks`` was
    trained as an attack, and the per-step history. ``base_lp_harmless`` are the original model's
    last-position log-probs of ``harmless`` (the KL retain term's reference)."""
    k_max = max(ks)
    if init.shape[1] < k_max:
        raise ValueError(f"init has {init.shape[1]} columns, need {k_max}")
    W = init[:, :k_max].detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr)
    rng = random.Random(seed)
    history = []
    for step in tqdm(range(steps), desc=f"optimized attack K<={k_max}", disable=not progress, leave=False):
        k = rng.choice(list(ks))
        hi = rng.sample(range(len(harmful)), min(batch_per_class, len(harmful)))
        oi = rng.sample(range(len(harmless)), min(batch_per_class, len(harmless)))
        with torch.enable_grad():
            U = torch.linalg.qr(W)[0][:, :k]
            s = refusal_score(_logprobs_with_grad(bundle, [harmful[i] for i in hi], U), bundle.refusal_token_ids).mean()
            lp = _logprobs_with_grad(bundle, [harmless[i] for i in oi], U)
            kl = kl_rows(base_lp_harmless[oi], lp).mean()
            loss = s + lambda_kl * kl
            opt.zero_grad()
            loss.backward()
        opt.step()
        history.append({"step": step, "k": k, "score": float(s), "kl": float(kl), "loss": float(loss)})
    with torch.no_grad():
        basis = torch.linalg.qr(W.detach().double())[0]
    return basis, history
