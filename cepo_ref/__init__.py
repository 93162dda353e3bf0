"""cepo_ref: the pure-PyTorch reference of cepo_kernels (same names, same signatures)."""

from cepo_ref.divergence import DivergenceOutput, divergence_loss, linear_divergence_loss
from cepo_ref.reference import (
    CEPOOutput,
    cepo_advantages,
    cepo_loss,
    group_advantages,
    grpo_loss,
    linear_cepo_loss,
    linear_grpo_loss,
    linear_logprobs,
    token_logprobs,
)

__all__ = [
    "token_logprobs", "linear_logprobs", "group_advantages", "cepo_advantages", "cepo_loss",
    "grpo_loss", "linear_cepo_loss", "linear_grpo_loss", "CEPOOutput",
    "divergence_loss", "linear_divergence_loss", "DivergenceOutput",
]
