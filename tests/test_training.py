"""The training loop on the tiny model: every variant runs, resuming gives the same weights, NaN stops."""
import copy
import math

import pytest
import torch

from refusal_rank import data as D
from refusal_rank.models import bundle_from_pretrained, checkpoint_dir
from refusal_rank.training import (TrainingDiverged, Variant, attach_lora, batch_indices, load_snapshot, lr_at,
                                   micro_batches, milestone_steps, snapshot_path, teacher_cache, train, trainable_state)


def _setup(cfg):
    b = bundle_from_pretrained(checkpoint_dir(cfg, log=lambda *_: None), cfg)
    harm = [p.text for p in D.split_prompts("harmful_defense", 12, 0)]
    ok = [p.text for p in D.split_prompts("harmless_defense", 12, 0)]
    layers = list(range(b.n_layers))
    teacher = teacher_cache(b, harm + ok, layers, 8, per_position=True)
    peft_model = attach_lora(b.model, cfg["defense"]["lora"], seed=0)
    b._nnsight = None
    return b, peft_model, harm, ok, layers, teacher


def test_batches_are_balanced_and_a_function_of_step():
    h, o = batch_indices(3, 0, 10, 7, 4)
    assert len(h) == len(o) == 4 and all(0 <= i < 10 for i in h) and all(0 <= i < 7 for i in o)
    assert batch_indices(3, 0, 10, 7, 4) == (h, o)
    # one epoch covers every example once
    seen = [i for s in range(5) for i in batch_indices(s, 0, 10, 7, 2)[0]]
    assert sorted(seen) == list(range(10))


@pytest.mark.parametrize("name", ["defended", "kl_only", "ablation_aware", "mean_matched", "paper_mean"])
def test_every_variant_trains(tiny_cfg, tmp_path, name):
    b, _, harm, ok, layers, teacher = _setup(tiny_cfg)
    before = trainable_state(b.model)
    v = Variant.from_cfg(name, tiny_cfg["defense"]["variants"][name])
    state = train(b, v, tiny_cfg["defense"]["train"], harm, ok, teacher, layers, tmp_path / "ck.pt", log=lambda *_: None)
    assert state.step == tiny_cfg["defense"]["train"]["steps"]
    terms = set(state.history[-1])
    assert {"lm", "kd"} <= terms and (("cov" in terms) == (v.lambda_cov > 0)) and (("abl" in terms) == (v.lambda_abl > 0))
    assert ("mean" in terms) == (v.lambda_mean > 0)
    after = trainable_state(b.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if v.lambda_cov or v.lambda_mean:  # each term logged beside its noise floor (two halves of one class)
        key = "cov" if v.lambda_cov else "mean"
        assert all(math.isfinite(h[key]) for h in state.history) and f"{key}_null" in state.history[-1]
        assert "log_spread" in state.history[-1] and (("spread" in state.history[-1]) == (v.lambda_spread > 0))
    # the moment diagnostics before training and at every milestone
    diag = [e for e in state.evals if "moments" in e]
    assert diag[0]["step"] == 0 and {e["step"] for e in diag} >= set(tiny_cfg["defense"]["train"]["milestones"])
    assert {"top_eig", "total_var", "mean", "mean_null", "cov", "cov_null", "spread", "top_eig_cov", "gap_sq"} <= set(diag[0]["moments"])
    assert diag[0]["moments"]["spread"] == pytest.approx(1.0, abs=0.02)  # the teacher against itself
    # a snapshot per milestone, verified on load
    for m in tiny_cfg["defense"]["train"]["milestones"]:
        assert snapshot_path(tmp_path / "ck.pt", m).is_file()
    assert [h["lr"] for h in state.history][0] <= tiny_cfg["defense"]["train"]["lr"]


@pytest.mark.parametrize("name", ["ablation_aware", "defended"])
def test_resume_gives_the_same_weights(tiny_cfg, tmp_path, name):
    v = Variant.from_cfg(name, tiny_cfg["defense"]["variants"][name])
    tcfg = tiny_cfg["defense"]["train"]
    b1, _, harm, ok, layers, teacher = _setup(tiny_cfg)
    train(b1, v, tcfg, harm, ok, teacher, layers, tmp_path / "a.pt", log=lambda *_: None)
    full = trainable_state(b1.model)
    b2, _, *_ = _setup(tiny_cfg)
    s = train(b2, v, tcfg, harm, ok, teacher, layers, tmp_path / "b.pt", stop_after=2, log=lambda *_: None)
    assert s.step == 2
    b3, _, *_ = _setup(tiny_cfg)  # a fresh process: new model, resumes from the checkpoint
    s = train(b3, v, tcfg, harm, ok, teacher, layers, tmp_path / "b.pt", log=lambda *_: None)
    assert s.step == tcfg["steps"]
    resumed = trainable_state(b3.model)
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_nan_loss_stops_with_clear_message(tiny_cfg, tmp_path):
    b, _, harm, ok, layers, teacher = _setup(tiny_cfg)
    bad = copy.deepcopy(teacher)
    bad.logits[:] = float("nan")
    v = Variant.from_cfg("kl_only", tiny_cfg["defense"]["variants"]["kl_only"])
    with pytest.raises(TrainingDiverged, match="training stopped.*last checkpoint"):
        train(b, v, tiny_cfg["defense"]["train"], harm, ok, bad, layers, tmp_path / "c.pt", log=lambda *_: None)


def test_per_position_teacher_statistics_match_a_direct_computation(tiny_cfg):
    from refusal_rank.activations import encode

    b = bundle_from_pretrained(checkpoint_dir(tiny_cfg, log=lambda *_: None), tiny_cfg)
    texts = [p.text for p in D.split_prompts("harmful_train", 6, 0)] + [p.text for p in D.split_prompts("harmless_train", 6, 0)]
    layers = [1, 2]
    t = teacher_cache(b, texts, layers, 4, per_position=True)
    with torch.no_grad():
        hs = b.model(**encode(b, texts), output_hidden_states=True).hidden_states
    # decoder layer l's output is HF's hidden_states[l + 1]; the last n_post positions are post-instruction
    direct = torch.stack([hs[l + 1][:, -b.n_post:, :] for l in layers], 1).double().flatten(1, 2)  # (N, L*P, d)
    assert torch.allclose(t.position_standardizer.mean.double(), direct.mean(0), atol=1e-4)
    assert torch.allclose(t.position_standardizer.std.double(), direct.std(0).clamp_min(1e-4), atol=1e-4)
    assert torch.allclose(t.standardizer.mean.double(), direct.reshape(len(texts), len(layers), b.n_post, -1).mean(2).mean(0), atol=1e-4)


def test_per_position_variant_needs_per_position_teacher(tiny_cfg, tmp_path):
    b, _, harm, ok, layers, _ = _setup(tiny_cfg)
    plain = teacher_cache(b, harm + ok, layers, 8)
    v = Variant.from_cfg("mean_matched", tiny_cfg["defense"]["variants"]["mean_matched"])
    with pytest.raises(ValueError, match="per_position=True"):
        train(b, v, tiny_cfg["defense"]["train"], harm, ok, plain, layers, tmp_path / "c.pt", log=lambda *_: None)


def test_micro_batches_cover_the_batch_balanced_and_sorted_by_length():
    h, o = [5, 1, 7, 3], [2, 0, 6, 4]
    h_len = {i: 10 * i for i in range(8)}
    o_len = {i: 100 - i for i in range(8)}
    mbs = micro_batches(h, o, h_len, o_len, 2)
    assert [len(a) for a, _ in mbs] == [2, 2] and [len(b) for _, b in mbs] == [2, 2]
    assert sorted(i for a, _ in mbs for i in a) == sorted(h) and sorted(i for _, b in mbs for i in b) == sorted(o)
    assert mbs[0][0] == [1, 3] and mbs[0][1] == [6, 4]  # the shortest of each class together
    with pytest.raises(ValueError, match="must divide"):
        micro_batches(h, o, h_len, o_len, 3)


def test_schedule_and_milestones():
    t = {"lr": 1e-3, "warmup_steps": 4, "steps": 8, "milestones": [2, 4, 8]}
    assert [lr_at(s, t) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert milestone_steps(t) == [2, 4, 8] and milestone_steps({"steps": 5}) == [5]
    with pytest.raises(ValueError, match="end at steps"):
        milestone_steps({"steps": 8, "milestones": [2, 4]})


def _grad_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float error, judged on the whole tensor: padding and summation order differ between the
    paths compared, and the moment terms' large weights scale that error with the gradient."""
    return float((a - b).norm()) <= 1e-4 * float(b.norm()) + 1e-8


def _first_step_grads(monkeypatch, cfg, variant, tcfg, tmp_path, name):
    """The gradient of a variant's first step as train() computes it (read where it is clipped), and the state."""
    grads: dict[str, torch.Tensor] = {}
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        if not grads:
            grads.update({str(i): p.grad.detach().clone() for i, p in enumerate(params)})
        return real(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    b, *_ , harm, ok, layers, teacher = _setup(cfg)
    state = train(b, variant, dict(tcfg, steps=1, milestones=[1], diag_prompts=0), harm, ok, teacher, layers,
                  tmp_path / f"{name}.pt", log=lambda *_: None)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)
    return grads, state


@pytest.mark.parametrize("name", ["kl_only", "defended", "mean_matched"])
def test_micro_batched_step_equals_the_whole_batch(tiny_cfg, tmp_path, monkeypatch, name):
    """Gradient accumulation over length-sorted micro-batches gives the gradient of the whole batch: the LM and
    KD terms are means over rows, and the moment terms are batch-level, reaching each micro-batch through
    its rows' site vectors (the two-phase step)."""
    tcfg = dict(tiny_cfg["defense"]["train"], micro_batches=1)
    v = Variant.from_cfg(name, tiny_cfg["defense"]["variants"][name])
    g1, _ = _first_step_grads(monkeypatch, tiny_cfg, v, tcfg, tmp_path, "one")
    g2, _ = _first_step_grads(monkeypatch, tiny_cfg, v, dict(tcfg, micro_batches=4), tmp_path, "four")
    assert g1.keys() == g2.keys() and any(g.abs().sum() > 0 for g in g1.values())
    # padding differs between the two splits, so equal up to float error, not bitwise
    for k in g1:
        assert _grad_close(g1[k], g2[k]), k


@pytest.mark.parametrize("name", ["defended", "mean_matched"])
def test_two_phase_moment_gradient_equals_one_pass_over_the_batch(tiny_cfg, tmp_path, monkeypatch, name):
    """The moment terms alone (no LM, no KD): train()'s gradient from two micro-batches equals autograd through
    one forward pass of the whole batch with the same pairings."""
    from refusal_rank.training import (_micro_batch_pass, batch_moment_terms, moment_sites, teacher_site_vectors,
                                       token_rows)

    cfgv = dict(tiny_cfg["defense"]["variants"][name], lambda_kd=0.0, lambda_lm=0.0)
    v = Variant.from_cfg(name, cfgv)
    tcfg = dict(tiny_cfg["defense"]["train"], micro_batches=2)
    got, _ = _first_step_grads(monkeypatch, tiny_cfg, v, tcfg, tmp_path, "two")
    b, _, harm, ok, layers, teacher = _setup(tiny_cfg)
    params = [p for p in b.model.parameters() if p.requires_grad]
    rows = token_rows(b, harm + ok)
    hi, oi = batch_indices(0, tcfg["seed"], len(harm), len(ok), tcfg["batch_per_class"])
    (mh, mo), = micro_batches(hi, oi, [len(r) for r in rows[:len(harm)]], [len(r) for r in rows[len(harm):]], 1)
    m_layers, std = moment_sites(b, v, teacher, layers)
    _, _, z, _, _ = _micro_batch_pass(b, [rows[i] for i in mh] + [rows[len(harm) + i] for i in mo],
                                      [harm[i] for i in mh] + [ok[i] for i in mo], True, v.moment_sites, m_layers, std, True)
    g = torch.Generator().manual_seed(int(tcfg["seed"]) * 1_000_003 + 0)
    ref = (teacher_site_vectors(b, v, teacher, layers, mh, std),
           teacher_site_vectors(b, v, teacher, layers, [len(harm) + i for i in mo], std))
    terms = batch_moment_terms(z[:len(mh)], z[len(mh):], v, g, int(tcfg["moment_pairings"]), ref)
    (v.lambda_cov * terms.get("cov", 0.0) + v.lambda_mean * terms.get("mean", 0.0)
     + v.lambda_spread * terms["spread"]).backward()  # written out, not moment_objective
    # parameters above the matched layers get no gradient from the moment terms (train() gives them zeros)
    want = {str(i): p.grad if p.grad is not None else torch.zeros_like(p) for i, p in enumerate(params)}
    assert any(w.abs().sum() > 0 for w in want.values())
    for k in want:
        assert _grad_close(got[k], want[k]), k


def test_batch_moment_terms_shuffle_the_sorted_batch_and_log_the_floor():
    from refusal_rank.training import batch_moment_terms

    g = torch.Generator().manual_seed(0)
    h, o = torch.randn(16, 2, 8, generator=g), torch.randn(16, 2, 8, generator=g)
    v = Variant("x", lambda_cov=1.0, lambda_mean=1.0)
    t1 = batch_moment_terms(h, o, v, torch.Generator().manual_seed(1), 4)
    t2 = batch_moment_terms(h, o, v, torch.Generator().manual_seed(1), 4)
    assert set(t1) == {"cov", "mean", "cov_null", "mean_null", "log_spread"} and all(torch.equal(t1[k], t2[k]) for k in t1)
    one = batch_moment_terms(h, o, v, torch.Generator().manual_seed(1), 1)
    assert not torch.equal(one["cov"], t1["cov"])  # more pairings average more row pairs
    with pytest.raises(ValueError, match="moment_pairings"):
        batch_moment_terms(h, o, v, g, 0)


def test_corrupted_snapshot_is_refused(tiny_cfg, tmp_path):
    tcfg = dict(tiny_cfg["defense"]["train"], steps=1, milestones=[1])
    v = Variant.from_cfg("kl_only", tiny_cfg["defense"]["variants"]["kl_only"])
    b, peft_model, harm, ok, layers, teacher = _setup(tiny_cfg)
    train(b, v, tcfg, harm, ok, teacher, layers, tmp_path / "ck.pt", log=lambda *_: None)
    snap = snapshot_path(tmp_path / "ck.pt", 1)
    load_snapshot(snap, b.model)
    data = bytearray(snap.read_bytes())
    data[-10] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_snapshot(snap, b.model)


def test_teacher_site_vectors_are_the_teachers_standardised_sites(tiny_cfg):
    """The spread anchor's reference: the teacher's own site vectors of the batch rows, at the variant's sites,
    standardised as the student's are (so the student at step 0, the teacher, reads a spread ratio of 1)."""
    from refusal_rank.training import _micro_batch_pass, moment_sites, teacher_site_vectors, token_rows

    b, _, harm, ok, layers, teacher = _setup(tiny_cfg)
    for name in ("defended", "mean_matched", "paper_mean"):
        v = Variant.from_cfg(name, tiny_cfg["defense"]["variants"][name])
        m_layers, std = moment_sites(b, v, teacher, layers)
        rows = token_rows(b, harm + ok)
        idx = [0, 3, len(harm) + 1, len(harm) + 5]
        with torch.no_grad():
            z = _micro_batch_pass(b, [rows[i] for i in idx], [(harm + ok)[i] for i in idx], True, v.moment_sites,
                                  m_layers, std, True, logits=False)[2]
        t = teacher_site_vectors(b, v, teacher, layers, idx, std)
        assert t.shape == z.shape
        assert torch.allclose(t, z, atol=2e-2 * float(z.abs().max())), name  # float16 storage
