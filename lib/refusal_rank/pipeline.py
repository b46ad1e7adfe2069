"""The steps of notebooks 01-02 as functions a test can call; the notebooks only tell the story.

Every expensive result is cached under ``cache/<profile>/`` with a key built from the model, the
prompts and the knobs that determine it, so a rerun after an interruption resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import data as D
from .activations import Ablation, ActAdd, Intervention, collect_residuals, completion_ce, last_token_logprobs
from .directions import Selection, candidate_grid, select_direction
from .generation import cache_key, generate
from .metrics import kl_rows, mean_with_ci, point_biserial, rate_with_ci, refusal_labels, refusal_score
from .models import ModelBundle
from .ablation import tensor_tag
from .config import config_hash
from .results import run_cache


CACHE_VERSION = 2  # bump when a change of code changes what a cached value means


def model_identity(cfg: dict[str, Any]) -> str:
    """What determines the profile's original weights: every knob of its model section (source, dtype,
    refusal words, template variables, the GGUF's sha256...) and, for the tiny model, which is built here,
    also the seed it is initialised with and the corpus its tokenizer is trained on (the same key as its
    checkpoint directory's, :func:`refusal_rank.models.tiny_key`)."""
    if cfg["model"]["source"] != "tiny":
        return config_hash(cfg, "model")
    from .data import DATA_DIR, SPLITS_PATH, tokenizer_corpus
    from .models import tiny_key

    files = [SPLITS_PATH, DATA_DIR / "harmless.jsonl"]  # what the corpus is read from (the harmful files are pinned)
    memo = (config_hash(cfg, "model"), cfg["seed"], *[(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files])
    if memo not in _IDENTITY:
        _IDENTITY[memo] = "tiny-" + tiny_key(cfg["model"], tokenizer_corpus(cfg), cfg["seed"])
    return _IDENTITY[memo]


_IDENTITY: dict[tuple, str] = {}


def model_tag(cfg: dict[str, Any], bundle: ModelBundle) -> str:
    """Identity of a model for cache keys: :func:`model_identity` (the original weights), the bundle's
    name, any weight edit, and the cache version."""
    return f"v{CACHE_VERSION}:{model_identity(cfg)}:{bundle.name}:{bundle.edit}"


def prompt_key(prompts: Sequence[D.Prompt]) -> dict[str, Any]:
    """Prompts as a cache key: their ids and a digest of their texts (an edited prompt text is another
    key, not a reuse of the value computed on the old text)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.text.encode("utf-8") + b"\x00")
    return {"ids": [p.id for p in prompts], "texts_sha256": h.hexdigest()[:16]}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


MISSING = object()


def load_cached(path: Path, log=print, remove_bad: bool = True) -> Any:
    """The value saved at ``path`` if its sha256 matches its ``.sha256`` sidecar, else ``MISSING``.
    A file whose sidecar is missing or does not match, or that cannot be read, is reported and removed
    (rebuilt by the caller): it is never trusted, nor given a sidecar that would certify it. A reader that
    only looks (``remove_bad=False``: a progress report beside a running queue, which may be between
    writing a sidecar and its file) leaves such a file alone."""
    side = path.with_name(path.name + ".sha256")
    if not path.is_file():
        return MISSING
    if not side.is_file():
        log(f"cache file {path.name} has no sha256 sidecar (unverifiable): rebuilding it")
    elif side.read_text().strip() != _sha256(path):
        log(f"cache file {path.name} is corrupted (sha256 mismatch): rebuilding it")
    else:
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # noqa: BLE001 - verified yet unreadable: written by another version
            log(f"cache file {path.name} is unreadable: rebuilding it")
    if not remove_bad:
        return MISSING
    path.unlink()
    side.unlink(missing_ok=True)
    return MISSING


def save_cached(path: Path, value: Any) -> None:
    """Save atomically, with the sha256 sidecar that :func:`load_cached` checks."""
    from .results import note_product

    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    side = path.with_name(path.name + ".sha256")
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(_sha256(tmp))
    side_tmp.replace(side)
    tmp.replace(path)
    note_product(path)


def cached_value(path: Path, fn, log=print) -> Any:
    """The cached value at ``path`` (verified by hash), else ``fn()``, saved for next time."""
    value = load_cached(path, log)
    if value is MISSING:
        value = fn()
        save_cached(path, value)
    return value


def logprobs_cached(cfg, bundle, prompts: Sequence[D.Prompt], intervention: Intervention = None,
                    tag: str = "", desc: str = "logits") -> torch.Tensor:
    """Last-position log-probs, cached by model, prompts and intervention tag."""
    key = cache_key(model_tag(cfg, bundle), prompt_key(prompts), tag)
    path = run_cache(cfg, "logprobs") / f"{key}.pt"
    bs = cfg["eval"]["fwd_batch_size"]
    return cached_value(path, lambda: last_token_logprobs(bundle, [p.text for p in prompts], bs, intervention, desc))


def scores_cached(cfg, bundle, prompts, intervention: Intervention = None, tag: str = "", desc: str = "scores") -> torch.Tensor:
    """Refusal scores (n,) of prompts, cached (stores only the scores, not the vocabulary)."""
    key = cache_key(model_tag(cfg, bundle), prompt_key(prompts), tag, "score")
    path = run_cache(cfg, "scores") / f"{key}.pt"
    bs = cfg["eval"]["fwd_batch_size"]
    return cached_value(path, lambda: refusal_score(
        last_token_logprobs(bundle, [p.text for p in prompts], bs, intervention, desc), bundle.refusal_token_ids))


# ----------------------------------------------------------------------------------------------
# notebook 01


@dataclass
class TrainVal:
    harmful_train: list[D.Prompt]
    harmless_train: list[D.Prompt]
    harmful_val: list[D.Prompt]
    harmless_val: list[D.Prompt]
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def filter_fallback(self) -> dict[str, int]:
        """The splits too few of whose prompts passed the refusal filter (an attacker kept their most
        refusing ones instead), with the number that did pass."""
        return {k: r["passed"] for k, r in self.report.items() if r.get("fallback")}


def filtered_train_val(cfg: dict[str, Any], bundle: ModelBundle, attacker: bool = False) -> TrainVal:
    """Train/val prompts, keeping (as Arditi et al.) harmful ones the model refuses (score > 0) and
    harmless ones it does not (score < 0), when the profile asks for it.

    Fewer than ``data.min_keep`` prompts of a split passing the filter is a configuration error for the
    original model (notebook 01), but not for an attacker (``attacker=True``: every attack on a trained,
    edited or audited model). A model may refuse in its generations while its first-token refusal score is
    negative (training moves that score: `defended` at 2x scored positive on 14 of the 41 harmful val
    prompts), and an abliterated model refuses nothing; a filter that starved the attacker would read as
    robustness. So the attacker keeps the split's ``n`` prompts the model scores most refusing (harmful)
    or least (harmless), in pool order, and ``report[split]`` says ``fallback = "top_scores"`` with the
    number that passed."""
    d, seed = cfg["data"], cfg["seed"]
    pools = {
        "harmful_train": D.split_prompts("harmful_train", d["train_pool"], seed),
        "harmless_train": D.profile_split(cfg, "harmless_train", d["train_pool"]),  # local file or hub
        "harmful_val": D.split_prompts("harmful_val", d["val_pool"], seed),
        "harmless_val": D.profile_split(cfg, "harmless_val", d["val_pool"]),
    }
    want = {"harmful_train": d["n_train"], "harmless_train": d["n_train"], "harmful_val": d["n_val"], "harmless_val": d["n_val"]}
    out, report = {}, {}
    for name, pool in pools.items():
        harmful, extra = name.startswith("harmful"), {}
        if d["filter_by_refusal"]:
            s = scores_cached(cfg, bundle, pool, desc=f"filter {name}").tolist()
            keep = [p for p, v in zip(pool, s) if (v > 0) == harmful]
        else:
            keep = list(pool)
        if len(keep) < min(want[name], d.get("min_keep", 1)) or not keep:
            if not (attacker and d["filter_by_refusal"] and pool):
                raise D.DataError(f"Only {len(keep)} of {len(pool)} {name} prompts pass the refusal filter: "
                                  f"raise data.train_pool/val_pool or lower data.n_train/n_val in {cfg['_path']}.")
            top = sorted(range(len(pool)), key=lambda i: -s[i] if harmful else s[i])[:want[name]]
            extra = {"fallback": "top_scores", "passed": len(keep)}
            keep = [pool[i] for i in sorted(top)]
        out[name] = keep[:want[name]]
        report[name] = {"pool": len(pool), "kept": len(keep), "used": len(out[name]), **extra}
    return TrainVal(**out, report=report)


def mean_residuals(cfg, bundle, prompts: Sequence[D.Prompt], desc: str) -> torch.Tensor:
    """Float64 mean block-input residual (layers, n_post, d) over prompts, cached."""
    key = cache_key(model_tag(cfg, bundle), prompt_key(prompts), "mean-resid", bundle.n_post)
    path = run_cache(cfg, "acts") / f"{key}.pt"

    def compute():
        acts = collect_residuals(bundle, [p.text for p in prompts], cfg["eval"]["fwd_batch_size"], desc=desc)
        return acts.double().mean(0)

    return cached_value(path, compute)


def direction_candidates(cfg, bundle) -> list[tuple[int, int]]:
    dc = cfg["directions"]
    return candidate_grid(bundle.n_layers, bundle.n_post, dc["drop_last_frac"], dc["layer_stride"], dc.get("positions") or None)


# Val criteria of the direction selection, shared by notebook 01 and the iterated attacker of notebook 04.
# Their cache tags name the basis by content, so the same direction is scored once whichever asks.

def val_ablation_score(cfg, bundle, tv: TrainVal, U: torch.Tensor) -> float:
    """Mean harmful-val refusal score with span(U) ablated at run time."""
    return scores_cached(cfg, bundle, tv.harmful_val, Ablation(U), tag=f"abl:{tensor_tag(U)}", desc="val ablate").mean().item()


def val_ablation_kl(cfg, bundle, tv: TrainVal, base_lp: torch.Tensor, U: torch.Tensor) -> float:
    """Mean first-token KL(unablated || ablated) on harmless val, ``base_lp`` being the unablated log-probs."""
    lp = logprobs_cached(cfg, bundle, tv.harmless_val, Ablation(U), tag=f"abl:{tensor_tag(U)}", desc="val KL")
    return kl_rows(base_lp, lp).mean().item()


def val_induce_score(cfg, bundle, tv: TrainVal, layer: int, v: torch.Tensor, U_prev: torch.Tensor | None = None) -> float:
    """Mean harmless-val refusal score with ``v`` added at ``layer`` (and span(U_prev) ablated, if given)."""
    if U_prev is None or U_prev.shape[1] == 0:
        iv, tag = ActAdd(layer, v), f"add:{layer}:{tensor_tag(v)}"
    else:
        iv, tag = (Ablation(U_prev), ActAdd(layer, v)), f"abl:{tensor_tag(U_prev)}+add:{layer}:{tensor_tag(v)}"
    return scores_cached(cfg, bundle, tv.harmless_val, iv, tag=tag, desc="val induce").mean().item()


def discover_direction(cfg: dict[str, Any], bundle: ModelBundle, tv: TrainVal) -> tuple[Selection, torch.Tensor]:
    """Difference-in-means candidates and Arditi et al.'s selection; returns (selection, all directions)."""
    dirs = (mean_residuals(cfg, bundle, tv.harmful_train, "harmful train acts")
            - mean_residuals(cfg, bundle, tv.harmless_train, "harmless train acts"))
    base_lp = logprobs_cached(cfg, bundle, tv.harmless_val, desc="base harmless val")
    dc = cfg["directions"]
    sel = select_direction(dirs, direction_candidates(cfg, bundle),
                           lambda u: val_ablation_score(cfg, bundle, tv, u[:, None]),
                           lambda u: val_ablation_kl(cfg, bundle, tv, base_lp, u[:, None]),
                           lambda layer, v: val_induce_score(cfg, bundle, tv, layer, v),
                           max_kl=dc["max_kl"], max_checks=dc["max_checks"])
    return sel, dirs


def forward_throughput(cfg, bundle, prompts: Sequence[D.Prompt]) -> dict[str, float]:
    """Tokens/s of one batched forward pass with every layer's residual read, beside the matmul peak of the
    dtype the model computes in, measured in the same process. On a CPU with AVX2 only, the cpu profile runs
    in float32 (bf16 is emulated there, ~50x slower): a bf16 peak would be no reference for it, and
    measuring one took minutes (most of a tiny run of notebook 01)."""
    from .activations import encode
    from .bench import matmul_peak_gflops, throughput_report

    texts = [p.text for p in prompts]
    n_tok = int(encode(bundle, texts)["attention_mask"].sum())
    t = time.perf_counter()
    collect_residuals(bundle, texts, cfg["eval"]["fwd_batch_size"], desc="throughput")
    dt = time.perf_counter() - t
    peak = matmul_peak_gflops(bundle.dtype, device=str(bundle.device))
    return {**throughput_report(n_tok, dt, bundle.model, peak), "peak_dtype": str(bundle.dtype).replace("torch.", "")}


# ----------------------------------------------------------------------------------------------
# notebook 02


@dataclass
class TestSets:
    harmful: list[D.Prompt]
    harmless: list[D.Prompt]
    overrefusal: list[D.Prompt]

    def items(self):
        return {"harmful": self.harmful, "harmless": self.harmless, "overrefusal": self.overrefusal}.items()


def test_sets(cfg: dict[str, Any]) -> TestSets:
    d, seed = cfg["data"], cfg["seed"]
    return TestSets(
        harmful=D.split_prompts("harmful_test", d["n_test_harmful_per_source"], seed, per_source=True),
        harmless=D.profile_split(cfg, "harmless_test", d["n_test_harmless"]),  # local file or hub
        overrefusal=D.split_prompts("overrefusal_test", d["n_test_overrefusal"], seed),
    )


def completions_path(cfg, bundle, prompts: Sequence[D.Prompt], intervention: Intervention = None) -> Path:
    """The generation cache file of these prompts for this model (name and weight edit) and intervention.
    Only ``bundle.name`` and ``bundle.edit`` are read, so a stand-in object finds cached completions
    without loading a model."""
    key = cache_key(model_tag(cfg, bundle), prompt_key(prompts), cfg["eval"]["max_new_tokens"],
                    str(type(intervention).__name__), tensor_tag(intervention.vector) if isinstance(intervention, ActAdd) else "",
                    getattr(intervention, "layer", ""), getattr(intervention, "coeff", ""))
    return run_cache(cfg, "gen") / f"{key}.jsonl"


def read_completions(path: Path, n: int) -> list[dict[str, Any]]:
    """Completions from a finished generation cache file, in prompt order; a clear error if incomplete."""
    from .generation import read_cache_rows

    rows, _, bad = read_cache_rows(path)
    missing = [i for i in range(n) if i not in rows]
    if missing:
        raise FileNotFoundError(f"{path} holds {n - len(missing)} of {n} verified completions"
                                + (f" ({bad} rows failed their digest)" if bad else "")
                                + ": run the notebook that generates them first.")
    return [{"text": rows[i]["text"], "ids": rows[i]["ids"]} for i in range(n)]


def completions(cfg, bundle, prompts: Sequence[D.Prompt], intervention: Intervention = None,
                desc: str = "generate") -> list[dict[str, Any]]:
    """Greedy completions of the bundle (with any weight edit applied), resumable."""
    e = cfg["eval"]
    return generate(bundle, [p.text for p in prompts], e["max_new_tokens"], e["gen_batch_size"], intervention,
                    cache_file=completions_path(cfg, bundle, prompts, intervention), desc=desc,
                    engine=e["gen_engine"], cache=e["gen_cache"], pack_weights=e["gen_pack_weights"])


def rates_by_source(cfg, prompts: Sequence[D.Prompt], comps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Refusal rate with CI over all prompts and per source."""
    e = cfg["eval"]
    labels = refusal_labels([c["text"] for c in comps])
    out = rate_with_ci(labels, e["n_boot"], cfg["seed"])
    sources = sorted({p.source for p in prompts})
    if len(sources) > 1:
        out["by_source"] = {s: rate_with_ci([l for p, l in zip(prompts, labels) if p.source == s], e["n_boot"], cfg["seed"])
                            for s in sources}
    return out


RATE_KEYS = {"harmful": "refusal_rate_harmful", "harmless": "refusal_rate_harmless", "overrefusal": "overrefusal_rate"}
"""Each test set's refusal-rate key in an evaluation (summary.json, budget entries, the progress file)."""


def evaluate_model(cfg, bundle, sets: TestSets, base_harmless: list[dict[str, Any]] | None,
                   base_lp_harmless: torch.Tensor | None, label: str = "base") -> dict[str, Any]:
    """Refusal rates on the three test sets, and (against the original) first-token KL and CE on harmless."""
    e = cfg["eval"]
    res: dict[str, Any] = {"completions": {}}
    for name, prompts in sets.items():
        comps = completions(cfg, bundle, prompts, desc=f"{label} {name}")
        res["completions"][name] = comps
        res[RATE_KEYS[name]] = rates_by_source(cfg, prompts, comps)
    if base_lp_harmless is not None:
        lp = logprobs_cached(cfg, bundle, sets.harmless, desc="KL harmless")
        res["kl_harmless"] = mean_with_ci(kl_rows(base_lp_harmless, lp).tolist(), e["n_boot"], cfg["seed"])
    if base_harmless is not None:
        res["ce_harmless"] = round(completion_ce(bundle, [p.text for p in sets.harmless], [c["ids"] for c in base_harmless],
                                                 e["fwd_batch_size"]), 5)
    return res


def export_check(cfg, bundle, basis: torch.Tensor, prompts: Sequence[D.Prompt], out_dir: Path,
                 log=print) -> dict[str, Any]:
    """Export the orthogonalised model, reload it with plain ``from_pretrained`` and compare its
    last-token log-probs with run-time ablation through nnsight on the original weights.

    The export is a cached value like any other: written atomically with a sha256 manifest of every file
    and a key (the model's tag, the basis, the card), and reused only when every file hashes to its manifest
    and the key is the same; a corrupted export, or one without a manifest, is rebuilt, never trusted
    (:func:`refusal_rank.ablation.reusable_export`)."""
    from transformers import AutoModelForCausalLM

    from .ablation import export_orthogonalized, reusable_export, tensor_tag
    from .models import ModelBundle
    from .results import note_product

    card = {
        "title": f"{cfg['model']['name']} with a rank-{basis.shape[1]} refusal ablation baked into its weights",
        "base_model": cfg["model"].get("hub_id") or cfg["model"]["name"],
        "summary": "Notebook 02's K=1 attack: the refusal direction of notebook 01 projected out of every matrix that "
                   "writes to the residual stream, W <- (I - U U^T) W, so that the model cannot represent it.",
        "edit": "directional ablation as weight orthogonalisation (rank K = number of basis columns)",
        "rank": basis.shape[1], "basis_sha256_12": tensor_tag(basis),
        "matrices edited": "the token embedding, every attention output and MLP output matrix, and their biases; "
                           "tied input/output embeddings are untied first so that the unembedding is unchanged",
        "direction": "difference in means of harmful and harmless prompts at the selected layer and post-instruction "
                     "position (results/<profile>/direction.safetensors)",
        "profile": cfg["profile"], "dtype": str(bundle.dtype).removeprefix("torch."),
        "checked": "reloaded with from_pretrained and compared with run-time ablation (summary: attack_k1.export_check)",
    }
    key = {"model": model_tag(cfg, bundle), "basis": tensor_tag(basis), "shape": list(basis.shape), "card": card}
    if reusable_export(out_dir, key, log):
        note_product(out_dir)  # still the notebook's product: a selective --fresh empties it
    else:
        export_orthogonalized(bundle, basis, out_dir, card=card, key=key)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=bundle.dtype).to(bundle.device).eval()
    rb = ModelBundle(reloaded, bundle.tokenizer, bundle.name + "-export", bundle.n_layers, bundle.d_model,
                     bundle.n_post, bundle.refusal_token_ids, bundle.post_tokens)
    texts = [p.text for p in prompts]
    bs = cfg["eval"]["fwd_batch_size"]
    lp_export = last_token_logprobs(rb, texts, bs, desc="export")
    lp_runtime = last_token_logprobs(bundle, texts, bs, Ablation(basis), desc="runtime")
    del reloaded, rb
    return {"path": portable_path(out_dir), "max_abs_logprob_diff": round((lp_export - lp_runtime).abs().max().item(), 5),
            "kl_runtime_vs_export": round(kl_rows(lp_runtime, lp_export).mean().item(), 6), "n": len(texts)}


def portable_path(path: Path) -> str:
    """A path as the summary stores it: relative to the cache root (``<cache>/runs/...``) or the repository,
    so that two machines' summaries of the same run compare equal; other paths as given."""
    from .config import REPO_ROOT, cache_root

    p = Path(path).resolve()
    for root, name in ((cache_root().resolve(), "<cache>"), (REPO_ROOT.resolve(), ".")):
        try:
            return f"{name}/{p.relative_to(root).as_posix()}"
        except ValueError:
            continue
    return str(path)


def correlation_report(scores: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    return {"point_biserial": round(point_biserial(scores, labels), 4), "n": len(labels)}


def reselected_k1(cfg: dict[str, Any], bundle: ModelBundle, sets: TestSets) -> dict[str, Any]:
    """Notebook 01's procedure re-run on ``bundle``'s own weights (the attacker holds them), then the
    K=1 weight edit scored on the harmful test set (``filter_fallback``: the splits too few of whose
    prompts passed the refusal filter, with the number that did; see :func:`filtered_train_val`)."""
    from .ablation import orthogonalized

    tv = filtered_train_val(cfg, bundle, attacker=True)
    sel, _ = discover_direction(cfg, bundle, tv)
    with orthogonalized(bundle, sel.unit[:, None]):
        comps = completions(cfg, bundle, sets.harmful, desc=f"{bundle.name} K=1")
    starved = tv.filter_fallback
    return {"refusal_rate_harmful": rates_by_source(cfg, sets.harmful, comps),
            **({"filter_fallback": starved} if starved else {}),
            "direction": {"layer": sel.layer, "position": sel.position, "fallback": sel.fallback,
                          "refusal_score_val_ablated": round(sel.refusal_score, 4), "kl_harmless": round(sel.kl_harmless, 5),
                          # > 0 when adding the direction makes harmless prompts refused (Arditi et al.'s check);
                          # a fallback's direction failed it (or the KL filter) at every candidate checked
                          "induce_score_val": round(sel.induce_score, 4), "candidates_checked": len(sel.checked)}}
