"""Notebook 05's steps: probe features of every model, every measure of :mod:`refusal_rank.probes` per
layer, the attackers' bases at the attacker's layer, and a reading of the numbers in words.

* Prompts: the probe split (:mod:`refusal_rank.probe_splits`), the same for every model and not filtered
  by the model's refusals (a probe measures the representation of harmful vs harmless requests; the
  attackers' refusal-filtered prompts would differ from model to model).
* Features: block-input residuals at the post-instruction positions, read once for every probed layer
  (cached); ``pooled`` is their mean (what the attackers read and the defence matches), ``last`` the
  last prompt token alone (the paper's lens: the final template token, after which the model answers).
* Layers: every ``layer_stride``-th layer, the last layer and the attacker's layer (so the last 20%,
  which no direction is selected from, is probed too).
* :func:`reading` turns the summary's numbers into one sentence per trained model: spread, moved,
  shrunk or left in place, with the numbers that decide it. Its thresholds are the profile's
  ``[probes.reading]``; it is a pure function of the summary, tested on synthetic numbers.
"""
from __future__ import annotations

import statistics
from typing import Any, Sequence

import numpy as np
import torch

from . import probes as Q
from .probe_splits import HARMFUL_SOURCES, probe_prompts, transfer_prompts


def probe_layers(n_layers: int, stride: int, extra: Sequence[int] = ()) -> list[int]:
    """Every ``stride``-th layer from 0, the last layer and ``extra`` (the attacker's layer), sorted."""
    return sorted(set(range(0, n_layers, max(1, int(stride)))) | {n_layers - 1} | {int(l) for l in extra})


def probe_sets(pc: dict[str, Any]) -> dict[str, Any]:
    """The probe prompts of a profile: {train, test: (harmful, harmless)}, the AdvBench-only train set
    for the transfer probe, and the over-refusal transfer set."""
    tr = probe_prompts("train", pc["n_train_per_source"])
    te = probe_prompts("test", pc["n_test_per_source"])
    adv = probe_prompts("train", pc["n_train_per_source"], sources=("advbench",))
    return {"train": tr, "test": te, "transfer_train": adv,
            "overrefusal": transfer_prompts("overrefusal", pc["n_overrefusal"])}


def labels_sources(harmful: Sequence[Any], harmless: Sequence[Any]) -> tuple[torch.Tensor, list[str]]:
    return (torch.cat([torch.ones(len(harmful)), torch.zeros(len(harmless))]),
            [p.source for p in harmful] + [p.source for p in harmless])


def probe_n(sets: dict[str, Any]) -> dict[str, Any]:
    """n of every probe set, per source: what every figure and table states."""
    count = lambda ps: {s: sum(p.source == s for p in ps) for s in dict.fromkeys(p.source for p in ps)}
    return {"train": len(sets["train"][0]) + len(sets["train"][1]), "test": len(sets["test"][0]) + len(sets["test"][1]),
            "train_by_source": count([*sets["train"][0], *sets["train"][1]]),
            "test_by_source": count([*sets["test"][0], *sets["test"][1]]),
            "transfer_train": len(sets["transfer_train"][0]) + len(sets["transfer_train"][1]),
            "overrefusal": len(sets["overrefusal"])}


def transfer_report(x_adv: Any, y_adv: Any, xte: Any, yte: Any, src_te: Sequence[str], x_over: Any, x_tr: Any, y_tr: Any,
                    C: float, seed: int, n_boot: int) -> dict[str, Any]:
    """Cross-source transfer, apart from the same-source numbers: a probe trained on AdvBench vs harmless
    only, tested on the held-out HarmBench and StrongREJECT prompts (and harmless); and the same-source
    probe's accuracy on the over-refusal set (benign prompts that look edgy: the share it calls harmless)."""
    src = np.asarray(list(src_te))
    keep = src != "advbench"
    pred = Q.linear_probe_predict(x_adv, y_adv, Q._np(xte)[keep], C=C, seed=seed)
    correct = (pred == Q._labels(yte)[keep]).astype(float)
    over = Q.linear_probe_predict(x_tr, y_tr, x_over, C=C, seed=seed)
    return {"trained_on": "advbench", "by_source": Q.by_source(correct, list(src[keep]), n_boot, seed),
            "overrefusal_as_harmless": Q.accuracy_ci((over == 0).astype(float), n_boot, seed)}


def last_token_report(xtr: Any, ytr: Any, xte: Any, yte: Any, src_te: Sequence[str], C: float, seed: int,
                      n_boot: int) -> dict[str, Any]:
    """The paper's lens at one layer: a linear probe on the last prompt token, held-out:
    {linear_acc, lo, hi, n, by_source}."""
    correct = (Q.linear_probe_predict(xtr, ytr, xte, C=C, seed=seed) == Q._labels(yte)).astype(float)
    ci = Q.accuracy_ci(correct, n_boot, seed)
    return {"linear_acc": ci["acc"], "lo": ci["lo"], "hi": ci["hi"], "n": ci["n"],
            "by_source": Q.by_source(correct, src_te, n_boot, seed)}


def by_source_rows(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One layer's per-source rows for the table and figure of notebook 05 (a layer report or its summary):
    the same-source probe per source, then, labelled apart, the AdvBench-trained probe on the other harmful
    sources ("transfer: <source>") and the same-source probe on the over-refusal prompts:
    {label: {acc, lo, hi, n}}."""
    return {**dict(r["by_source"]),
            **{f"transfer: {s}": v for s, v in r["transfer"]["by_source"].items() if s != "harmless"},
            "over-refusal as harmless": r["transfer"]["overrefusal_as_harmless"]}


def summary_layer(r: dict[str, Any]) -> dict[str, Any]:
    """What of one layer's report goes into ``probes.<model>.<layer>`` (the curves stay at the site)."""
    keep = ("effective_rank", "k_chance", "k_erase", "k_erase_budget", "linear_acc", "linear_ci", "mlp_acc", "by_source",
            "transfer", "whitened", "leace", "separability", "total_var", "C")
    return {**{k: r[k] for k in keep if k in r}, "top_eigvals": r["top_eigvals"][:8]}


# ---- the reading ----------------------------------------------------------------------------------

def _layer_map(by_layer: dict[str, Any], key) -> dict[int, float]:
    out = {}
    for l, r in by_layer.items():
        v = key(r)
        if v is not None:
            out[int(l)] = float(v)
    return out


def _fmt(v: Any, nd: int = 3) -> str:
    return "null" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def reading(probes: dict[str, dict[str, Any]], site: dict[str, dict[str, Any]], last_token: dict[str, dict[str, Any]],
            knobs: dict[str, Any], base: str = "base") -> dict[str, dict[str, Any]]:
    """{model: {case, flags, evidence, sentence}} for every model but ``base``, from the summary's
    ``probes``, ``probes_site`` and ``probes_last_token``. The cases, checked in this order:

    * spread: a scale-free count of directions rose at the model's attacker layer against the base's:
      ``k_erase`` or the number of whitened eigenvalues above the noise edge by ``k_margin`` or more (or
      k_erase left the budget), or the share of separability the iterated attacker's first direction holds
      fell by ``share_drop`` or more, or the whitened participation ratio rose by ``spread_factor`` or more
      while the number above the edge did not fall (the ratio also rises when the top direction alone
      weakens, which leaves fewer directions, not more); and no count fell by ``k_margin`` or more (counts
      that disagree are said, and not read as spread);
    * concentrated (not one of the paper's cases, the opposite of spread): a count fell by ``k_margin`` or
      more and none rose: fewer directions carry the signal than in the base;
    * moved: the layer of peak held-out separability moved by ``move_layers`` or more, or separability at
      the base's attacker layer fell by ``move_factor`` or more while the peak over layers did not;
    * weakened (none of the three, but it happens): held-out separability fell by ``move_factor`` or more at
      its peak over layers, so the linear signal is fainter everywhere, not elsewhere;
    * shrunk: the median over common layers of the harmless class's total variance, as a ratio to the
      base's, is ``1/shrink_factor`` or less (a change of scale, which an ablation of unit directions
      ignores; the unwhitened top eigenvalue's ratio is quoted beside it, but it also falls when the class
      difference alone shrinks);
    * left in place: none of these.
    The linear probe's held-out accuracy and the last-token lens are quoted in every sentence."""
    b = probes.get(base)
    out: dict[str, dict[str, Any]] = {}
    if not b:
        return out
    sb = site.get(base, {}).get("layer")
    for m, by_layer in probes.items():
        if m == base:
            continue
        sm = site.get(m, {}).get("layer")
        rb, rm = b.get(str(sb), {}), by_layer.get(str(sm), {})
        ev: list[str] = []
        flags = {"spread": False, "concentrated": False, "moved": False, "weakened": False, "shrunk": False}
        # spread
        margin = knobs["k_margin"]
        up, fell = False, []
        nb, nm = (rb.get("whitened") or {}).get("n_sig"), (rm.get("whitened") or {}).get("n_sig")
        if nb is not None and nm is not None:
            ev.append(f"whitened eigenvalues above the noise edge {nb} -> {nm}")
            up |= nm - nb >= margin
            if nb - nm >= margin:
                fell.append("the eigenvalues above the edge")
        wb, wm = (rb.get("whitened") or {}).get("rank"), (rm.get("whitened") or {}).get("rank")
        if wb and wm is not None:
            ratio = wm / wb
            fewer = nb is not None and nm is not None and nm < nb
            ev.append(f"whitened participation ratio {_fmt(wb)} -> {_fmt(wm)} (x{ratio:.2f}"
                      + (", over fewer eigenvalues above the edge: not counted as spread)" if fewer and ratio >= knobs["spread_factor"] else ")"))
            up |= ratio >= knobs["spread_factor"] and not fewer
        kb, km = rb.get("k_erase"), rm.get("k_erase")
        if kb is not None or km is not None:
            ev.append(f"k_erase {_fmt(kb)} -> {_fmt(km) if km is not None else '> ' + str(rm.get('k_erase_budget'))}")
            up |= (km is None and kb is not None) or (km is not None and kb is not None and km - kb >= margin)
            if km is not None and kb is not None and kb - km >= margin:
                fell.append("k_erase")
        hb = ((site.get(base, {}).get("attack_share") or {}).get("iterated") or {}).get("1", {}).get("held")
        hm = ((site.get(m, {}).get("attack_share") or {}).get("iterated") or {}).get("1", {}).get("held")
        if hb is not None and hm is not None:
            ev.append(f"share held by the iterated attacker's first direction {hb:.2f} -> {hm:.2f}")
            up |= hb - hm >= knobs["share_drop"]
        flags["spread"] = up and not fell
        flags["concentrated"] = bool(fell) and not up
        if up and fell:
            ev.append(f"the direction counts disagree ({' and '.join(fell)} fell): not read as spread")
        # moved
        sep_b, sep_m = _layer_map(b, lambda r: r.get("separability")), _layer_map(by_layer, lambda r: r.get("separability"))
        common = sorted(set(sep_b) & set(sep_m))
        if common and max(sep_b[l] for l in common) > 0:
            pb = max(common, key=lambda l: sep_b[l])
            pm = max(common, key=lambda l: sep_m[l])
            ev.append(f"peak separability at layer {pb} -> {pm}")
            flags["moved"] |= abs(pm - pb) >= knobs["move_layers"]
            peak = max(sep_m[l] for l in common) / max(sep_b[l] for l in common)
            flags["weakened"] = peak <= 1 / knobs["move_factor"]
            if sb is not None and int(sb) in sep_m and sep_b.get(int(sb), 0) > 0:
                at = sep_m[int(sb)] / sep_b[int(sb)]
                ev.append(f"separability at the base's layer {sb} x{at:.2f}, at the peak x{peak:.2f}")
                flags["moved"] |= at <= 1 / knobs["move_factor"] and peak > 1 / knobs["move_factor"]
            else:
                ev.append(f"separability at the peak x{peak:.2f}")
        # shrunk
        def median_ratio(key) -> tuple[float, int] | None:
            mb, mm = _layer_map(b, key), _layer_map(by_layer, key)
            ratios = [mm[l] / mb[l] for l in sorted(set(mb) & set(mm)) if mb[l] > 0]
            return (statistics.median(ratios), len(ratios)) if ratios else None

        tv = median_ratio(lambda r: r.get("total_var"))
        if tv:
            ev.append(f"total variance x{tv[0]:.2f} (median over {tv[1]} layers)")
            flags["shrunk"] = tv[0] <= 1 / knobs["shrink_factor"]
        te = median_ratio(lambda r: (r.get("top_eigvals") or [None])[0])
        if te:
            ev.append(f"unwhitened top eigenvalue x{te[0]:.2f} (median over {te[1]} layers)")
        # always quoted
        la, lm_ = rb.get("linear_acc"), rm.get("linear_acc")
        if la is not None and lm_ is not None:
            ev.append(f"linear probe {la:.3f} -> {lm_:.3f} at the attacker's layer ({sb} -> {sm})")
        ltb, ltm = (last_token.get(base) or {}).get("linear_acc"), (last_token.get(m) or {}).get("linear_acc")
        if ltb is not None and ltm is not None:
            ev.append(f"last-token probe {ltb:.3f} -> {ltm:.3f}")
        order = ("spread", "concentrated", "moved", "weakened", "shrunk")
        case = next((c for c in order if flags[c]), "left in place")
        also = [c for c in order if flags[c] and c != case]
        sentence = (f"{m}: {case}" + (f" (also {', '.join(also)})" if also else "") + f" against {base}: " + "; ".join(ev) + ".")
        out[m] = {"case": case, "flags": flags, "evidence": ev, "sentence": sentence}
    return out


# ---- one model -------------------------------------------------------------------------------------

def probe_model(cfg: dict[str, Any], name: str, sets: dict[str, Any], log=print) -> dict[str, Any]:
    """Every probe measure of one model of notebook 04 (``base`` or a trained variant): per layer, at the
    attacker's layer (removal curves and attack shares of every estimator), and the last-token lens.
    Activations, bases and the iterated attacker's rounds come from the caches notebook 04 filled."""
    from . import sweep_run as S

    pc, seed, n_boot = cfg["probes"], cfg["seed"], cfg["eval"]["n_boot"]
    bundle = S.load_attacked(cfg, name)
    ctx = S.attack_context(cfg, bundle)
    found = S.iterated_basis(ctx, 1)  # the attacker's layer: that of the iterated attacker's first direction
    site = int(found.rounds[0]["layer"])
    layers = probe_layers(bundle.n_layers, pc["layer_stride"], [site])
    acts = {}
    for key, ps in (("train_h", sets["train"][0]), ("train_o", sets["train"][1]), ("test_h", sets["test"][0]),
                    ("test_o", sets["test"][1]), ("over", sets["overrefusal"])):
        acts[key] = S.grid_acts(cfg, bundle, ps, layers, f"{name} probe {key}")  # (n, layers, n_post, d) bf16
    ytr, _ = labels_sources(*sets["train"])
    yte, src_te = labels_sources(*sets["test"])
    n_adv = len(sets["transfer_train"][0])
    adv_idx = torch.tensor([i for i, p in enumerate(sets["train"][0]) if p.source == "advbench"][:n_adv]
                           + [len(sets["train"][0]) + i for i in range(len(sets["transfer_train"][1]))])
    y_adv = ytr[adv_idx]

    def feats(i: int, pos: int | None):
        pick = (lambda a: a[:, i].float().mean(1)) if pos is None else (lambda a: a[:, i, pos].float())
        return (torch.cat([pick(acts["train_h"]), pick(acts["train_o"])]), torch.cat([pick(acts["test_h"]), pick(acts["test_o"])]),
                pick(acts["over"]))

    knobs = dict(inlp_k_max=pc["inlp_k_max"], ks=pc["ks"], erase_ks=pc["erase_ks"],
                 whiten_dim=pc["whiten_dim"], n_perm=pc["n_perm"], threshold=pc["threshold"], mlp_hidden=pc["mlp_hidden"],
                 seed=seed, n_boot=n_boot)
    # the probe's L2 strength: cross-validated on the probe-train split at the attacker's layer, then used at
    # every layer of this model (features are standardised, so one strength carries over; ~8 s a choice here)
    C = Q.choose_C(feats(layers.index(site), None)[0], ytr, pc["Cs"], pc["cv_folds"], seed)
    reports, last = {}, {}
    for i, l in enumerate(layers):
        xtr, xte, xov = feats(i, None)
        if (xtr[ytr == 1].double().mean(0) - xtr[ytr == 0].double().mean(0)).norm() < 1e-6 * xtr.double().norm(dim=1).mean():
            continue  # layer 0: the pooled template tokens are the same for every prompt
        r = Q.layer_report(xtr, ytr, xte, yte, sources_te=src_te, C=C, **knobs)
        r["transfer"] = transfer_report(xtr[adv_idx], y_adv, xte, yte, src_te, xov, xtr, ytr, r["C"], seed, n_boot)
        reports[l] = r
        ltr, lte, _ = feats(i, -1)
        last[l] = last_token_report(ltr, ytr, lte, yte, src_te, r["C"], seed, n_boot)
        log(f"{name} layer {l}: linear {r['linear_acc']:.3f}, k_erase {r['k_erase']}, whitened rank {r['whitened']['rank']}")
    if site not in reports:
        raise ValueError(f"{name}: the attacker's layer {site} carries no pooled class difference to probe")
    i = layers.index(site)
    xtr, xte, _ = feats(i, None)
    removal = {"inlp": reports[site]["acc_vs_removed"], "whitened eraser": reports[site]["erase_curve"]}
    shares = {}
    k_need = max(max(cfg["sweep"]["k_grid"]), max(pc["attack_ks"]))
    for e in S.check_estimators(cfg["sweep"]["estimators"]):
        # the iterated attacker contributes every round notebook 04 computed (cached; at least one)
        basis = found.basis if e == "iterated" else S.estimator_basis(ctx, e, max(cfg["sweep"]["k_grid"]))["basis"]
        basis = basis.double()[:, :k_need]
        removal[e] = Q.acc_vs_removed(xtr, ytr, xte, yte, basis, pc["ks"], seed, C=C)
        shares[e] = {str(k): v for k, v in Q.attack_share(xtr, ytr, xte, yte, basis, pc["attack_ks"], pc["whiten_dim"]).items()}
    w = Q.Whitened(xtr, ytr, pc["whiten_dim"])
    eig_raw = Q.spectrum(xtr[ytr == 1], xtr[ytr == 0])
    del bundle, ctx
    return {
        "reports": reports, "site": site, "layers": layers,
        "site_summary": {"layer": site, "k_chance": {e: Q.k_chance(c, pc["threshold"]) for e, c in removal.items()},
                         "k_erase": reports[site]["k_erase"], "k_erase_budget": reports[site]["k_erase_budget"],
                         "removal": {e: {str(k): v for k, v in c.items()} for e, c in removal.items()},
                         "attack_share": shares},
        "last_token": {**last[site], "layer": site, "by_layer": {str(l): v["linear_acc"] for l, v in last.items()}},
        "removal": removal, "shares": shares,
        "spectra": {"raw": eig_raw[:64].tolist(), "whitened": {"vals": w.vals[:64].tolist(),
                                                               "edge": reports[site]["whitened"]["edge"]}},
    }
