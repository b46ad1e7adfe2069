"""The model-in-the-loop attackers on the tiny model."""
import torch

from refusal_rank import data as D
from refusal_rank.activations import Ablation, ActAdd, collect_residuals, last_token_logprobs
from refusal_rank.directions import candidate_grid
from refusal_rank.metrics import kl_rows, refusal_score
from refusal_rank.sweep import iterated, optimized


def _texts(split, n):
    return [p.text for p in D.split_prompts(split, n, 0)]


def test_iterated_reextracts_under_found_directions(tiny):
    harm, ok = _texts("harmful_train", 8), _texts("harmless_train", 8)
    hv, ov = _texts("harmful_val", 4), _texts("harmless_val", 4)
    base = last_token_logprobs(tiny, ov, 4)
    rid = tiny.refusal_token_ids
    score = lambda U: refusal_score(last_token_logprobs(tiny, hv, 4, Ablation(U)), rid).mean().item()
    kl = lambda U: kl_rows(base, last_token_logprobs(tiny, ov, 4, Ablation(U))).mean().item()
    induce = lambda Up, l, v: refusal_score(last_token_logprobs(
        tiny, ov, 4, (Ablation(Up), ActAdd(l, v)) if Up.shape[1] else ActAdd(l, v)), rid).mean().item()
    seen = []

    def means(U, prompts, layers):
        seen.append(U.clone())
        iv = Ablation(U) if U.shape[1] else None
        return collect_residuals(tiny, prompts, 4, layers=layers, intervention=iv).double().mean(0)

    cands = candidate_grid(tiny.n_layers, tiny.n_post, 0.2, 1)
    res = iterated(tiny, harm, ok, cands, 3, score, kl, induce, 4, max_kl=10.0, max_checks=2, means=means, progress=False)
    B = res.basis
    assert B.shape[1] == len(res.rounds) >= 2
    assert torch.allclose(B.T @ B, torch.eye(B.shape[1], dtype=B.dtype), atol=1e-8)
    # round 2 extracted its candidates with round 1's direction ablated
    assert seen[0].shape[1] == 0 and seen[2].shape[1] == 1
    assert torch.allclose(seen[2][:, 0].abs(), B[:, 0].abs(), atol=1e-8)
    # and the residuals it read have no component along that direction
    acts = collect_residuals(tiny, harm, 4, layers=[1, 2], intervention=Ablation(B[:, :1]))
    assert (acts.double() @ B[:, 0]).abs().max() < 1e-4


def test_optimized_returns_orthonormal_nested_basis_and_lowers_loss(tiny):
    harm, ok = _texts("harmful_train", 8), _texts("harmless_train", 8)
    base = last_token_logprobs(tiny, ok, 4)
    g = torch.Generator().manual_seed(0)
    init = torch.linalg.qr(torch.randn(tiny.d_model, 3, generator=g, dtype=torch.float64))[0]
    B, hist = optimized(tiny, harm, ok, base, init, ks=[1, 3], steps=25, lr=0.05, lambda_kl=1.0, batch_per_class=8,
                        progress=False)
    assert B.shape == (tiny.d_model, 3)
    assert torch.allclose(B.T @ B, torch.eye(3, dtype=B.dtype), atol=1e-8)
    rid = tiny.refusal_token_ids
    loss = lambda U: (refusal_score(last_token_logprobs(tiny, harm, 8, Ablation(U)), rid).mean()
                      + kl_rows(base, last_token_logprobs(tiny, ok, 8, Ablation(U))).mean()).item()
    assert loss(B[:, :3]) < loss(init[:, :3])
