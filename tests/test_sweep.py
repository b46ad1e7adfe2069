"""The model-in-the-loop attackers on the tiny model: the paper's attacker against a plain reference
implementation, and the optimised attacker's loss."""
import torch

from refusal_rank import data as D
from refusal_rank import sweep_run as S
from refusal_rank.activations import Ablation, ActAdd, collect_residuals, encode, last_token_logprobs
from refusal_rank.config import override
from refusal_rank.directions import candidate_grid
from refusal_rank.metrics import kl_rows, refusal_score
from refusal_rank.sweep import OptimizeBatch, extend_basis, iterated, optimized_k, optimized_loss, target_terms


def _texts(split, n):
    return [p.text for p in D.split_prompts(split, n, 0)]


def test_iterated_reextracts_under_found_directions(tiny):
    harm, ok = _texts("harmful_train", 8), _texts("harmless_train", 8)
    hv, ov = _texts("harmful_val", 4), _texts("harmless_val", 4)
    rid = tiny.refusal_token_ids
    lp = lambda texts, U: last_token_logprobs(tiny, texts, 4, Ablation(U) if U.shape[1] else None)
    score = lambda U: refusal_score(lp(hv, U), rid).mean().item()
    kl_refs = []

    def kl(Up, U):
        kl_refs.append(Up.shape[1])
        return kl_rows(lp(ov, Up), lp(ov, U)).mean().item()

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
    # round 2 extracted its candidates with round 1's direction ablated, and took its KL against that model
    assert seen[0].shape[1] == 0 and seen[2].shape[1] == 1
    assert kl_refs[0] == 0 and 1 in kl_refs
    assert torch.allclose(seen[2][:, 0].abs(), B[:, 0].abs(), atol=1e-8)
    acts = collect_residuals(tiny, harm, 4, layers=[1, 2], intervention=Ablation(B[:, :1]))
    assert (acts.double() @ B[:, 0]).abs().max() < 1e-4


# ---- a plain reference of the paper's attacker: HF forward hooks, one batch, no nnsight, no cache


def _hooks(model, U=None, add=None):
    """Forward hooks: project span(U) out of every residual write; add (layer, v) at that layer's input."""
    hs = []
    P = None if U is None or U.shape[1] == 0 else U.float()
    proj = lambda x: x - (x @ P) @ P.T
    inner = model.model
    if P is not None:
        hs.append(inner.embed_tokens.register_forward_hook(lambda m, i, o: proj(o)))
        for layer in inner.layers:
            hs.append(layer.self_attn.register_forward_hook(lambda m, i, o: (proj(o[0]), *o[1:])))
            hs.append(layer.mlp.register_forward_hook(lambda m, i, o: proj(o)))
    if add is not None:
        l, v = add
        site = inner.embed_tokens if l == 0 else inner.layers[l - 1]
        hs.append(site.register_forward_hook(lambda m, i, o: o + v.float()))
    return hs


def _forward(tiny, texts, U=None, add=None):
    hs = _hooks(tiny.model, U, add)
    try:
        with torch.no_grad():
            out = tiny.model(**encode(tiny, texts), output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    return torch.log_softmax(out.logits[:, -1].float(), -1), out.hidden_states


def _reference_round(tiny, harm, ok, s_harm, s_ok, cands, found, max_kl, max_checks):
    n_post = tiny.n_post
    means = lambda texts: torch.stack([h[:, -n_post:].double().mean(0) for h in _forward(tiny, texts, found)[1][:tiny.n_layers]])
    dirs = means(harm) - means(ok)
    if found.shape[1]:
        dirs = dirs - (dirs @ found) @ found.T
    norms = {c: dirs[c].norm().item() for c in cands}
    top = max(norms.values())
    cands = [c for c in cands if norms[c] > 1e-6 * top]
    rid = tiny.refusal_token_ids
    with_u = lambda c: torch.cat([found, (dirs[c] / dirs[c].norm())[:, None]], 1)
    score = {c: refusal_score(_forward(tiny, s_harm, with_u(c))[0], rid).mean().item() for c in cands}
    ref_lp = _forward(tiny, s_ok, found)[0]
    checked = []
    for c in sorted(cands, key=score.get)[:max_checks]:
        kl = kl_rows(ref_lp, _forward(tiny, s_ok, with_u(c))[0]).mean().item()
        ind = refusal_score(_forward(tiny, s_ok, found, (c[0], dirs[c]))[0], rid).mean().item() if kl <= max_kl else None
        checked.append((c, kl))
        if kl <= max_kl and ind > 0:
            return c, dirs[c], score[c], kl
    c, kl = min(checked, key=lambda t: score[t[0]] + t[1])
    return c, dirs[c], score[c], kl


def test_iterated_rounds_match_a_plain_reference(tiny_cfg, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    # on tiny the induced refusal score stays negative, so each round takes the fallback (lowest score + KL
    # among the checked): the choice, the score and the KL must all be the reference's
    for max_kl in (0.1,):
        cfg = override(tiny_cfg, **{"directions.max_kl": max_kl})
        ctx = S.attack_context(cfg, tiny)
        got = S.iterated_basis(ctx, 2)
        assert len(got.rounds) == 2
        txt = lambda ps: [p.text for p in ps]
        s_harm, s_ok = S.iterated_scoring_sets(ctx)
        assert len(s_harm) == cfg["sweep"]["iterated_n_score"]  # scored on train prompts, the paper's count
        assert {p.id for p in s_harm} <= {p.id for p in ctx.tv.harmful_train}
        cands = S.iterated_candidates(cfg, tiny)
        found = torch.zeros(tiny.d_model, 0, dtype=torch.float64)
        for r in got.rounds:
            c, v, sc, kl = _reference_round(tiny, txt(ctx.tv.harmful_train), txt(ctx.tv.harmless_train), txt(s_harm), txt(s_ok),
                                    cands, found, max_kl, cfg["directions"]["max_checks"])
            assert (r["layer"], r["position"]) == c, (max_kl, r)
            assert abs(r["norm"] - v.norm().item()) < 1e-3 * max(1.0, v.norm().item())
            # the same numbers: scored on the train prompts, KL against the model with the earlier rounds ablated
            assert abs(r["refusal_score"] - sc) < 1e-3 and abs(r["kl"] - kl) < 1e-4, (r, sc, kl)
            found = torch.linalg.qr(torch.cat([found, (v / v.norm())[:, None]], 1))[0]
        B = got.basis
        assert torch.allclose(B @ B.T, found @ found.T, atol=1e-4)


# ---- the optimised attacker


def _targets(tiny, texts, n=5):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, 200, (n,), generator=g).tolist() for _ in texts]


def test_target_terms_equal_a_plain_teacher_forced_nll(tiny):
    harm = _texts("harmful_train", 4)
    tg = _targets(tiny, harm)
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(tiny.d_model, 2, generator=g, dtype=torch.float64))[0]
    nll, score = target_terms(tiny, harm, tg, U)
    ref_nll, ref_score = [], []
    from refusal_rank.activations import chat_texts
    for t, c in zip(chat_texts(tiny.tokenizer, harm, **tiny.template_kwargs), tg):
        p = tiny.tokenizer(t, add_special_tokens=False)["input_ids"]
        hs = _hooks(tiny.model, U)
        try:
            with torch.no_grad():
                logits = tiny.model(input_ids=torch.tensor([p + c])).logits[0].float()
        finally:
            for h in hs:
                h.remove()
        lp = torch.log_softmax(logits, -1)
        ref_nll.extend(-lp[len(p) - 1 + j, c[j]].item() for j in range(len(c)))
        ref_score.append(refusal_score(lp[len(p) - 1][None], tiny.refusal_token_ids).item())
    assert abs(nll.item() - sum(ref_nll) / len(ref_nll)) < 1e-4
    assert torch.allclose(score, torch.tensor(ref_score), atol=1e-4)


def test_optimized_loss_has_a_gradient_and_training_lowers_it(tiny):
    harm, ok = _texts("harmful_train", 8), _texts("harmless_train", 8)
    hv, ov = _texts("harmful_val", 6), _texts("harmless_val", 6)
    train = OptimizeBatch(harm, _targets(tiny, harm), ok, last_token_logprobs(tiny, ok, 8))
    held = OptimizeBatch(hv, _targets(tiny, hv), ov, last_token_logprobs(tiny, ov, 8))
    g = torch.Generator().manual_seed(0)
    inits = {n: torch.linalg.qr(torch.randn(tiny.d_model, 2, generator=g, dtype=torch.float64))[0] for n in ("a", "b", "c")}
    W = inits["a"].float().clone().requires_grad_(True)
    with torch.enable_grad():
        terms = optimized_loss(tiny, train, torch.linalg.qr(W)[0], 1.0, 0.1)
        terms["loss"].backward()
    assert W.grad is not None and W.grad.abs().sum() > 0
    got = optimized_k(tiny, 2, inits, train, held, steps=25, lr=0.05, lambda_kl=1.0, lambda_score=0.1,
                      batch_per_class=8, n_train_starts=2, progress=False)
    B = got["basis"]
    assert B.shape == (tiny.d_model, 2) and torch.allclose(B.T @ B, torch.eye(2, dtype=B.dtype), atol=1e-8)
    assert set(got["screened"]) == {"a", "b", "c"} and len(got["trained"]) == 2
    best = got["trained"][got["best_start"]]
    assert best["held_out"]["loss"] < got["screened"][got["best_start"]]["loss"]  # training lowered the held-out loss
    assert len(best["history"]) == 25


def test_extend_basis_keeps_the_previous_span():
    g = torch.Generator().manual_seed(0)
    prev = torch.linalg.qr(torch.randn(16, 2, generator=g, dtype=torch.float64))[0]
    extra = torch.randn(16, 5, generator=g, dtype=torch.float64)
    B = extend_basis(prev, extra, 4)
    assert B.shape == (16, 4) and torch.allclose(B.T @ B, torch.eye(4, dtype=B.dtype), atol=1e-10)
    assert torch.allclose(B[:, :2] @ B[:, :2].T, prev @ prev.T, atol=1e-10)
