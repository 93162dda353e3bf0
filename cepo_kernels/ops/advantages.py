"""Group-normalised advantages (GRPO), the sequence-level input of CEPO."""

from __future__ import annotations

import torch

from cepo_kernels._params import check_number, check_tensor

SCALES = ("group", "batch", "none")


def check_group_inputs(rewards, group_size, scale, eps):
    """The argument checks of group_advantages (shared with cepo_ref)."""
    check_tensor("rewards", rewards, ndim=(1,))
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise TypeError(f"rewards: expected a real tensor, got dtype {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"rewards: expected a length divisible by group_size={group_size}, got {rewards.numel()}"
        )
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {SCALES}, got {scale!r}")
    check_number("eps", eps, lo=0.0)


@torch.no_grad()
def group_advantages(rewards, group_size, *, scale="group", eps=1e-6):
    """Group-normalised advantages.

    Args:
        rewards: [B] rewards, B = groups * group_size with each group's responses contiguous.
        group_size: responses per prompt (G).
        scale: "group" -> (r - mean_g) / (std_g + eps); "batch" -> (r - mean_g) / (std_batch + eps);
            "none" -> r - mean_g. std is unbiased (torch.std); a group of one has std 0.
        eps: added to the std.
    Returns:
        [B] fp32 advantages on the rewards' device.
    """
    check_group_inputs(rewards, group_size, scale, eps)
    r = rewards.float().view(-1, group_size)  # [groups, G]
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else r.new_zeros(r.shape[0], 1)
    else:
        std = r.std() if r.numel() > 1 else r.new_zeros(())
    return (centred / (std + eps)).reshape(-1)
