"""Batched greedy generation, with an optional nnsight intervention, and a resumable disk cache.

Weight-edited models (ablation) generate through plain ``model.generate``: the edit is in the weights.
Activation addition needs a run-time patch at every step and goes through ``nnsight``'s generate. Each
finished batch is appended to a JSONL file keyed by everything that determines the output, so an
interrupted run resumes at the next batch and a repeated run costs nothing.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from .progress import tqdm

from .activations import ActAdd, Intervention, encode, length_batches
from .models import ModelBundle


def greedy_kwargs(bundle: ModelBundle, max_new_tokens: int) -> dict[str, Any]:
    """Pure greedy decoding whatever the checkpoint's generation_config says (hub configs may set
    sampling or a repetition penalty): the next token is the argmax of the raw logits."""
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "repetition_penalty": 1.0, "temperature": None,
            "top_p": None, "top_k": None, "pad_token_id": bundle.tokenizer.pad_token_id}


def _eos_ids(bundle: ModelBundle) -> set[int]:
    eos = bundle.model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, list) else {eos}
    return {i for i in ids | {bundle.tokenizer.eos_token_id, bundle.tokenizer.pad_token_id} if i is not None}


def _generate_batch(bundle: ModelBundle, prompts: Sequence[str], max_new_tokens: int,
                    intervention: Intervention) -> list[list[int]]:
    enc = encode(bundle, prompts)
    width = enc["input_ids"].shape[1]
    if intervention is None:
        rows = bundle.model.generate(**enc, **greedy_kwargs(bundle, max_new_tokens))[:, width:].tolist()
    elif isinstance(intervention, ActAdd):
        # The addition is patched in at every step through nnsight. Each step's token is the argmax of that
        # step's logits (pure greedy), saved inside the loop: a loop cut short because every row reached
        # EOS keeps what it saved, and generation ends where the model ends it, as plain generate does.
        lm, layer = bundle.lm, intervention.layer
        steps: list[Any] = []
        with lm.generate(enc, **greedy_kwargs(bundle, max_new_tokens)) as tracer:
            for _ in tracer.iter[:]:
                site = lm.model.embed_tokens if layer == 0 else lm.model.layers[layer - 1]
                site.output[:] += intervention.vector.to(site.output.dtype) * intervention.coeff
                steps.append(lm.lm_head.output[:, -1, :].argmax(-1).save())
        rows = torch.stack([t.cpu() for t in steps], dim=1).tolist()
    else:
        raise TypeError("generate ablations through weight edits (refusal_rank.ablation.orthogonalized)")
    eos = _eos_ids(bundle)
    return [row[:next((i for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.inference_mode()
def generate(bundle: ModelBundle, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
             intervention: Intervention = None, cache_file: Path | None = None,
             desc: str = "generate") -> list[dict[str, Any]]:
    """Greedy completions ``[{"text", "ids"}]`` in prompt order; resumes from ``cache_file`` if given."""
    done: dict[int, dict[str, Any]] = {}
    if cache_file is not None and cache_file.is_file():
        lines = cache_file.read_text().splitlines()
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
            done[row["i"]] = row
        if len(done) != len(lines) or not cache_file.read_text().endswith("\n"):
            # rewrite without the cut line, so later appends start on a fresh line
            cache_file.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    todo = [b for b in length_batches(bundle, prompts, batch_size) if not all(i in done for i in b)]
    for idx in tqdm(todo, desc=desc, leave=False):
        ids = _generate_batch(bundle, [prompts[i] for i in idx], max_new_tokens, intervention)
        new = [{"i": i, "ids": r, "text": bundle.tokenizer.decode(r, skip_special_tokens=True)} for i, r in zip(idx, ids)]
        for row in new:
            done[row["i"]] = row
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            with cache_file.open("a") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in new))
    return [{"text": done[i]["text"], "ids": done[i]["ids"]} for i in range(len(prompts))]
