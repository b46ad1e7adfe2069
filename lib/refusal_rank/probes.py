"""How the harmful-vs-harmless signal is spread in one layer's activations: spectra, probes, erasure.

Models are compared by whether "harmful" is carried by a few directions (cheap to ablate) or spread
over many (or read non-linearly), and whether a change is only one of scale. Everything here is a pure
function of pooled activations ``x`` (n, d) and labels ``y`` (n,) in {0, 1} (1 = harmful), so it can be
tested on planted data.

* ``spectrum`` / ``effective_rank``: eigenvalues of the excess second moment of harmful over harmless
  (:func:`refusal_rank.attacks.excess_second_moment`) and their participation ratio, over the positive
  part only. Not scale-free: shrinking every activation by c shrinks it by c^2, and its top eigenvalue is
  the mean-difference outer product, so its shape barely moves.
* ``linear_probe_acc`` / ``mlp_probe_acc``: held-out accuracy of an L2-regularised logistic-regression
  and a one-hidden-layer MLP probe. Features are z-scored per dimension with the *train* statistics
  first (Qwen residual streams have a few dimensions with huge magnitudes). The probes are regularised
  because a profile has a few hundred prompts in d = 1536 dimensions: with n < d any labelling of the
  training prompts is linearly separable, so an unregularised probe fits noise; ``choose_C`` picks the
  strength by cross-validation on the train split only.
* ``whiten_fit``: the scale-free frame. Standardised features are reduced to the top ``dim`` principal
  components of the train split (a covariance in d dimensions cannot be estimated from n < d prompts)
  and whitened by the harmless class's Ledoit-Wolf-shrunk covariance there. The **whitened class
  difference** is M = W (S_h - C_0) W, S_h the harmful second moment about the harmless mean, C_0 the
  harmless covariance, W = C_0^{-1/2}: its eigenvalues are the harmful class's extra energy per
  direction in units of the harmless spread, unchanged when all activations are scaled. ``n_sig``
  counts eigenvalues above a noise edge (:func:`permutation_edge`; a planted k-dimensional difference
  reads k when there are many prompts per frame dimension, and can read fewer when there are few: a
  conservative count) and ``rank`` is their participation ratio (k for k equal ones, ~1 when one dominates).
* ``erase_curve`` / ``k_erase``: closed-form linear erasure in the LEACE sense, generalised to k
  directions. The eigenvectors of M are ordered by their share of the whitened mean difference and the
  first k are erased obliquely (x -> x - C_0^{1/2} V V^T C_0^{-1/2} x in the reduced frame; k = 1 with V the
  whitened mean difference is exactly LEACE for a binary label); a linear probe is refitted on the erased
  train split and tested on the erased held-out split. ``k_erase`` is the smallest k at which it is at
  chance (<= threshold). For a binary label the linear information of a *population* is always erasable
  in one oblique direction (LEACE's theorem: equal class means), so k_erase > 1 says the harmful prompts'
  mean shift is carried by several directions along which they vary independently (the planted test),
  or that the train estimate does not carry over to held-out prompts; ``leace`` reports the rank-1
  eraser's held-out linear and MLP accuracy beside it (a high MLP accuracy after it: the signal is
  there, but not linearly).
* ``fisher_separability`` / ``attack_share``: held-out squared d' of a train-fitted shrinkage LDA, a
  scale-free amount of linear separability; the share an attacker's top-k directions hold (features
  projected on them) against what remains once they are projected out (orthogonally, in the raw
  stream, as the ablation does).
* ``acc_vs_removed`` / ``inlp_curve`` / ``k_chance``: linear accuracy after projecting the first k
  directions of a basis out of the *raw* features (train and test alike; standardisation comes after,
  as an ablation acts on the raw stream), the INLP basis being fitted on the train split only, and the
  smallest k that brings accuracy down to a chance threshold. INLP removes probe weights (~ the noise
  covariance's inverse times the mean difference), not the mean difference, so with anisotropic noise
  it needs many rounds even for a one-direction signal: its count says how slow that eraser is more
  than how many directions carry the signal. Kept beside k_erase for continuity.
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
                   basis: torch.Tensor, ks: Sequence[int], seed: int = 0, C: float = 1.0) -> dict[int, float]:
    """{k: linear test accuracy after projecting basis[:, :k] out of raw train and test}, k <= basis.shape[1]."""
    U = _np(basis)
    a, b = _np(xtr), _np(xte)
    out: dict[int, float] = {}
    for k in ks:
        k = int(k)
        if k < 0 or k > U.shape[1]:
            continue
        Uk = U[:, :k]
        out[k] = linear_probe_acc(a - (a @ Uk) @ Uk.T, ytr, b - (b @ Uk) @ Uk.T, yte, seed=seed, C=C)
    return out


def k_chance(acc_by_k: dict[int, float], threshold: float = 0.60) -> int | None:
    """Smallest k whose accuracy is <= threshold, or None if none is."""
    hits = [k for k, acc in acc_by_k.items() if acc <= threshold]
    return min(hits) if hits else None


def inlp_curve(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, k_max: int,
               ks: Sequence[int], seed: int = 0, threshold: float = 0.60,
               stop_at_chance: bool = True, C: float = 1.0) -> dict[int, float]:
    """Linear test accuracy vs. number of train-fitted INLP directions removed (ks beyond INLP's basis are skipped).

    With ``stop_at_chance``, ks are visited in increasing order and larger ones are skipped once the
    accuracy is <= threshold.
    """
    x = xtr if isinstance(xtr, torch.Tensor) else torch.from_numpy(_np(xtr))
    y = ytr if isinstance(ytr, torch.Tensor) else torch.from_numpy(_labels(ytr))
    basis = attacks.inlp(x, y, min(int(k_max), x.shape[1]), seed=seed)
    out: dict[int, float] = {}
    for k in sorted({int(k) for k in ks}):
        out.update(acc_vs_removed(xtr, ytr, xte, yte, basis, [k], seed=seed, C=C))
        if stop_at_chance and k in out and out[k] <= threshold:
            break
    return out





# ---- regularised probes, per-source accuracy -----------------------------------------------------

def choose_C(xtr: Any, ytr: Any, Cs: Sequence[float], folds: int = 4, seed: int = 0, max_iter: int = 1000) -> float:
    """The L2 strength of the logistic probe, by stratified cross-validation on the (standardised) train split."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    (a,) = standardize(xtr)
    y = _labels(ytr)
    folds = max(2, min(int(folds), int(np.bincount(y, minlength=2).min())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # sklearn's notices of changing defaults; the choice here is explicit
        clf = LogisticRegressionCV(Cs=list(Cs), cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                   max_iter=max_iter, random_state=seed).fit(a, y)
    return float(clf.C_[0])


def linear_probe_predict(xtr: Any, ytr: Any, xte: Any, C: float = 1.0, seed: int = 0, max_iter: int = 1000) -> np.ndarray:
    """0/1 predictions on the test features of a logistic probe fitted on standardised train features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    a, b = standardize(xtr, xte)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(a, _labels(ytr))
    return clf.predict(b).astype(int)


def accuracy_ci(correct: Any, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """{acc, lo, hi, n}: accuracy with a 95% percentile-bootstrap interval over prompts."""
    from .metrics import rate_with_ci

    r = rate_with_ci(np.asarray(correct, dtype=float), n_boot, seed)
    return {"acc": r["rate"], "lo": r["lo"], "hi": r["hi"], "n": r["n"]}


def by_source(correct: Any, sources: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Accuracy (with interval and n) on the held-out prompts of each source, in first-seen order.
    On a harmful source this is the share classified harmful; on the harmless one the share classified harmless."""
    c = np.asarray(correct, dtype=float)
    src = np.asarray(list(sources))
    return {s: accuracy_ci(c[src == s], n_boot, seed) for s in dict.fromkeys(sources)}


# ---- the scale-free frame: reduced, whitened by the harmless covariance ---------------------------

def _shrunk_cov(z: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrinkage covariance (scale-equivariant, well conditioned when n ~ dim)."""
    from sklearn.covariance import ledoit_wolf

    cov, _ = ledoit_wolf(z - z.mean(0), assume_centered=True)
    return cov


def _sym_pow(c: np.ndarray, p: float) -> np.ndarray:
    vals, vecs = np.linalg.eigh(c)
    vals = np.maximum(vals, 1e-12 * max(float(vals.max()), 1e-300))
    return (vecs * vals ** p) @ vecs.T


def _difference(z: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Whitening and whitened class difference of reduced features z (n, r), labels y."""
    h, o = z[y == 1], z[y == 0]
    mu0 = o.mean(0)
    c0 = _shrunk_cov(o)
    W, W_inv = _sym_pow(c0, -0.5), _sym_pow(c0, 0.5)
    hc = h - mu0
    M = W @ (hc.T @ hc / len(h) - c0) @ W
    vals, vecs = np.linalg.eigh((M + M.T) / 2)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    m = W @ (h.mean(0) - mu0)
    share = (vecs.T @ m) ** 2 / max(float(m @ m), 1e-300)
    return {"W": W, "W_inv": W_inv, "vals": vals, "vecs": vecs, "m": m, "share": share}


class Whitened:
    """The frame of one train split: z = Q^T (x - mean) / sd (the top-``dim`` principal components of the
    standardised train features), the whitening W = C_0^{-1/2} by the harmless class's shrunk covariance,
    and the whitened class difference M = W (S_h - C_0) W: eigenvalues (descending), eigenvectors, each
    eigenvector's share of the whitened mean difference m = W (mu_h - mu_0), and m itself."""

    def __init__(self, xtr: Any, ytr: Any, dim: int):
        x, y = _np(xtr), _labels(ytr)
        self.mean, self.sd = x.mean(0), np.maximum(x.std(0), STD_FLOOR)
        a = (x - self.mean) / self.sd
        r = int(max(1, min(dim, a.shape[1], a.shape[0] - 1)))
        _, _, vh = np.linalg.svd(a - a.mean(0), full_matrices=False)
        self.Q = vh[:r].T  # (d, r) orthonormal
        self.z = a @ self.Q
        self.y = y
        for k, v in _difference(self.z, y).items():
            setattr(self, k, v)

    def reduce(self, x: Any) -> np.ndarray:
        return ((_np(x) - self.mean) / self.sd) @ self.Q

    def erase(self, x: Any, V: np.ndarray) -> np.ndarray:
        """Standardised features with span(V) (whitened-frame columns) erased obliquely, the LEACE form
        a - Q W^{-1} V V^T W Q^T a; the complement of the reduced frame is left as it is."""
        a = (_np(x) - self.mean) / self.sd
        if V.shape[1] == 0:
            return a
        P = self.W_inv @ V @ V.T @ self.W
        return a - (a @ self.Q) @ P.T @ self.Q.T

    def erase_order(self) -> np.ndarray:
        """Eigenvectors of M in order of their share of the whitened mean difference (ties: eigenvalue)."""
        idx = sorted(range(len(self.vals)), key=lambda j: (-float(self.share[j]), -float(self.vals[j])))
        return self.vecs[:, idx]

    def leace(self) -> np.ndarray:
        """The unit whitened mean difference as one column: erasing it is LEACE for a binary label."""
        return (self.m / max(float(np.linalg.norm(self.m)), 1e-300))[:, None]


def permutation_edge(xtr: Any, ytr: Any, dim: int, n_perm: int = 8, seed: int = 0) -> float:
    """How large the top eigenvalue of the whitened class difference gets from sampling noise alone, in
    this frame: the harmless prompts are split at random into two halves, one playing harmful, and the
    largest top eigenvalue over ``n_perm`` splits is rescaled from the halves' sizes to the real classes'
    (noise in M scales as sqrt(1/n_h + 1/n_0)). Harmless halves, not permuted labels: with a strong
    signal, label permutations mix it into both groups and inflate the edge."""
    w = Whitened(xtr, ytr, dim)
    o = w.z[w.y == 0]
    n_h, n_o = int((w.y == 1).sum()), len(o)
    if n_perm <= 0 or n_o < 4:
        return float("inf")
    rng = np.random.default_rng(seed)
    na = n_o // 2
    tops = []
    for _ in range(int(n_perm)):
        lab = np.zeros(n_o, dtype=int)
        lab[rng.permutation(n_o)[:na]] = 1
        tops.append(_difference(o, lab)["vals"][0])
    return float(max(tops) * np.sqrt((1 / n_h + 1 / n_o) / (1 / na + 1 / (n_o - na))))


def whitened_summary(xtr: Any, ytr: Any, dim: int, n_perm: int = 8, seed: int = 0, top: int = 8) -> dict[str, Any]:
    """{rank: participation ratio of the eigenvalues above the noise edge (0 if none), n_sig: how
    many there are, edge, top: the leading eigenvalues, dim: the frame's size} of the whitened class
    difference. Only eigenvalues above the edge count: in a 64-dimensional frame the many small positive
    noise eigenvalues would otherwise dominate a participation ratio."""
    w = Whitened(xtr, ytr, dim)
    edge = permutation_edge(xtr, ytr, dim, n_perm, seed)
    sig = w.vals[w.vals > edge]
    return {"rank": round(effective_rank(torch.from_numpy(sig.copy())), 4), "n_sig": int(len(sig)),
            "edge": float(f"{edge:.6g}"), "top": [float(f"{v:.6g}") for v in w.vals[:top]], "dim": int(len(w.vals))}


# ---- erasure ----------------------------------------------------------------------------------

def erase_curve(xtr: Any, ytr: Any, xte: Any, yte: Any, ks: Sequence[int], dim: int, C: float = 1.0, seed: int = 0,
                threshold: float = 0.60, stop_at_chance: bool = True) -> dict[int, float]:
    """{k: held-out linear accuracy after erasing the first k directions of the whitened class difference
    (train-fitted, in order of their share of the mean difference)}; ks beyond the frame are skipped.
    With ``stop_at_chance``, larger ks are skipped once the accuracy is <= threshold."""
    w = Whitened(xtr, ytr, dim)
    V = w.erase_order()
    yt = _labels(yte)
    out: dict[int, float] = {}
    for k in sorted({int(k) for k in ks}):
        if k < 0 or k > V.shape[1]:
            continue
        Vk = V[:, :k]
        out[k] = float((linear_probe_predict(w.erase(xtr, Vk), ytr, w.erase(xte, Vk), C=C, seed=seed) == yt).mean())
        if stop_at_chance and out[k] <= threshold:
            break
    return out


def k_erase(curve: dict[int, float], threshold: float = 0.60) -> int | None:
    """Smallest k of an erasure curve at chance (<= threshold), or None if none is (see the budget)."""
    return k_chance(curve, threshold)


def leace_accuracies(xtr: Any, ytr: Any, xte: Any, yte: Any, dim: int, C: float = 1.0, seed: int = 0,
                     mlp_hidden: int = 64) -> dict[str, float]:
    """Held-out linear and MLP probe accuracy after the rank-1 LEACE eraser (train-fitted): the linear
    probe is then at chance if the mean shift was all it read; an MLP above chance reads what remains."""
    w = Whitened(xtr, ytr, dim)
    V = w.leace()
    a, b = w.erase(xtr, V), w.erase(xte, V)
    lin = float((linear_probe_predict(a, ytr, b, C=C, seed=seed) == _labels(yte)).mean())
    return {"linear_acc": round(lin, 4), "mlp_acc": round(mlp_probe_acc(a, ytr, b, yte, hidden=mlp_hidden, seed=seed), 4)}


# ---- separability and what an attack removes --------------------------------------------------

def fisher_separability(xtr: Any, ytr: Any, xte: Any, yte: Any, dim: int) -> float:
    """Held-out squared d' of a train-fitted LDA (standardised features, reduced to ``dim`` principal
    components when wider, Ledoit-Wolf pooled within-class covariance): w = S^-1 (mu_h - mu_0) on train,
    d' = w.(mean difference on test) / sqrt(w' S_test w). 0 when the test difference points the other way.
    Scale-free, and additive over independent directions (unlike accuracy, which saturates)."""
    a, b = standardize(xtr, xte)
    ya, yb = _labels(ytr), _labels(yte)
    if a.shape[1] > dim:
        _, _, vh = np.linalg.svd(a - a.mean(0), full_matrices=False)
        Q = vh[:max(1, min(dim, a.shape[0] - 1))].T
        a, b = a @ Q, b @ Q
    d_tr = a[ya == 1].mean(0) - a[ya == 0].mean(0)
    within = np.concatenate([a[ya == 1] - a[ya == 1].mean(0), a[ya == 0] - a[ya == 0].mean(0)])
    from sklearn.covariance import ledoit_wolf

    S, _ = ledoit_wolf(within, assume_centered=True)
    w = np.linalg.solve(S + 1e-12 * np.trace(S) / len(S) * np.eye(len(S)), d_tr)
    d_te = b[yb == 1].mean(0) - b[yb == 0].mean(0)
    pw = lambda z: z - z.mean(0)
    var = 0.5 * (np.var(pw(b[yb == 1]) @ w) + np.var(pw(b[yb == 0]) @ w))
    num = float(w @ d_te)
    return float(num ** 2 / var) if num > 0 and var > 0 else 0.0


def attack_share(xtr: Any, ytr: Any, xte: Any, yte: Any, basis: Any, ks: Sequence[int], dim: int) -> dict[int, dict[str, float]]:
    """{k: {held, remains}} for the first k columns U of an attacker's (raw-stream) basis: held = the
    separability of the features projected on span(U), remains = that of the features with span(U)
    projected out, each over the separability of all features (held-out squared d'). ks beyond the basis
    are skipped; empty if the features carry no held-out separability. Both are held-out estimates: with few
    prompts either can exceed 1, and the two need not sum to 1 (the directions correlate with the rest)."""
    U = _np(basis)
    a, b = _np(xtr), _np(xte)
    total = fisher_separability(a, ytr, b, yte, dim)
    out: dict[int, dict[str, float]] = {}
    if total <= 0:
        return out
    for k in sorted({int(k) for k in ks}):
        if k < 1 or k > U.shape[1]:
            continue
        Uk = U[:, :k]
        held = fisher_separability(a @ Uk, ytr, b @ Uk, yte, dim)
        rem = fisher_separability(a - (a @ Uk) @ Uk.T, ytr, b - (b @ Uk) @ Uk.T, yte, dim)
        out[k] = {"held": round(held / total, 4), "remains": round(rem / total, 4)}
    return out


# ---- one layer ----------------------------------------------------------------------------------

def layer_report(xtr: Any, ytr: Any, xte: Any, yte: Any, *, sources_te: Sequence[str] | None = None,
                 C: float | None = None, Cs: Sequence[float] = (0.01, 0.1, 1.0), cv_folds: int = 4,
                 inlp_k_max: int = 16, ks: Sequence[int] = (0, 1, 2, 4, 8, 16), erase_ks: Sequence[int] = (0, 1, 2, 4, 8),
                 whiten_dim: int = 64, n_perm: int = 8, threshold: float = 0.60, mlp_hidden: int = 64, seed: int = 0,
                 n_boot: int = 1000) -> dict[str, Any]:
    """Every measure of one layer, JSON-serialisable: the excess-moment spectrum (train), the probes
    (held-out, with intervals and per source), the whitened class difference, k_erase with its curve and
    budget, the rank-1 LEACE check, the held-out Fisher separability, and the INLP curve with k_chance."""
    x, y = torch.from_numpy(_np(xtr)), _labels(ytr)
    yt = _labels(yte)
    vals = spectrum(x[torch.from_numpy(y == 1)], x[torch.from_numpy(y == 0)])
    C = choose_C(xtr, ytr, Cs, cv_folds, seed) if C is None else float(C)
    correct = (linear_probe_predict(xtr, ytr, xte, C=C, seed=seed) == yt).astype(float)
    curve = inlp_curve(xtr, ytr, xte, yte, inlp_k_max, ks, seed=seed, threshold=threshold, C=C)
    erase = erase_curve(xtr, ytr, xte, yte, erase_ks, whiten_dim, C=C, seed=seed, threshold=threshold)
    budget = min(max(int(k) for k in erase_ks), Whitened(xtr, ytr, whiten_dim).Q.shape[1])
    return {
        "effective_rank": round(effective_rank(vals), 4),
        "top_eigvals": [float(f"{v:.6g}") for v in vals[:32].tolist()],
        # the scale of the stream here (trace of the harmless class's covariance): what a defense that shrinks
        # every activation lowers, and what a change of the signal's shape alone leaves in place
        "total_var": float(f"{float(x[torch.from_numpy(y == 0)].var(0).sum()):.6g}"),
        "C": C,
        "linear_acc": round(float(correct.mean()), 4),
        "linear_ci": accuracy_ci(correct, n_boot, seed),
        "by_source": by_source(correct, sources_te, n_boot, seed) if sources_te is not None else {},
        "mlp_acc": round(mlp_probe_acc(xtr, ytr, xte, yte, hidden=mlp_hidden, seed=seed), 4),
        "whitened": whitened_summary(xtr, ytr, whiten_dim, n_perm, seed),
        "erase_curve": {int(k): round(v, 4) for k, v in erase.items()},
        "k_erase": k_erase(erase, threshold),
        "k_erase_budget": int(budget),
        "leace": leace_accuracies(xtr, ytr, xte, yte, whiten_dim, C=C, seed=seed, mlp_hidden=mlp_hidden),
        "separability": round(fisher_separability(xtr, ytr, xte, yte, whiten_dim), 4),
        "acc_vs_removed": {int(k): round(float(v), 4) for k, v in curve.items()},
        "k_chance": k_chance(curve, threshold),
    }
