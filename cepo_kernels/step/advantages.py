"""Sequence advantages A, the schedule lambda(step), the token advantages A_hat and the evidence statistics.

Equations: docs/method.md §1 (A), §4 (A_hat), §7 (lambda). The kernels do the arithmetic
(`cepo_kernels.group_advantages`, `cepo_kernels.cepo_advantages`); this module is the step's view of them.
"""

from __future__ import annotations

import torch

from cepo_kernels.ops._common import delta_metrics
from cepo_kernels.ops.advantages import group_advantages
from cepo_kernels.ops.logits import cepo_advantages

__all__ = ["sequence_advantages", "lam_at", "token_advantages", "evidence_stats"]


def sequence_advantages(rewards, group_size: int, *, scale: str = "group", eps: float = 1e-6,
                        device=None) -> torch.Tensor:
    """A [B] fp32 from the rewards of B = groups x group_size responses (each group contiguous).

    docs/method.md §1: A_i = (r_i - mean_g r) / (std_g r + eps), std unbiased; scale "batch" divides by
    the batch's std, "none" only centres. `rewards` may be a list of floats or a [B] tensor.
    """
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.tensor([float(r) for r in rewards], dtype=torch.float32)
    adv = group_advantages(rewards, group_size, scale=scale, eps=eps)
    return adv if device is None else adv.to(device)


def lam_at(step: int, lam0: float, t_warm: int) -> float:
    """docs/method.md §7: lambda(step) = max(0, lam0 (1 - step / t_warm)) at the 0-based rollout batch
    `step`; 0 when t_warm <= 0. A pure function, so a resumed run continues the schedule."""
    if t_warm <= 0:
        return 0.0
    return max(0.0, lam0 * (1.0 - step / t_warm))


def token_advantages(advantages, pos_logp, neg_logp, mask, *, lam: float, eps_w: float = 0.2) -> torch.Tensor:
    """A_hat [B, T] = A ((1 - lam) + lam clip(exp(sign(A) (pos - neg)), 1 - eps_w, 1 + eps_w)) at valid
    tokens, 0 elsewhere (docs/method.md §3-4). RLSD: the old student log-probs as neg_logp."""
    return cepo_advantages(advantages, pos_logp, neg_logp, mask, lam=lam, eps_w=eps_w)


def evidence_stats(delta: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Statistics of Delta = pos - neg [B, T] over the valid tokens with A != 0 (adv [B], one per
    sequence): delta_mean, delta_std, delta_mean_pos (A > 0), delta_mean_neg (A < 0), frac_wrong_dir
    (tokens whose Delta has the opposite sign of their A). One host sync."""
    values = delta_metrics(delta, adv[:, None].expand_as(delta), mask)
    return dict(zip(values, torch.stack(list(values.values())).tolist(), strict=True))
