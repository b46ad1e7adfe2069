"""Notebook 03's steps: train each variant once (resumable), export it, load it, evaluate it.

A trained variant is identified by the profile's model, the defense config (shared training knobs and
the variant's own weights) and the training prompts; its rolling checkpoint and the snapshots of its
trainable weights at every milestone (1x, 2x, 4x, 8x of the base budget) live under
``cache/<profile>/defense/<variant>-<key>/``. A model at a milestone is the original plus that snapshot,
merged in memory when it is loaded (no multi-GB export per milestone); beside each LoRA snapshot, a standard
peft adapter folder (``adapter-NNNNN/``, with a model card) lets others load it without this code. Every
variant in ``[defense] run`` trains to the first milestone; those in ``[defense] budget_curve`` to the last.
An interrupted run resumes from its last checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import data as D
from .config import config_hash
from .generation import cache_key
from .models import ModelBundle, bundle_from_pretrained, checkpoint_dir, save_verified, verify_manifest
from .results import run_cache, run_cache_path
from .training import (TeacherCache, TrainState, Variant, attach_lora, load_snapshot, milestone_steps, snapshot_digest, snapshot_path,
                       teacher_cache, train)


def defense_prompts(cfg: dict[str, Any]) -> tuple[list[D.Prompt], list[D.Prompt]]:
    n = cfg["defense"]["n_train_per_class"]
    return (D.split_prompts("harmful_defense", n, cfg["seed"]), D.profile_split(cfg, "harmless_defense", n))


def defense_layers(cfg: dict[str, Any], n_layers: int) -> list[int]:
    return list(cfg["defense"].get("layers") or range(n_layers))


def default_variants(cfg: dict[str, Any]) -> list[str]:
    """The variants notebook 03 trains when none are named: ``[defense] run``, else every configured one."""
    dc = cfg["defense"]
    names = list(dc.get("run") or dc["variants"])
    bad = [n for n in names if n not in dc["variants"]]
    if bad:
        raise ValueError(f"[defense] run names unknown variant(s) {bad}: configured are {', '.join(dc['variants'])}")
    return names


TRAIN_CODE = "mb-sorted"
MOMENT_CODE = "batch-moments+teacher-spread"


def variant_dir(cfg: dict[str, Any], name: str) -> Path:
    """A variant's folder in the run cache (created): :func:`variant_dir_name` under ``defense/``."""
    return run_cache(cfg, "defense", variant_dir_name(cfg, name))


def variant_path(cfg: dict[str, Any], name: str) -> Path:
    """The same folder as :func:`variant_dir`, not created: for the code that only reads it."""
    return run_cache_path(cfg, "defense", variant_dir_name(cfg, name))


def variant_dir_name(cfg: dict[str, Any], name: str) -> str:
    """``<name>-<key>``: the key hashes everything that determines the trained weights, the model's
    resolved dtype included (a bf16 and a float32 run of one profile are two runs). Creates nothing."""
    harm, ok = defense_prompts(cfg)
    dc = cfg["defense"]
    # what determines the trained weights (not the variants' siblings, not the targets they are judged by,
    # not which of them notebook 03 runs by default)
    # share_prefix only changes how the same losses are computed (tested equal), so it is left out too
    shared = {k: v for k, v in dc.items() if k not in ("variants", "targets", "run", "budget_curve", "eval", "screen")}
    variant = dc["variants"][name]
    moments = bool(variant.get("lambda_cov") or variant.get("lambda_mean"))
    # the moment terms' knobs cannot change a variant without moment terms (its key stays when they change)
    moment_knobs = () if moments else ("moment_pairings",)
    shared["train"] = {k: v for k, v in shared["train"].items() if k != "share_prefix" and k not in moment_knobs}
    # TRAIN_CODE names changes of the training code that change the update for the same config (bump it then):
    # "mb-sorted": micro-batches cut by real token counts. MOMENT_CODE, for variants with moment terms only:
    # "batch-moments": the terms read the whole step's batch at the current weights (no detached memory),
    # their covariance pairs drawn at random; "teacher-spread": the spread anchor's reference is the teacher's
    # spread on the same batch
    code = TRAIN_CODE + (f"+{MOMENT_CODE}" if moments else "")
    key = cache_key(cfg["model"], shared, code,
                    dc["variants"][name],
                    [p.id for p in harm + ok])
    return f"{name}-{key}"


def dir_dtypes(cfg: dict[str, Any], names: Sequence[str]) -> dict[str, str]:
    """Folder name -> dtype, for these variants under every concrete dtype the config accepts: which dtype a
    committed run's folder stands for (a CPU resolves ``dtype = "auto"`` by its kind, and the dtype is part of
    the folder's key)."""
    from .config_schema import DTYPES

    return {variant_dir_name({**cfg, "model": {**cfg["model"], "dtype": dtype}}, n): dtype
            for dtype in DTYPES if dtype != "auto" for n in names}


def check_prompt_texts(cfg: dict[str, Any], name: str, out: Path) -> None:
    """A variant's directory is keyed by its training prompts' ids (the key of the variants trained before
    prompt texts entered cache keys); the digest of their texts is kept beside the weights
    (``prompts.sha256``) and checked on every use, so that a variant trained on other texts under the same
    ids is never reused silently. A directory without the file (trained before it existed) gets it."""
    from .pipeline import prompt_key

    harm, ok = defense_prompts(cfg)
    digest = prompt_key(harm + ok)["texts_sha256"]
    side = out / "prompts.sha256"
    if side.is_file():
        if side.read_text().strip() != digest:
            raise ValueError(f"variant {name!r} in {out} was trained on other prompt texts than data/ now holds under the "
                             f"same ids: move that directory away to retrain it, or restore the prompt files.")
    elif out.is_dir():
        side.write_text(digest + "\n")


def cached_teacher(cfg: dict[str, Any], bundle: ModelBundle, texts: list[str], layers: list[int],
                   per_position: bool = False) -> TeacherCache:
    from .pipeline import CACHE_VERSION, cached_value

    # the teacher is the original model whatever the student is called: one cache for every variant
    key = cache_key(f"v{CACHE_VERSION}:{config_hash(cfg, 'model')}:original", texts, layers, bundle.n_post,
                    "with-prompt-pooling", "with-site-vectors", *(["per-position"] if per_position else []))
    return cached_value(run_cache(cfg, "teacher") / f"{key}.pt",
                        lambda: teacher_cache(bundle, texts, layers, cfg["eval"]["fwd_batch_size"], per_position))


def budget_label(cfg: dict[str, Any], step: int) -> str:
    """'1x', '2x', ...: a step's prompt passes as a multiple of the first milestone's."""
    first = milestone_steps(cfg["defense"]["train"])[0]
    ratio = step / first
    return f"{ratio:g}x"


def prompt_passes(cfg: dict[str, Any], step: int) -> int:
    return int(step * 2 * cfg["defense"]["train"]["batch_per_class"])


def target_step(cfg: dict[str, Any], name: str) -> int:
    """How far a variant trains by default: the last milestone for the budget curve, else the first."""
    ms = milestone_steps(cfg["defense"]["train"])
    return ms[-1] if name in (cfg["defense"].get("budget_curve") or []) else ms[0]


def reached_milestones(cfg: dict[str, Any], name: str) -> list[int]:
    """The milestones whose snapshot exists for this variant (in step order)."""
    out = variant_path(cfg, name)
    return [m for m in milestone_steps(cfg["defense"]["train"]) if snapshot_path(out / "ckpt.pt", m).is_file()]


def train_plan(cfg: dict[str, Any], names: list[str], on_record: dict[str, Sequence[int]] | None = None) -> list[tuple[str, int]]:
    """(variant, until-step) in the order the background queue trains them: every variant to 1x first, then
    the budget-curve variants (in ``budget_curve`` order, its priority) milestone by milestone, so that an
    interrupted queue always leaves a complete curve at a lower budget rather than one variant far ahead of
    the others.

    ``on_record``: variant -> the milestone steps a committed progress file already holds measured for the
    variant's current configuration (:func:`recorded_milestones`; a new machine retrains them). Milestones that
    every curve variant has on record are a complete curve already, so through them and the first milestone
    beyond, the plan takes one variant at a time: the first variant of ``budget_curve`` reaches the new budget
    hours before the others, instead of all of them retraining the recorded ones first."""
    ms = milestone_steps(cfg["defense"]["train"])
    plan = [(n, ms[0]) for n in names]
    priority = list(cfg["defense"].get("budget_curve") or [])
    curve = sorted((n for n in names if target_step(cfg, n) > ms[0]), key=lambda n: priority.index(n) if n in priority else len(priority))
    rec = on_record or {}
    j = 1  # ms[1:j] are on record for every curve variant
    while j < len(ms) and curve and all(ms[j] in rec.get(n, ()) for n in curve):
        j += 1
    head = ms[1:j + 1]
    plan += [(n, m) for n in curve for m in head if target_step(cfg, n) >= m]
    for m in ms[j + 1:]:
        plan += [(n, m) for n in curve if target_step(cfg, n) >= m]
    return plan


def recorded_milestones(cfg: dict[str, Any], committed: dict[str, Any] | None) -> dict[str, list[int]]:
    """Variant -> the milestone steps a committed progress file (``results/<profile>/queue_progress.json``)
    holds measured for the variant's current configuration: the same folder name, which hashes every knob that
    determines the weights, the dtype included. Entries of another configuration do not count."""
    out: dict[str, list[int]] = {}
    for name, v in ((committed or {}).get("variants") or {}).items():
        if name in cfg["defense"]["variants"] and v.get("dir") == variant_dir_name(cfg, name):
            out[name] = sorted(int(e["step"]) for e in (v.get("budget") or {}).values() if "step" in e)
    return out


def train_variant(cfg: dict[str, Any], name: str, evaluate_factory=None, log=print, until: int | None = None) -> dict[str, Any]:
    """Train (or resume, or reuse) one variant up to step ``until`` (default: ``target_step``); returns its
    training record (history, evals, time), the same record whatever step it was reused at."""
    out = variant_dir(cfg, name)
    until = until or target_step(cfg, name)
    if until not in milestone_steps(cfg["defense"]["train"]):
        raise ValueError(f"train {name!r} until step {until}: not a milestone of defense.train ({milestone_steps(cfg['defense']['train'])})")
    record_path = out / "record.json"
    started_here = not any(out.iterdir())  # a variant this run starts (not one a background training or an earlier notebook made)
    check_prompt_texts(cfg, name, out)
    if record_path.is_file() and snapshot_path(out / "ckpt.pt", until).is_file():
        record = json.loads(record_path.read_text())
        if record["steps"] >= until:
            return record
    if started_here:
        from .results import note_product

        note_product(out)
    bundle = bundle_from_pretrained(checkpoint_dir(cfg, log=log), cfg, name=f"{name}-student")
    harm, ok = defense_prompts(cfg)
    layers = defense_layers(cfg, bundle.n_layers)
    dc = cfg["defense"]
    variant = Variant.from_cfg(name, dc["variants"][name])
    teacher = cached_teacher(cfg, bundle, [p.text for p in harm + ok], layers, variant.moment_sites == "positions")
    peft_model = _trainable(cfg, bundle)
    evaluate = evaluate_factory(bundle) if evaluate_factory else None
    from .bench import forward_flops_per_token, matmul_peak_gflops

    peak = matmul_peak_gflops(bundle.dtype, n=1024)  # this process's peak, beside the steps it times
    state: TrainState = train(bundle, variant, dc["train"], [p.text for p in harm], [p.text for p in ok], teacher,
                              layers, out / "ckpt.pt", evaluate=evaluate, stop_at=until, log=log)
    record = {"variant": variant.__dict__, "steps": state.step, "seconds": round(state.seconds, 1), "tokens": state.tokens,
              "padded_tokens": state.padded_tokens, "computed_tokens": state.computed_tokens,
              "moment_tokens": state.moment_tokens,
              "tokens_per_s": round(state.tokens / max(state.seconds, 1e-9), 2), "history": state.history, "evals": state.evals,
              "milestones": {budget_label(cfg, m): m for m in milestone_steps(dc["train"]) if m <= state.step},
              # a LoRA step costs ~4 x parameters a token (forward, backward into the activations); full: ~6 x
              "peak_gflops": round(peak, 2), "flops_per_token": (2 if peft_model is not None else 3) * forward_flops_per_token(bundle.model)}
    if peft_model is not None:  # full fine-tuning has no adapter: its snapshot is every trained weight
        try:  # a convenience copy for others: its failure must not stop a many-hour queue nor hide the record
            write_adapters(cfg, name, peft_model, out, state.step, log=log)
        except Exception as e:  # noqa: BLE001 - reported, and retried by write_adapters on the next call
            log(f"{name}: the peft adapter folders were not written ({type(e).__name__}: {e}); the verified "
                f"snapshots are intact, and defense_run.write_adapters can write them later")
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(record_path)
    del peft_model
    return record


def adapter_card(cfg: dict[str, Any], name: str, step: int) -> dict[str, Any]:
    """The model card's facts for a variant's peft adapter folder at milestone ``step``: what was trained
    (the variant, its objective weights with the defaults filled in, the LoRA shape), for how long (steps
    and prompt passes) and on which prompts."""
    dc = cfg["defense"]
    variant = Variant.from_cfg(name, dc["variants"][name])
    lora = dc["lora"]
    return {
        "title": f"LoRA adapter: {cfg['model']['name']}, notebook 03's {name} variant at step {step} "
                 f"({budget_label(cfg, step)})",
        "base_model": cfg["model"].get("hub_id") or cfg["model"]["name"],
        "library_name": "peft",
        "summary": "Defensive post-training of the refusal-rank artifact (docs/method.md): the original model trained so "
                   "that its refusal is harder to remove by ablating a few directions of the residual stream. This "
                   "folder holds only the LoRA adapter; load it onto the base model with "
                   "`PeftModel.from_pretrained(base, folder)` (merge it with `merge_and_unload()` for a plain model).",
        "variant": name,
        "lambdas": {k: v for k, v in variant.__dict__.items() if k.startswith("lambda_")},
        "objective weights": dc["variants"][name],
        "training": f"LoRA (peft, r={lora['r']}, alpha={lora['alpha']}, on {', '.join(lora['targets'])})",
        "steps": step, "prompt passes": prompt_passes(cfg, step),
        "training prompts": f"{dc['n_train_per_class']} a class: data/splits.json's harmful_defense, and harmless_defense "
                            f"of {cfg['data'].get('harmless_hub') or 'data/harmless.jsonl'}",
        "profile": cfg["profile"], "dtype": cfg["model"].get("dtype"),
    }


def write_adapters(cfg: dict[str, Any], name: str, peft_model, out: Path, last_step: int, log=print) -> list[Path]:
    """After training, a peft adapter folder (with its model card) for every milestone snapshot up to
    ``last_step`` that lacks a current one (:mod:`refusal_rank.adapters`). Written here, once train() has
    returned, rather than by a callback at each milestone: train() stays unaware of peft, and snapshots
    an older run (or an interrupted one) left without a folder get theirs at the next training call. The
    snapshot stays what the project loads; ``peft_model`` ends holding the last folder's weights."""
    from .adapters import export_adapters

    step_of = {snapshot_path(out / "ckpt.pt", m): m for m in milestone_steps(cfg["defense"]["train"]) if m <= last_step}
    return export_adapters(peft_model, list(step_of), lambda p: adapter_card(cfg, name, step_of[p]),
                           cfg["model"].get("hub_id") or cfg["model"]["name"], log=log)


def _trainable(cfg: dict[str, Any], bundle: ModelBundle):
    """Make the bundle's model trainable as the profile says (LoRA adapters, or every weight but the
    embedding); returns the PeftModel or None."""
    dc = cfg["defense"]
    if dc["method"] == "lora":
        peft_model = attach_lora(bundle.model, dc["lora"], cfg["seed"])
        bundle._nnsight = None  # rebuild the nnsight wrapper over the adapted modules
        return peft_model
    if dc["method"] == "full":
        bundle.model.requires_grad_(True)
        bundle.model.get_input_embeddings().requires_grad_(False)
        return None
    raise ValueError(f"defense.method must be 'lora' or 'full', not {dc['method']!r}")


def variant_model_name(cfg: dict[str, Any], name: str, step: int) -> str:
    """A variant's model name at a milestone, which keys every cache of what that model computes. The
    snapshot's digest is part of it: a variant retrained under the same folder is a new model, never one
    whose completions are reused."""
    vdir = variant_path(cfg, name)
    return checkpoint_name(vdir.name, step, snapshot_digest(snapshot_path(vdir / "ckpt.pt", step)) or "unverified")


def checkpoint_name(folder: str, step: int, digest: str) -> str:
    """The model name of a variant folder's snapshot at ``step`` with sha256 ``digest`` (see
    :func:`variant_model_name`); hand labels record it, and the README's progress table matches on it."""
    return f"{folder}@{step}:{digest[:12]}"


def load_variant(cfg: dict[str, Any], name: str, step: int | None = None) -> ModelBundle:
    """The original model with a variant's trainable weights at milestone ``step`` (default: the variant's
    target), merged: a plain model that every notebook reads like the original."""
    step = step or target_step(cfg, name)
    vdir = variant_dir(cfg, name)
    snap = snapshot_path(vdir / "ckpt.pt", step)
    if not snap.is_file():
        raise FileNotFoundError(f"variant {name!r} has no snapshot at step {step} in {vdir}: train it first "
                                f"(notebook 03, or tools/train_variant.py --variant {name}).")
    check_prompt_texts(cfg, name, vdir)
    bundle = bundle_from_pretrained(checkpoint_dir(cfg), cfg, name=variant_model_name(cfg, name, step))
    peft_model = _trainable(cfg, bundle)
    load_snapshot(snap, bundle.model)  # the adapted modules, named as train() saved them (checked against the digest)
    model = peft_model.merge_and_unload() if peft_model is not None else bundle.model
    model.requires_grad_(False)
    model.eval()
    bundle.model = model
    bundle._nnsight = None
    return bundle


def periodic_eval(cfg: dict[str, Any], tv, base_lp_harmless_val: torch.Tensor):
    """Factory for the callback run every ``eval_every`` steps on val: harmful refusal score, harmless
    first-token KL against the original, and the strongest K=1 attack over a coarse candidate grid
    (difference in means of the *current* weights; the lowest ablated harmful refusal score)."""
    from .activations import Ablation, collect_residuals, last_token_logprobs
    from .directions import candidate_grid
    from .metrics import kl_rows, refusal_score

    ec = cfg["defense"]["eval"]

    def factory(bundle: ModelBundle):
        bs = cfg["eval"]["fwd_batch_size"]
        harm_val = [p.text for p in tv.harmful_val]
        ok_val = [p.text for p in tv.harmless_val]
        harm_tr = [p.text for p in tv.harmful_train[:ec["n_dim_prompts"]]]
        ok_tr = [p.text for p in tv.harmless_train[:ec["n_dim_prompts"]]]

        def evaluate(step: int) -> dict[str, Any]:
            with torch.no_grad():
                s = refusal_score(last_token_logprobs(bundle, harm_val, bs, desc="val"), bundle.refusal_token_ids)
                kl = kl_rows(base_lp_harmless_val, last_token_logprobs(bundle, ok_val, bs, desc="val")).mean().item()
                grid = candidate_grid(bundle.n_layers, bundle.n_post, cfg["directions"]["drop_last_frac"], ec["layer_stride"],
                                      ec.get("positions") or None)
                layers = sorted({l for l, _ in grid})
                h = collect_residuals(bundle, harm_tr, bs, layers=layers, desc="dim").double().mean(0)
                o = collect_residuals(bundle, ok_tr, bs, layers=layers, desc="dim").double().mean(0)
                best = (float("inf"), None)
                for l, p in grid:
                    v = h[layers.index(l), p] - o[layers.index(l), p]
                    if v.norm() < 1e-6:
                        continue
                    u = (v / v.norm())[:, None]
                    sc = refusal_score(last_token_logprobs(bundle, harm_val, bs, Ablation(u), desc="k1"),
                                       bundle.refusal_token_ids).mean().item()
                    best = min(best, (sc, (l, p)), key=lambda t: t[0])
            return {"val_refusal_score": round(s.mean().item(), 4), "val_kl_harmless": round(kl, 5),
                    "k1_best_ablated_score": round(best[0], 4), "k1_best_candidate": best[1]}

        return evaluate

    return factory


def target_checks(base: dict[str, Any], res: dict[str, Any], t: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The defense's targets for one trained model against the original, each with the measured values and
    whether it is met (point estimates; the intervals are in the table beside it). ``t`` holds the
    tolerances of the profile's ``[defense.targets]``."""
    rate = lambda r, k: (r.get(k) or {}).get("rate")
    b_h, d_h = rate(base, "refusal_rate_harmful"), rate(res, "refusal_rate_harmful")
    out: dict[str, dict[str, Any]] = {}
    out["harmful_refusal_within"] = {"base": b_h, "model": d_h,
                                     "met": d_h is not None and b_h is not None and abs(d_h - b_h) <= t["harmful_within"]}
    for key in ("refusal_rate_harmless", "overrefusal_rate"):
        b, d = rate(base, key), rate(res, key)
        out[f"{key}_not_higher"] = {"base": b, "model": d, "met": d is not None and b is not None and d <= b + t["benign_rise"]}
    kl = (res.get("kl_harmless") or {}).get("mean")
    out["kl_harmless"] = {"model": kl, "max": t["max_kl"], "met": kl is not None and kl <= t["max_kl"]}
    b_ce, d_ce = base.get("ce_harmless"), res.get("ce_harmless")
    b_ce = b_ce.get("mean") if isinstance(b_ce, dict) else b_ce
    out["ce_harmless_within"] = {"base": b_ce, "model": d_ce,
                                 "met": d_ce is not None and b_ce is not None and d_ce <= b_ce * (1 + t["ce_rel"])}
    k1 = rate(res.get("attack_k1") or {}, "refusal_rate_harmful")
    out["k1_attack_resisted"] = {"model": d_h, "under_k1": k1, "ratio": (round(k1 / d_h, 4) if k1 is not None and d_h else None),
                                 "met": k1 is not None and d_h is not None and d_h > 0 and k1 >= t["k1_fraction"] * d_h}
    return out


def attack_screen(cfg: dict[str, Any], bundle: ModelBundle, sets) -> dict[str, Any]:
    """The cheap attack screen of every budget checkpoint (``[defense.screen]``), each basis from the
    checkpoint's own activations on the attackers' prompts, each K applied as a weight edit, each rate a
    generated, marker-judged harmful refusal rate on the sweep's test prompts:
    the re-selected K=1 attack (notebook 01's procedure), the first rounds of the paper's iterated
    attacker, and dim-svd at a few K. The lowest K among them whose rate is below the sweep's threshold
    is the screen's K_break (None: none broke within the screen). With ``stop_after_break`` a K at or above
    the lowest K that already broke (in any estimator, the re-selected K=1 attack first) is skipped
    (``k_skipped``), not generated: it cannot lower the screen's K_break."""
    import functools
    import math

    from . import sweep_run as S
    from .pipeline import reselected_k1

    import copy

    sc = cfg["defense"]["screen"]
    thr = cfg["sweep"]["threshold"]
    # a screen, not the final sweep: the paper's attacker on a coarser layer grid (said in the config);
    # notebook 04 runs it on its full grid at the final checkpoints
    cfg = copy.deepcopy(cfg)
    cfg["sweep"]["iterated_layer_stride"] = sc.get("iterated_layer_stride", cfg["sweep"]["iterated_layer_stride"])
    prompts = S.sweep_test_set(cfg)
    out: dict[str, Any] = {"k1_reselected": reselected_k1(cfg, bundle, sets)}
    stop = bool(sc.get("stop_after_break", False))
    # the attacker's activations and the dim-svd basis, built on first use: a screen whose K=1 attack already
    # broke the model skips every other K and needs neither
    ctx = functools.cache(lambda: S.attack_context(cfg, bundle))
    dim_basis = functools.cache(lambda: S.estimator_basis(ctx(), "dim-svd", max(sc["dim_svd_ks"]))["basis"])

    def at_k(U: torch.Tensor) -> dict[str, Any]:
        r = S.evaluate_k(cfg, bundle, U, prompts, math.inf)
        return {"refusal_rate_harmful": r["refusal_rate_harmful"], "mean_score": r["mean_score"]}

    def iterated_k(k: int) -> dict[str, Any] | None:  # the paper's attacker, extended one round at a time
        it = S.iterated_basis(ctx(), k)
        return at_k(it.basis[:, :k]) if it.basis.shape[1] >= k else None  # None: it stopped before round k

    def dim_k(k: int) -> dict[str, Any] | None:
        return at_k(dim_basis()[:, :k]) if k <= dim_basis().shape[1] else None

    # the screen's K_break is the lowest K that broke in any estimator: with stop_after_break a K at or above
    # the lowest break found so far (the re-selected K=1 attack's included) cannot lower it and is skipped
    k1 = out["k1_reselected"]["refusal_rate_harmful"]
    k1_rate = k1.get("rate") if "rate" in k1 else (k1.get("all") or {}).get("rate")
    broke = [1] if k1_rate is not None and k1_rate < thr else []
    out["k_skipped"] = {}
    for name, ks, fn in (("iterated", range(1, sc["iterated_rounds"] + 1), iterated_k), ("dim-svd", sc["dim_svd_ks"], dim_k)):
        out[name], out["k_skipped"][name] = screen_walk(ks, fn, thr, stop, min(broke, default=None))
        broke += [int(k) for k, r in out[name].items() if r["refusal_rate_harmful"]["rate"] < thr]
    out["k_break"] = min(broke) if broke else None
    out["k_screened"] = sorted({1, *map(int, out["iterated"]), *map(int, out["dim-svd"])})  # measured, not skipped
    return out


def screen_walk(ks: Sequence[int], measure, threshold: float, stop_after_break: bool,
                below: int | None = None) -> tuple[dict[str, Any], list[int]]:
    """One estimator's K of the attack screen, in increasing order: ``measure(k)`` gives ``{"refusal_rate_harmful":
    {"rate": ...}, ...}`` or None (the estimator has no K-th direction: the walk ends). With ``stop_after_break``
    the K after the first one whose rate is below ``threshold`` are not measured, nor any K at or above
    ``below`` (the lowest K another part of the same screen already broke): the screen reads the lowest K that
    breaks, and a K that cannot lower it costs a generation pass for nothing. Those K are returned as skipped."""
    out: dict[str, Any] = {}
    ks = sorted(int(k) for k in ks)
    for i, k in enumerate(ks):
        if stop_after_break and below is not None and k >= below:
            return out, ks[i:]
        r = measure(k)
        if r is None:
            break
        out[str(k)] = r
        if stop_after_break and r["refusal_rate_harmful"]["rate"] < threshold:
            return out, ks[i + 1:]
    return out, []


def checkpoint_eval(cfg: dict[str, Any], name: str, step: int, sets, base_harmless: list[dict[str, Any]],
                    base_lp: torch.Tensor, log=print) -> dict[str, Any]:
    """Notebook 03's measurements of one variant at one milestone: ``{"res": ..., "screen": ...}``, the
    utility (``pipeline.evaluate_model`` against the original, completions included) and the attack screen,
    with ``res["attack_k1"]`` the screen's re-selected K=1 attack.

    Cached beside the variant's weights, keyed by the snapshot's sha256 and every config section the two
    read, so the background queue (``train-variant --plan --evaluate``) can measure each checkpoint as soon
    as it is trained, one model job at a time, and the notebook reuses the result instead of recomputing it
    (about half an hour a checkpoint on 2 CPU cores)."""
    from .pipeline import cached_value, evaluate_model

    path = checkpoint_eval_path(cfg, name, step, sets)
    if path is None:
        raise FileNotFoundError(f"variant {name!r} has no verified snapshot at step {step} in "
                                f"{variant_path(cfg, name)}: train it first.")

    def compute() -> dict[str, Any]:
        model = load_variant(cfg, name, step)
        res = evaluate_model(cfg, model, sets, base_harmless, base_lp, f"{name}@{step}")
        screen = attack_screen(cfg, model, sets)
        res["attack_k1"] = screen["k1_reselected"]
        return {"res": res, "screen": screen}

    return cached_value(path, compute, log)


def checkpoint_eval_path(cfg: dict[str, Any], name: str, step: int, sets) -> Path | None:
    """Where :func:`checkpoint_eval` keeps one checkpoint's measurements (whether or not they exist yet), or
    None when the variant has no verified snapshot at that step. The key holds the snapshot's sha256 and
    every config section the measurements read, so a file found here measured exactly this checkpoint under
    exactly this config."""
    from .pipeline import CACHE_VERSION, prompt_key

    vdir = variant_path(cfg, name)
    digest = snapshot_digest(snapshot_path(vdir / "ckpt.pt", step))
    if digest is None:
        return None
    key = cache_key(f"v{CACHE_VERSION}", digest, cfg["seed"],
                    config_hash(cfg, "model", "data", "directions", "eval", "sweep"), cfg["defense"]["screen"],
                    {k: prompt_key(v) for k, v in sets.items()})
    return vdir / f"eval-{step:05d}-{key}.pt"


def checkpoint_moment_diagnostics(cfg: dict[str, Any], name: str, step: int) -> dict[str, Any]:
    """The moment diagnostics of a variant at a trained milestone (step 0: the original model, which is the
    student before its first update), recomputed with the current library on the same fixed prompts, sites
    and batch size as training measured them. For checkpoints trained before a diagnostic existed (the
    covariance and mean-gap parts of the top eigenvalue); a milestone's recorded values are reproduced up to
    merging the adapters into the weights (tested on tiny)."""
    import gc

    from .models import load_model
    from .training import moment_diagnostics

    dc = cfg["defense"]
    tcfg = dc["train"]
    variant = Variant.from_cfg(name, dc["variants"][name])
    harm, ok = defense_prompts(cfg)
    n = int(tcfg.get("diag_prompts", 0))
    if n < 2:
        raise ValueError(f"defense.train.diag_prompts is {n} in {cfg['_path']}: the diagnostics need >= 2 prompts a class")
    vdir = variant_path(cfg, name)
    if step and not snapshot_path(vdir / "ckpt.pt", step).is_file():  # before any model loads
        raise FileNotFoundError(f"variant {name!r} has no snapshot at step {step} in {vdir}: train it first.")
    original = load_model(cfg)
    layers = defense_layers(cfg, original.n_layers)
    # the teacher is the original's, whatever is measured: read (or computed) before any variant is loaded
    teacher = cached_teacher(cfg, original, [p.text for p in harm + ok], layers, variant.moment_sites == "positions")
    if step:
        del original
        gc.collect()
        bundle = load_variant(cfg, name, step)
    else:
        bundle = original
    rows = (list(range(min(n, len(harm)))), [len(harm) + i for i in range(min(n, len(ok)))])
    batch = 2 * tcfg["batch_per_class"] // int(tcfg.get("micro_batches", 1))
    return moment_diagnostics(bundle, variant, teacher, layers, [p.text for p in harm[:n]], [p.text for p in ok[:n]],
                              batch, rows)


class _CachedOnly:
    """A model's stand-in for reading its caches without loading it: the name, weight edit and template
    facts that cache keys read. Anything a computation would need is missing, so a cache miss stops with
    :class:`FileNotFoundError` instead of computing."""

    def __init__(self, name: str, edit: str, n_post: int):
        self.name, self.edit, self.n_post = name, edit, n_post

    def __getattr__(self, attr: str):
        raise FileNotFoundError(f"{self.name}: a value this needs is not in the cache (it would need the "
                                f"model's {attr!r}); measure the checkpoint first")


def screen_k1_completions(cfg: dict[str, Any], name: str, step: int, sets) -> list[dict[str, Any]]:
    """The harmful-test completions of one checkpoint under the attack screen's re-selected K=1 attack,
    read from the caches alone (no model is loaded), e.g. for hand labelling: the screen's measurement names
    the layer and position it chose; the checkpoint's cached difference in means there, made a unit vector as
    notebook 01's selection makes it, names the weight edit whose generations were cached. The marker rate
    of what is read must equal the one the screen recorded, or the wrong file was found and this stops."""
    from transformers import AutoTokenizer

    from .ablation import edit_tag
    from .metrics import refusal_labels
    from .models import template_n_post
    from .pipeline import MISSING, completions_path, filtered_train_val, load_cached, mean_residuals, read_completions

    path = checkpoint_eval_path(cfg, name, step, sets)
    ev = MISSING if path is None else load_cached(path, lambda *_: None, remove_bad=False)
    if ev is MISSING:
        raise FileNotFoundError(f"{name} at step {step} has no cached measurement under this profile's config: "
                                f"run train-variant --evaluate (or notebook 03) first.")
    where = ev["screen"]["k1_reselected"]["direction"]
    tok = AutoTokenizer.from_pretrained(checkpoint_dir(cfg))
    n_post, _ = template_n_post(tok, cfg["model"])
    model = _CachedOnly(variant_model_name(cfg, name, step), "", n_post)
    tv = filtered_train_val(cfg, model, attacker=True)
    v = (mean_residuals(cfg, model, tv.harmful_train, "") - mean_residuals(cfg, model, tv.harmless_train, ""))[where["layer"], where["position"]]
    model.edit = edit_tag((v / v.norm())[:, None])
    comps = read_completions(completions_path(cfg, model, sets.harmful), len(sets.harmful))
    labels = refusal_labels([c["text"] for c in comps])
    recorded = ev["screen"]["k1_reselected"]["refusal_rate_harmful"]["rate"]
    if abs(sum(labels) / len(labels) - recorded) > 5e-4:  # the recorded rate is rounded
        raise RuntimeError(f"{name}@{step}: the completions found read a refusal rate of {sum(labels) / len(labels):.4f}, "
                           f"the screen recorded {recorded}: not the screen's generations")
    return comps


def committed_progress(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The profile's committed ``results/<profile>/queue_progress.json``, or None (none yet, or another
    profile's)."""
    from .results import progress_path

    path = progress_path(cfg["profile"])
    doc = json.loads(path.read_text()) if path.is_file() else None
    return doc if doc is not None and doc.get("profile") == cfg["profile"] else None


def carried_entry(cfg: dict[str, Any], name: str, step: int, sets, committed: dict[str, Any] | None) -> dict[str, Any] | None:
    """The committed budget entry of this very measurement, or None. A new machine retrains every checkpoint;
    where a retrained snapshot is bitwise the one measured before, under the same measurement config and test
    prompts, the committed entry is that measurement, and re-measuring it would cost about half an hour a
    checkpoint for the same numbers. The test is one name: the entry's ``eval_file`` is the measurement's
    cache file, whose key holds the snapshot's sha256, the seed, every config section the measurement reads
    and the test prompts (:func:`checkpoint_eval_path`), so it equals this checkpoint's only when all of them
    do. The entry comes back marked ``carried_from_commit``."""
    return _carried_at(checkpoint_eval_path(cfg, name, step, sets), name, committed)


def _carried_at(path: Path | None, name: str, committed: dict[str, Any] | None) -> dict[str, Any] | None:
    """:func:`carried_entry` for a measurement cache path already computed (None: no verified snapshot)."""
    v = (((committed or {}).get("variants") or {}).get(name)) or {}
    if path is None or v.get("dir") != path.parent.name:
        return None
    for e in (v.get("budget") or {}).values():
        if e.get("eval_file") == path.name:
            return {**e, "carried_from_commit": e.get("carried_from_commit") or committed.get("read_at_commit")}
    return None


def milestone_budget(cfg: dict[str, Any], name: str, step: int, sets,
                     original: Callable[[], tuple[list[dict[str, Any]], torch.Tensor]],
                     committed: dict[str, Any] | None = None, log=print) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One milestone's budget entry and its full measurement (:func:`checkpoint_eval`). A milestone below the
    variant's last (whose completions no later notebook reads) that this cache has not measured takes the
    committed entry of the same measurement where there is one (:func:`carried_entry`); the measurement is
    then None. The last milestone is always measured here: notebooks 03-05 read its completions.
    ``original()`` gives the original's harmless completions and log-probs, called only when measuring (so a
    carried milestone loads no model)."""
    path = checkpoint_eval_path(cfg, name, step, sets)
    if step != target_step(cfg, name) and path is not None and not path.is_file():
        carried = _carried_at(path, name, committed)
        if carried is not None:
            log(f"{name}@{budget_label(cfg, step)}: the committed measurement (commit {carried['carried_from_commit']}) "
                f"is of this very checkpoint and config ({path.name}): carried, not re-measured")
            return carried, None
    ev = checkpoint_eval(cfg, name, step, sets, *original(), log)
    return budget_entry(cfg, step, ev["res"], ev["screen"]), ev


def queue_progress(cfg: dict[str, Any], sets, names: Sequence[str] | None = None) -> dict[str, Any]:
    """What the background queue has trained and measured so far, read from the caches alone (no model is
    loaded): per variant, the milestones whose snapshot exists, ``training`` and ``moments`` from its
    training record (once one exists), and ``budget``: notebook 03's entry for every checkpoint already
    measured, with the snapshot's sha256 and the measurement's file name, the two hops back to the weights
    and the cache. Checkpoints trained but not yet measured are listed under ``unmeasured``. Notebook 03
    computes the same entries from the same caches; this lets a many-session queue commit its finished
    measurements as they land."""
    from .pipeline import load_cached, MISSING

    out: dict[str, Any] = {}
    for name in names or default_variants(cfg):
        vdir = variant_path(cfg, name)
        entry: dict[str, Any] = {"dir": vdir.name, "dtype": cfg["model"]["dtype"], "target_step": target_step(cfg, name),
                                 "milestones": reached_milestones(cfg, name), "budget": {}, "unmeasured": []}
        record_path = vdir / "record.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            entry["training"] = training_entry(record, record.get("peak_gflops"), record.get("flops_per_token"))
            entry["moments"] = moments_entry(record)
        for step in entry["milestones"]:
            path = checkpoint_eval_path(cfg, name, step, sets)
            ev = MISSING if path is None else load_cached(path, lambda *_: None, remove_bad=False)
            if ev is MISSING:
                entry["unmeasured"].append(step)
                continue
            e = budget_entry(cfg, step, ev["res"], ev["screen"])  # it keeps its own keys, never the completions
            e["snapshot_sha256"] = snapshot_digest(snapshot_path(vdir / "ckpt.pt", step))
            e["eval_file"] = path.name
            entry["budget"][budget_label(cfg, step)] = e
        out[name] = entry
    return out


def original_rates(cfg: dict[str, Any], sets) -> dict[str, Any] | None:
    """The original model's refusal rates on the three test sets, read from its cached completions (no model
    is loaded), as every checkpoint's measurement compares against them; None until all three are cached.
    The dtype is said beside them: a profile whose dtype is "auto" measures the original anew on a CPU that
    resolves it otherwise."""
    from types import SimpleNamespace

    from .pipeline import RATE_KEYS, completions_path, rates_by_source, read_completions

    stand_in = SimpleNamespace(name=cfg["model"]["name"], edit="")
    out: dict[str, Any] = {"dtype": cfg["model"]["dtype"]}
    for name, prompts in sets.items():
        try:
            comps = read_completions(completions_path(cfg, stand_in, prompts), len(prompts))
        except FileNotFoundError:  # not generated yet, or not finished
            return None
        out[RATE_KEYS[name]] = rates_by_source(cfg, prompts, comps)
    return out


def dtype_change(cfg: dict[str, Any], committed: dict[str, Any] | None) -> str | None:
    """One sentence when this machine would compute the profile in another dtype than its committed progress
    file was measured in, else None. The dtype enters every cache key: a queue started here would retrain and
    re-measure every variant from scratch in the other dtype, beside (not continuing) the committed budget
    curve, at this CPU's speed (an AVX2-only CPU resolves ``dtype = "auto"`` to float32, 5-10x slower than
    bf16 on one with AMX at the matmul peak). The queue asks before spending hours on that."""
    was = ((committed or {}).get("original") or {}).get("dtype")
    now = cfg["model"]["dtype"]
    if was is None or was == now:
        return None
    how = " (dtype = \"auto\" resolved by this CPU's measured matmul speed)" if cfg["model"].get("dtype_requested") == "auto" else ""
    return (f"this machine computes the {cfg['profile']} profile in {now}{how}, but its committed progress "
            f"(results/{cfg['profile']}/queue_progress.json) was measured in {was}: a queue here would retrain every "
            f"variant from scratch in {now} instead of continuing that run; run it on a CPU that gives {was}, or pass "
            f"--allow-dtype-change to start a separate {now} run on purpose.")


def merge_progress(committed: dict[str, Any] | None, current: dict[str, Any],
                   dtype_of_dir: dict[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """``current`` (``queue_progress`` of this machine's cache) completed by a committed progress file.

    A queue of many sessions may lose its cache (a new machine): writing the progress file from the cache
    alone would then erase measurements that were committed and are not yet retrained. A variant's committed
    ``training``, ``moments`` and budget entries are carried over where the cache has none, only when the
    variant's cache folder name (which hashes its configuration) is the same, and each carried budget entry
    says so (``carried_from_commit``). Where both hold a measured checkpoint, the cache's entry wins and a
    differing snapshot sha256 is reported: a retrained checkpoint that is not bitwise the same. A committed
    variant trained under another configuration (the same profile on a machine whose CPU resolved ``dtype =
    "auto"`` otherwise, say) is not a measurement of the current one, but it was measured: it is kept apart,
    under ``other_configurations``, by folder name, with its dtype where ``dtype_of_dir`` (folder name -> dtype,
    :func:`dir_dtypes`) knows it. Returns the merged variants and one line per carried entry, kept run or mismatch."""
    out = json.loads(json.dumps(current))
    notes: list[str] = []
    if not committed:
        return out, notes
    commit = committed.get("read_at_commit")
    for name, old in committed.get("variants", {}).items():
        new = out.get(name)
        if new is None:
            continue  # a variant the profile no longer runs
        for d, kept in old.get("other_configurations", {}).items():
            if d != new["dir"]:
                new.setdefault("other_configurations", {}).setdefault(d, kept)
        if old.get("dir") != new["dir"]:
            if old.get("budget") or "training" in old:
                kept = {k: old[k] for k in ("training", "moments", "budget") if old.get(k)}
                dtype = (dtype_of_dir or {}).get(old["dir"])
                kept = {**({"dtype": dtype} if dtype else {}), "read_at_commit": commit, **kept}
                new.setdefault("other_configurations", {}).setdefault(old["dir"], kept)
                notes.append(f"{name}: the committed run {old['dir']} was trained under another configuration"
                             + (f" ({dtype})" if dtype else "") + ": kept under other_configurations")
            continue
        for key in ("training", "moments"):
            if key not in new and key in old:
                new[key] = old[key]
                notes.append(f"{name}: {key} carried from the committed file (commit {commit})")
        for label, e in old.get("budget", {}).items():
            mine = new["budget"].get(label)
            if mine is None:
                new["budget"][label] = {**e, "carried_from_commit": e.get("carried_from_commit", commit)}
                notes.append(f"{name} {label}: carried from the committed file (commit {commit})")
            elif mine.get("snapshot_sha256") != e.get("snapshot_sha256"):
                notes.append(f"{name} {label}: the cache's snapshot differs from the committed one "
                             f"({str(mine.get('snapshot_sha256'))[:12]} vs {str(e.get('snapshot_sha256'))[:12]}): "
                             "the retrained checkpoint is not bitwise the same; the cache's entry is kept")
        new["budget"] = dict(sorted(new["budget"].items(), key=lambda kv: kv[1].get("step", 0)))
    return out, notes


def budget_entry(cfg: dict[str, Any], step: int, res: dict[str, Any], screen: dict[str, Any] | None) -> dict[str, Any]:
    """summary.json's ``budget.<variant>.<Nx>``: prompt passes, the utility rates and the screen."""
    keep = ("refusal_rate_harmful", "refusal_rate_harmless", "overrefusal_rate", "kl_harmless", "ce_harmless")
    return {"step": step, "prompt_passes": prompt_passes(cfg, step), **{k: res.get(k) for k in keep},
            "screen": screen}


def budget_headline(entry: dict[str, Any]) -> dict[str, Any]:
    """A budget entry's headline numbers, as the queue's log, ``refusal-rank progress`` and notebook 03's
    table show them: the rates, KL, CE, the re-selected K=1 attack's rate, whether its direction was a
    fallback (no candidate passed the selection's filters) and that direction's own first-token KL on
    harmless val (what the attack costs: a fallback may fail the KL filter), the splits whose refusal filter
    kept too few prompts for the attacker (it fitted on their most refusing ones instead), and the
    screen's K_break."""
    rate = lambda k: (entry.get(k) or {}).get("rate")
    screen = entry.get("screen") or {}
    k1 = screen.get("k1_reselected") or {}
    direction = k1.get("direction") or {}
    return {"harmful": rate("refusal_rate_harmful"), "harmless": rate("refusal_rate_harmless"),
            "overrefusal": rate("overrefusal_rate"), "kl": (entry.get("kl_harmless") or {}).get("mean"),
            "ce": entry.get("ce_harmless"), "k1_reselected": (k1.get("refusal_rate_harmful") or {}).get("rate"),
            "k1_fallback": direction.get("fallback"), "k1_kl": direction.get("kl_harmless"),
            "k1_filter_fallback": sorted(k1.get("filter_fallback") or {}) or None,
            "screen_k_break": screen.get("k_break")}


def moments_entry(record: dict[str, Any]) -> dict[str, Any] | None:
    """summary.json's ``moments.<variant>``, from the training record: the matched term's value at the
    start and end of training (means of the first and last ``n`` logged steps), its noise floor (the
    spread of the same term on two halves of the harmless class over training), and the moment
    diagnostics on fixed prompts before training and at the last milestone (top eigenvalue of the excess
    second moment, total variance, and the spread against the teacher's). None for variants without a
    moment term."""
    import statistics

    v = record["variant"]
    key = "cov" if v.get("lambda_cov") else "mean" if v.get("lambda_mean") else None
    diags = [e for e in record["evals"] if "moments" in e]
    out: dict[str, Any] = {}
    if key is not None:
        h = [x for x in record["history"] if key in x]
        n = max(1, min(5, len(h) // 4))
        nulls = [x[f"{key}_null"] for x in record["history"] if f"{key}_null" in x]
        out.update({"term": key, "start": round(statistics.fmean(x[key] for x in h[:n]), 6),
                    "end": round(statistics.fmean(x[key] for x in h[-n:]), 6),
                    "noise_floor": round(statistics.pstdev(nulls), 6) if len(nulls) > 1 else None,
                    "null_mean": round(statistics.fmean(nulls), 6) if nulls else None, "n_logged": len(h)})
    if diags:
        first, last = diags[0]["moments"], diags[-1]["moments"]
        out.update({"top_eig_before": first["top_eig"], "top_eig_after": last["top_eig"],
                    "total_var_before": first["total_var"], "total_var_after": last["total_var"],
                    "diag_steps": [diags[0]["step"], diags[-1]["step"]], "sites": first["sites"]})
        if "spread" in last:  # the spread against the teacher's on the same prompts (1: unchanged; runs since 6f4ce13)
            out.update({"spread_before": first.get("spread"), "spread_after": last["spread"]})
        for k in ("top_eig_cov", "gap_sq"):  # the top eigenvalue's two parts (diagnostics since these keys)
            if k in last:
                out.update({f"{k}_before": first.get(k), f"{k}_after": last[k]})
        if key is not None:
            out.update({"diag_before": first[key], "diag_after": last[key], "diag_null_before": first[f"{key}_null"],
                        "diag_null_after": last[f"{key}_null"]})
    return out or None


def training_entry(record: dict[str, Any], peak_gflops: float | None, flops_per_token: float | None) -> dict[str, Any]:
    """summary.json's ``training.<variant>``: step time, the rows' own tokens a second (each prompt counted
    as if run alone: the unit of the budgets) and, as a share of the peak, the FLOPs of the positions
    actually computed (``fraction_of_peak``: padding in, a shared prefix once, the moment terms' forward-only
    pass at half weight) and of the rows' tokens
    (``effective_fraction_of_peak``, above the other when a shared prefix saves work).

    These come from the run's own clock, so they include whatever ran beside a background run and any pause
    within a step; ``median_step_s`` (over the ``timed_steps`` whose history holds their seconds) is robust
    to both. The matched, alone measurement of the step is benchmarks/bench_training.py's."""
    import statistics

    tps = record["tokens_per_s"]
    out = {"steps": record["steps"], "seconds": record["seconds"], "tokens_per_s": tps,
           "padding_share": round(1 - record["tokens"] / max(record.get("padded_tokens") or record["tokens"], 1), 4)}
    timed = [h["sec"] for h in record.get("history", []) if "sec" in h]
    if timed:
        out.update(median_step_s=round(statistics.median(timed), 2), timed_steps=len(timed))
    computed = record.get("computed_tokens") or record.get("padded_tokens") or record["tokens"]
    computed += record.get("moment_tokens", 0) / 2  # the moment terms' forward-only pass: half the FLOPs a position
    out["computed_per_token"] = round(computed / max(record["tokens"], 1), 4)
    if peak_gflops and flops_per_token:
        out["fraction_of_peak"] = round(tps * out["computed_per_token"] * flops_per_token / 1e9 / peak_gflops, 4)
        out["effective_fraction_of_peak"] = round(tps * flops_per_token / 1e9 / peak_gflops, 4)
        out["peak_gflops"] = round(peak_gflops, 2)
    return out
