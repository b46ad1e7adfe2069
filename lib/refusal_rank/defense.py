"""The defense's objective (notebook 03), one small function per term.

    loss = L_lm + lambda_kd * T^2 * KL(teacher_T || student_T) + lambda_cov * L_cov + lambda_mean * L_mean
           + lambda_spread * L_spread

* ``prompt_lm_loss``: next-token cross-entropy over the (prompt-only, chat-formatted) tokens.
* ``kd_loss``: T^2 * KL(softmax(t/T) || softmax(s/T)) at the last prompt position, where refuse-or-comply
  is decided. The T^2 factor keeps the gradient scale comparable across T (Hinton et al.); as T grows,
  T^2 * KL tends to the logit-matching limit sum((ds - mean ds)^2) / (2 V) (tested).
* ``cov_matching_loss`` / ``mean_matching_loss``: per site (a layer's pooled representation, or a layer and
  position), after per-dimension standardisation by the teacher's statistics (``Standardizer``: Qwen
  residual streams carry a few dimensions of huge magnitude that would otherwise be the whole trace).
  Each is scale-free (the class gap divided by the student's own current spread) and unbiased
  (U-statistics over distinct prompts; covariances from differences of row pairs), computed through
  n x n Gram matrices (no d x d matrix is formed). The covariance term needs >= 4 examples per class and
  rows in a random order (``shuffle_rows``); the paper's micro-batch of 2 silently made its term zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def prompt_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over non-padding positions. logits (B, T, V), ids/mask (B, T)."""
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:]
    mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return nll[mask.reshape(-1)].mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), mean over rows. Both (B, V) at the last prompt position."""
    T = float(temperature)
    if T <= 0:
        raise ValueError("temperature must be positive")
    # float64: at large T the KL is tiny and T^2 amplifies float32 rounding (rows x vocab is small)
    log_t = F.log_softmax(teacher_logits.double() / T, dim=-1)
    log_s = F.log_softmax(student_logits.double() / T, dim=-1)
    return (T * T * (log_t.exp() * (log_t - log_s)).sum(-1).mean()).float()


@dataclass
class Standardizer:
    """Per-layer, per-dimension mean and std of the teacher's pooled representations: (L, d) each."""

    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> standardised (B, L, d) in float32."""
        return (pooled.float() - self.mean.to(pooled.device)) / self.std.to(pooled.device)

    @classmethod
    def fit(cls, pooled: torch.Tensor, eps: float = 1e-4) -> "Standardizer":
        """From teacher pooled vectors (N, L, d), accumulated in float64."""
        x = pooled.double()
        return cls(x.mean(0).float(), x.std(0).clamp_min(eps).float())


def pool_positions(hidden: torch.Tensor, n_post: int) -> torch.Tensor:
    """Mean over the last ``n_post`` positions (left padding puts them at the end). (B, T, d) -> (B, d)."""
    return hidden[:, -n_post:, :].mean(1)


def _offdiag_mean(g: torch.Tensor) -> torch.Tensor:
    """Mean of the off-diagonal entries of square matrices (..., n, n): the U-statistic that drops the
    i = j terms whose expectation carries each sample's own variance (the noise floor)."""
    n = g.shape[-1]
    return (g.sum((-1, -2)) - g.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


def _per_site(z: torch.Tensor) -> torch.Tensor:
    """(n, S, d) -> (S, n, d) in float32: one Gram matrix per site (layer, or layer x position)."""
    return z.float().transpose(0, 1)


def _total_variance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased tr(Sigma) per site of (S, n, d) samples: the spread every scale-free term divides by."""
    return (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2)) / (x.shape[1] - 1)


def class_mean_gap(z_harmful: torch.Tensor, z_harmless: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased estimates, per site, of ||mu_h - mu_o||^2 and of tr(Sigma_h) + tr(Sigma_o).

    ||mu_h - mu_o||^2 = E<h,h'> + E<o,o'> - 2 E<h,o> over *distinct* samples; the plug-in ||mean_h - mean_o||^2
    adds tr(Sigma_h)/n + tr(Sigma_o)/m, a positive floor that an optimiser lowers by shrinking, not matching.
    Inputs (n, S, d), (m, S, d) with n, m >= 2; outputs (S,), (S,)."""
    n, m = z_harmful.shape[0], z_harmless.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"unbiased class statistics need >= 2 examples of each class (got {n} and {m})")
    A, B = _per_site(z_harmful), _per_site(z_harmless)
    # the estimate is translation-invariant; centring on a common reference keeps Gram entries small
    ref = torch.cat([A, B], 1).mean(1, keepdim=True).detach()
    A, B = A - ref, B - ref
    hh = _offdiag_mean(A @ A.transpose(1, 2))
    oo = _offdiag_mean(B @ B.transpose(1, 2))
    ho = (A @ B.transpose(1, 2)).mean((1, 2))
    gap = hh + oo - 2 * ho
    return gap, _total_variance(A) + _total_variance(B)


def _pair_differences(x: torch.Tensor) -> torch.Tensor:
    """(S, n, d) -> (S, n // 2, d): (x_2p - x_2p+1) / sqrt(2). Independent, zero-mean, with the class
    covariance: the class mean drops out exactly, so no centring bias enters the second moments."""
    k = x.shape[1] // 2
    return (x[:, 0:2 * k:2] - x[:, 1:2 * k:2]) / 2 ** 0.5


def class_cov_gap(z_harmful: torch.Tensor, z_harmless: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased estimates, per site, of ||Sigma_h - Sigma_o||_F^2 and of the scale ((tr Sigma_h + tr Sigma_o) / 2)^2.

    With pair differences u_p (harmful) and v_q (harmless): tr(Sigma_h^2) = E (u_p . u_q)^2 for p != q,
    tr(Sigma_h Sigma_o) = E (u_p . v_q)^2. Computed through (n/2 x n/2) Gram matrices (no d x d matrix).
    The scale is a squared mean variance: it scales as c^4 like the gap, and, a sum over every dimension,
    it is far less noisy than ||Sigma||_F^2 would be, so the ratio carries almost no ratio bias (tested).
    Rows must be in a random order (``shuffle_rows``): neighbouring rows are paired. Inputs (n, S, d),
    (m, S, d) with n, m >= 4; outputs (S,), (S,)."""
    n, m = z_harmful.shape[0], z_harmless.shape[0]
    if n < 4 or m < 4:
        raise ValueError(f"unbiased covariance matching needs >= 4 examples of each class (got {n} and {m})")
    A, B = _per_site(z_harmful), _per_site(z_harmless)
    U, V = _pair_differences(A), _pair_differences(B)
    uu = _offdiag_mean((U @ U.transpose(1, 2)).pow(2))
    vv = _offdiag_mean((V @ V.transpose(1, 2)).pow(2))
    uv = (U @ V.transpose(1, 2)).pow(2).mean((1, 2))
    return uu + vv - 2 * uv, ((_total_variance(A) + _total_variance(B)) / 2).pow(2)


def shuffle_rows(z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``z`` with its rows (first axis) in a random order; gradients flow through the permutation.

    The covariance term pairs neighbouring rows, so each pair must be two independent draws of its class.
    Rows from length-sorted micro-batches are not: neighbours share a length, their difference cancels
    whatever covariance length carries, and the term then matches only the covariance *within* a length.
    (Measured on the cpu model's 96 + 96 training prompts: length order read 0.063 where random orders read
    0.091 +- 0.012 on the original, 0.026 against 0.047 +- 0.005 after 70 steps of ``defended``.)
    A permutation makes the rows exchangeable again. The mean term sums over every pair and needs none."""
    return z[torch.randperm(z.shape[0], generator=generator).to(z.device)]


def mean_matching_loss(z_harmful: torch.Tensor, z_harmless: torch.Tensor) -> torch.Tensor:
    """Scale-free, unbiased mean matching: mean over sites of ||mu_h - mu_o||^2 / (tr Sigma_h + tr Sigma_o).

    Rescaling every representation by c leaves it unchanged (numerator and denominator both scale as c^2),
    so shrinking the activations buys nothing; two samples of one distribution give 0 on average (it can
    be negative on one draw). Inputs (n, S, d), (m, S, d)."""
    gap, scale = class_mean_gap(z_harmful, z_harmless)
    return (gap / scale.clamp_min(1e-12)).mean()


def cov_matching_loss(z_harmful: torch.Tensor, z_harmless: torch.Tensor) -> torch.Tensor:
    """Scale-free, unbiased covariance matching: mean over sites of
    ||Sigma_h - Sigma_o||_F^2 / ((tr Sigma_h + tr Sigma_o) / 2)^2.

    Invariant to a common rescaling (both sides scale as c^4); 0 on average for two samples of one
    distribution. Inputs (n, S, d), (m, S, d), n, m >= 4."""
    gap, scale = class_cov_gap(z_harmful, z_harmless)
    return (gap / scale.clamp_min(1e-12)).mean()


def plugin_cov_gap(z_harmful: torch.Tensor, z_harmless: torch.Tensor) -> torch.Tensor:
    """The earlier, biased form kept for comparison only: mean over sites of ||Cov_h - Cov_o||_F^2 / d^2 with
    sample covariances. It scales as c^4 and has a positive floor of about 2 d^-2 tr(Sigma)^2 / (n - 1)."""
    n, m = z_harmful.shape[0], z_harmless.shape[0]
    d = z_harmful.shape[-1]
    A = _per_site(z_harmful) - _per_site(z_harmful).mean(1, keepdim=True)
    B = _per_site(z_harmless) - _per_site(z_harmless).mean(1, keepdim=True)
    aa = (A @ A.transpose(1, 2)).pow(2).sum((1, 2)) / (n - 1) ** 2
    bb = (B @ B.transpose(1, 2)).pow(2).sum((1, 2)) / (m - 1) ** 2
    ab = (A @ B.transpose(1, 2)).pow(2).sum((1, 2)) / ((n - 1) * (m - 1))
    return ((aa + bb - 2 * ab) / d**2).clamp_min(0).mean()


def excess_top_eig(z_harmful: torch.Tensor, z_harmless: torch.Tensor) -> torch.Tensor:
    """Top eigenvalue, per site, of the excess second moment about the harmless mean,
    E_h[(z-mu_o)(z-mu_o)^T] - Sigma_o = Sigma_h - Sigma_o + (mu_h-mu_o)(mu_h-mu_o)^T: the matrix whose top
    eigenvectors the cov-diff attacker ablates (``attacks.excess_second_moment``). Invariant to a common
    shift of both classes (an uncentred second moment is not: a drift of both class means away from the
    teacher's inflates it); shrinking the activations by c scales it by c^2; matching the classes lowers it
    without shrinking them. Inputs (n, S, d), (m, S, d) -> (S,), float64."""
    from .attacks import excess_second_moment

    out = []
    for s in range(z_harmful.shape[1]):
        out.append(torch.linalg.eigvalsh(excess_second_moment(z_harmful[:, s], z_harmless[:, s]))[-1])
    return torch.stack(out)


def excess_cov_top_eig(z_harmful: torch.Tensor, z_harmless: torch.Tensor) -> torch.Tensor:
    """Top eigenvalue, per site, of Sigma_h - Sigma_o alone: :func:`excess_top_eig` with each class centred
    on its own mean, so without the outer product of the mean gap. Read beside it, it says what a fall of the
    excess second moment was: a variant that matches the class means removes (mu_h-mu_o)(mu_h-mu_o)^T and
    lowers excess_top_eig while this one stays; shrinking the activations by c lowers both by c^2.
    Inputs (n, S, d), (m, S, d) -> (S,), float64."""
    return excess_top_eig(z_harmful - z_harmful.mean(0, keepdim=True), z_harmless - z_harmless.mean(0, keepdim=True))


def spread_log_ratio(z_harmful: torch.Tensor, z_harmless: torch.Tensor,
                     reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per site, log(total variance of both classes pooled / the teacher's): 0 where the student's spread is
    the teacher's. ``reference``: the teacher's vectors of the same prompts, the exact reference on a batch;
    without it, d (the sites are standardised by the teacher over every training prompt, 1 a dimension, but
    a batch of a heavy-tailed distribution typically reads less: -0.14 in log on the cpu model's first steps,
    a pull to inflate that the exact reference does not have). A scale-free term can still be lowered by
    inflating a spread both classes share (the gap stays, the denominator grows), and in a model whose every
    block starts with an RMS norm the residual stream's scale costs the LM and KD terms almost nothing: the
    cpu run inflated it 2- to 1600-fold by layer within 30 steps (notebook 03). Penalising this log ratio
    holds the spread where the teacher had it. Inputs (n, S, d), (m, S, d); output (S,)."""
    x = torch.cat([_per_site(z_harmful), _per_site(z_harmless)], 1)
    if reference is None:
        ref = torch.full((x.shape[0],), float(x.shape[-1]), dtype=x.dtype, device=x.device)
    else:
        ref = _total_variance(torch.cat([_per_site(reference[0]), _per_site(reference[1])], 1)).to(x.device)
    return torch.log(_total_variance(x).clamp_min(1e-12) / ref.clamp_min(1e-12))


def spread_anchor_loss(z_harmful: torch.Tensor, z_harmless: torch.Tensor,
                       reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean over sites of ``spread_log_ratio`` squared: shrinking or inflating the representations by c
    costs (2 log c)^2, symmetric in c and 1/c."""
    return spread_log_ratio(z_harmful, z_harmless, reference).pow(2).mean()


def null_split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of one class (alternate rows): the moment terms on them measure the noise
    floor of an estimate from half as many prompts (an upper bound on the floor of the real term)."""
    return z[0::2], z[1::2]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding tokens of each row: (B, T, d), (B, T) -> (B, d). The paper's pooling over
    every prompt token (template included), against ours over the post-instruction positions only."""
    w = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1)
