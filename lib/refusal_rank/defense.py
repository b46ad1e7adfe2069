"""The defense's objective (notebook 03), one small function per term.

    loss = L_lm + lambda_kd * T^2 * KL(teacher_T || student_T) + lambda_cov * L_cov + lambda_mean * L_mean

* ``prompt_lm_loss``: next-token cross-entropy over the (prompt-only, chat-formatted) tokens.
* ``kd_loss``: T^2 * KL(softmax(t/T) || softmax(s/T)) at the last prompt position, where refuse-or-comply
  is decided. The T^2 factor keeps the gradient scale comparable across T (Hinton et al.); as T grows,
  T^2 * KL tends to the logit-matching limit sum((ds - mean ds)^2) / (2 V) (tested).
* ``cov_matching_loss`` / ``mean_matching_loss``: on *pooled* representations (mean over the
  post-instruction positions) at every decoder layer, after per-layer, per-dimension standardisation by
  the teacher's pooled statistics (``Standardizer``). Qwen residual streams carry a few dimensions of
  huge magnitude; without standardisation they would dominate both terms, and so would late layers.
  L_cov = ||Cov_harmful - Cov_harmless||_F^2 / d^2, averaged over layers, computed through n x n Gram
  matrices (no d x d matrix is formed). A covariance needs >= 2 examples per class: the function refuses
  fewer, which is how the paper's micro-batch of 2 (one per class) silently made its term zero.
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


def _centered(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0, keepdim=True)


def cov_matching_loss(z_harmful: torch.Tensor, z_harmless: torch.Tensor) -> torch.Tensor:
    """mean over layers of ||Cov(z_harmful) - Cov(z_harmless)||_F^2 / d^2; inputs (n, L, d), (m, L, d)."""
    n, m = z_harmful.shape[0], z_harmless.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"covariance matching needs >= 2 examples of each class per batch (got {n} and {m})")
    d = z_harmful.shape[-1]
    A = _centered(z_harmful.float()).transpose(0, 1)  # (L, n, d)
    B = _centered(z_harmless.float()).transpose(0, 1)  # (L, m, d)
    # ||A^T A/(n-1) - B^T B/(m-1)||_F^2 = ||AA^T||^2/(n-1)^2 + ||BB^T||^2/(m-1)^2 - 2||AB^T||^2/((n-1)(m-1))
    aa = (A @ A.transpose(1, 2)).pow(2).sum((1, 2)) / (n - 1) ** 2
    bb = (B @ B.transpose(1, 2)).pow(2).sum((1, 2)) / (m - 1) ** 2
    ab = (A @ B.transpose(1, 2)).pow(2).sum((1, 2)) / ((n - 1) * (m - 1))
    return ((aa + bb - 2 * ab) / d**2).clamp_min(0).mean()


def mean_matching_loss(z_harmful: torch.Tensor, z_harmless: torch.Tensor) -> torch.Tensor:
    """mean over layers of ||mean(z_harmful) - mean(z_harmless)||^2 / d; inputs (n, L, d), (m, L, d)."""
    if z_harmful.shape[0] < 1 or z_harmless.shape[0] < 1:
        raise ValueError("mean matching needs >= 1 example of each class per batch")
    diff = z_harmful.float().mean(0) - z_harmless.float().mean(0)  # (L, d)
    return diff.pow(2).mean(-1).mean()
