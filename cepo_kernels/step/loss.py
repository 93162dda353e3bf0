"""The policy loss of a micro-batch: A_hat and the PPO-clipped loss in one fused call (docs/method.md §4-5).

The teachers enter as log-probs scored before the update (`scoring.teacher_logprobs`); the hidden
states and the lm_head carry the gradient. At lam = 0, or without teachers, A_hat = A exactly and no
teacher input is read: the loss is GRPO's.
"""

from __future__ import annotations

from cepo_kernels.ops.linear import linear_cepo_loss

__all__ = ["policy_loss"]


def policy_loss(hidden, weight, targets, advantages, mask, *, old_logp=None, pos_logp=None, neg_logp=None,
                bias=None, lam: float = 0.5, eps_w: float = 0.2, eps_low: float = 0.2, eps_high: float = 0.28,
                clip_dual: float | None = 3.0, temperature: float = 1.0, reduction: str = "token-mean",
                num_tokens=None, metrics="tensor"):
    """L = reduce_t -min(rho_t A_hat_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_hat_t) (dual clip at
    -clip_dual A_hat_t for A_hat_t < 0), rho_t = exp(lp_t - old_t), lp from hidden @ weight.T + bias;
    A_hat from advantages [n] and the teachers' log-probs with weight lam (docs/method.md §4-5).

    Returns the CEPOOutput of `cepo_kernels.linear_cepo_loss` (metrics as 0-dim tensors by default:
    no host sync).
    """
    teachers = {}
    if pos_logp is not None and neg_logp is not None and lam > 0.0:
        teachers = {"pos_logp": pos_logp, "neg_logp": neg_logp}
    else:
        lam = 0.0
    return linear_cepo_loss(hidden, weight, targets, advantages, mask, old_logp=old_logp, bias=bias, lam=lam,
                            eps_w=eps_w, eps_low=eps_low, eps_high=eps_high, clip_dual=clip_dual,
                            temperature=temperature, reduction=reduction, num_tokens=num_tokens,
                            metrics=metrics, **teachers)
