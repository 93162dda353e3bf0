"""Self-distillation divergences (OPSD, SDPO): the student's against a teacher's next-token distribution.

Here: the public functions and their input checks. The operators (torch.ops.cepo_kernels.divergence_fwd /
linear_divergence_fwd, fake implementations, autograd, native CPU kernels): ops/_divergence_ops.py; the
launchers and the linear path's row chunks: ops/_divergence_launch.py; the Triton kernels (full vocabulary):
ops/_divergence_kernels.py; chunked torch (top-k, native CPU): ops/_divergence_torch.py. Math and numbers:
docs/divergence.md.
"""

from __future__ import annotations

import torch

from cepo_kernels._params import (
    DivergenceOutput,
    DivergenceParams,
    check_kernel_dtype,
    check_linear,
    check_loss_inputs,
    check_tensor,
)
from cepo_kernels.ops import _divergence_ops  # noqa: F401  (registers torch.ops.cepo_kernels.*divergence*)
from cepo_kernels.ops._common import check_metrics_option, reduce_loss
from cepo_kernels.ops.linear import _lastdim, _rows2d
from cepo_kernels.ops.logits import _as_btv

_OPTIONS_DOC = """
        mask: [B, T] / [N] bool or 0/1: the response tokens that count.
        beta: in [0, 1]. D_t = beta KL(p_T || M) + (1 - beta) KL(p_S || M), M = (1 - beta) p_S + beta p_T;
            beta = 0 is exactly KL(p_T || p_S) (forward), beta = 1 exactly KL(p_S || p_T) (reverse).
        temperature: > 0; both logits are divided by it.
        topk: None (full vocabulary) or k <= V: both distributions over the k ids with the largest logits of
            `topk_from` ("student" or "teacher"); add_tail=True adds one bucket holding 1 - (sum of the k
            probabilities) of each, add_tail=False renormalises both over the k ids. (Chunked torch.topk.)
        targets: [B, T] / [N] integer sampled tokens or None. A negative id (-100) counts as masked; needed
            for the importance weight, where an id >= V at an unmasked position gives a NaN loss.
        old_logp, is_clip: SDPO's importance weight, both or neither: D_t is multiplied by
            min(exp(sg(logp_S(target_t) - old_logp_t)), is_clip) (old_logp [B, T] / [N] float, is_clip > 0).
        reduction: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum" or "none" (as the
            CEPO losses); num_tokens: the token-mean denominator (gradient accumulation), as cepo_loss.
        metrics: True (dict of floats, one host sync), "tensor" (0-dim tensors, no sync) or False ({}).
    Returns:
        DivergenceOutput(loss: scalar ([B, T] / [N] for "none"), per_token: fp32 D_t times the importance
        weight, 0 at masked tokens, detached; metrics: num_tokens, divergence_mean, is_weight_mean,
        is_clip_frac)."""


def _doc(text):
    def wrap(fn):
        fn.__doc__ = text + _OPTIONS_DOC
        return fn
    return wrap


def check_divergence_inputs(lead, device, V, mask, targets, old_logp, params, num_tokens,
                            float_dtype=torch.float32):
    """The per-token inputs of a divergence loss against the student's leading shape `lead` ([B, T] or
    [N]) and vocabulary size V. Returns a Batch (advantages zero; targets zero when not given), whose mask
    already excludes negative target ids."""
    if params.topk is not None and params.topk > V:
        raise ValueError(f"topk: expected at most the vocabulary size V = {V}, got {params.topk}")
    if (old_logp is None) != (params.is_clip is None):
        raise ValueError("old_logp and is_clip: expected both (SDPO's importance weight) or neither, "
                         "got only "
                         f"{'old_logp' if old_logp is not None else 'is_clip'}")
    if old_logp is not None and targets is None:
        raise ValueError("targets: expected the sampled token ids with old_logp and is_clip (the importance "
                         "weight is taken at the target), got None")
    if targets is None:
        targets = torch.zeros(tuple(lead), dtype=torch.long, device=device)
    zeros = torch.zeros(tuple(lead), dtype=torch.float32, device=device)
    return check_loss_inputs(lead, device, targets, zeros, mask, old_logp=old_logp, num_tokens=num_tokens,
                             reduction=params.reduction, float_dtype=float_dtype)


def _params_and_batch(lead, device, V, mask, targets, old_logp, num_tokens, metrics, opts):
    check_metrics_option(metrics)
    p = DivergenceParams(**opts)
    batch = check_divergence_inputs(lead, device, V, mask, targets, old_logp, p, num_tokens)
    return p, batch


def _op_args(batch, targets, p):
    tgt = None if targets is None else batch.targets.reshape(-1).contiguous()
    return tgt, batch.mask.reshape(-1).to(torch.uint8), (p.temperature, p.beta, p.topk or 0, p.topk_from,
                                                        p.add_tail)


@_doc("""The divergence between the student's and a teacher's next-token distributions, fused over logits.

    Args:
        logits: [B, T, V] or [N, V] student logits, fp32/bf16/fp16, last dim contiguous (any other strides);
            the gradient flows here only.
        teacher_logits: shaped like logits, fp32/bf16/fp16 (no gradient).""")
def divergence_loss(logits, teacher_logits, mask, *, beta=0.5, temperature=1.0, topk=None,
                    topk_from="student",
                    add_tail=True, targets=None, old_logp=None, is_clip=None, reduction="token-mean",
                    num_tokens=None, metrics=True):
    check_tensor("logits", logits, dtypes="float")
    if logits.dim() not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected [B, T, V] or [N, V] with V >= 1, got shape {tuple(logits.shape)}")
    check_kernel_dtype("logits", logits)
    check_tensor("teacher_logits", teacher_logits, dtypes="float", shape=logits.shape, device=logits.device)
    check_kernel_dtype("teacher_logits", teacher_logits)
    p, batch = _params_and_batch(logits.shape[:-1], logits.device, logits.shape[-1], mask, targets, old_logp,
                                 num_tokens, metrics, dict(beta=beta, temperature=temperature, topk=topk,
                                                           topk_from=topk_from, add_tail=add_tail,
                                                           is_clip=is_clip, reduction=reduction))
    tgt, msk, opts = _op_args(batch, targets, p)
    div, lp, _ = torch.ops.cepo_kernels.divergence_fwd(_as_btv(logits), _as_btv(teacher_logits.detach()), tgt,
                                                       msk, *opts)
    return _output(div, lp, batch, p, num_tokens, metrics)


@_doc("""divergence_loss from hidden states and the lm_head weight, never materialising either [N, V] logits.

    The logits exist one row chunk at a time (about 32 MiB each, in the inputs' dtype as an eager lm_head
    computes them), scored by the same kernels; the backward recomputes them per chunk.

    Args:
        hidden: [B, T, H] or [N, H] student hidden states, fp32/bf16/fp16, the weight's dtype; gradient flows
            to hidden, weight and bias.
        teacher_hidden: shaped like hidden (cast to the weight's dtype; no gradient).
        weight: [V, H] the lm_head weight; bias: [V] or None.
        teacher_weight, teacher_bias: the teacher's own lm_head ([V, H] in the weight's dtype, [V] or None;
            no gradient), e.g. an EMA teacher's; teacher_weight None (default): the teacher uses weight and
            bias too.""")
def linear_divergence_loss(hidden, teacher_hidden, weight, mask, *, bias=None, teacher_weight=None,
                           teacher_bias=None, beta=0.5, temperature=1.0, topk=None, topk_from="student",
                           add_tail=True, targets=None, old_logp=None, is_clip=None, reduction="token-mean",
                           num_tokens=None, metrics=True):
    check_linear(hidden, weight, bias)
    if teacher_weight is not None:
        check_tensor("teacher_weight", teacher_weight, dtypes=(weight.dtype,), shape=weight.shape,
                     device=weight.device)
        if teacher_bias is not None:
            check_tensor("teacher_bias", teacher_bias, dtypes="float", shape=(weight.shape[0],),
                         device=weight.device)
    elif teacher_bias is not None:
        raise ValueError("teacher_bias: given without teacher_weight (the teacher then uses weight and bias)")
    check_kernel_dtype("hidden", hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    check_tensor("teacher_hidden", teacher_hidden, dtypes="float", shape=hidden.shape, device=hidden.device)
    p, batch = _params_and_batch(hidden.shape[:-1], hidden.device, weight.shape[0], mask, targets, old_logp,
                                 num_tokens, metrics, dict(beta=beta, temperature=temperature, topk=topk,
                                                           topk_from=topk_from, add_tail=add_tail,
                                                           is_clip=is_clip, reduction=reduction))
    tgt, msk, opts = _op_args(batch, targets, p)
    th = _rows2d(teacher_hidden.detach().to(weight.dtype))
    tw = None if teacher_weight is None else _lastdim(teacher_weight.detach())
    tb = None if teacher_bias is None else teacher_bias.detach()
    div, lp, _ = torch.ops.cepo_kernels.linear_divergence_fwd(_rows2d(hidden), th, _lastdim(weight), bias,
                                                              tw, tb, tgt, msk, *opts)
    return _output(div, lp, batch, p, num_tokens, metrics)


def _output(div, lp, batch, p, num_tokens, metrics):
    """The weighted per-token divergence, its reduction and the metrics (div, lp: [N] fp32, an operator's)."""
    B, T, mask = batch.B, batch.T, batch.mask
    div = div.reshape(B, T)
    weight = torch.ones_like(div)
    if p.is_clip is not None:  # stop-gradient: lp is a constant output of the operator
        weight = torch.clamp(torch.exp(lp.detach().reshape(B, T) - batch.old_logp), max=p.is_clip)
    per_token = torch.where(mask, div * weight, torch.zeros_like(div))
    loss = reduce_loss(per_token, mask, p.reduction, num_tokens)
    shape = (-1,) if batch.flat else (B, T)
    if p.reduction == "none":
        loss = loss.reshape(shape)
    out_metrics = {}
    if metrics:
        out_metrics = _metrics(div.detach(), weight, mask, p, as_tensors=metrics == "tensor")
    return DivergenceOutput(loss, per_token.detach().reshape(shape), out_metrics)


@torch.no_grad()
def _metrics(div, weight, mask, p, as_tensors):
    m = mask.reshape(-1).float()
    zero = torch.zeros_like(div)
    clipped = (weight >= p.is_clip) if p.is_clip is not None else zero.bool()
    per_token = torch.stack([torch.where(mask, div, zero), torch.where(mask, weight, zero), clipped.float()])
    n = m.sum()
    values = torch.cat([n[None], (per_token.reshape(3, -1) * m).sum(1) / n.clamp_min(1.0)])
    names = ("num_tokens", "divergence_mean", "is_weight_mean", "is_clip_frac")
    return dict(zip(names, values.unbind() if as_tensors else values.tolist(), strict=True))


def sampled_token_kl_loss(logp, teacher_logp, mask, *, old_logp=None, is_clip=None, reduction="token-mean",
                          num_tokens=None):
    """The sampled-token reverse-KL surrogate of OPSD/SDPO: L_t = w_t sg(logp_S - logp_T) * logp_S at the
    sampled token (its gradient, (logp_S - logp_T) grad logp_S, is an unbiased estimate of grad KL(p_S || p_T)
    on on-policy samples); w_t = 1, or SDPO's importance weight min(exp(sg(logp_S - old_logp)), is_clip).

    Built on the log-prob kernels: pass logp = token_logprobs(logits, targets) or linear_logprobs(hidden,
    weight, targets) (differentiable) and teacher_logp the teacher's log-probs of the same targets (e.g.
    linear_teacher_logprobs, or token_logprobs under no_grad; detached here).

    Args:
        logp: [B, T] / [N] float student log-probs of the sampled tokens (differentiable).
        teacher_logp: shaped like logp (no gradient). mask: [B, T] / [N] bool or 0/1.
        old_logp, is_clip: both or neither: the rollout policy's log-probs (shaped like logp) and the cap > 0
            of the importance weight.
        reduction, num_tokens: as the CEPO losses.
    Returns:
        DivergenceOutput(loss, per_token: the per-token KL estimate logp_S - logp_T (fp32, 0 at masked tokens,
        detached, before w), metrics: num_tokens, divergence_mean (the mean estimate), is_weight_mean,
        is_clip_frac).
    """
    check_tensor("logp", logp, dtypes="float")
    check_tensor("teacher_logp", teacher_logp, dtypes="float", shape=logp.shape, device=logp.device)
    p = DivergenceParams(reduction=reduction, is_clip=is_clip)
    targets = None if old_logp is None else torch.zeros(logp.shape, dtype=torch.long, device=logp.device)
    batch = check_divergence_inputs(logp.shape, logp.device, 1, mask, targets, old_logp, p, num_tokens)
    lp = logp.float().reshape(batch.B, batch.T)
    est = torch.where(batch.mask, lp.detach() - teacher_logp.detach().float().reshape(lp.shape), 0.0)
    weight = torch.ones_like(est)
    if p.is_clip is not None:  # stop-gradient, as divergence_loss's weight
        weight = torch.clamp(torch.exp(lp.detach() - batch.old_logp), max=p.is_clip)
    loss = reduce_loss(torch.where(batch.mask, weight * est * lp, 0.0), batch.mask, p.reduction, num_tokens)
    shape = (-1,) if batch.flat else (batch.B, batch.T)
    if p.reduction == "none":
        loss = loss.reshape(shape)
    metrics = _metrics(est, weight, batch.mask, p, False)
    return DivergenceOutput(loss, est.reshape(shape), metrics)
