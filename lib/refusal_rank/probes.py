"""How the harmful-vs-harmless signal is spread in one layer's activations: spectra, probes, removal curves.

Models are compared by whether "harmful" is carried by a few directions (cheap to ablate) or spread
over many (or read non-linearly). Everything here is a pure function of pooled activations
``x`` (n, d) and labels ``y`` (n,) in {0, 1} (1 = harmful), so it can be tested on planted data.

* ``spectrum`` / ``effective_rank``: eigenvalues of the excess second moment of harmful over harmless
  (:func:`refusal_rank.attacks.excess_second_moment`) and their participation ratio, over the positive
  part only (the matrix is indefinite; see :func:`effective_rank`).
* ``linear_probe_acc`` / ``mlp_probe_acc``: held-out accuracy of a logistic-regression and a one-hidden-
  layer MLP probe. Features are z-scored per dimension with the *train* statistics first, because Qwen
  residual streams have a few dimensions with huge magnitudes that would otherwise dominate the fit.
* ``acc_vs_removed`` / ``inlp_curve`` / ``k_chance``: linear accuracy after projecting the first k
  directions of a basis out of the *raw* features (train and test alike; standardisation comes after,
  as an ablation acts on the raw stream), the INLP basis being fitted on the train split only, and the
  smallest k that brings accuracy down to a chance threshold.
* ``layer_report``: all of the above for one layer, as a JSON-serialisable dict.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch

from . import attacks

STD_FLOOR = 1e-6


def _np(x: Any) -> np.ndarray:
    """Features as a float64 numpy array (torch tensors or array-likes)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _labels(y: Any) -> np.ndarray:
    """Labels as an int numpy array."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    return np.asarray(y).astype(int)


def spectrum(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the excess second moment of harmful over harmless, descending, float64."""
    vals = torch.linalg.eigvalsh(attacks.excess_second_moment(harmful, harmless))
    return torch.sort(vals, descending=True).values


def effective_rank(eigvals: torch.Tensor) -> float:
    """Participation ratio (sum l)^2 / sum l^2 over the positive eigenvalues; 0.0 if there are none.

    The excess second moment is indefinite: negative eigenvalues are directions where harmful prompts
    vary *less* than harmless ones. Only the positive part is extra harmful-side energy, which is what
    an attacker ablating directions found from harmful activations can remove, so only it is counted.
    """
    pos = eigvals.double()[eigvals.double() > 0]
    if pos.numel() == 0:
        return 0.0
    return float(pos.sum() ** 2 / pos.pow(2).sum())


def standardize(train: torch.Tensor, *others: torch.Tensor) -> tuple[np.ndarray, ...]:
    """Z-score every dimension with the train mean and std (floor 1e-6); float64 arrays (train, *others)."""
    tr = _np(train)
    mu, sd = tr.mean(0), np.maximum(tr.std(0), STD_FLOOR)
    return tuple((a - mu) / sd for a in (tr, *(_np(o) for o in others)))


def linear_probe_acc(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
                     seed: int = 0, C: float = 1.0, max_iter: int = 1000) -> float:
    """Test accuracy of a logistic-regression probe fitted on standardised train features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    a, b = standardize(xtr, xte)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(a, _labels(ytr))
    return float(clf.score(b, _labels(yte)))


def mlp_probe_acc(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
                  hidden: int = 64, seed: int = 0, max_iter: int = 500) -> float:
    """Test accuracy of a one-hidden-layer MLP probe (alpha 1e-3, no early stopping) on standardised features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    a, b = standardize(xtr, xte)
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=max_iter,
                        early_stopping=False, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(a, _labels(ytr))
    return float(clf.score(b, _labels(yte)))


def acc_vs_removed(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
                   basis: torch.Tensor, ks: Sequence[int], seed: int = 0) -> dict[int, float]:
    """{k: linear test accuracy after projecting basis[:, :k] out of raw train and test}, k <= basis.shape[1]."""
    U = _np(basis)
    a, b = _np(xtr), _np(xte)
    out: dict[int, float] = {}
    for k in ks:
        k = int(k)
        if k < 0 or k > U.shape[1]:
            continue
        Uk = U[:, :k]
        out[k] = linear_probe_acc(a - (a @ Uk) @ Uk.T, ytr, b - (b @ Uk) @ Uk.T, yte, seed=seed)
    return out


def k_chance(acc_by_k: dict[int, float], threshold: float = 0.60) -> int | None:
    """Smallest k whose accuracy is <= threshold, or None if none is."""
    hits = [k for k, acc in acc_by_k.items() if acc <= threshold]
    return min(hits) if hits else None


def inlp_curve(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, k_max: int,
               ks: Sequence[int], seed: int = 0, threshold: float = 0.60,
               stop_at_chance: bool = True) -> dict[int, float]:
    """Linear test accuracy vs. number of train-fitted INLP directions removed (ks beyond INLP's basis are skipped).

    With ``stop_at_chance``, ks are visited in increasing order and larger ones are skipped once the
    accuracy is <= threshold.
    """
    x = xtr if isinstance(xtr, torch.Tensor) else torch.from_numpy(_np(xtr))
    y = ytr if isinstance(ytr, torch.Tensor) else torch.from_numpy(_labels(ytr))
    basis = attacks.inlp(x, y, min(int(k_max), x.shape[1]), seed=seed)
    out: dict[int, float] = {}
    for k in sorted({int(k) for k in ks}):
        out.update(acc_vs_removed(xtr, ytr, xte, yte, basis, [k], seed=seed))
        if stop_at_chance and k in out and out[k] <= threshold:
            break
    return out


def layer_report(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, k_max: int,
                 ks: Sequence[int], seed: int = 0, threshold: float = 0.60, mlp_hidden: int = 64) -> dict[str, Any]:
    """Spectrum (train split), linear and MLP probe accuracies and the INLP removal curve of one layer."""
    x, y = torch.from_numpy(_np(xtr)), _labels(ytr)
    vals = spectrum(x[torch.from_numpy(y == 1)], x[torch.from_numpy(y == 0)])
    curve = inlp_curve(xtr, ytr, xte, yte, k_max, ks, seed=seed, threshold=threshold)
    return {
        "effective_rank": round(effective_rank(vals), 4),
        "top_eigvals": [float(f"{v:.6g}") for v in vals[:32].tolist()],
        "linear_acc": round(linear_probe_acc(xtr, ytr, xte, yte, seed=seed), 4),
        "mlp_acc": round(mlp_probe_acc(xtr, ytr, xte, yte, hidden=mlp_hidden, seed=seed), 4),
        "acc_vs_removed": {int(k): round(float(v), 4) for k, v in curve.items()},
        "k_chance": k_chance(curve, threshold),
    }
