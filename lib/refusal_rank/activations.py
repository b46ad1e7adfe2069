"""Every forward pass that reads or patches activations goes through nnsight, here.

Choices: prompts are chat-formatted by the tokenizer's own template and left-padded, so the
post-instruction positions are the last ``n_post`` columns of every row. Batches are formed after
sorting by length (less padding, restored order on return). The residual stream read at layer ``l``
is the *block input* of decoder layer ``l`` (layer 0: the embedding output), i.e. HF's
``hidden_states[l]``. Run-time interventions are described by small dataclasses so that a test can
compare them with weight edits:

* :class:`Ablation` projects an orthonormal basis ``U`` (d x K) out of every write into the residual
  stream (embedding, each attention output, each MLP output), which keeps the whole stream in the
  orthogonal complement of ``U``: the run-time twin of weight orthogonalisation.
* :class:`ActAdd` adds ``coeff * vector`` to the block input of one layer at every position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from .progress import tqdm

from .ablation import project_out
from .models import ModelBundle


@dataclass
class Ablation:
    basis: torch.Tensor  # (d, K), orthonormal columns


@dataclass
class ActAdd:
    layer: int
    vector: torch.Tensor  # (d,)
    coeff: float = 1.0


Intervention = Ablation | ActAdd | tuple | None  # a tuple combines one Ablation with one ActAdd


def chat_texts(tokenizer: Any, prompts: Sequence[str], **template_kwargs: Any) -> list[str]:
    """Prompt-only chat-formatted strings (generation prompt added, no response). ``template_kwargs``
    fix template variables that would otherwise change (Llama 3's "Today Date")."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                      **template_kwargs)
        for p in prompts
    ]


def encode(bundle: ModelBundle, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded token ids of chat-formatted prompts (the template already holds any BOS)."""
    texts = chat_texts(bundle.tokenizer, prompts, **bundle.template_kwargs)
    enc = bundle.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(bundle.device) for k, v in enc.items()}


def prompt_lengths(bundle: ModelBundle, prompts: Sequence[str]) -> list[int]:
    """Token count of each chat-formatted prompt (the width :func:`encode` gives it alone)."""
    texts = chat_texts(bundle.tokenizer, prompts, **bundle.template_kwargs)
    return [len(x) for x in bundle.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def length_batches(bundle: ModelBundle, prompts: Sequence[str], batch_size: int) -> Iterator[list[int]]:
    """Index batches of prompts sorted by token length (longest first, so memory peaks early)."""
    lengths = prompt_lengths(bundle, prompts)
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


def run_interventions(lm: Any, intervention: Intervention, n_layers: int,
                      read_layers: Sequence[int] = (), n_pos: int = 1, saved: list | None = None) -> None:
    """Inside an nnsight trace: walk the residual writes in execution order, applying the intervention
    and saving the block input of each layer in ``read_layers`` (last ``n_pos`` positions) to ``saved``."""
    layers = lm.model.layers
    read = set(read_layers)
    parts = intervention if isinstance(intervention, tuple) else (intervention,)
    abl = next((p for p in parts if isinstance(p, Ablation)), None)
    add = next((p for p in parts if isinstance(p, ActAdd)), None)
    unknown = [p for p in parts if p is not None and not isinstance(p, (Ablation, ActAdd))]
    if unknown:
        raise TypeError(f"unknown intervention {type(unknown[0]).__name__}")

    def block_input(layer: int, site: Any) -> None:
        if add is not None and add.layer == layer:
            site.output[:] += add.vector.to(site.output.device, site.output.dtype) * add.coeff
        if layer in read:
            saved.append(site.output[:, -n_pos:, :].save())

    emb = lm.model.embed_tokens
    if abl is not None:
        emb.output = project_out(emb.output, abl.basis)
    block_input(0, emb)
    last = max([*read, add.layer if add is not None else 0])
    for layer in range(n_layers):
        if abl is None and layer + 1 > last:
            break
        if abl is not None:
            # replace the output tuple rather than writing into it: an in-place write would corrupt the
            # tensor autograd saved for the gradient with respect to the basis (the optimised attacker)
            attn = layers[layer].self_attn.output
            layers[layer].self_attn.output = (project_out(attn[0], abl.basis), *attn[1:])
            layers[layer].mlp.output = project_out(layers[layer].mlp.output, abl.basis)
        if layer + 1 < n_layers:
            block_input(layer + 1, layers[layer])


@torch.inference_mode()
def collect_residuals(bundle: ModelBundle, prompts: Sequence[str], batch_size: int,
                      layers: Sequence[int] | None = None, n_pos: int | None = None,
                      intervention: Intervention = None, desc: str = "activations") -> torch.Tensor:
    """Block-input residuals at the last ``n_pos`` positions: float32 tensor (n, len(layers), n_pos, d)."""
    layers = sorted(range(bundle.n_layers) if layers is None else layers)
    n_pos = n_pos or bundle.n_post
    lm = bundle.lm
    out = torch.empty(len(prompts), len(layers), n_pos, bundle.d_model, dtype=torch.float32)
    for idx in tqdm(list(length_batches(bundle, prompts, batch_size)), desc=desc, leave=False):
        enc = encode(bundle, [prompts[i] for i in idx])
        saved: list[Any] = []
        with lm.trace(enc) as tracer:
            run_interventions(lm, intervention, bundle.n_layers, layers, n_pos, saved)
            tracer.stop()
        out[idx] = torch.stack([s.float().cpu() for s in saved], dim=1)
    return out


@torch.inference_mode()
def last_token_logprobs(bundle: ModelBundle, prompts: Sequence[str], batch_size: int,
                        intervention: Intervention = None, desc: str = "logits") -> torch.Tensor:
    """Next-token log-probabilities at the last prompt position: float32 (n, vocab)."""
    lm = bundle.lm
    rows: dict[int, torch.Tensor] = {}
    for idx in tqdm(list(length_batches(bundle, prompts, batch_size)), desc=desc, leave=False):
        enc = encode(bundle, [prompts[i] for i in idx])
        saved: list[Any] = []
        with lm.trace(enc, logits_to_keep=1):
            run_interventions(lm, intervention, bundle.n_layers)
            saved.append(lm.lm_head.output[:, -1, :].save())
        lp = torch.log_softmax(saved[0].float(), dim=-1).cpu()
        for j, i in enumerate(idx):
            rows[i] = lp[j]
    return torch.stack([rows[i] for i in range(len(prompts))])


@torch.inference_mode()
def completion_ce(bundle: ModelBundle, prompts: Sequence[str], completions: Sequence[list[int]],
                  batch_size: int, intervention: Intervention = None, desc: str = "CE", chunk: int = 512) -> float:
    """Mean per-token cross-entropy of the model on given completion token ids (teacher forcing)."""
    lm = bundle.lm
    tok = bundle.tokenizer
    total, count = 0.0, 0
    texts = chat_texts(tok, prompts, **bundle.template_kwargs)
    for s in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        ids, comp_mask = [], []
        for t, c in zip(texts[s:s + batch_size], completions[s:s + batch_size]):
            p = tok(t, add_special_tokens=False)["input_ids"]
            ids.append(p + list(c))
            comp_mask.append([0] * len(p) + [1] * len(c))
        width = max(len(x) for x in ids)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        mask = torch.tensor([[0] * (width - len(m)) + m for m in comp_mask])
        enc = {"input_ids": input_ids.to(bundle.device), "attention_mask": attn.to(bundle.device)}
        saved: list[Any] = []
        with lm.trace(enc) as tracer:
            run_interventions(lm, intervention, bundle.n_layers)
            saved.append(lm.model.norm.output.save())
            tracer.stop()
        # unembed only the positions that predict a completion token (not the prompt), in chunks:
        # full-sequence logits in float32 would be batch x length x vocab (GBs for a 150k vocabulary)
        m = mask[:, 1:].bool()
        hidden = saved[0][:, :-1][m.to(saved[0].device)]
        target = input_ids[:, 1:][m].to(hidden.device)
        head = bundle.model.get_output_embeddings()
        for c in range(0, hidden.shape[0], chunk):
            logits = head(hidden[c:c + chunk].contiguous()).float()
            total += torch.nn.functional.cross_entropy(logits, target[c:c + chunk], reduction="sum").item()
        count += int(m.sum())
    return total / max(count, 1) if count else math.nan
