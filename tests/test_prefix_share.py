"""Prefix sharing computes the same training losses and gradients as the full padded batch (tiny model)."""
import pytest
import torch

from refusal_rank.activations import encode
from refusal_rank.defense import Standardizer, kd_loss, prompt_lm_loss
from refusal_rank.prefix_share import (common_prefix_len, last_logits, shared_lm_loss, shared_prefix_forward,
                                       tail_hidden)
from refusal_rank.training import (Variant, _save_sites, _shared_site_vectors, _site_vectors, token_rows, train,
                                   trainable_state)
from test_training import _first_step_grads, _grad_close, _setup


def test_common_prefix_len():
    assert common_prefix_len([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9, 9]], keep=1) == 3
    assert common_prefix_len([[1, 2, 3], [1, 2, 3, 4]], keep=1) == 2  # a row keeps >= keep tokens of its own
    assert common_prefix_len([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]], keep=3) == 3
    assert common_prefix_len([[5, 1], [6, 1]], keep=1) == 0
    with pytest.raises(ValueError):
        common_prefix_len([], keep=1)


def test_token_rows_are_what_encode_pads(tiny_cfg):
    b, *_ = _setup(tiny_cfg)
    texts = ["hi", "How do I bake a loaf of bread at home?", "a b c"]
    rows = token_rows(b, texts)
    enc = encode(b, texts)
    assert [len(r) for r in rows] == enc["attention_mask"].sum(1).tolist()
    for r, ids, m in zip(rows, enc["input_ids"], enc["attention_mask"]):
        assert r == ids[m.bool()].tolist()
    assert len(set(len(r) for r in rows)) == 3  # real token counts, not the encoding dict's two keys


def _texts(harm, ok, shared: bool):
    h, o = harm[:3], ok[:3]
    if shared:  # a longer common prefix than the tiny template's own
        h, o = ["Please answer this: " + t for t in h], ["Please answer this: " + t for t in o]
    return h + o


@pytest.mark.parametrize("shared_words", [False, True])
@pytest.mark.parametrize("mode", ["positions", "pooled", "prompt"])
def test_shared_pass_equals_the_full_batch(tiny_cfg, shared_words, mode):
    """LM loss, KD at the last prompt token, the site vectors of every moment mode, and the gradients of
    a loss made of all three: the same on both paths (float error only)."""
    b, _, harm, ok, layers, teacher = _setup(tiny_cfg)
    texts = _texts(harm, ok, shared_words)
    rows = token_rows(b, texts)
    n_post = b.n_post
    p = common_prefix_len(rows, keep=n_post + 1)
    assert p >= (4 if shared_words else 1)
    t_logits = torch.randn(len(texts), b.model.config.vocab_size)
    std = Standardizer(torch.zeros(len(layers), b.d_model), torch.ones(len(layers), b.d_model))
    if mode == "positions":
        std = Standardizer(torch.zeros(len(layers) * n_post, b.d_model), torch.ones(len(layers) * n_post, b.d_model))
    params = [q for q in b.model.parameters() if q.requires_grad]
    torch.manual_seed(0)
    probe = torch.randn(b.d_model)

    def grads(loss):
        g = torch.autograd.grad(loss, params)
        return [x.clone() for x in g]

    enc = encode(b, texts)
    saved = []
    with b.lm.trace(enc):
        _save_sites(b.lm, mode, layers, n_post, saved)
        saved.append(b.lm.lm_head.output.save())
    lm_a = prompt_lm_loss(saved[-1], enc["input_ids"], enc["attention_mask"])
    kd_a = kd_loss(saved[-1][:, -1, :], t_logits)
    z_a = _site_vectors(saved[:-1], mode, enc["attention_mask"], std)
    g_a = grads(lm_a + kd_a + (z_a @ probe).pow(2).mean())

    sp = shared_prefix_forward(b.model, rows, layers, p, b.tokenizer.pad_token_id)
    lm_b, kd_b = shared_lm_loss(sp), kd_loss(last_logits(sp), t_logits)
    z_b = _shared_site_vectors(sp, mode, layers, n_post, std)
    g_b = grads(lm_b + kd_b + (z_b @ probe).pow(2).mean())

    assert float(lm_b.detach()) == pytest.approx(float(lm_a.detach()), rel=1e-5)
    assert float(kd_b.detach()) == pytest.approx(float(kd_a.detach()), rel=1e-4, abs=1e-7)
    assert torch.allclose(z_a, z_b, atol=1e-4, rtol=1e-4)
    for x, y in zip(g_a, g_b):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-3)
    assert any(float(x.abs().sum()) > 0 for x in g_b)


def test_a_hidden_states_only_pass_stops_after_its_deepest_layer(tiny_cfg):
    """``logits=False`` returns the same hidden states at the layers asked for, and the layers after the
    deepest of them never run on the rows (the moment terms' pass without a graph skips them)."""
    b, *_ = _setup(tiny_cfg)
    rows = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8], [1, 2, 3, 9, 10, 11, 12]]
    dec = b.model.model.layers
    deepest = len(dec) - 2
    calls = []
    h = dec[-1].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        with torch.no_grad():
            full = shared_prefix_forward(b.model, rows, [0, deepest], 3, b.tokenizer.pad_token_id)
            calls_full = list(calls)
            calls.clear()
            part = shared_prefix_forward(b.model, rows, [0, deepest], 3, b.tokenizer.pad_token_id, logits=False)
    finally:
        h.remove()
    assert calls_full == [1, len(rows)]  # the last layer ran on the prefix and on the rows
    assert calls == [1]  # only on the prefix (its keys and values), not on the rows
    assert part.logits is None and full.logits is not None
    for l in (0, deepest):
        assert torch.equal(part.hidden[l][1], full.hidden[l][1]) and torch.equal(part.hidden[l][0], full.hidden[l][0])


def test_tail_hidden_refuses_rows_too_short(tiny_cfg):
    b, *_ = _setup(tiny_cfg)
    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 9]]
    sp = shared_prefix_forward(b.model, rows, [0], 3, b.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="fewer than 3"):
        tail_hidden(sp, 0, 3)
    with pytest.raises(ValueError, match="do not share"):
        shared_prefix_forward(b.model, [[1, 2, 3], [1, 5, 3]], [0], 2, 0)


@pytest.mark.parametrize("name", ["defended", "paper_mean", "mean_matched"])
def test_a_training_step_with_a_shared_prefix_equals_the_full_batch(tiny_cfg, tmp_path, monkeypatch, name):
    """The first step's gradient (before Adam, whose first update is ~lr * sign(grad) and flips on entries near
    0) and every logged term, shared against unshared, in the profile's micro-batches (the moment terms'
    two-phase step included)."""
    tcfg = dict(tiny_cfg["defense"]["train"], warmup_steps=0)
    v = Variant.from_cfg(name, tiny_cfg["defense"]["variants"][name])
    (g1, s1), (g2, s2) = (_first_step_grads(monkeypatch, tiny_cfg, v, dict(tcfg, share_prefix=share), tmp_path, f"s{share}")
                          for share in (False, True))
    assert g1.keys() == g2.keys() and any(g.abs().sum() > 0 for g in g1.values())
    for k in g1:
        assert _grad_close(g1[k], g2[k]), k
    for k in ("lm", "kd", "cov", "mean", "cov_null", "mean_null"):
        if k in s1.history[0]:
            assert s2.history[0][k] == pytest.approx(s1.history[0][k], rel=1e-3, abs=1e-6)
    assert s1.tokens == s2.tokens and s2.computed_tokens < s1.computed_tokens


def test_accumulated_gradient_of_shared_micro_batches_equals_the_whole_batch(tiny_cfg, tmp_path, monkeypatch):
    """The gradient itself, before any optimiser step (Adam's first update is ~lr * sign(grad), blind to
    scale): two prefix-shared micro-batches accumulate the gradient of the whole unshared batch (kl_only:
    LM and KD, the terms without class statistics), so the LM weighting by targets is right too."""
    real_clip = torch.nn.utils.clip_grad_norm_
    seen = []

    def clip(params, max_norm, *a, **k):
        params = list(params)
        seen.append([p.grad.detach().clone() for p in params])
        return real_clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    tcfg = dict(tiny_cfg["defense"]["train"], steps=1, milestones=[1], warmup_steps=0, diag_prompts=0)
    v = Variant.from_cfg("kl_only", tiny_cfg["defense"]["variants"]["kl_only"])
    for share, micro in ((False, 1), (True, 2)):
        b, _, harm, ok, layers, teacher = _setup(tiny_cfg)
        train(b, v, dict(tcfg, share_prefix=share, micro_batches=micro), harm, ok, teacher, layers,
              tmp_path / f"{share}.pt", log=lambda *_: None)
    whole, shared = seen
    assert len(whole) == len(shared) and any(float(g.abs().sum()) > 0 for g in whole)
    for g1, g2 in zip(whole, shared):
        assert torch.allclose(g1, g2, atol=1e-6, rtol=1e-3)
