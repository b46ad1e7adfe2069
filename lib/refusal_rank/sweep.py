"""The two model-in-the-loop attackers of notebook 04, and the helpers they share.

* ``iterated`` (the paper's own attacker, as its code does it): K rounds of notebook 01's selection. Round
  k re-extracts the difference-in-means candidates with the k-1 directions found so far ablated, scores
  each candidate with those k-1 directions and the candidate ablated, takes its KL against the model with
  the k-1 directions ablated (not against the unablated model: the filter asks whether *this* direction
  costs behaviour), picks one by the same KL / induce / lowest-refusal rule (fallback: lowest refusal +
  KL) and orthonormalises the set. It stops when the chosen difference in means falls under
  ``min_norm_frac`` of round 1's. Which prompts score the candidates is the caller's choice (the sweep
  uses the paper's: its train prompts).
* ``optimized`` (the adaptive attacker, in the spirit of Wollschlager et al. 2025, RDO): a d x K matrix,
  orthonormalised by QR at every step, trained by Adam on a loss on what the judge reads: the negative
  log-likelihood of compliant target completions of the harmful prompts under the ablation (teacher
  forced, several tokens: a first-token loss alone is gamed, the model then refuses one token later),
  plus a softplus of the refusal score at the first generated position, plus ``lambda_kl`` x the first-token
  KL on harmless prompts (the retain term). One K at a time; the caller warm-starts K from the previous K
  and restarts from other estimators' bases (``optimize_subspace`` trains one start, ``optimized_k``
  screens the starts and trains the best).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from .progress import tqdm

from .ablation import orthonormalize
from .activations import Ablation, chat_texts, collect_residuals, encode, run_interventions
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
             score: Callable[[torch.Tensor], float], kl: Callable[[torch.Tensor, torch.Tensor], float],
             induce: Callable[[torch.Tensor, int, torch.Tensor], float],
             batch_size: int, max_kl: float = 0.1, max_checks: int | None = None, min_norm_frac: float = 0.01,
             means: Callable[[torch.Tensor, Sequence[str], Sequence[int]], torch.Tensor] | None = None,
             progress: bool = True, start: IteratedResult | None = None) -> IteratedResult:
    """The paper's attacker. ``score(U)``: mean harmful refusal score with span(U) ablated;
    ``kl(U_prev, U)``: first-token KL on harmless prompts of the model with span(U) ablated against the model
    with span(U_prev) ablated (U_prev may have no column: the unablated model); ``induce(U_prev, layer, v)``:
    harmless refusal score with U_prev ablated and v added at ``layer``. ``means(U_prev, prompts, layers)``
    (optional, for caching) returns mean block-input residuals (len(layers), n_post, d) with U_prev ablated.
    ``start`` continues an earlier result (its rounds are kept) up to ``k_max`` rounds in all."""
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
            kl_under_ablation=lambda u: kl(prev, torch.cat([prev, u[:, None]], 1)),
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
                              "refusal_score": round(sel.refusal_score, 4), "kl": round(sel.kl_harmless, 5),
                              "fallback": sel.fallback})
    result.basis = found
    return result


# ---- the optimised attacker


def _logprobs_with_grad(bundle: ModelBundle, texts: Sequence[str], basis: torch.Tensor) -> torch.Tensor:
    """Last-position log-probs under run-time ablation of ``basis``, differentiable w.r.t. ``basis``."""
    lm = bundle.lm
    enc = encode(bundle, texts)
    saved: list[Any] = []
    with lm.trace(enc, logits_to_keep=1):
        run_interventions(lm, Ablation(basis), bundle.n_layers)
        saved.append(lm.lm_head.output[:, -1, :].save())
    return torch.log_softmax(saved[0].float(), dim=-1)


def target_terms(bundle: ModelBundle, prompts: Sequence[str], targets: Sequence[Sequence[int]],
                 basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL per target token, refusal score per prompt at the first generated position) of the prompts'
    target completions under run-time ablation of ``basis``, teacher forced in one pass, differentiable
    w.r.t. ``basis``. Sequences are left-padded prompt + target, so only target positions are unembedded."""
    tok = bundle.tokenizer
    texts = chat_texts(tok, prompts, **bundle.template_kwargs)
    seqs, starts = [], []
    for t, c in zip(texts, targets):
        p = tok(t, add_special_tokens=False)["input_ids"]
        seqs.append(p + list(c))
        starts.append(len(p))
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    # position j predicts token j+1: the last prompt position predicts the first target token
    pred = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        off = width - len(s)
        pred[i, off + st - 1:width - 1] = True
    first = torch.tensor([width - len(s) + st - 1 for s, st in zip(seqs, starts)])
    lm = bundle.lm
    saved: list[Any] = []
    with lm.trace({"input_ids": ids.to(bundle.device), "attention_mask": attn.to(bundle.device)}):
        run_interventions(lm, Ablation(basis), bundle.n_layers)
        saved.append(lm.model.norm.output.save())
    hidden = saved[0]
    head = bundle.model.get_output_embeddings()
    target = ids[:, 1:][pred[:, :-1]].to(hidden.device)
    logits = head(hidden[pred.to(hidden.device)].contiguous()).float()
    nll = torch.nn.functional.cross_entropy(logits, target)
    first_lp = torch.log_softmax(head(hidden[torch.arange(len(seqs)), first.to(hidden.device)]).float(), dim=-1)
    return nll, refusal_score(first_lp, bundle.refusal_token_ids)


@dataclass
class OptimizeBatch:
    """What one evaluation of the optimised loss reads: harmful prompts with their compliant targets, and
    harmless prompts with the attacked model's own (unablated) last-position log-probs."""
    harmful: list[str]
    targets: list[list[int]]
    harmless: list[str]
    ref_lp: torch.Tensor  # (len(harmless), vocab)


def optimized_loss(bundle: ModelBundle, b: OptimizeBatch, U: torch.Tensor, lambda_kl: float,
                   lambda_score: float) -> dict[str, torch.Tensor]:
    """nll + lambda_score x mean softplus(first-position refusal score) + lambda_kl x harmless first-token KL.
    The softplus stops rewarding a score once it is negative (a refusal first token already unlikely), so
    the term cannot buy an ever lower score at the targets' expense."""
    nll, score = target_terms(bundle, b.harmful, b.targets, U)
    kl = kl_rows(b.ref_lp, _logprobs_with_grad(bundle, b.harmless, U)).mean()
    loss = nll + lambda_score * torch.nn.functional.softplus(score).mean() + lambda_kl * kl
    return {"loss": loss, "nll": nll, "score": score.mean(), "kl": kl}


def optimize_subspace(bundle: ModelBundle, train: OptimizeBatch, init: torch.Tensor, steps: int, lr: float,
                      lambda_kl: float, lambda_score: float, batch_per_class: int, seed: int = 0,
                      progress: bool = True) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Train one start: Adam on W (d, K), U = QR(W); each step reads ``batch_per_class`` harmful prompts
    (with targets) and harmless prompts drawn from ``train``. Returns the orthonormal float64 basis and the
    per-step history (loss and its terms)."""
    W = init.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr)
    rng = random.Random(seed)
    history = []
    for step in tqdm(range(steps), desc=f"optimized K={init.shape[1]}", disable=not progress, leave=False):
        hi = rng.sample(range(len(train.harmful)), min(batch_per_class, len(train.harmful)))
        oi = rng.sample(range(len(train.harmless)), min(batch_per_class, len(train.harmless)))
        b = OptimizeBatch([train.harmful[i] for i in hi], [train.targets[i] for i in hi],
                          [train.harmless[i] for i in oi], train.ref_lp[oi])
        with torch.enable_grad():
            U = torch.linalg.qr(W)[0]
            terms = optimized_loss(bundle, b, U, lambda_kl, lambda_score)
            opt.zero_grad()
            terms["loss"].backward()
        opt.step()
        history.append({"step": step, **{k: round(float(v.detach()) if torch.is_tensor(v) else float(v), 5)
                                           for k, v in terms.items()}})
    with torch.no_grad():
        basis = torch.linalg.qr(W.detach().double())[0]
    return basis, history


@torch.no_grad()
def screen_loss(bundle: ModelBundle, b: OptimizeBatch, U: torch.Tensor, lambda_kl: float, lambda_score: float,
                batch_size: int) -> dict[str, float]:
    """The optimised loss of a fixed basis on a whole (held-out) batch, in chunks, without gradients."""
    sums, n = {"loss": 0.0, "nll": 0.0, "score": 0.0, "kl": 0.0}, 0
    m = min(len(b.harmful), len(b.harmless))
    for s in range(0, m, batch_size):
        part = OptimizeBatch(b.harmful[s:s + batch_size], b.targets[s:s + batch_size], b.harmless[s:s + batch_size],
                             b.ref_lp[s:s + batch_size])
        w = len(part.harmful)
        for k, v in optimized_loss(bundle, part, U.float(), lambda_kl, lambda_score).items():
            sums[k] += float(v) * w
        n += w
    return {k: round(v / max(n, 1), 5) for k, v in sums.items()}


def extend_basis(prev: torch.Tensor, extra: torch.Tensor, k: int) -> torch.Tensor:
    """A (d, k) orthonormal start holding span(prev) and the part of span(extra) orthogonal to it that is
    largest (top singular directions of extra with prev projected out)."""
    if prev.shape[1] >= k:
        return orthonormalize(prev[:, :k])
    rest = extra.double() - prev.double() @ (prev.double().T @ extra.double())
    u, _, _ = torch.linalg.svd(rest, full_matrices=False)
    return orthonormalize(torch.cat([prev.double(), u[:, :k - prev.shape[1]]], 1))


def optimized_k(bundle: ModelBundle, k: int, starts: dict[str, torch.Tensor], train: OptimizeBatch,
                held_out: OptimizeBatch, steps: int, lr: float, lambda_kl: float, lambda_score: float,
                batch_per_class: int, n_train_starts: int, seed: int = 0, batch_size: int = 8,
                progress: bool = True) -> dict[str, Any]:
    """The adaptive attacker at one K: every start (name -> (d, k) orthonormal basis: the previous K's
    result extended, other estimators' bases) is scored by the loss on ``held_out``; the best
    ``n_train_starts`` are trained for ``steps`` steps each, and the trained basis with the lowest held-out
    loss is returned with every start's screening loss and every trained start's curve."""
    if not starts:
        raise ValueError("optimized_k needs at least one start")
    screened = {name: screen_loss(bundle, held_out, U[:, :k], lambda_kl, lambda_score, batch_size)
                for name, U in starts.items()}
    order = sorted(screened, key=lambda n: screened[n]["loss"])[:max(1, n_train_starts)]
    trained = {}
    for j, name in enumerate(order):
        basis, hist = optimize_subspace(bundle, train, starts[name][:, :k], steps, lr, lambda_kl, lambda_score,
                                        batch_per_class, seed + j, progress)
        trained[name] = {"basis": basis, "history": hist,
                         "held_out": screen_loss(bundle, held_out, basis, lambda_kl, lambda_score, batch_size)}
    best = min(trained, key=lambda n: trained[n]["held_out"]["loss"])
    return {"basis": trained[best]["basis"], "best_start": best, "screened": screened,
            "trained": {n: {"held_out": t["held_out"], "history": t["history"]} for n, t in trained.items()}}
