"""Greedy generation: activation addition through nnsight equals a plain forward-hook reference,
and the disk cache resumes without regenerating finished batches."""
import contextlib
import json

import torch

from refusal_rank.activations import ActAdd, encode
from refusal_rank.generation import generate


def _hook_reference(tiny, prompts, add, n, eos=None):
    site = tiny.model.model.layers[add.layer - 1]
    h = site.register_forward_hook(lambda m, i, o: o + add.vector.to(o.dtype) * add.coeff)
    try:
        enc = encode(tiny, prompts)
        out = tiny.model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id,
                                  eos_token_id=eos)
    finally:
        h.remove()
    return out[:, enc["input_ids"].shape[1]:]


def _cut(row, eos):
    return row[:next((i for i, t in enumerate(row) if t in eos), len(row))]


def test_actadd_generation_matches_hook_reference(tiny, prompts):
    torch.manual_seed(0)
    add = ActAdd(2, torch.randn(tiny.d_model) * 3, 1.0)
    got = generate(tiny, prompts, 6, batch_size=4, intervention=add)
    ref = _hook_reference(tiny, prompts, add, 6)
    eos = {tiny.tokenizer.eos_token_id, tiny.tokenizer.pad_token_id}
    for g, r in zip(got, ref.tolist()):
        assert g["ids"] == _cut(r, eos)
    plain = generate(tiny, prompts, 6, batch_size=4)
    assert any(a["ids"] != b["ids"] for a, b in zip(got, plain)), "the addition must change some completion"


def test_actadd_generation_ends_where_the_model_ends(tiny, prompts):
    """When every row reaches EOS early, generation stops there (no forced length) and the completions
    still equal the hook reference: the case that broke on the real model."""
    torch.manual_seed(0)
    add = ActAdd(2, torch.randn(tiny.d_model) * 3, 1.0)
    ref = _hook_reference(tiny, prompts, add, 8)
    early = ref[0, 2].item()  # make a token the steered model emits early act as EOS
    gc = tiny.model.generation_config
    old = gc.eos_token_id
    gc.eos_token_id = [early]
    try:
        got = generate(tiny, prompts, 8, batch_size=4, intervention=add)
        ref_eos = _hook_reference(tiny, prompts, add, 8, eos=early)
    finally:
        gc.eos_token_id = old
    eos = {early, tiny.tokenizer.eos_token_id, tiny.tokenizer.pad_token_id}
    assert len(got[0]["ids"]) <= 2
    for g, r in zip(got, ref_eos.tolist()):
        assert g["ids"] == _cut(r, eos)


def test_generation_cache_resumes(tiny, prompts, tmp_path):
    f = tmp_path / "g.jsonl"
    first = generate(tiny, prompts, 5, batch_size=2, cache_file=f)
    lines = f.read_text().splitlines()
    assert len(lines) == len(prompts)
    # simulate an interruption: keep the first batch and a half-written line
    f.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    again = generate(tiny, prompts, 5, batch_size=2, cache_file=f)
    assert again == first
    rows = [json.loads(l) for l in f.read_text().splitlines()]  # every line is whole again
    assert len({r["i"] for r in rows}) == len(prompts)


# ---- this project's decoding loop against plain generate


MIXED = ["Hi", "Write a long and careful poem about the sea, the wind and the light on the water.",
         "What is 12 times 13?", "Explain photosynthesis to a child in two sentences, please.", "Tell me a joke",
         "List three prime numbers larger than one hundred and say why each one is prime."]


def _ids(rows):
    return [r["ids"] for r in rows]


@contextlib.contextmanager
def _early_eos(tiny):
    """Make the token row 0 emits third act as EOS, so that some rows end mid-way and others do not."""
    early = generate(tiny, MIXED, 12, batch_size=6, engine="hf")[0]["ids"][2]
    gc = tiny.model.generation_config
    old = gc.eos_token_id
    gc.eos_token_id = [early]
    try:
        yield
    finally:
        gc.eos_token_id = old


def test_fast_loop_equals_plain_generate(tiny):
    ref = generate(tiny, MIXED, 12, batch_size=4, engine="hf")
    for cache in ("static", "dynamic"):
        assert _ids(generate(tiny, MIXED, 12, batch_size=4, cache=cache)) == _ids(ref), cache
    assert _ids(generate(tiny, MIXED, 12, batch_size=6)) == _ids(generate(tiny, MIXED, 12, batch_size=6, engine="hf"))


def test_fast_loop_drops_ended_rows_and_still_equals_generate(tiny):
    """Make a token that some rows emit early act as EOS: those rows leave the batch mid-way, the others
    go on with a smaller batch, and every completion is still plain generate's."""
    from refusal_rank.activations import encode
    from refusal_rank.generation import greedy_loop

    with _early_eos(tiny):
        ref = generate(tiny, MIXED, 12, batch_size=6, engine="hf")
        got = generate(tiny, MIXED, 12, batch_size=6)
        stats = {}
        greedy_loop(tiny, encode(tiny, MIXED), 12, stats=stats)
    assert _ids(got) == _ids(ref)
    assert any(len(r) < 12 for r in _ids(got)) and any(len(r) == 12 for r in _ids(got))
    assert stats["steps_rows"] < len(MIXED) * 12  # ended rows were not carried


def test_stop_on_refusal_keeps_every_verdict(tiny, monkeypatch):
    """With a marker the random model does write, verdict-only generation stops those rows at the marker:
    their ids are a prefix of the full completion, every verdict equals the full completion's, and
    rows without a marker are whole."""
    import refusal_rank.generation as G

    full = generate(tiny, MIXED, 16, batch_size=6)
    text = full[1]["text"].lower()
    # a 3-character piece of row 1's text from its middle on (not whitespace), the judge's only marker
    marker = next(text[i:i + 3] for i in range(len(text) // 3, len(text) - 2) if text[i:i + 3].strip() == text[i:i + 3])
    judge = lambda t, markers=None: marker in t.lower().replace("\u2019", "'")
    monkeypatch.setattr(G, "is_refusal", judge)
    short = generate(tiny, MIXED, 16, batch_size=6, stop_on_refusal=True)
    assert [judge(s["text"]) for s in short] == [judge(f["text"]) for f in full]
    assert judge(short[1]["text"]) and len(short[1]["ids"]) < len(full[1]["ids"])
    for s, f in zip(short, full):
        assert f["ids"][:len(s["ids"])] == s["ids"]
        if not judge(f["text"]):
            assert s["ids"] == f["ids"]


def test_refill_equals_plain_generate_with_rows_joining_and_the_cache_shifting(tiny):
    """Refill at a batch smaller than the prompt count: freed slots take the next prompt, rows join at
    different columns, and at batch 1 the write column passes the cache's end so the live columns shift
    left. Every completion is still plain generate's, early-ending rows included."""
    from refusal_rank.generation import greedy_refill

    ref = _ids(generate(tiny, MIXED, 12, batch_size=6, engine="hf"))
    for b in (1, 2, 4, 6, 8):
        assert _ids(generate(tiny, MIXED, 12, batch_size=b, engine="refill")) == ref, b
    stats, many = {}, MIXED * 3
    assert greedy_refill(tiny, many, 1, 12, stats=stats) == ref * 3
    assert stats["shifts"] >= 1  # at batch 1 the rows' spans add up past the cache: the shift was exercised
    with _early_eos(tiny):
        ref = _ids(generate(tiny, MIXED, 12, batch_size=6, engine="hf"))
        stats, seen = {}, []
        got = greedy_refill(tiny, MIXED, 2, 12, stats=stats, on_row=lambda i, ids: seen.append(i))
    assert got == ref and any(len(r) < 12 for r in got)
    assert sorted(seen) == list(range(len(MIXED)))  # each row reported once, as it ended
    assert stats["steps_rows"] <= len(MIXED) * 13


def test_refill_verdicts_and_cache_resume(tiny, monkeypatch, tmp_path):
    """Verdict-only refill keeps every verdict of the full completions; its cache file resumes by row."""
    import refusal_rank.generation as G

    full = generate(tiny, MIXED, 16, batch_size=6)
    text = full[1]["text"].lower()
    marker = next(text[i:i + 3] for i in range(len(text) // 3, len(text) - 2) if text[i:i + 3].strip() == text[i:i + 3])
    judge = lambda t, markers=None: marker in t.lower().replace("\u2019", "'")
    monkeypatch.setattr(G, "is_refusal", judge)
    path = tmp_path / "gen.jsonl"
    short = generate(tiny, MIXED, 16, batch_size=2, stop_on_refusal=True, engine="refill", cache_file=path)
    assert [judge(s["text"]) for s in short] == [judge(f["text"]) for f in full]
    assert judge(short[1]["text"]) and len(short[1]["ids"]) < len(full[1]["ids"])
    lines = path.read_text().splitlines()
    assert len(lines) == len(MIXED)
    path.write_text("\n".join(lines[:3]) + "\n")  # an interrupted run: three rows written
    calls = []
    orig = G.greedy_refill
    monkeypatch.setattr(G, "greedy_refill", lambda b, p, *a, **k: calls.append(len(p)) or orig(b, p, *a, **k))
    again = generate(tiny, MIXED, 16, batch_size=2, stop_on_refusal=True, engine="refill", cache_file=path)
    assert calls == [len(MIXED) - 3] and _ids(again) == _ids(short)


@contextlib.contextmanager
def _bf16(tiny):
    """A bf16 copy of the tiny model as a bundle (packing applies to CPU bf16 only)."""
    import copy
    import dataclasses

    import pytest

    from refusal_rank.models import can_pack_linears

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    if not can_pack_linears(model):
        pytest.skip("this CPU's oneDNN has no bf16 kernels: packed_linears is a no-op here")
    yield dataclasses.replace(tiny, model=model, _nnsight=None)


def test_packed_linears_are_bit_identical_and_restored(tiny):
    """Every linear layer on its packed weight gives the plain layer's logits bit for bit, prefill and
    one-token steps alike; leaving the context restores the plain layers; a weight edited inside the
    context raises instead of computing with the stale packed copy; float32 is left alone."""
    from refusal_rank.models import packed_linears

    with packed_linears(tiny.model) as did:
        assert not did  # float32: a no-op
    with _bf16(tiny) as b:
        enc = encode(b, MIXED)
        with torch.inference_mode():
            ref = b.model(**enc).logits
            ref1 = b.model(input_ids=enc["input_ids"][:, -1:]).logits
            before = {n: m.__dict__.get("forward") for n, m in b.model.named_modules()}
            with packed_linears(b.model, batch_hint=4) as did:
                assert did and "forward" in b.model.lm_head.__dict__
                got = b.model(**enc).logits
                got1 = b.model(input_ids=enc["input_ids"][:, -1:]).logits
            assert torch.equal(got, ref) and torch.equal(got1, ref1)
            assert {n: m.__dict__.get("forward") for n, m in b.model.named_modules()} == before
            b.lm  # nnsight's wrapper puts its own forward on every module: packing must replace and restore it
            wrapped = {n: m.__dict__.get("forward") for n, m in b.model.named_modules()}
            assert wrapped["lm_head"] is not None
            with packed_linears(b.model, batch_hint=4):
                assert b.model.lm_head.__dict__["forward"] is not wrapped["lm_head"]
                assert torch.equal(b.model(**enc).logits, ref)
            assert {n: m.__dict__.get("forward") for n, m in b.model.named_modules()} == wrapped
            with packed_linears(b.model):
                with torch.no_grad():
                    b.model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
                try:
                    b.model(**enc)
                    raise AssertionError("a stale packed weight was used")
                except RuntimeError as e:
                    assert "edited while its packed copy" in str(e)


def test_packed_weights_give_the_same_ids_in_both_engines(tiny):
    """Generation with packed weights returns the same ids as without, in the batch loop and in refill
    (with rows joining), on a bf16 model."""
    with _bf16(tiny) as b:
        for engine in ("fast", "refill"):
            plain = _ids(generate(b, MIXED, 12, batch_size=3, engine=engine))
            packed = _ids(generate(b, MIXED, 12, batch_size=3, engine=engine, pack_weights=True))
            assert packed == plain, engine


def test_refill_joins_at_the_cache_end_and_matches_generate():
    """Random prompt sets of mixed lengths, batches of 2-4 and early EOS: refill equals plain generate on
    every set, and some set makes a prompt join while the write column is at the cache's end (the case
    that stopped the cpu queue: it raised instead of joining)."""
    import random

    from refusal_rank.config import load_config
    from refusal_rank.generation import greedy_refill
    from refusal_rank.models import load_model

    b = load_model(load_config("tiny"), log=lambda *_: None)
    rng = random.Random(0)
    words = "the sea wind light water stone over under bright dark slow quick".split()
    gc = b.model.generation_config
    old = gc.eos_token_id
    hits = 0
    for trial in range(60):
        prompts = [" ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 3, 20, 40])))
                   for _ in range(rng.randint(3, 10))]
        bs, T = rng.randint(2, 4), rng.choice([6, 9, 12])
        plain = _ids(generate(b, prompts, T, batch_size=bs, engine="hf"))
        gc.eos_token_id = [r[2] for r in plain if len(r) > 3][:2] + ([old] if isinstance(old, int) else list(old or []))
        try:
            ref = _ids(generate(b, prompts, T, batch_size=bs, engine="hf"))
            stats = {}
            assert greedy_refill(b, prompts, bs, T, stats=stats) == ref, trial
        finally:
            gc.eos_token_id = old
        hits += stats.get("joins_at_end", 0)
        if hits:
            break
    assert hits, "no prompt set made a prompt join at the cache's end"
