"""Per-step statistics of the training loop that the loss's own metrics do not give."""

from __future__ import annotations

import resource

import torch

from cepo_kernels.ops._common import delta_metrics


def delta_stats(delta: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> dict:
    """delta_metrics of the whole rollout batch (adv [B], one per sequence), as floats."""
    values = delta_metrics(delta, adv[:, None].expand_as(delta), mask)
    return dict(zip(values, torch.stack(list(values.values())).tolist(), strict=True))


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA), else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
