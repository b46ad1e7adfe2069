"""Directional ablation as a weight edit ("abliteration"), the attack of notebooks 02 and 04.

Projecting an orthonormal basis ``U`` out of every matrix that *writes* into the residual stream
(the embedding, each attention output projection, each MLP down projection, and their biases) keeps
the whole residual stream orthogonal to ``U``: it is exactly the run-time ablation of
:class:`refusal_rank.activations.Ablation`, at zero run-time cost, and the edited model saves as an
ordinary Hugging Face checkpoint. Tied input/output embeddings are untied first, since the
unembedding *reads* the stream and must stay as it was. Edits are computed in float64 and cast back.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Iterator

import torch

from .models import ModelBundle


def orthonormalize(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, K) of the column span of ``vectors`` (d, K) by QR, in float64."""
    q, r = torch.linalg.qr(vectors.double())
    keep = r.diagonal().abs() > 1e-10 * r.diagonal().abs().max().clamp_min(1e-300)
    return q[:, keep]


def tensor_tag(t: torch.Tensor) -> str:
    """Short content hash of a tensor (float64 bytes), for cache keys and edit tags."""
    return hashlib.sha256(t.detach().double().cpu().numpy().tobytes()).hexdigest()[:12]


def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x - U U^T x along the last dimension."""
    b = basis.to(x.device, x.dtype)
    return x - (x @ b) @ b.T


def residual_writers(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every linear map writing into the residual stream (Llama/Qwen/Mistral layout)."""
    out = []
    for i, layer in enumerate(model.model.layers):
        out.append((f"model.layers.{i}.self_attn.o_proj", layer.self_attn.o_proj))
        out.append((f"model.layers.{i}.mlp.down_proj", layer.mlp.down_proj))
    return out


def untie_embeddings(model: Any) -> None:
    """Give the unembedding its own copy of the weights so editing the embedding leaves it alone."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    # transformers re-ties on save/load when the mapping remains; clear it
    if getattr(model, "_tied_weights_keys", None):
        model._tied_weights_keys = None


@torch.no_grad()
def orthogonalize_weights(model: Any, basis: torch.Tensor) -> None:
    """In place: remove span(basis) from every residual write (see module docstring)."""
    untie_embeddings(model)
    U = basis.double().to(model.device)
    emb = model.get_input_embeddings().weight  # (vocab, d): rows are written into the stream
    for s in range(0, emb.shape[0], 16384):
        rows = emb[s:s + 16384].double()
        emb[s:s + 16384] = (rows - (rows @ U) @ U.T).to(emb.dtype)
    for _, lin in residual_writers(model):
        W = lin.weight.double()  # (d, d_in): columns live in the stream
        lin.weight.copy_((W - U @ (U.T @ W)).to(lin.weight.dtype))
        if lin.bias is not None:
            b = lin.bias.double()
            lin.bias.copy_((b - U @ (U.T @ b)).to(lin.bias.dtype))


def edit_tag(basis: torch.Tensor) -> str:
    """How an orthogonalisation by ``basis`` is named in a bundle's edit tag (and so in cache keys)."""
    return f"+orth{basis.shape[1]}:{tensor_tag(basis)}"


@contextlib.contextmanager
def orthogonalized(bundle: ModelBundle, basis: torch.Tensor) -> Iterator[ModelBundle]:
    """Temporarily orthogonalise the bundle's weights; the originals are restored on exit."""
    model = bundle.model
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    was_tied = head.weight.data_ptr() == emb.weight.data_ptr()
    untie_embeddings(model)
    params = [model.get_input_embeddings().weight]
    for _, lin in residual_writers(model):
        params.append(lin.weight)
        if lin.bias is not None:
            params.append(lin.bias)
    saved = [p.detach().clone() for p in params]
    previous = bundle.edit
    try:
        orthogonalize_weights(model, basis)
        bundle.edit = previous + edit_tag(basis)
        yield bundle
    finally:
        bundle.edit = previous
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        if was_tied:  # give the memory of the untied copy back and restore the original structure
            head.weight = emb.weight
            model.config.tie_word_embeddings = True


def export_orthogonalized(bundle: ModelBundle, basis: torch.Tensor, out_dir: str | Path) -> Path:
    """Save an orthogonalised copy as a plain HF checkpoint that ``from_pretrained`` loads."""
    from .results import note_product

    out_dir = Path(out_dir)
    note_product(out_dir)
    with orthogonalized(bundle, basis):
        bundle.model.save_pretrained(out_dir)
    bundle.tokenizer.save_pretrained(out_dir)
    return out_dir
