"""Sequence advantages A, the schedule lambda(step), the token advantages A_hat and the statistics of Delta.

Equations: docs/method.md §1 (A), §4 (A_hat), §7 (lambda). The kernels do the arithmetic; the step uses
their names: `group_advantages` (the kernel's, also taking a list of rewards and a device),
`cepo_advantages` (the kernel itself) and `delta_metrics` (the kernels' statistics, as floats).
"""

from __future__ import annotations

import torch

import cepo_kernels as _kernels
from cepo_kernels import cepo_advantages
from cepo_kernels.ops import _common

__all__ = ["group_advantages", "lam_at", "cepo_advantages", "delta_metrics"]


def group_advantages(rewards, group_size: int, *, scale: str = "group", eps: float = 1e-6,
                     device=None) -> torch.Tensor:
    """A [B] fp32 from the rewards of B = groups x group_size responses (each group contiguous).

    docs/method.md §1: A_i = (r_i - mean_g r) / (std_g r + eps), std unbiased; scale "batch" divides by
    the batch's std, "none" only centres. `rewards` may be a list of floats or a [B] tensor
    (`cepo_kernels.group_advantages`), the result on `device` when given.
    """
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.tensor([float(r) for r in rewards], dtype=torch.float32)
    adv = _kernels.group_advantages(rewards, group_size, scale=scale, eps=eps)
    return adv if device is None else adv.to(device)


def lam_at(step: int, lam0: float, t_warm: int) -> float:
    """docs/method.md §7: lambda(step) = max(0, lam0 (1 - step / t_warm)) at the 0-based rollout batch
    `step`; 0 when t_warm <= 0. A pure function, so a resumed run continues the schedule."""
    if t_warm <= 0:
        return 0.0
    return max(0.0, lam0 * (1.0 - step / t_warm))


def delta_metrics(delta: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Statistics of Delta = pos - neg [B, T] over the valid tokens with A != 0 (adv [B], one per
    sequence): delta_mean, delta_std, delta_mean_pos (A > 0), delta_mean_neg (A < 0), frac_wrong_dir
    (tokens whose Delta has the opposite sign of their A). One host sync."""
    values = _common.delta_metrics(delta, adv[:, None].expand_as(delta), mask)
    return dict(zip(values, torch.stack(list(values.values())).tolist(), strict=True))
