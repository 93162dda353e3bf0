"""cepo_ref: the pure-PyTorch reference of cepo_kernels (same names, same signatures)."""

from cepo_ref.divergence import (
    DivergenceOutput,
    DivergenceParams,
    divergence_loss,
    linear_divergence_loss,
    sampled_token_kl_loss,
)
from cepo_ref.reference import (
    CEPOOutput,
    LossParams,
    cepo_advantages,
    cepo_loss,
    group_advantages,
    grpo_loss,
    linear_cepo_loss,
    linear_grpo_loss,
    linear_logprobs,
    linear_teacher_logprobs,
    token_logprobs,
)

__all__ = [
    "token_logprobs", "linear_logprobs", "linear_teacher_logprobs", "group_advantages", "cepo_advantages",
    "cepo_loss", "grpo_loss", "linear_cepo_loss", "linear_grpo_loss", "CEPOOutput", "LossParams",
    "divergence_loss", "linear_divergence_loss", "sampled_token_kl_loss", "DivergenceOutput",
    "DivergenceParams",
]
