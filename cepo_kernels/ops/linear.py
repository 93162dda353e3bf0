"""Fused linear path: log-probs and the CEPO/GRPO loss from hidden states + lm_head, logits never stored.

Here: the public functions. They call the operators torch.ops.cepo_kernels.linear_scores / token_loss /
linear_bwd (ops/_linear_ops.py: fake implementations, autograd, the native CPU kernels), which run the
launchers (ops/_linear_launch.py: the forward scores 1-3 row sources against the weight in one launch, the
backward recomputes the logits from the saved fp32 lse, only on rows with a non-zero gradient) of the Triton
kernels (ops/_linear_kernels.py).
"""

from __future__ import annotations

import torch

from cepo_kernels._params import (
    LossParams,
    check_kernel_dtype,
    check_linear,
    check_loss_inputs,
    check_temperature,
    check_tensor,
    resolve_lam,
)
from cepo_kernels.ops import _linear_ops  # noqa: F401  (registers torch.ops.cepo_kernels.linear_*)
from cepo_kernels.ops._common import check_metrics_option, loss_output
from cepo_kernels.ops._linear_launch import Scored, active_rows


def _scores(sources, weight, bias, targets, rows=None, count=None, *, rows_from=0, temperature=1.0,
            entropy_grad=False):
    """Scored(lse, logp, entropy) through the operator (what the public functions trace)."""
    out = torch.ops.cepo_kernels.linear_scores(sources[0], list(sources[1:]), weight, bias, targets, rows,
                                               count, rows_from, float(temperature), entropy_grad)
    return Scored(*out)


def _rows2d(x):
    """[..., H] -> [N, H] with a contiguous last dim (a copy only when needed)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _lastdim(w):
    return w if w.stride(-1) == 1 or w.shape[-1] <= 1 else w.contiguous()


def _teacher2d(name, t, like, weight):
    """A teacher's hidden states checked against the policy's, as [N, H] in the weight's dtype, detached."""
    check_tensor(name, t, dtypes="float", shape=like.shape, device=like.device)
    return _rows2d(t.detach().to(weight.dtype))


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False):
    """log_softmax((hidden @ weight.T + bias) / temperature)[target] without materialising the logits.

    Args:
        hidden: [..., H] fp32/bf16/fp16 (float64 raises TypeError: use cepo_ref), the same dtype as weight.
        weight: [V, H] the lm_head weight. bias: [V] or None.
        targets: [...] integer token ids. A negative id (Hugging Face's -100) gives logp = 0 with no
            gradient (the entropy as usual); an id >= V gives a NaN log-prob (no out-of-bounds read).
        temperature: > 0; the logits are divided by it before the softmax.
        return_entropy: also return the entropy of the tempered distribution.
    Returns:
        logp [...] fp32 (and entropy [...] fp32 with return_entropy); both differentiable w.r.t. hidden,
        weight and bias.
    """
    check_linear(hidden, weight, bias)
    check_kernel_dtype("hidden", hidden)
    check_tensor("targets", targets, dtypes="int", shape=hidden.shape[:-1], device=hidden.device)
    check_temperature(temperature)
    lead = hidden.shape[:-1]
    sc = _scores([_rows2d(hidden)], _lastdim(weight), bias, targets.reshape(-1), temperature=temperature,
                 entropy_grad=bool(return_entropy))
    logp, ent = sc.logp[0].reshape(lead), sc.entropy[0].reshape(lead)
    return (logp, ent) if return_entropy else logp


def linear_cepo_loss(hidden, weight, targets, advantages, mask, *, old_logp=None, pos_hidden=None,
                     neg_hidden=None, pos_logp=None, neg_logp=None, bias=None, lam=None, eps_w=0.2,
                     eps_low=0.2, eps_high=0.28, clip_dual=3.0, temperature=1.0, reduction="token-mean",
                     num_tokens=None, metrics=True):
    """The CEPO loss (as cepo_loss) from hidden states and the lm_head, logits never materialised.

    Args:
        hidden: [B, T, H] or [N, H] policy hidden states, fp32/bf16/fp16 (float64 raises TypeError), the
            weight's dtype; weight [V, H]; bias [V]/None.
        targets: [B, T] / [N] integer; a negative id (-100) counts as masked, an id >= V at an unmasked
            position gives a NaN loss (as cepo_loss). advantages: [B] (per sequence) or [B, T] / [N] float.
        mask: [B, T] / [N] bool or 0/1. old_logp: [B, T] / [N] float, or None (on-policy: ratio 1).
        pos_hidden, neg_hidden: teacher hidden states shaped like hidden (no gradient; scored with the same
            weight in the same launch as the policy rows, only where mask and advantage != 0), or
        pos_logp, neg_logp: the teachers' log-probs [B, T] / [N]. Each teacher independently; both or none
            (RLSD: pos_hidden and neg_logp = the old student log-probs).
        lam, eps_w, eps_low, eps_high, clip_dual, temperature, reduction, num_tokens, metrics: as cepo_loss
            (metrics="tensor" keeps them on the device: no host sync).
    Returns:
        CEPOOutput(loss, logp, advantages=A_hat, metrics). loss is differentiable w.r.t. hidden, weight and
        bias; logp and A_hat fp32 detached, shaped like targets. Metric delta_* statistics count the rows
        whose teachers were scored (Delta = 0 elsewhere).
    """
    check_metrics_option(metrics)
    check_linear(hidden, weight, bias)
    check_kernel_dtype("hidden", hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    p = LossParams(lam=lam, eps_w=eps_w, eps_low=eps_low, eps_high=eps_high, clip_dual=clip_dual,
                   temperature=temperature, reduction=reduction)
    p = resolve_lam(p, any(t is not None for t in (pos_hidden, neg_hidden, pos_logp, neg_logp)))
    pos_h = None if pos_hidden is None else _teacher2d("pos_hidden", pos_hidden, hidden, weight)
    neg_h = None if neg_hidden is None else _teacher2d("neg_hidden", neg_hidden, hidden, weight)
    b = check_loss_inputs(hidden.shape[:-1], hidden.device, targets, advantages, mask, old_logp=old_logp,
                          pos=pos_hidden, neg=neg_hidden, pos_logp=pos_logp, neg_logp=neg_logp,
                          num_tokens=num_tokens, reduction=reduction,
                          teacher_names=("pos_hidden", "neg_hidden"))

    def flat(x):
        return None if x is None else x.reshape(-1).contiguous()

    tgt, adv, msk = flat(b.targets), flat(b.advantages), flat(b.mask)
    teacher_h = [t for t in (pos_h, neg_h) if t is not None]
    rows = count = None
    if teacher_h:  # docs/method.md §4: rows with A = 0 (or masked) get A_hat = 0, teachers not scored
        rows, count = active_rows(msk & (adv != 0))
    sc = _scores([_rows2d(hidden), *teacher_h], _lastdim(weight), bias, tgt, rows, count, rows_from=1,
                 temperature=temperature)
    it = iter(sc.logp[1:].detach())
    pos = next(it) if pos_h is not None else flat(b.pos_logp)
    neg = next(it) if neg_h is not None else flat(b.neg_logp)
    lp = sc.logp[0]
    loss_tok, a_hat, _, delta = torch.ops.cepo_kernels.token_loss(lp, flat(b.old_logp), adv, pos, neg, msk,
                                                                  p.lam, p.eps_w, p.eps_low, p.eps_high,
                                                                  p.clip_dual)
    B, T = b.B, b.T
    lp, a_hat, delta = (x.detach().reshape(B, T) for x in (lp, a_hat, delta))
    loss_tok = loss_tok.reshape(B, T)
    has_teachers = pos_h is not None or neg_h is not None or b.pos_logp is not None
    return loss_output(loss_tok, lp, a_hat, delta if has_teachers else None, b, p, num_tokens, metrics)


def linear_grpo_loss(hidden, weight, targets, advantages, mask, *, old_logp=None, bias=None, eps_low=0.2,
                     eps_high=0.28, clip_dual=3.0, temperature=1.0, reduction="token-mean", num_tokens=None,
                     metrics=True):
    """linear_cepo_loss without teachers (A_hat = A): the PPO-clip GRPO loss from hidden states.

    Args and Returns: as linear_cepo_loss.
    """
    return linear_cepo_loss(hidden, weight, targets, advantages, mask, old_logp=old_logp, bias=bias,
                            eps_low=eps_low, eps_high=eps_high, clip_dual=clip_dual, temperature=temperature,
                            reduction=reduction, num_tokens=num_tokens, metrics=metrics)


@torch.no_grad()
def linear_teacher_logprobs(pos_hidden, neg_hidden, weight, targets, *, bias=None, temperature=1.0,
                            rows=None):
    """Both teachers' log-probs in one launch (each weight tile loaded once for both); no gradient.

    Args:
        pos_hidden, neg_hidden: [..., H] teacher hidden states of the same shape (cast to the weight's dtype);
            either may be None (e.g. RLSD scores only the positive teacher).
        weight: [V, H]; bias: [V] or None; targets: [...] integer (a negative id gives 0.0, an id >= V NaN);
            temperature: > 0 (the rollout's).
        rows: None (score every row), a bool mask shaped like targets, or a 1-D integer tensor of indices
            into the flattened rows. Typically mask & (advantage != 0).
    Returns:
        (pos_logp, neg_logp), each [...] fp32 (None for a teacher given as None). Rows not selected by `rows`
        are 0.0, so Delta = pos - neg is 0 there ("no evidence"): they are harmless in any loss, and their
        A_hat is 0 anyway when they are the zero-advantage rows.
    """
    given = [(n, t) for n, t in (("pos_hidden", pos_hidden), ("neg_hidden", neg_hidden)) if t is not None]
    if not given:
        raise ValueError("pos_hidden and neg_hidden: expected at least one tensor, got None for both")
    first = given[0][1]
    for name, t in given:
        check_tensor(name, t, dtypes="float", shape=first.shape if t is not first else None,
                     device=weight.device if isinstance(weight, torch.Tensor) else None)
        check_linear(t.to(weight.dtype) if isinstance(weight, torch.Tensor) and t.is_floating_point() else t,
                     weight, bias, name=name)
    check_kernel_dtype("weight", weight)
    check_tensor("targets", targets, dtypes="int", shape=first.shape[:-1], device=first.device)
    check_temperature(temperature)
    lead = first.shape[:-1]
    N = targets.numel()
    count = None
    if rows is not None:
        check_tensor("rows", rows, device=first.device)
        if rows.dtype == torch.bool:
            check_tensor("rows", rows, shape=lead)
            rows, count = active_rows(rows.reshape(-1))  # no host sync
        elif rows.is_floating_point() or rows.is_complex() or rows.dim() != 1:
            raise TypeError(f"rows: expected a bool mask of shape {tuple(lead)} or a 1-D integer index "
                            f"tensor, got dtype {rows.dtype} and shape {tuple(rows.shape)}")
        else:
            rows = rows.long().contiguous()
            if rows.numel() and not bool(((rows >= 0) & (rows < N)).all()):  # a check of explicit indices
                raise ValueError(f"rows: expected indices in [0, {N}), got values outside")
            count = torch.full((1,), rows.numel(), dtype=torch.int32, device=rows.device)
    srcs = [_rows2d(t.detach().to(weight.dtype)) for _, t in given]
    out = _scores(srcs, _lastdim(weight.detach()), None if bias is None else bias.detach(),
                  targets.reshape(-1), rows, count, temperature=temperature).logp
    it = iter(out.reshape(len(srcs), *lead))
    return tuple(next(it) if t is not None else None for t in (pos_hidden, neg_hidden))
