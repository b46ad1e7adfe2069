"""Batched greedy generation, with an optional nnsight intervention, and a resumable disk cache.

Weight-edited models (ablation) generate through :func:`greedy_loop`, this module's own decoding loop;
plain ``model.generate`` stays available (``engine="hf"``) as the reference it is benchmarked and tested
against (the same token ids on the tiny model). The loop is faster at the same batch because

* the key/value cache is allocated once for the whole generation (``cache="static"``: no re-allocation
  and copy of every layer's cache at every step, as a growing cache does);
* a row leaves the batch as soon as it has ended (EOS) instead of being carried, padded, to the end;
* with ``stop_on_refusal`` a row also leaves once its text contains a refusal marker: the marker judge's
  verdict can no longer change (it is "contains any marker"), so the verdict is the same as that of the
  full completion while the rest of that completion is not computed. Such completions are verdict-only
  (their text ends at the marker) and are cached apart from full ones;
* with ``engine="refill"`` (:func:`greedy_refill`) a slot freed by an ended row takes the next prompt at
  once, instead of the batch running on for its longest row: on the CPU a decode step with a few rows
  costs more than half as much as a full one, so a full batch is where the steps are worth spending;
* with ``pack_weights`` a bf16 model on the CPU runs its linear layers on weights packed once for oneDNN
  (:func:`refusal_rank.models.packed_linears`) instead of re-packed at every call: a cheaper step, the
  same function up to bf16 rounding.

Activation addition needs a run-time patch at every step and goes through ``nnsight``'s generate. Each
finished batch is appended to a JSONL file keyed by everything that determines the output, so an
interrupted run resumes at the next batch and a repeated run costs nothing.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from .progress import tqdm

from .activations import ActAdd, Intervention, encode, length_batches, prompt_lengths
from .metrics import REFUSAL_MARKERS, is_refusal
from .models import ModelBundle, packed_linears

ENGINES = ("fast", "refill", "hf")
CACHES = ("static", "dynamic")
# tokens decoded at the end of a row to look for a marker that has just been completed: every token is at
# least one character, so a window longer than the longest marker holds any marker ending at the last token
MARKER_WINDOW = max(len(m) for m in REFUSAL_MARKERS) + 8


def greedy_kwargs(bundle: ModelBundle, max_new_tokens: int) -> dict[str, Any]:
    """Pure greedy decoding whatever the checkpoint's generation_config says (hub configs may set
    sampling or a repetition penalty): the next token is the argmax of the raw logits."""
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "repetition_penalty": 1.0, "temperature": None,
            "top_p": None, "top_k": None, "pad_token_id": bundle.tokenizer.pad_token_id}


def _eos_ids(bundle: ModelBundle) -> set[int]:
    eos = bundle.model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, list) else {eos}
    return {i for i in ids | {bundle.tokenizer.eos_token_id, bundle.tokenizer.pad_token_id} if i is not None}


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    return row[:next((i for i, t in enumerate(row) if t in eos), len(row))]


def _make_cache(model: Any, kind: str, max_len: int) -> Any:
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    raise ValueError(f"unknown cache {kind!r}: choose from {', '.join(CACHES)}")


def _keep_rows(cache: Any, keep: torch.Tensor) -> None:
    """Drop the cache's batch rows not in ``keep`` (indices into the current batch)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys.index_select(0, keep)
            layer.values = layer.values.index_select(0, keep)


def _prefill(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Run left-padded prompts into ``cache``: (logits at the last position, each row's last position).
    Positions are ``model.generate``'s (the number of real tokens before), so a row's values do not depend
    on its padding."""
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    return logits, pos[:, -1]


def refusal_decided(tokenizer: Any, ids: Sequence[int]) -> bool:
    """True once the text of ``ids`` contains a refusal marker (checked on the last tokens, then confirmed
    on the whole text, so that the verdict is exactly the marker judge's on the full decode)."""
    tail = tokenizer.decode(ids[-MARKER_WINDOW:], skip_special_tokens=True)
    return is_refusal(tail) and is_refusal(tokenizer.decode(ids, skip_special_tokens=True))


@torch.inference_mode()
def greedy_loop(bundle: ModelBundle, enc: dict[str, torch.Tensor], max_new_tokens: int, cache: str = "static",
                stop_on_refusal: bool = False, stats: dict[str, int] | None = None,
                pack_weights: bool = False) -> list[list[int]]:
    """Greedy completions (token ids, cut before EOS) of a left-padded batch, decoded step by step with
    rows leaving the batch once they end (or, with ``stop_on_refusal``, once their verdict is a refusal).
    Positions and masks follow ``model.generate``'s (position = number of real tokens before), so the
    token ids are those of plain generate; ``stats["steps_rows"]`` counts the row-steps computed.
    ``pack_weights``: see :func:`refusal_rank.models.packed_linears`."""
    with packed_linears(bundle.model, pack_weights, enc["input_ids"].shape[0]):
        return _greedy_loop(bundle, enc, max_new_tokens, cache, stop_on_refusal, stats)


def _greedy_loop(bundle: ModelBundle, enc: dict[str, torch.Tensor], max_new_tokens: int, cache: str,
                 stop_on_refusal: bool, stats: dict[str, int] | None) -> list[list[int]]:
    model, tok = bundle.model, bundle.tokenizer
    eos = torch.tensor(sorted(_eos_ids(bundle)), device=bundle.device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n, width = ids.shape
    out: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens <= 0:
        return out
    kv = _make_cache(model, cache, width + max_new_tokens)
    logits, last = _prefill(model, ids, mask, kv)
    rows = torch.arange(n, device=ids.device)  # which original row each batch row is
    computed = n
    for t in range(max_new_tokens):
        nxt = logits.argmax(-1)
        done = torch.isin(nxt, eos)
        for j, (r, tkn, d) in enumerate(zip(rows.tolist(), nxt.tolist(), done.tolist())):
            if d:
                continue
            out[r].append(tkn)
            if stop_on_refusal and refusal_decided(tok, out[r]):
                done[j] = True
        if t == max_new_tokens - 1:
            break
        if done.any():
            keep = (~done).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            rows, nxt, mask, last = rows[keep], nxt[keep], mask[keep], last[keep]
            _keep_rows(kv, keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last = last + 1
        computed += rows.numel()
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], past_key_values=kv,
                       use_cache=True).logits[:, -1]
    if stats is not None:
        stats["steps_rows"] = stats.get("steps_rows", 0) + computed
    return out


@torch.inference_mode()
def greedy_refill(bundle: ModelBundle, prompts: Sequence[str], batch_size: int, max_new_tokens: int,
                  stop_on_refusal: bool = False, on_row: Callable[[int, list[int]], None] | None = None,
                  stats: dict[str, int] | None = None, pack_weights: bool = False) -> list[list[int]]:
    """Greedy completions (token ids, cut before EOS) of every prompt, at most ``batch_size`` rows in flight:
    a row that ends (EOS, ``max_new_tokens``, or with ``stop_on_refusal`` its first refusal marker) frees its
    slot, and the next prompt is prefilled into it at once.

    Why: on the CPU a decode step with a few rows costs more than half as much as one with 32 (much of it
    is reading the weights), so :func:`greedy_loop`'s batches, which run until their longest row ends,
    spend many steps on a few long completions. Keeping every slot busy spends those steps on rows.

    How: one static key/value cache of ``batch_size`` slots. The shared write column ``c`` advances by
    one each decode step. A joining prompt is prefilled alone (left-padded with any others joining at the
    same step) and its keys and values are copied into its slot's columns ``[c - w, c)``; its mask is zero
    on the slot's older columns. Positions are each row's own (as ``model.generate``'s), and keys carry
    their rotary positions, so a row computes the same function wherever its columns lie. Prompts go
    longest first, so a joining prompt fits in ``[c - w, c)``: before any shift ``c`` is at least the first
    batch's width, and a shift leaves ``c`` at the oldest live row's age in columns, at least that row's
    width, which no prompt still queued exceeds. A prompt may join when ``c`` is at the cache's end (its
    columns lie before ``c``); the shift before the next step frees column ``c``. When ``c`` reaches the
    cache's end, every slot's live columns shift left together by the oldest live row's start. The cache
    holds the first batch's span and a margin, so a shift frees at least the margin (a longer cache would
    cost every step, as attention reads all of it). ``on_row(i, ids)`` is called as each prompt's row ends
    (a generation cache appends it there); rows come back in prompt order. ``stats``: ``steps_rows``
    (row-steps computed, prefills included), ``shifts`` (column shifts) and ``joins_at_end`` (prompts
    that joined with the write column at the cache's end).
    ``pack_weights``: see :func:`refusal_rank.models.packed_linears`."""
    with packed_linears(bundle.model, pack_weights, batch_size):
        return _greedy_refill(bundle, prompts, batch_size, max_new_tokens, stop_on_refusal, on_row, stats)


def _greedy_refill(bundle: ModelBundle, prompts: Sequence[str], batch_size: int, max_new_tokens: int,
                   stop_on_refusal: bool, on_row: Callable[[int, list[int]], None] | None,
                   stats: dict[str, int] | None) -> list[list[int]]:
    from transformers import DynamicCache

    model, tok = bundle.model, bundle.tokenizer
    eos_set = _eos_ids(bundle)
    out: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens <= 0:
        for i in range(len(prompts)):
            if on_row:
                on_row(i, [])
        return out
    lengths = prompt_lengths(bundle, prompts)
    queue = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first (ties in prompt order) ...
    queue.reverse()  # ... popped from the end
    b = min(batch_size, len(prompts))
    device = bundle.device
    computed = shifts = at_end = 0

    def prefill(idx: list[int]):
        """Joining prompts, prefilled into a cache of their own (copied into their slots after)."""
        enc = encode(bundle, [prompts[i] for i in idx])
        pc = DynamicCache(config=model.config)
        logits, plast = _prefill(model, enc["input_ids"], enc["attention_mask"], pc)
        return pc, enc["attention_mask"], plast, logits.argmax(-1)

    # the first batch: a plain left-padded prefill into the static cache
    first = [queue.pop() for _ in range(b)]
    enc = encode(bundle, [prompts[i] for i in first])
    width = enc["input_ids"].shape[1]
    span = width + max_new_tokens  # the most columns one row can hold
    # attention reads every column of a static cache at every step (about 0.6 GB a step for 32 rows x 650
    # columns x 28 layers in bf16), so the cache is kept short: one row's span and a margin. A shift then
    # frees at least the margin, since no live row is older than one span
    total = span + max(8, max_new_tokens // 8)
    kv = _make_cache(model, "static", total)
    mask = torch.zeros((b, total), dtype=torch.long, device=device)
    mask[:, :width] = enc["attention_mask"]
    logits, last = _prefill(model, enc["input_ids"], enc["attention_mask"], kv)
    computed += b
    c = width
    slot_row = list(first)  # prompt index in each slot (-1: empty)
    start = [0] * b  # first live column of each slot
    last = last.clone()  # written in place as rows join
    nxt = logits.argmax(-1)

    def finish(j: int) -> None:
        r = slot_row[j]
        if on_row:
            on_row(r, out[r])
        slot_row[j] = -1

    def accept(j: int, token: int) -> bool:
        """Record slot j's new token; True if its row has ended."""
        r = slot_row[j]
        if token in eos_set:
            return True
        out[r].append(token)
        return len(out[r]) >= max_new_tokens or (stop_on_refusal and refusal_decided(tok, out[r]))

    while True:
        ended = [j for j in range(len(slot_row)) if slot_row[j] >= 0 and accept(j, int(nxt[j]))]
        for j in ended:
            finish(j)
        # refill the freed slots (a joined row may end at its first token: then fill again)
        free = [j for j in range(len(slot_row)) if slot_row[j] < 0]
        while free and queue:
            idx = [queue.pop() for _ in range(min(len(free), len(queue)))]
            pc, pmask, plast, ptok = prefill(idx)
            computed += len(idx)
            w = pmask.shape[1]
            if w > c:  # cannot happen: see the docstring (a shift leaves c - min(start) >= every queued width)
                raise RuntimeError(f"greedy_refill: a joining prompt of {w} tokens does not fit before the write "
                                   f"column {c}")
            at_end += c == total  # columns [c - w, c) are in the cache; the shift below frees column c
            slots = free[:len(idx)]
            sl = torch.tensor(slots, device=device)
            for layer, src in zip(kv.layers, pc.layers):
                layer.keys[sl, :, c - w:c] = src.keys
                layer.values[sl, :, c - w:c] = src.values
            mask[sl] = 0
            mask[sl, c - w:c] = pmask
            last[sl] = plast
            for j, i, t in zip(slots, idx, ptok.tolist()):
                slot_row[j], start[j] = i, c - w
                nxt[j] = t
                if accept(j, t):
                    finish(j)
            free = [j for j in range(len(slot_row)) if slot_row[j] < 0]
        live = [j for j in range(len(slot_row)) if slot_row[j] >= 0]
        if not live:
            break
        if len(live) < len(slot_row):  # no prompt left to fill a slot: drop the empty ones
            keep = torch.tensor(live, device=device)
            _keep_rows(kv, keep)
            mask, last, nxt = mask[keep], last[keep], nxt[keep]
            slot_row = [slot_row[j] for j in live]
            start = [start[j] for j in live]
        if c + 1 > total:  # shift every slot's live columns left by the oldest live start
            m = min(start)
            for layer in kv.layers:
                layer.keys[:, :, :c - m] = layer.keys[:, :, m:c].clone()
                layer.values[:, :, :c - m] = layer.values[:, :, m:c].clone()
                layer.cumulative_length.fill_(c - m)
            mask[:, :c - m] = mask[:, m:c].clone()
            mask[:, c - m:] = 0
            start = [s_ - m for s_ in start]
            c -= m
            shifts += 1
        mask[:, c] = 1
        last = last + 1
        computed += len(slot_row)
        logits = model(input_ids=nxt[:, None], attention_mask=mask[:, :c + 1], position_ids=last[:, None],
                       past_key_values=kv, use_cache=True).logits[:, -1]
        c += 1
        nxt = logits.argmax(-1)
    if stats is not None:
        stats["steps_rows"] = stats.get("steps_rows", 0) + computed
        stats["shifts"] = stats.get("shifts", 0) + shifts
        stats["joins_at_end"] = stats.get("joins_at_end", 0) + at_end
    return out


def _generate_batch(bundle: ModelBundle, prompts: Sequence[str], max_new_tokens: int,
                    intervention: Intervention, engine: str = "fast", cache: str = "static",
                    stop_on_refusal: bool = False) -> list[list[int]]:
    enc = encode(bundle, prompts)
    width = enc["input_ids"].shape[1]
    eos = _eos_ids(bundle)
    if intervention is None:
        if engine == "fast":
            return greedy_loop(bundle, enc, max_new_tokens, cache, stop_on_refusal)
        if engine != "hf":
            raise ValueError(f"unknown generation engine {engine!r}: choose from {', '.join(ENGINES)}")
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
    return [_cut_at_eos(row, eos) for row in rows]


def row_digest(row: dict[str, Any]) -> str:
    """The digest each completion-cache row carries: of its index, token ids and text."""
    return hashlib.sha256(json.dumps([row["i"], row["ids"], row["text"]]).encode()).hexdigest()[:16]


def read_cache_rows(path: Path) -> tuple[dict[int, dict[str, Any]], int, int]:
    """(verified rows by index, lines read, lines rejected) of a completion cache file. A line that is cut,
    not a row, without its digest or not matching it (an edited completion) is rejected: the caller
    regenerates it, nothing unverified is ever returned."""
    rows: dict[int, dict[str, Any]] = {}
    lines = path.read_text().splitlines() if path.is_file() else []
    bad = 0
    for line in lines:
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and row.get("sha") == row_digest(row)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut by an interruption, or not a row
            ok = False
        if ok:
            rows[row["i"]] = row
        else:
            bad += 1
    return rows, len(lines), bad


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.inference_mode()
def generate(bundle: ModelBundle, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
             intervention: Intervention = None, cache_file: Path | None = None,
             desc: str = "generate", engine: str = "fast", cache: str = "static",
             stop_on_refusal: bool = False, pack_weights: bool = False) -> list[dict[str, Any]]:
    """Greedy completions ``[{"text", "ids"}]`` in prompt order; resumes from ``cache_file`` if given.
    ``engine``/``cache``/``stop_on_refusal``/``pack_weights``: see the module docstring (a cache file of
    verdict-only completions must be named apart from full ones by the caller; packing changes ids at most
    at bf16 rounding, as the batch's make-up does, so neither names the file). Weights are packed once for
    the whole call, on our engines only."""
    done: dict[int, dict[str, Any]] = {}
    if cache_file is not None and cache_file.is_file():
        done, n_lines, bad = read_cache_rows(cache_file)
        done = {i: r for i, r in done.items() if 0 <= i < len(prompts)}
        if bad:  # a line cut by an interruption, or an edited or unverifiable row
            print(f"completion cache {cache_file.name}: {bad} of {n_lines} rows failed their digest: regenerating them")
        if len(done) != n_lines or not cache_file.read_text().endswith("\n"):
            # rewrite with the verified rows only, so later appends start on a fresh line
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
            tmp.replace(cache_file)
    def record(idx: Sequence[int], ids: Sequence[list[int]]) -> None:
        new = [{"i": i, "ids": r, "text": bundle.tokenizer.decode(r, skip_special_tokens=True)} for i, r in zip(idx, ids)]
        for row in new:
            row["sha"] = row_digest(row)
            done[row["i"]] = row
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            created = not cache_file.is_file()
            with cache_file.open("a") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in new))
            if created:
                from .results import note_product

                note_product(cache_file)

    pack = pack_weights and intervention is None and engine in ("fast", "refill") and len(done) < len(prompts)
    with packed_linears(bundle.model, pack, batch_size):
        _generate_todo(bundle, prompts, max_new_tokens, batch_size, intervention, desc, engine, cache,
                       stop_on_refusal, done, record)
    return [{"text": done[i]["text"], "ids": done[i]["ids"]} for i in range(len(prompts))]


def _generate_todo(bundle: ModelBundle, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                   intervention: Intervention, desc: str, engine: str, cache: str, stop_on_refusal: bool,
                   done: dict[int, dict[str, Any]], record: Callable[[Sequence[int], Sequence[list[int]]], None]) -> None:
    """The prompts of :func:`generate` not in ``done`` yet, each batch or row ``record``-ed as it ends."""
    if engine == "refill" and intervention is None:
        # every prompt not cached yet goes through one refilled loop; each row is recorded as it ends
        todo_i = [i for i in range(len(prompts)) if i not in done]
        if todo_i:
            bar = tqdm(total=len(todo_i), desc=desc, leave=False)

            def on_row(k: int, ids: list[int]) -> None:
                record([todo_i[k]], [ids])
                bar.update(1)

            greedy_refill(bundle, [prompts[i] for i in todo_i], batch_size, max_new_tokens, stop_on_refusal, on_row)
            bar.close()
    else:
        if engine == "refill":  # activation addition goes through nnsight's generate, batch by batch
            engine = "fast"
        todo = [b for b in length_batches(bundle, prompts, batch_size) if not all(i in done for i in b)]
        for idx in tqdm(todo, desc=desc, leave=False):
            record(idx, _generate_batch(bundle, [prompts[i] for i in idx], max_new_tokens, intervention, engine, cache,
                                        stop_on_refusal))
