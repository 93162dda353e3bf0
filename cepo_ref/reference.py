"""CEPO in plain PyTorch, written to be read. The fused kernels in cepo_kernels are tested against it.

Every function has the signature of its cepo_kernels namesake and its docstring
gives the equation of docs/method.md it implements. Only the input checks are shared with cepo_kernels
(so both reject bad input alike); the arithmetic here is independent of the kernels.
"""

from __future__ import annotations

import torch

from cepo_kernels._params import (
    LOG_RATIO_CLAMP,
    CEPOOutput,
    LossParams,
    as_float,
    check_linear,
    check_logits_and_targets,
    check_logits_loss,
    check_loss_inputs,
    check_temperature,
    check_tensor,
    token_mean_scale,
)
from cepo_kernels.ops._common import check_metrics_option
from cepo_kernels.ops.advantages import check_group_inputs


def token_logprobs(logits, targets, *, temperature=1.0, return_entropy=False, inplace=False):
    """logp = log_softmax(logits / temperature)[target], in fp32 (fp64 for fp64 logits).

    inplace: the kernels' memory option (their backward reuses the logits' storage); the reference never
    writes into its inputs, so it only checks the value.

    entropy = -sum_v p_v log p_v of the same tempered distribution. A negative target (Hugging Face's
    -100) gives logp = 0 with no gradient (the entropy is computed as usual); a target >= V gives a NaN
    log-prob (never an out-of-bounds read).
    """
    check_logits_and_targets(logits, targets)
    check_temperature(temperature)
    _check_inplace(inplace)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logsm = torch.log_softmax(z, dim=-1)
    V = logits.shape[-1]
    valid = (targets >= 0) & (targets < V)
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nan = torch.full_like(logp, float("nan"))
    logp = torch.where(valid, logp, torch.where(targets < 0, torch.zeros_like(logp), nan))
    if not return_entropy:
        return logp
    p = logsm.exp()
    # 0 * log 0 = 0 for vocabulary entries masked with -inf
    entropy = -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)
    return logp, entropy


def _check_inplace(inplace):
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {inplace!r}")


def _linear_logits(hidden, weight, bias):
    """hidden @ weight.T + bias in the inputs' dtype, as torch eager code computes an lm_head."""
    logits = hidden @ weight.T
    return logits if bias is None else logits + bias


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False):
    """token_logprobs(hidden @ weight.T + bias, targets): here the logits are materialised."""
    check_linear(hidden, weight, bias)
    check_tensor("targets", targets, dtypes="int", shape=hidden.shape[:-1], device=hidden.device)
    return token_logprobs(_linear_logits(hidden, weight, bias), targets, temperature=temperature,
                          return_entropy=return_entropy)


@torch.no_grad()
def linear_teacher_logprobs(pos_hidden, neg_hidden, weight, targets, *, bias=None, temperature=1.0,
                            rows=None):
    """(linear_logprobs(pos_hidden, ...), linear_logprobs(neg_hidden, ...)) without gradient; None for a
    teacher given as None. rows (a bool mask shaped like targets, or 1-D indices into the flattened rows)
    selects the rows scored; the others are 0.0, so Delta = pos - neg is 0 there."""
    if pos_hidden is None and neg_hidden is None:
        raise ValueError("pos_hidden and neg_hidden: expected at least one tensor, got None for both")
    keep = None
    if rows is not None:
        keep = torch.zeros(targets.numel(), dtype=torch.bool, device=targets.device)
        if rows.dtype == torch.bool:
            keep = rows.reshape(-1).to(targets.device)
        else:
            keep[rows.reshape(-1).long()] = True
        keep = keep.reshape(targets.shape)
    out = []
    for hidden in (pos_hidden, neg_hidden):
        if hidden is None:
            out.append(None)
            continue
        logp = linear_logprobs(hidden.to(weight.dtype), weight, targets, bias=bias, temperature=temperature)
        logp = logp.float()
        out.append(logp if keep is None else torch.where(keep, logp, torch.zeros_like(logp)))
    return tuple(out)


@torch.no_grad()
def group_advantages(rewards, group_size, *, scale="group", eps=1e-6):
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std unbiased as torch.std.

    Groups are contiguous: rewards [B] with B = groups * group_size.
    scale="group": std of the group; "batch": std of the whole batch; "none": no division.
    A group of size 1 has std 0 (its advantage is 0).
    """
    check_group_inputs(rewards, group_size, scale, eps)
    r = rewards.double()
    batch_std = r.std() if r.numel() > 1 else r.new_zeros(())
    out = torch.empty_like(r)
    for start in range(0, r.numel(), group_size):
        group = r[start:start + group_size]
        centred = group - group.mean()
        if scale == "group":
            centred = centred / ((group.std() if group_size > 1 else 0.0) + eps)
        elif scale == "batch":
            centred = centred / (batch_std + eps)
        out[start:start + group_size] = centred
    return out.float()


@torch.no_grad()
def cepo_advantages(advantages, pos_logp, neg_logp, mask, *, lam, eps_w=0.2):
    """A_hat_t = A * ((1 - lam) + lam * clip(exp(sign(A) * (pos_t - neg_t)), 1 - eps_w, 1 + eps_w)) * mask_t.

    advantages [B] (one per sequence) or [B, T]; pos_logp, neg_logp, mask [B, T] (or all flattened [N]).
    RLSD: pass the student's old log-probs as neg_logp. Masked tokens get exactly 0.
    """
    check_tensor("pos_logp", pos_logp, dtypes="float")
    device = pos_logp.device
    lead = tuple(pos_logp.shape)
    batch = check_loss_inputs(lead, device, torch.zeros(lead, dtype=torch.long, device=device),
                              advantages, mask, pos_logp=pos_logp, neg_logp=neg_logp,
                              float_dtype=torch.promote_types(pos_logp.dtype, torch.float32))
    lam = LossParams(lam=as_float("lam", lam), eps_w=eps_w).lam  # validates lam and eps_w
    a_hat = _reweight(batch.advantages, batch.pos_logp - batch.neg_logp, batch.mask, lam, eps_w)
    return a_hat.reshape(lead)


def _reweight(adv, delta, mask, lam, eps_w):
    w = torch.exp(torch.sign(adv) * delta).clamp(1.0 - eps_w, 1.0 + eps_w)
    a_hat = adv * ((1.0 - lam) + lam * w)
    # A = 0 and masked tokens give exactly 0, whatever the teachers hold there (docs/method.md §4)
    return torch.where(mask & (adv != 0), a_hat, torch.zeros_like(a_hat))


def _teacher_logp(logits, given_logp, targets, temperature):
    """A teacher's log-probs (no gradient), from its logits or as given."""
    if given_logp is not None:
        return given_logp
    with torch.no_grad():
        return token_logprobs(logits.detach(), targets, temperature=temperature)


def cepo_loss(logits, targets, advantages, mask, *, old_logp=None, pos_logits=None, neg_logits=None,
              pos_logp=None, neg_logp=None, lam=None, eps_w=0.2, eps_low=0.2, eps_high=0.28,
              clip_dual=3.0, temperature=1.0, reduction="token-mean", num_tokens=None, inplace=False,
              metrics=True):
    """The CEPO policy loss (PPO-clip on the reweighted advantage A_hat).

    lp_t = log_softmax(logits_t / T)[y_t]; teachers give pos_t, neg_t the same way (no gradient);
    Delta_t = pos_t - neg_t;  A_hat_t = A * ((1 - lam) + lam * clip(exp(sign(A) Delta_t), 1 -+ eps_w));
    rho_t = exp(clamp(lp_t - old_t, -20, 20))   (old_t = lp_t.detach() when old_logp is None);
    L_t = max(-rho_t A_hat_t, -clip(rho_t, 1 - eps_low, 1 + eps_high) A_hat_t);
    for A_hat_t < 0 (dual clip): L_t = min(L_t, -clip_dual * A_hat_t).
    No teachers: A_hat = A (GRPO). Reductions: see cepo_kernels._params.reduction_weights.
    metrics: True (floats), "tensor" (0-dim tensors) or False (none); inplace: as token_logprobs.
    """
    _check_inplace(inplace)
    check_metrics_option(metrics)
    p, batch = check_logits_loss(
        logits, targets, advantages, mask, old_logp=old_logp, pos_logits=pos_logits, neg_logits=neg_logits,
        pos_logp=pos_logp, neg_logp=neg_logp, num_tokens=num_tokens,
        float_dtype=torch.promote_types(logits.dtype, torch.float32), lam=lam, eps_w=eps_w, eps_low=eps_low,
        eps_high=eps_high, clip_dual=clip_dual, temperature=temperature, reduction=reduction,
    )
    lp = token_logprobs(logits, targets, temperature=temperature).reshape(batch.B, batch.T)
    has_teachers = pos_logits is not None or pos_logp is not None
    if has_teachers:
        pos = _teacher_logp(pos_logits, batch.pos_logp, targets, temperature).reshape(batch.B, batch.T)
        neg = _teacher_logp(neg_logits, batch.neg_logp, targets, temperature).reshape(batch.B, batch.T)
        delta = pos - neg
        a_hat = _reweight(batch.advantages, delta, batch.mask, p.lam, p.eps_w)
    else:
        delta = torch.zeros_like(lp.detach())
        a_hat = torch.where(batch.mask, batch.advantages, torch.zeros_like(batch.advantages))
    return _ppo_loss(lp, a_hat, delta, batch, p, num_tokens, metrics)


def _ppo_loss(lp, a_hat, delta, batch, p, num_tokens, metrics):
    mask = batch.mask
    old = lp.detach() if batch.old_logp is None else batch.old_logp
    ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg_unclipped = -a_hat * ratio
    pg_clipped = -a_hat * ratio.clamp(1.0 - p.eps_low, 1.0 + p.eps_high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)
    if p.clip_dual is not None:
        per_token = torch.where(a_hat < 0, torch.minimum(per_token, -p.clip_dual * a_hat), per_token)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))

    B, T = mask.shape
    if p.reduction == "none":
        loss = per_token
    elif p.reduction == "sum":
        loss = per_token.sum()
    elif p.reduction == "token-mean":
        loss = per_token.sum() * token_mean_scale(num_tokens, mask.sum(), per_token.dtype)
    elif p.reduction == "seq-mean-token-mean":
        per_seq = per_token.sum(dim=1) / mask.sum(dim=1).clamp_min(1)
        loss = per_seq.sum() / max(B, 1)
    else:  # seq-mean-token-sum-norm (Dr. GRPO)
        loss = per_token.sum() / max(B * T, 1)
    if batch.flat and p.reduction == "none":
        loss = loss.reshape(-1)

    if metrics:
        values = _metrics(lp.detach(), ratio.detach(), batch.advantages, a_hat, delta, mask, p)
        metrics = {k: torch.tensor(v) for k, v in values.items()} if metrics == "tensor" else values
    else:
        metrics = {}
    shape = (-1,) if batch.flat else (B, T)
    return CEPOOutput(loss, lp.detach().reshape(shape), a_hat.detach().reshape(shape), metrics)


@torch.no_grad()
def _metrics(lp, ratio, adv, a_hat, delta, mask, p):
    """Scalars over valid tokens; an empty selection gives 0.0."""

    def mean(x, sel):
        sel = sel & mask
        return float(x[sel].double().mean()) if bool(sel.any()) else 0.0

    everywhere = torch.ones_like(mask)
    clip_high = (a_hat > 0) & (ratio > 1.0 + p.eps_high)
    clip_low = (a_hat < 0) & (ratio < 1.0 - p.eps_low)
    dual = (a_hat < 0) & (ratio > p.clip_dual) if p.clip_dual is not None else torch.zeros_like(mask)
    log_ratio = torch.log(ratio)
    used = mask & (adv != 0)  # Delta statistics over the tokens whose evidence is used
    d_used = delta[used].double()
    return {
        "num_tokens": float(mask.sum()),
        "clip_frac": mean((clip_high | clip_low).float(), everywhere),
        "clip_frac_low": mean(clip_low.float(), everywhere),
        "clip_frac_high": mean(clip_high.float(), everywhere),
        "dual_clip_frac": mean(dual.float(), everywhere),
        "ratio_mean": mean(ratio, everywhere),
        "approx_kl": mean(-log_ratio, everywhere),
        "delta_mean": mean(delta, adv != 0),
        "delta_std": float(d_used.std()) if d_used.numel() > 1 else 0.0,
        "delta_mean_pos": mean(delta, adv > 0),
        "delta_mean_neg": mean(delta, adv < 0),
        "frac_wrong_dir": mean((torch.sign(delta) * torch.sign(adv) < 0).float(), adv != 0),
        "adv_abs_mean": mean(adv.abs(), everywhere),
        "adv_hat_abs_mean": mean(a_hat.abs(), everywhere),
        "logp_mean": mean(lp, everywhere),
    }


def grpo_loss(logits, targets, advantages, mask, *, old_logp=None, eps_low=0.2, eps_high=0.28,
              clip_dual=3.0, temperature=1.0, reduction="token-mean", num_tokens=None, inplace=False,
              metrics=True):
    """cepo_loss without teachers: the PPO-clip GRPO loss with A_hat = A."""
    return cepo_loss(logits, targets, advantages, mask, old_logp=old_logp, eps_low=eps_low,
                     eps_high=eps_high, clip_dual=clip_dual, temperature=temperature,
                     reduction=reduction, num_tokens=num_tokens, inplace=inplace, metrics=metrics)


def linear_cepo_loss(hidden, weight, targets, advantages, mask, *, old_logp=None, pos_hidden=None,
                     neg_hidden=None, pos_logp=None, neg_logp=None, bias=None, lam=None, eps_w=0.2,
                     eps_low=0.2, eps_high=0.28, clip_dual=3.0, temperature=1.0,
                     reduction="token-mean", num_tokens=None, metrics=True):
    """cepo_loss(hidden @ weight.T + bias, ...): teachers' hidden states share the (detached) weight.

    The reference materialises the logits; the gradient reaches hidden, weight and bias.
    """
    check_linear(hidden, weight, bias)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    teachers = {}
    for name, t in (("pos_hidden", pos_hidden), ("neg_hidden", neg_hidden)):
        if t is not None:
            check_tensor(name, t, dtypes="float", shape=hidden.shape, device=hidden.device)
            with torch.no_grad():
                w, b = weight.detach(), None if bias is None else bias.detach()
                teachers[name.replace("hidden", "logits")] = _linear_logits(t.to(w.dtype), w, b)
    check_loss_inputs(hidden.shape[:-1], hidden.device, targets, advantages, mask, old_logp=old_logp,
                      pos=pos_hidden, neg=neg_hidden, pos_logp=pos_logp, neg_logp=neg_logp,
                      num_tokens=num_tokens, reduction=reduction,
                      teacher_names=("pos_hidden", "neg_hidden"))
    logits = _linear_logits(hidden, weight, bias)
    return cepo_loss(logits, targets, advantages, mask, old_logp=old_logp, pos_logp=pos_logp,
                     neg_logp=neg_logp, lam=lam, eps_w=eps_w, eps_low=eps_low, eps_high=eps_high,
                     clip_dual=clip_dual, temperature=temperature, reduction=reduction,
                     num_tokens=num_tokens, metrics=metrics, **teachers)


def linear_grpo_loss(hidden, weight, targets, advantages, mask, *, old_logp=None, bias=None,
                     eps_low=0.2, eps_high=0.28, clip_dual=3.0, temperature=1.0,
                     reduction="token-mean", num_tokens=None, metrics=True):
    """linear_cepo_loss without teachers."""
    return linear_cepo_loss(hidden, weight, targets, advantages, mask, old_logp=old_logp, bias=bias,
                            eps_low=eps_low, eps_high=eps_high, clip_dual=clip_dual,
                            temperature=temperature, reduction=reduction, num_tokens=num_tokens,
                            metrics=metrics)


__all__ = [
    "token_logprobs", "linear_logprobs", "linear_teacher_logprobs", "group_advantages", "cepo_advantages",
    "cepo_loss", "grpo_loss", "linear_cepo_loss", "linear_grpo_loss", "CEPOOutput", "LossParams",
]
