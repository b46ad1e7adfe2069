"""Difference-in-means refusal directions and their selection (Arditi et al. 2024), notebook 01.

Means are accumulated in float64 from float32 residuals. A candidate is a (layer, position) pair:
every layer but the last ``drop_last_frac`` of them, every post-instruction position (a profile may
thin the grid; the notebook's figure says so). Selection follows Arditi et al.: among candidates with
KL <= ``max_kl`` on harmless val under ablation and a positive induced refusal score under activation
addition, take the lowest harmful-val refusal score under ablation. To save forward passes we score
ablation for every candidate first, then check the two filters in ascending order of that score and
stop at the first candidate that passes: the same choice as checking all, far fewer passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from .progress import tqdm


def diff_in_means(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """mean(harmful) - mean(harmless) over the first axis, in float64: shape = harmful.shape[1:]."""
    if harmful.shape[0] == 0 or harmless.shape[0] == 0:
        raise ValueError("difference in means needs at least one prompt of each class")
    return harmful.double().mean(0) - harmless.double().mean(0)


def candidate_grid(n_layers: int, n_pos: int, drop_last_frac: float = 0.2, layer_stride: int = 1,
                   positions: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(layer, position) candidates; positions index the post-instruction slice (0..n_pos-1, or negative)."""
    max_layer = int(n_layers * (1 - drop_last_frac))
    pos = [p % n_pos for p in positions] if positions is not None else list(range(n_pos))
    return [(l, p) for l in range(0, max_layer, layer_stride) for p in pos]


@dataclass
class Selection:
    layer: int
    position: int
    direction: torch.Tensor  # unnormalised difference in means at (layer, position), float64
    refusal_score: float  # mean harmful-val refusal score under ablation
    kl_harmless: float
    induce_score: float
    fallback: bool
    scores: dict[tuple[int, int], float] = field(default_factory=dict)  # ablation score per candidate
    checked: list[dict[str, float]] = field(default_factory=list)  # filter results in the order checked

    @property
    def unit(self) -> torch.Tensor:
        return self.direction / self.direction.norm()


def select_direction(dirs: torch.Tensor, candidates: Sequence[tuple[int, int]],
                     ablation_score: Callable[[torch.Tensor], float],
                     kl_under_ablation: Callable[[torch.Tensor], float],
                     induce_score: Callable[[int, torch.Tensor], float],
                     max_kl: float = 0.1, max_checks: int | None = None, progress: bool = True) -> Selection:
    """Pick a candidate by the rule in the module docstring.

    ``dirs``: (layers, positions, d) difference-in-means vectors. The three callables evaluate a unit
    direction (ablation refusal score on harmful val, KL on harmless val) or a layer and raw vector
    (induced refusal score on harmless val). When no candidate passes within ``max_checks``, the
    fallback is the checked candidate with the lowest refusal score + KL (``fallback=True``).
    """
    # at layer 0 every post-instruction position holds the same token for every prompt: the difference
    # in means is exactly zero there and has no direction; such candidates are skipped
    if not candidates:
        raise ValueError("no direction candidates: check the profile's directions grid")
    if max_checks is not None and max_checks < 1:
        raise ValueError("directions.max_checks must be at least 1")
    max_norm = max(dirs[l, p].norm().item() for l, p in candidates)
    candidates = [(l, p) for l, p in candidates if dirs[l, p].norm().item() > 1e-6 * max_norm]
    if not candidates:
        raise ValueError("every candidate's difference in means is zero: the grid holds only layer 0")
    scores: dict[tuple[int, int], float] = {}
    for l, p in tqdm(candidates, desc="ablation score per candidate", disable=not progress, leave=False):
        v = dirs[l, p]
        scores[(l, p)] = ablation_score(v / v.norm())
    bad = [c for c, v in scores.items() if v != v]
    if bad:
        raise FloatingPointError(f"refusal score is NaN for candidates {bad[:3]}: check the model's dtype and inputs")
    order = sorted(candidates, key=lambda c: scores[c])
    checked: list[dict[str, float]] = []
    for l, p in order[:max_checks]:
        v = dirs[l, p]
        kl = kl_under_ablation(v / v.norm())
        ind = induce_score(l, v) if kl <= max_kl else float("nan")
        checked.append({"layer": l, "position": p, "refusal_score": scores[(l, p)], "kl": kl, "induce": ind})
        if kl <= max_kl and ind > 0:
            return Selection(l, p, v, scores[(l, p)], kl, ind, False, scores, checked)
    best = min(checked, key=lambda c: c["refusal_score"] + c["kl"])
    l, p = int(best["layer"]), int(best["position"])
    ind = best["induce"] if best["induce"] == best["induce"] else induce_score(l, dirs[l, p])
    return Selection(l, p, dirs[l, p], best["refusal_score"], best["kl"], ind, True, scores, checked)
