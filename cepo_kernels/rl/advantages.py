"""Group-normalised advantages for the training loop: re-exported from cepo_kernels.ops.advantages."""

from cepo_kernels.ops.advantages import SCALES, check_group_inputs, group_advantages

__all__ = ["SCALES", "check_group_inputs", "group_advantages"]
