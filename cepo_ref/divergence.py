"""The self-distillation divergence of OPSD and SDPO in plain PyTorch, written to be read.

cepo_kernels.divergence_loss and linear_divergence_loss are tested against these. Only the input checks are
shared with cepo_kernels; the arithmetic here (full log-softmax, torch.topk, autograd) is independent of the
kernels. Equations: docs/divergence.md.
"""

from __future__ import annotations

import math

import torch

from cepo_kernels._params import (
    DivergenceOutput,
    DivergenceParams,
    check_linear,
    check_tensor,
    token_mean_scale,
)
from cepo_kernels.ops._common import check_metrics_option
from cepo_kernels.ops.divergence import check_divergence_inputs


def _xlogy_diff(q, log_a, log_b):
    """q * (log_a - log_b), 0 where q = 0 (0 log 0 = 0)."""
    return torch.where(q == 0, torch.zeros_like(q), q * (log_a - log_b))


def generalized_jsd(lq_s, lq_t, beta):
    """sum over the last dim of JSD_beta(p_T, p_S) from log-probabilities.

    beta = 0: KL(p_T || p_S); beta = 1: KL(p_S || p_T) (the exact forms: the mixture formula gives 0 there);
    else with M = (1 - beta) p_S + beta p_T: beta KL(p_T || M) + (1 - beta) KL(p_S || M).
    """
    q_s, q_t = lq_s.exp(), lq_t.exp()
    if beta == 0.0:
        return _xlogy_diff(q_t, lq_t, lq_s).sum(-1)
    if beta == 1.0:
        return _xlogy_diff(q_s, lq_s, lq_t).sum(-1)
    lm = torch.logsumexp(torch.stack([lq_s + math.log(1.0 - beta), lq_t + math.log(beta)]), dim=0)
    return (beta * _xlogy_diff(q_t, lq_t, lm) + (1.0 - beta) * _xlogy_diff(q_s, lq_s, lm)).sum(-1)


def _buckets(lp_s, lp_t, z_s, z_t, p):
    """The distributions the divergence compares: the full vocabulary, or the top-k ids of p.topk_from with
    (add_tail) one more bucket holding the rest, or renormalised over the k ids."""
    if p.topk is None:
        return lp_s, lp_t
    source = z_s if p.topk_from == "student" else z_t
    ids = torch.topk(source.detach(), p.topk, dim=-1).indices
    if not p.add_tail:
        return torch.log_softmax(z_s.gather(-1, ids), -1), torch.log_softmax(z_t.gather(-1, ids), -1)
    out = []
    for lp in (lp_s, lp_t):
        lk = lp.gather(-1, ids)
        mass = torch.logsumexp(lk, dim=-1, keepdim=True).clamp(max=0.0)
        out.append(torch.cat([lk, torch.log(-torch.expm1(mass))], dim=-1))  # log(1 - sum of the k)
    return out


def _reduce(per_token, m, reduction, num_tokens, flat):
    """The CEPO losses' reductions of a [B, T] per-token loss (m: the valid tokens as 0/1)."""
    B, T = per_token.shape
    if reduction == "none":
        return per_token.reshape(-1) if flat else per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "token-mean":
        return per_token.sum() * token_mean_scale(num_tokens, m.sum(), per_token.dtype)
    if reduction == "seq-mean-token-mean":
        return (per_token.sum(1) / m.sum(1).clamp_min(1)).sum() / max(B, 1)
    return per_token.sum() / max(B * T, 1)  # seq-mean-token-sum-norm


def divergence_loss(logits, teacher_logits, mask, *, beta=0.5, temperature=1.0, topk=None,
                    topk_from="student",
                    add_tail=True, targets=None, old_logp=None, is_clip=None, reduction="token-mean",
                    num_tokens=None, metrics=True):
    """D_t = JSD_beta(p_T, p_S) per token (optionally over top-k buckets), times SDPO's importance weight
    min(exp(sg(logp_S(target) - old_logp)), is_clip) when old_logp and is_clip are given; masked tokens
    (mask off or a negative target) give 0. Computed in fp32 (fp64 for fp64 logits), gradient to `logits`."""
    check_metrics_option(metrics)
    p = DivergenceParams(beta=beta, temperature=temperature, topk=topk, topk_from=topk_from,
                         add_tail=add_tail,
                         is_clip=is_clip, reduction=reduction)
    check_tensor("logits", logits, dtypes="float")
    if logits.dim() not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected [B, T, V] or [N, V] with V >= 1, got shape {tuple(logits.shape)}")
    check_tensor("teacher_logits", teacher_logits, dtypes="float", shape=logits.shape, device=logits.device)
    dt = torch.promote_types(logits.dtype, torch.float32)
    batch = check_divergence_inputs(logits.shape[:-1], logits.device, logits.shape[-1], mask, targets,
                                    old_logp, p, num_tokens, float_dtype=dt)
    B, T = batch.B, batch.T
    z_s = logits.to(dt).reshape(B, T, -1) / p.temperature
    z_t = teacher_logits.detach().to(dt).reshape(B, T, -1) / p.temperature
    lp_s, lp_t = torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)
    lq_s, lq_t = _buckets(lp_s, lp_t, z_s, z_t, p)
    div = generalized_jsd(lq_s, lq_t, p.beta)
    valid = batch.mask
    weight = torch.ones_like(div)
    if p.is_clip is not None:
        V = logits.shape[-1]
        tgt = batch.targets.clamp(0, V - 1)
        lp_tgt = lp_s.detach().gather(-1, tgt[..., None])[..., 0]
        lp_tgt = torch.where(batch.targets < V, lp_tgt, torch.full_like(lp_tgt, float("nan")))
        weight = torch.clamp(torch.exp(lp_tgt - batch.old_logp), max=p.is_clip)
    zero = torch.zeros_like(div)
    per_token = torch.where(valid, div * weight, zero)
    m = valid.to(dt)
    loss = _reduce(per_token, m, p.reduction, num_tokens, batch.flat)
    n = m.sum()

    def mean(x):
        return float(torch.where(valid, x.detach(), zero).sum() / n.clamp_min(1))

    values = {}
    if metrics is not False:  # (reads the values back: not under fake tensors, bench/memory_fake_distill.py)
        clipped = (weight >= p.is_clip) if p.is_clip is not None else torch.zeros_like(valid)
        values = {"num_tokens": float(n), "divergence_mean": mean(div), "is_weight_mean": mean(weight),
                  "is_clip_frac": mean(clipped.to(dt))}
    if metrics == "tensor":
        values = {k: torch.tensor(v) for k, v in values.items()}
    shape = (-1,) if batch.flat else (B, T)
    return DivergenceOutput(loss, per_token.detach().float().reshape(shape), values)


def linear_divergence_loss(hidden, teacher_hidden, weight, mask, *, bias=None, teacher_weight=None,
                           teacher_bias=None, beta=0.5, temperature=1.0, topk=None, topk_from="student",
                           add_tail=True, targets=None, old_logp=None, is_clip=None, reduction="token-mean",
                           num_tokens=None, metrics=True):
    """divergence_loss(hidden @ weight.T + bias, teacher_hidden @ W_T.T + b_T, mask, **options) with the
    teacher's head (W_T, b_T) = (teacher_weight, teacher_bias) when teacher_weight is given, else (weight,
    bias): here the logits are materialised (in the inputs' dtype, as eager torch code computes an
    lm_head)."""
    check_linear(hidden, weight, bias)
    check_tensor("teacher_hidden", teacher_hidden, dtypes="float", shape=hidden.shape, device=hidden.device)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    t_w, t_b = (weight, bias) if teacher_weight is None else (teacher_weight, teacher_bias)
    t_logits = teacher_hidden.detach().to(weight.dtype) @ t_w.detach().T
    if t_b is not None:
        t_logits = t_logits + t_b.detach()
    return divergence_loss(logits, t_logits, mask, beta=beta, temperature=temperature, topk=topk,
                           topk_from=topk_from, add_tail=add_tail, targets=targets, old_logp=old_logp,
                           is_clip=is_clip, reduction=reduction, num_tokens=num_tokens, metrics=metrics)


def sampled_token_kl_loss(logp, teacher_logp, mask, *, old_logp=None, is_clip=None, reduction="token-mean",
                          num_tokens=None):
    """The sampled-token surrogate of OPSD/SDPO: L_t = w_t sg(logp_S - logp_T) * logp_S at the sampled token,
    w_t = 1 or min(exp(sg(logp_S - old_logp)), is_clip) (SDPO); per_token is the KL estimate logp_S - logp_T
    (0 at masked tokens)."""
    p = DivergenceParams(reduction=reduction, is_clip=is_clip)
    check_tensor("logp", logp, dtypes="float")
    check_tensor("teacher_logp", teacher_logp, dtypes="float", shape=logp.shape, device=logp.device)
    targets = None if old_logp is None else torch.zeros(logp.shape, dtype=torch.long, device=logp.device)
    batch = check_divergence_inputs(logp.shape, logp.device, 1, mask, targets, old_logp, p, num_tokens,
                                    float_dtype=torch.promote_types(logp.dtype, torch.float32))
    dt = torch.promote_types(logp.dtype, torch.float32)
    lp = logp.to(dt).reshape(batch.B, batch.T)
    est = (lp - teacher_logp.to(dt).reshape(lp.shape)).detach()
    w = torch.ones_like(lp)
    if is_clip is not None:
        w = torch.exp(lp.detach() - batch.old_logp.to(dt)).clamp(max=p.is_clip)
    zero = torch.zeros_like(lp)
    per_token = torch.where(batch.mask, w * est * lp, zero)
    m = batch.mask.to(dt)
    loss = _reduce(per_token, m, p.reduction, num_tokens, batch.flat)
    n = m.sum()
    est = torch.where(batch.mask, est, zero)
    clipped = (w >= p.is_clip) if is_clip is not None else torch.zeros_like(batch.mask)
    metrics = {"num_tokens": float(n), "divergence_mean": float(est.sum() / n.clamp_min(1)),
               "is_weight_mean": float((w * m).sum() / n.clamp_min(1)),
               "is_clip_frac": float((clipped.to(dt) * m).sum() / n.clamp_min(1))}
    shape = (-1,) if batch.flat else (batch.B, batch.T)
    return DivergenceOutput(loss, est.float().reshape(shape), metrics)
