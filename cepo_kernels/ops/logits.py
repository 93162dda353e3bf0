"""Fused Triton kernels on logits: token log-probs (+ entropy) and the single-pass CEPO/GRPO loss.
Here: the public functions; the launchers: ops/_logits_launch.py; the operators wrapping them
(torch.ops.cepo_kernels.*, with fake implementations and autograd): ops/_logits_ops.py; the kernels:
ops/_logits_kernels.py.

Forward: one program per token row streams the vocabulary in BLOCK_V tiles, reading the policy logits
and, when given, both teachers' logits of the same token in the same loop (online logsumexp, fp32),
then applies the per-token CEPO arithmetic (`cepo_token`). It saves only fp32 per-token values
(lse, dL_t/dlp). Backward: dlogits = (g_lp (onehot - p) - g_H p (log p + H)) / T per row, written in
the logits' dtype; a row with zero upstream coefficient (masked, clipped, A_hat = 0) writes zeros
without reading its logits. With `inplace=True` the gradient overwrites the logits' storage.
Derivation: docs/gradient.md.
"""

from __future__ import annotations

import math

import torch

from cepo_kernels._params import (
    LossParams,
    as_float,
    check_kernel_dtype,
    check_logits_and_targets,
    check_logits_loss,
    check_loss_inputs,
    check_temperature,
    check_tensor,
)
from cepo_kernels.ops import _logits_ops  # noqa: F401  (registers torch.ops.cepo_kernels.*)
from cepo_kernels.ops._common import check_metrics_option, loss_output


def _as_btv(x):
    """A [B, T, V] view of [..., V] with a unit last stride (copies only when no such view exists)."""
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    lead = x.shape[:-1]
    T = lead[-1] if len(lead) else 1
    B = math.prod(lead[:-1])
    try:
        return x.view(B, T, x.shape[-1])
    except RuntimeError:
        return x.reshape(B, T, x.shape[-1])


def token_logprobs(logits, targets, *, temperature=1.0, return_entropy=False, inplace=False):
    """log_softmax(logits / temperature)[targets] in one pass over the vocabulary, differentiable.

    Args:
        logits: [..., V] fp32/bf16/fp16 (float64 raises TypeError: use cepo_ref); any strides, only the
            last dim should be contiguous.
        targets: [...] int64 token ids. A negative id (Hugging Face's -100 ignore index) gives logp = 0
            with no gradient (the entropy is computed as usual); an id >= V gives a NaN log-prob (never
            an out-of-bounds read).
        temperature: > 0, the logits are divided by it.
        return_entropy: also return the entropy of the tempered distribution (differentiable).
        inplace: the backward writes dlogits into the logits' storage (no second [..., V] buffer);
            the logits are clobbered and must not be used after backward.
    Returns:
        logp [...] fp32, or (logp, entropy) with return_entropy.
    """
    check_logits_and_targets(logits, targets)
    check_kernel_dtype("logits", logits)
    check_temperature(temperature)
    x = _as_btv(logits)
    lp, _, ent = torch.ops.cepo_kernels.token_logprobs(
        x, targets.reshape(-1).long().contiguous(), float(temperature), bool(return_entropy), bool(inplace))
    if return_entropy:
        return lp.reshape(targets.shape), ent.reshape(targets.shape)
    return lp.reshape(targets.shape)


def cepo_loss(logits, targets, advantages, mask, *, old_logp=None, pos_logits=None, neg_logits=None,
              pos_logp=None, neg_logp=None, lam=None, eps_w=0.2, eps_low=0.2, eps_high=0.28, clip_dual=3.0,
              temperature=1.0, reduction="token-mean", num_tokens=None, inplace=False, metrics=True):
    """The CEPO policy loss (PPO-clip on the contrastively reweighted advantage), fused over logits.

    One pass over the vocabulary reads the policy logits and the teachers' logits of each token together.
    Each teacher is given either as logits (read in that pass) or as log-probs (e.g. RLSD:
    neg_logp=old_logp); no teachers -> GRPO. The gradient reaches only `logits`.

    Args:
        logits: [B, T, V] or [N, V] policy logits, fp32/bf16/fp16 (float64 raises TypeError, as for the
            teachers' logits), last dim contiguous (any other strides).
        targets: [B, T] / [N] int64 sampled tokens. A negative id (Hugging Face's -100) counts as masked
            (as F.cross_entropy(ignore_index=-100); no host sync) and its logp comes out 0; an id >= V at
            an unmasked position gives a NaN log-prob, hence a NaN loss (never an out-of-bounds read).
        advantages: [B] (one per sequence) or [B, T] / [N], float.
        mask: [B, T] / [N] bool or 0/1: the response tokens that count.
        old_logp: [B, T] / [N] log-probs of the rollout policy; None -> on-policy (ratio 1).
        pos_logits, neg_logits: teachers' logits shaped like `logits` (no gradient).
        pos_logp, neg_logp: teachers' log-probs [B, T] / [N] instead (at most one form per teacher).
        lam, eps_w: mixing weight in [0, 1] and weight clip in [0, 1).
        eps_low, eps_high, clip_dual: PPO clip range and dual clip (None: off).
        temperature: > 0; policy and teacher logits are divided by it.
        reduction: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum" or "none".
        num_tokens: token-mean denominator (gradient accumulation across micro-batches): a number > 0,
            used as given, or a one-element tensor used as given on the device (no host sync, not
            validated): 0 means no valid tokens (zero loss and gradient), a negative or NaN value gives a
            NaN loss.
        inplace: the backward writes dlogits into the logits' storage (no extra [N, V] buffer); the
            logits are clobbered and must not be used after backward (their version counter is bumped,
            so autograd raises if anything that saved them reads them later).
        metrics: True (default): a dict of Python floats, all read with one device-to-host copy;
            "tensor": the same keys as 0-dim fp32 tensors on the device (no host sync: CUDA-graph
            capturable with a bool mask and num_tokens given as a number or a tensor); False: {} (none
            computed).
    Returns:
        CEPOOutput(loss: scalar ([B, T] / [N] for "none"), logp: fp32 detached (0 at masked positions,
        whose logits are never read), advantages: fp32 A_hat detached, metrics: dict of floats, or of
        tensors with metrics="tensor").
    """
    check_metrics_option(metrics)
    params, batch = check_logits_loss(
        logits, targets, advantages, mask, old_logp=old_logp, pos_logits=pos_logits, neg_logits=neg_logits,
        pos_logp=pos_logp, neg_logp=neg_logp, num_tokens=num_tokens, lam=lam, eps_w=eps_w, eps_low=eps_low,
        eps_high=eps_high, clip_dual=clip_dual, temperature=temperature, reduction=reduction,
    )
    for name, t in (("logits", logits), ("pos_logits", pos_logits), ("neg_logits", neg_logits)):
        if t is not None:
            check_kernel_dtype(name, t)
    B, T = batch.B, batch.T

    def flat(t):
        return None if t is None else t.detach().reshape(-1).float().contiguous()

    p = params
    loss_tok, lp, _, a_hat, _, delta = torch.ops.cepo_kernels.cepo_fwd(
        _as_btv(logits), batch.targets.reshape(-1).contiguous(), flat(batch.advantages),
        batch.mask.reshape(-1).to(torch.uint8), flat(batch.old_logp),
        None if pos_logits is None else _as_btv(pos_logits.detach()),
        None if neg_logits is None else _as_btv(neg_logits.detach()), flat(batch.pos_logp),
        flat(batch.neg_logp),
        p.temperature, p.lam, p.eps_w, p.eps_low, p.eps_high, p.clip_dual, bool(inplace))
    loss_tok, lp, a_hat = loss_tok.reshape(B, T), lp.detach().reshape(B, T), a_hat.detach().reshape(B, T)
    has_teachers = pos_logits is not None or batch.pos_logp is not None
    delta = delta.detach().reshape(B, T) if has_teachers else None
    return loss_output(loss_tok, lp, a_hat, delta, batch, params, num_tokens, metrics)


def grpo_loss(logits, targets, advantages, mask, *, old_logp=None, eps_low=0.2, eps_high=0.28, clip_dual=3.0,
              temperature=1.0, reduction="token-mean", num_tokens=None, inplace=False, metrics=True):
    """cepo_loss without teachers (A_hat = A): the fused PPO-clip GRPO loss. Same arguments and output."""
    return cepo_loss(logits, targets, advantages, mask, old_logp=old_logp, eps_low=eps_low, eps_high=eps_high,
                     clip_dual=clip_dual, temperature=temperature, reduction=reduction, num_tokens=num_tokens,
                     inplace=inplace, metrics=metrics)


@torch.no_grad()
def cepo_advantages(advantages, pos_logp, neg_logp, mask, *, lam, eps_w=0.2):
    """A_hat = A ((1 - lam) + lam clip(exp(sign(A) (pos - neg)), 1 - eps_w, 1 + eps_w)) * mask, in Triton.

    Args:
        advantages: [B] (one per sequence) or [B, T] float; pos_logp, neg_logp: [B, T] float;
            mask: [B, T] bool or 0/1 (all may be flattened to [N]). RLSD: neg_logp = old student log-probs.
        lam: in [0, 1]; eps_w: in [0, 1).
    Returns:
        A_hat shaped like pos_logp, fp32, exactly 0 at masked tokens.
    """
    check_tensor("pos_logp", pos_logp, dtypes="float")
    lead = tuple(pos_logp.shape)
    dummy_targets = torch.zeros(lead, dtype=torch.long, device=pos_logp.device)
    batch = check_loss_inputs(lead, pos_logp.device, dummy_targets, advantages, mask, pos_logp=pos_logp,
                              neg_logp=neg_logp)
    lam = LossParams(lam=as_float("lam", lam), eps_w=eps_w).lam

    def flat(t):
        return t.reshape(-1).float().contiguous()

    out = torch.ops.cepo_kernels.cepo_advantages(flat(batch.advantages), flat(batch.pos_logp),
                                                 flat(batch.neg_logp), batch.mask.reshape(-1).to(torch.uint8),
                                                 lam, float(eps_w))
    return out.reshape(lead)
