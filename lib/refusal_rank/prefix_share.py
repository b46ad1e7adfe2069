"""One training micro-batch whose rows share a prefix, with the prefix computed once.

Every chat-formatted prompt starts with the same template tokens (Qwen 2.5's system prompt and the user
header: 24 of a training prompt's ~42 tokens on the cpu profile). A causal model computes identical
activations, logits and keys/values for an identical prefix, so a batch of B rows can run the prefix once
(batch 1), broadcast its keys/values to the B rows and run only each row's own suffix (right-padded,
positions continuing after the prefix). Gradients flow through the broadcast into the single prefix pass,
where they sum over the rows exactly as B copies would have summed them. The losses read from this pass
are the same functions of the same numbers as on the full padded batch (tested against it on the tiny
model, values and gradients): only the work differs, about P x (B - 1) fewer positions a micro-batch.

The full batch is left-padded elsewhere in the project; here the suffixes are right-padded, so each row's
last prompt token sits at its own index (``SharedPass.last``). With rotary position embeddings only
relative positions enter attention, so the two layouts compute the same function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


def common_prefix_len(rows: Sequence[Sequence[int]], keep: int) -> int:
    """Length of the token prefix all ``rows`` share, capped so that every row keeps at least ``keep``
    tokens of its own after it (the positions read at the end of a prompt must lie in the suffix)."""
    if not rows:
        raise ValueError("common_prefix_len needs at least one row")
    cap = min(len(r) for r in rows) - max(int(keep), 1)
    first, p = rows[0], 0
    while p < cap and all(r[p] == first[p] for r in rows):
        p += 1
    return max(p, 0)


@dataclass
class SharedPass:
    """What one prefix-shared forward pass produced.

    ``prefix_logits`` (P, V); ``logits`` (B, S, V) over the right-padded suffixes ``ids``/``mask`` (B, S);
    ``lengths`` each row's full token count (prefix included); ``hidden[layer]`` = (prefix (P, d),
    suffix (B, S, d)) decoder-layer outputs at the layers asked for."""

    prefix_ids: torch.Tensor
    prefix_logits: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor | None
    lengths: torch.Tensor
    hidden: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @property
    def n_prefix(self) -> int:
        return int(self.prefix_ids.shape[0])

    @property
    def last(self) -> torch.Tensor:
        """Index in the suffix of each row's last prompt token: (B,)."""
        return self.lengths - self.n_prefix - 1


class _StopForward(Exception):
    """Raised by a hook to end a hidden-states-only pass after the deepest layer it needs."""


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: prefix sharing supports decoder-only HF models")
    return layers


def shared_prefix_forward(model: torch.nn.Module, rows: Sequence[Sequence[int]], layers: Sequence[int],
                          n_prefix: int, pad_id: int, logits: bool = True) -> SharedPass:
    """Run ``rows`` (token ids, unpadded) through ``model`` with their first ``n_prefix`` tokens computed
    once. ``layers``: decoder layers whose outputs are kept (for the moment terms). Gradients flow.
    ``logits=False`` (a pass that needs hidden states only): the rows' pass stops once the deepest of
    ``layers`` has run, so no later layer and no vocabulary projection is computed; ``logits`` is then None
    and ``prefix_logits`` holds the prefix's last position only."""
    from transformers import DynamicCache

    if n_prefix < 1 or any(list(r[:n_prefix]) != list(rows[0][:n_prefix]) for r in rows):
        raise ValueError(f"the rows do not share their first {n_prefix} tokens")
    if any(len(r) <= n_prefix for r in rows):
        raise ValueError("every row needs at least one token after the shared prefix")
    device = next(model.parameters()).device
    dec = _decoder_layers(model)
    want = sorted(set(int(l) for l in layers))
    caught: dict[int, list[torch.Tensor]] = {l: [] for l in want}

    def hook(layer: int):
        def f(_mod, _inp, out):
            caught[layer].append(out[0] if isinstance(out, tuple) else out)
        return f

    def stop(_mod, _inp, _out):
        raise _StopForward

    handles = [dec[l].register_forward_hook(hook(l)) for l in want]
    try:
        prefix = torch.tensor(list(rows[0][:n_prefix]), device=device)
        keep = {} if logits else {"logits_to_keep": 1}
        pre = model(input_ids=prefix[None], use_cache=True, **keep)
        b = len(rows)
        cache = DynamicCache(config=model.config)
        for i, layer in enumerate(pre.past_key_values.layers):
            cache.update(layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1), i)
        s = max(len(r) for r in rows) - n_prefix
        ids = torch.full((b, s), int(pad_id), dtype=torch.long, device=device)
        mask = torch.zeros((b, s), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            suf = torch.tensor(list(r[n_prefix:]), device=device)
            ids[i, :len(suf)], mask[i, :len(suf)] = suf, 1
        attn = torch.cat([torch.ones((b, n_prefix), dtype=torch.long, device=device), mask], dim=1)
        pos = (n_prefix + torch.arange(s, device=device)).expand(b, -1)
        if want and not logits:  # the rows' pass only (the prefix's keys and values are needed at every layer):
            # after the hook above has caught the deepest layer's output, end the pass there
            handles.append(dec[want[-1]].register_forward_hook(stop))
        try:
            out_logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                               use_cache=True, **keep).logits
        except _StopForward:
            out_logits = None
    finally:
        for h in handles:
            h.remove()
    hidden = {l: (caught[l][0][0], caught[l][1]) for l in want}
    lengths = torch.tensor([len(r) for r in rows], device=device)
    return SharedPass(prefix, pre.logits[0], ids, mask, out_logits, lengths, hidden)


def shared_lm_loss(sp: SharedPass) -> torch.Tensor:
    """Mean next-token CE over every row's tokens, as ``defense.prompt_lm_loss`` on the full batch: the
    prefix's own targets once, weighted by the number of rows; the prefix's last logits against each row's
    first suffix token; then the suffixes."""
    b, p = sp.ids.shape[0], sp.n_prefix
    pre = sp.prefix_logits.float()
    lp_last = F.log_softmax(pre[-1], dim=-1)
    total = -lp_last[sp.ids[:, 0]].sum()
    if p > 1:
        total = total + b * F.cross_entropy(pre[:-1], sp.prefix_ids[1:], reduction="sum")
    if sp.ids.shape[1] > 1:
        pred = sp.logits[:, :-1].float()
        nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), sp.ids[:, 1:].reshape(-1), reduction="none")
        total = total + nll[sp.mask[:, 1:].reshape(-1).bool()].sum()  # padded targets dropped, not multiplied by 0
    return total / (sp.lengths - 1).sum()


def last_logits(sp: SharedPass) -> torch.Tensor:
    """(B, V) logits at each row's last prompt token (where KD reads them)."""
    return sp.logits[torch.arange(sp.ids.shape[0], device=sp.ids.device), sp.last]


def tail_hidden(sp: SharedPass, layer: int, n: int) -> torch.Tensor:
    """(B, n, d) outputs of ``layer`` at each row's last ``n`` prompt tokens, in order (the full batch's
    ``out[:, -n:]`` under left padding)."""
    suffix = sp.hidden[layer][1]
    idx = sp.last[:, None] - torch.arange(n - 1, -1, -1, device=suffix.device)[None]
    if int(idx.min()) < 0:
        raise ValueError(f"a row has fewer than {n} tokens after the shared prefix")
    return suffix[torch.arange(suffix.shape[0], device=suffix.device)[:, None], idx]


def prompt_mean_hidden(sp: SharedPass, layer: int) -> torch.Tensor:
    """(B, d) mean of ``layer``'s outputs over each row's every prompt token, prefix included (the full
    batch's ``defense.masked_mean``)."""
    prefix, suffix = sp.hidden[layer]
    keep = sp.mask.bool().unsqueeze(-1)
    total = prefix.sum(0)[None] + torch.where(keep, suffix, torch.zeros((), dtype=suffix.dtype)).sum(1)
    return total / sp.lengths.to(suffix.dtype)[:, None]
