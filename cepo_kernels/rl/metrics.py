"""Per-step statistics of the training loop that the loss's own metrics do not give."""

from __future__ import annotations

import resource

import torch


@torch.no_grad()
def delta_stats(delta: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> dict:
    """Delta = log P_T+ - log P_T- over the valid tokens of the sequences with A != 0 (the only ones whose
    teachers run): mean, std, mean on A > 0 and on A < 0, fraction with sign(Delta) opposite to sign(A)."""
    sign = torch.sign(adv)[:, None].expand_as(delta)
    sel = mask & (sign != 0)

    def mean(x, m):
        return float(x[m].double().mean()) if bool(m.any()) else 0.0

    d = delta[sel].double()
    return {
        "delta_mean": mean(delta, sel),
        "delta_std": float(d.std()) if d.numel() > 1 else 0.0,
        "delta_mean_pos": mean(delta, sel & (sign > 0)),
        "delta_mean_neg": mean(delta, sel & (sign < 0)),
        "frac_wrong_dir": mean((torch.sign(delta) * sign < 0).float(), sel),
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA), else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
