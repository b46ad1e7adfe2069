"""Which matrices of a checkpoint differ from a reference's, and the numerical rank of each change.

Two edits leave traces that can be read off the weights alone:

* **abliteration** (:func:`refusal_rank.ablation.orthogonalize_weights`): ``W <- W - u u^T W`` for one unit
  vector ``u`` of the residual stream, on the embedding and on every matrix that writes into the stream
  (attention and MLP output projections); nothing else changes. Each change has rank 1, the stream side of
  every change is the same ``u``, and ``dW + u u^T W_ref = 0``: it is a projection, not any rank-1 update.
* **a merged LoRA fine-tune**: ``W <- W + (alpha / r) B A`` on every adapted linear map: rank <= r on each, the
  embedding untouched. A full fine-tune changes matrices at full rank.

The numerical rank counts the singular values of ``dW`` that stand above both ``rel_tol`` x the largest and
``tail_factor`` x the noise bulk: the median of the smallest quarter of the values the decomposition returns.
A change computed in high precision and stored in bf16 carries a rounding error in about every element it
touches, which is full rank and flat; a low-rank change stands out of it (a LoRA delta of 1e-4 of the
weights' norm still has its largest value 2.5x the bulk, measured on synthetic bf16 matrices), while a dense
change is flat itself (largest about 1.2x the bulk) and reads as full rank. Large matrices are not decomposed
in full: a randomised range finder with ``probe`` columns and one power iteration (Halko, Martinsson and Tropp
2011) returns the leading ``probe`` values; a flat top, or a rank reaching into the probe's last quarter,
reads "more than the probe can tell". Whether a rank-1 change is a projection is checked against the rounding
too: ``dW + u u^T W_ref`` must vanish up to ``edge_factor`` x the Frobenius norm of a round-to-nearest error of
the stored dtype (spacing / sqrt(12) per element).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
EMBEDDING = "embed_tokens.weight"
HEAD = "lm_head.weight"
WRITERS = (".self_attn.o_proj.weight", ".mlp.down_proj.weight")  # the matrices that write into the stream


def weight_files(folder: Path) -> list[Path]:
    """The files of a checkpoint folder that hold weights (any format transformers reads)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def tensor_index(folder: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> loader of every tensor in the folder's safetensors (or torch ``.bin``) files, read lazily so
    that only one pair of matrices is in memory at a time."""
    from safetensors import safe_open

    index: dict[str, Callable[[], torch.Tensor]] = {}
    files = [p for p in weight_files(folder) if p.suffix == ".safetensors"]
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                index[key] = (lambda p=path, k=key: _read_safetensor(p, k))
    if not files:
        for path in (p for p in weight_files(folder) if p.suffix in (".bin", ".pt", ".pth")):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for key, value in state.items():
                index[key] = (lambda v=value: v)
    return index


def _read_safetensor(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(key)


def ties_embeddings(folder: Path) -> bool:
    """Whether a checkpoint's config ties its unembedding to the embedding (then it stores no ``lm_head``)."""
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config") or {}
    return bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


# ----------------------------------------------------------------------------------------------
# spectra (big products in float32, in row chunks: an embedding of 150k x 1.5k is 0.9 GB in float32)

CHUNK = 8192


def fro(x: torch.Tensor) -> float:
    """Frobenius norm, chunk by chunk of rows (float32 norms of the chunks, summed in Python floats)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(x[s:s + CHUNK].float())) ** 2
                         for s in range(0, max(x.shape[0], 1), CHUNK)))


@dataclass
class Spectrum:
    values: torch.Tensor  # leading singular values, descending (float64)
    left: torch.Tensor  # leading left singular vector (n,)
    right: torch.Tensor  # leading right singular vector (m,)
    captured: float  # share of ||M||_F^2 held by ``values`` (1.0 for an exact SVD)
    exact: bool


def spectrum(m: torch.Tensor, probe: int, seed: int = 0) -> Spectrum:
    """Leading singular values and vectors of a 2-D tensor: exact when its smaller side is at most ``probe``,
    else a randomised range finder with ``probe`` columns and one power iteration."""
    n, k = m.shape
    if min(n, k) <= probe:
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        return Spectrum(s, u[:, 0], vh[0], 1.0, True)
    x = m.float()
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(k, probe, generator=g).to(x.device)
    q = torch.linalg.qr(x @ omega)[0]
    q = torch.linalg.qr(x @ (x.T @ q))[0]  # one power iteration sharpens the leading values
    b = (q.T @ x).double()
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    total = fro(x) ** 2
    captured = float(b.pow(2).sum()) / total if total > 0 else 1.0
    return Spectrum(s, (q.double() @ ub[:, 0]), vh[0], min(captured, 1.0), False)


def numerical_rank(spec: Spectrum, rel_tol: float, tail_factor: float) -> tuple[int, bool]:
    """(rank, exceeds_probe) by the rule of the module docstring."""
    s = spec.values
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0, False
    q = max(1, s.numel() // 4)
    bulk = float(s[-q:].median())
    rank = int((s > max(rel_tol * float(s[0]), tail_factor * bulk)).sum())
    if spec.exact:
        return rank, False
    flat = float(s[0]) < tail_factor * bulk
    return (s.numel() if flat else rank), flat or rank > s.numel() - q


# ----------------------------------------------------------------------------------------------
# per tensor


def role(name: str, ndim: int = 2) -> str:
    """What a tensor is, for the edit signatures: embedding, head, writer (a matrix writing into the residual
    stream), writer_bias, linear (any other matrix), bias, norm (a 1-D weight) or other."""
    if name.endswith(EMBEDDING):
        return "embedding"
    if name.endswith(HEAD):
        return "head"
    if name.endswith(WRITERS):
        return "writer"
    if name.endswith(".bias"):
        return "writer_bias" if any(name.endswith(w.replace(".weight", ".bias")) for w in WRITERS) else "bias"
    if name.endswith(".weight"):
        return "linear" if ndim == 2 else "norm"
    return "other"


def stream_vector(name: str, spec: Spectrum) -> torch.Tensor | None:
    """The residual-stream side of a change's leading singular pair: the embedding's rows live in the
    stream (right vector), a writer's columns do (left vector)."""
    r = role(name)
    if r == "embedding":
        return spec.right
    if r == "writer":
        return spec.left
    return None


def projection_residual(name: str, delta: torch.Tensor, ref: torch.Tensor, u: torch.Tensor) -> float:
    """||dW + (the component of W_ref along u)||_F: 0 when the change is exactly the removal of ``u``
    (the embedding's rows, a writer's columns)."""
    u = u.float().to(delta.device)
    emb = role(name) == "embedding"
    along = None if emb else sum(u[s:s + CHUNK] @ ref[s:s + CHUNK].float() for s in range(0, ref.shape[0], CHUNK))
    total = 0.0
    for s in range(0, delta.shape[0], CHUNK):
        w = ref[s:s + CHUNK].float()
        removed = (w @ u)[:, None] * u[None, :] if emb else u[s:s + CHUNK, None] * along[None, :]
        total += float(torch.linalg.vector_norm(delta[s:s + CHUNK] + removed)) ** 2
    return math.sqrt(total)


def rounding_fro(stored: torch.Tensor) -> float:
    """Frobenius norm expected of a matrix's rounding error in its stored dtype (rms spacing / sqrt(12) x sqrt(nm))."""
    if not stored.is_floating_point():
        return 0.0
    eps = torch.finfo(stored.dtype).eps
    return eps * fro(stored) / math.sqrt(12)


@dataclass
class DiffConfig:
    rel_change: float  # a tensor "changed" when ||dW|| > rel_change x ||W_ref||
    rel_tol: float  # singular values below rel_tol x the largest do not count towards the rank ...
    tail_factor: float  # ... nor those below tail_factor x the noise bulk (smallest quarter's median)
    edge_factor: float  # a projection's residual may be this x the stored dtype's rounding error
    probe: int  # columns of the randomised range finder (exact SVD at or below this size)
    same_direction: float  # |cos| of two stream directions that read as the same direction
    projection_tol: float  # a residual below this x ||dW|| (or within the rounding noise) reads as "u projected out of W"
    low_rank_max: int  # a change of rank <= this on every changed linear map reads as a LoRA-like fine-tune

    @classmethod
    def from_cfg(cls, d: dict[str, Any]) -> "DiffConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def diff_tensor(name: str, w: torch.Tensor, ref: torch.Tensor, dc: DiffConfig) -> dict[str, Any]:
    """One tensor against the reference's: changed or not, relative size of the change, and for 2-D tensors
    the numerical rank (with the stream direction of a rank-1 change kept under ``_u``)."""
    row: dict[str, Any] = {"name": name, "role": role(name, w.ndim), "shape": list(w.shape)}
    if w.shape != ref.shape:
        row.update(changed=True, shape_ref=list(ref.shape))
        return row
    if torch.equal(w, ref):
        row.update(changed=False, rel_change=0.0)
        return row
    delta = w.to(torch.float32, copy=True)
    delta.sub_(ref)  # in place: one float32 copy of an embedding-sized matrix, not three
    norm = fro(delta) if delta.ndim == 2 else float(delta.double().norm())
    rel = norm / max(fro(ref) if ref.ndim == 2 else float(ref.double().norm()), 1e-300)
    row.update(changed=rel > dc.rel_change, rel_change=round(rel, 6))
    if not row["changed"] or w.ndim != 2:
        if w.ndim == 1 and row["changed"]:
            row["_vec"] = delta.double() / delta.double().norm()
        return row
    spec = spectrum(delta, dc.probe)
    rank, exceeds = numerical_rank(spec, dc.rel_tol, dc.tail_factor)
    row.update(rank=rank, rank_exceeds_probe=exceeds,
               top_singular=[round(float(v), 6) for v in spec.values[:4]])
    u = stream_vector(name, spec)
    if rank == 1 and u is not None:
        res = projection_residual(name, delta, ref, u)
        row["_u"] = u
        row["projection_residual"] = round(res / norm, 5)  # relative to ||dW||
        row["projection"] = res <= dc.projection_tol * norm or res <= dc.edge_factor * rounding_fro(w)
    return row


def compare_folders(model_dir: Path, ref_dir: Path, dc: DiffConfig) -> list[dict[str, Any]]:
    """Every tensor of the model against the reference's. An untied head (the weight edit unties it) is
    compared with the reference's embedding when the reference ties the two."""
    mine, theirs = tensor_index(model_dir), tensor_index(ref_dir)
    rows = []
    for name in sorted(mine):
        other = theirs.get(name)
        if other is None and name.endswith(HEAD) and ties_embeddings(ref_dir):
            other = next((theirs[k] for k in theirs if k.endswith(EMBEDDING)), None)
            if other is not None:
                row = diff_tensor(name, mine[name](), other(), dc)
                row["untied"] = True
                rows.append(row)
                continue
        if other is None:
            rows.append({"name": name, "role": role(name, mine[name]().ndim), "changed": True, "only_in": "model"})
            continue
        rows.append(diff_tensor(name, mine[name](), other(), dc))
    for name in sorted(set(theirs) - set(mine)):
        if name.endswith(HEAD) and ties_embeddings(model_dir):
            continue
        rows.append({"name": name, "role": role(name, theirs[name]().ndim), "changed": True, "only_in": "reference"})
    return rows


# ----------------------------------------------------------------------------------------------
# signatures


def _shared_direction(vectors: list[torch.Tensor], same: float) -> tuple[bool, float]:
    """Whether all vectors are one direction up to sign: (all |cos| >= same with the first, the smallest)."""
    if not vectors:
        return False, 0.0
    v0 = vectors[0] / vectors[0].norm()
    cos = [abs(float(v0 @ (v / v.norm()))) for v in vectors[1:]] or [1.0]
    return min(cos) >= same, min(cos)


def signature(rows: list[dict[str, Any]], dc: DiffConfig) -> dict[str, Any]:
    """Read an edit's kind off the per-tensor rows:

    * ``identical``: nothing changed;
    * ``abliteration``: one shared stream direction projected out of the embedding and every residual writer
      (rank 1 each), nothing else changed but the writers' biases (and a head untied, left as it was);
    * ``rank1_projection``: a shared rank-1 projection on some of those matrices only (a partial abliteration);
    * ``low_rank``: every changed 2-D tensor is a linear map of rank <= ``low_rank_max``, the embedding untouched
      (the signature of a merged LoRA fine-tune);
    * ``different_architecture``: tensors missing on one side or of another shape;
    * ``dense``: anything else (e.g. a full fine-tune).
    """
    changed = [r for r in rows if r.get("changed")]
    writers = [r for r in rows if r["role"] == "writer"]
    emb = [r for r in rows if r["role"] == "embedding"]
    out: dict[str, Any] = {"n_tensors": len(rows), "n_changed": len(changed),
                           "changed_by_role": {k: sum(1 for r in changed if r["role"] == k)
                                               for k in sorted({r["role"] for r in changed})}}
    ranks = [r["rank"] for r in changed if "rank" in r]
    out["max_rank"] = max(ranks) if ranks else None
    out["rank_exceeds_probe"] = any(r.get("rank_exceeds_probe") for r in changed)
    if not changed:
        return {**out, "kind": "identical", "sentence": "no tensor differs from the reference"}
    if any("only_in" in r or "shape_ref" in r for r in changed):
        n = sum(1 for r in changed if "only_in" in r or "shape_ref" in r)
        return {**out, "kind": "different_architecture",
                "sentence": f"{n} tensors are missing on one side or differ in shape"}
    proj = [r for r in changed if r["role"] in ("embedding", "writer") and r.get("projection")]
    shared, min_cos = _shared_direction([r["_u"] for r in proj], dc.same_direction)
    if proj and shared:
        bias_vecs = [r["_vec"] for r in changed if r["role"] == "writer_bias" and "_vec" in r]
        biases_along = all(abs(float((proj[0]["_u"] / proj[0]["_u"].norm()) @ v)) >= dc.same_direction for v in bias_vecs)
        in_proj = {id(r) for r in proj}
        others = [r for r in changed if id(r) not in in_proj and r["role"] != "writer_bias"]
        out.update(shared_direction_min_cos=round(min_cos, 6), n_projected=len(proj),
                   max_projection_residual=max(r["projection_residual"] for r in proj))
        everywhere = len(proj) == len(writers) + len(emb) and not others and biases_along
        if everywhere:
            return {**out, "kind": "abliteration",
                    "sentence": (f"a rank-1 projection of one direction out of the embedding and all {len(writers)} "
                                 f"residual writers (|cos| >= {min_cos:.4f} between their changes' directions); "
                                 f"no other matrix changed")}
        return {**out, "kind": "rank1_projection",
                "sentence": (f"rank-1 projection of one direction out of {len(proj)} of the "
                             f"{len(writers) + len(emb)} matrices that write into the residual stream"
                             + (f", and {len(others)} other tensors changed" if others else ""))}
    mats = [r for r in changed if "rank" in r]
    if mats and not any(r["role"] == "embedding" for r in mats) and not out["rank_exceeds_probe"] \
            and max(ranks) <= dc.low_rank_max:
        at_noise = sum(1 for r in mats if r["rank"] == 0)
        return {**out, "kind": "low_rank",
                "sentence": (f"{len(mats)} linear maps changed, numerical rank <= {max(ranks)} each"
                             + (f" ({at_noise} only at the dtype's rounding level)" if at_noise else "")
                             + ", embedding unchanged: a merged LoRA-like fine-tune")}
    big = sum(1 for r in mats if r.get("rank_exceeds_probe") or r["rank"] > dc.low_rank_max)
    return {**out, "kind": "dense",
            "sentence": (f"{len(changed)} tensors changed, {big} matrices at a rank above {dc.low_rank_max} "
                         f"(a full fine-tune, or another edit)")}


def public_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without the tensors kept for the signature (JSON-ready)."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
