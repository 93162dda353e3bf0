"""cepo_kernels: fused Triton kernels for CEPO (Contrastive Evidence Policy Optimization) and GRPO.

Public API: token_logprobs, linear_teacher_logprobs, linear_logprobs, group_advantages, cepo_advantages,
cepo_loss, grpo_loss, linear_cepo_loss, linear_grpo_loss, and the self-distillation divergences
divergence_loss, linear_divergence_loss, sampled_token_kl_loss. Importing needs no GPU; on CPU tensors the
operators run native PyTorch kernels (the same arithmetic), or, with CEPO_KERNELS_CPU=interpreter and
TRITON_INTERPRET=1 set before importing, the Triton kernels through Triton's interpreter.
"""

from cepo_kernels._interrupt import quiet_startup_interrupt  # first: Ctrl-C while torch imports

quiet_startup_interrupt()

from cepo_kernels._params import CEPOOutput, DivergenceOutput, DivergenceParams, LossParams  # noqa: E402
from cepo_kernels.ops.advantages import group_advantages  # noqa: E402
from cepo_kernels.ops.divergence import (  # noqa: E402
    divergence_loss,
    linear_divergence_loss,
    sampled_token_kl_loss,
)
from cepo_kernels.ops.linear import (  # noqa: E402
    linear_cepo_loss,
    linear_grpo_loss,
    linear_logprobs,
    linear_teacher_logprobs,
)
from cepo_kernels.ops.logits import cepo_advantages, cepo_loss, grpo_loss, token_logprobs  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "token_logprobs",
    "linear_logprobs",
    "linear_teacher_logprobs",
    "group_advantages",
    "cepo_advantages",
    "cepo_loss",
    "grpo_loss",
    "linear_cepo_loss",
    "linear_grpo_loss",
    "divergence_loss",
    "linear_divergence_loss",
    "sampled_token_kl_loss",
    "CEPOOutput",
    "LossParams",
    "DivergenceOutput",
    "DivergenceParams",
]
