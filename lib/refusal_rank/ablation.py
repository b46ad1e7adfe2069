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

from .models import ModelBundle, release_freed_memory


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
        saved = None
        release_freed_memory()  # the saved copies and the untied head (1.9 GB on cpu) are gone: give them back


EXPORT_KEY = "export_key.json"  # what an export was made from (the caller's key), listed in its manifest


def export_orthogonalized(bundle: ModelBundle, basis: torch.Tensor, out_dir: str | Path,
                          card: dict[str, Any] | None = None, key: dict[str, Any] | None = None) -> Path:
    """Save an orthogonalised copy as a plain HF checkpoint that ``from_pretrained`` loads, atomically and with
    a digest of every file: weights, tokenizer, the model card ``card`` and ``key`` (as ``export_key.json``)
    when given, are written into ``<out_dir>.partial``, its ``MANIFEST.json`` of sha256 last
    (:func:`refusal_rank.models.write_manifest`), and the folder is then renamed into place. A folder at
    ``out_dir`` written here is complete and verifiable (:func:`reusable_export`); an interrupted export leaves
    only the ``.partial`` folder, which the next one removes."""
    import json
    import shutil

    from .model_card import write_model_card
    from .models import write_manifest
    from .results import note_product

    out_dir = Path(out_dir)
    note_product(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with orthogonalized(bundle, basis):
        bundle.model.save_pretrained(tmp)
    bundle.tokenizer.save_pretrained(tmp)
    if card is not None:
        write_model_card(tmp, card)
    if key is not None:
        (tmp / EXPORT_KEY).write_text(json.dumps(key, indent=1, sort_keys=True, default=str) + "\n")
    write_manifest(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def reusable_export(out_dir: str | Path, key: dict[str, Any], log=print) -> bool:
    """Whether ``out_dir`` holds an export of ``key`` that can be trusted: a ``MANIFEST.json`` that every file
    it lists hashes to, and the same ``export_key.json``. Anything else (no manifest: an export from before
    digests were kept, or not written by :func:`export_orthogonalized`; a file that does not match; another
    model or basis) is said and answered False, for the caller to rebuild it: never trusted, never certified."""
    import json

    from .models import verify_manifest

    out_dir = Path(out_dir)
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return False
    if not (out_dir / "MANIFEST.json").is_file():
        log(f"export {out_dir.name} has no digest manifest (unverifiable): rebuilding it")
        return False
    try:
        intact = verify_manifest(out_dir)
    except ValueError:  # a manifest that is not JSON
        intact = False
    if not intact:
        log(f"export {out_dir.name} does not match its digest manifest (corrupted or incomplete): rebuilding it")
        return False
    try:
        recorded = json.loads((out_dir / EXPORT_KEY).read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded != json.loads(json.dumps(key, sort_keys=True, default=str)):
        log(f"export {out_dir.name} was made from another model, basis or card: rebuilding it")
        return False
    return True
