"""Greedy generation: activation addition through nnsight equals a plain forward-hook reference,
and the disk cache resumes without regenerating finished batches."""
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
