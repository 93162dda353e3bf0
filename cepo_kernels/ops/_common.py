"""Pieces shared by the logits and the linear kernels.

- `lse_tile`: one step of the online logsumexp (with the entropy accumulator) over a vocabulary tile.
- `cepo_token`: the per-token CEPO/PPO arithmetic (Delta -> A_hat -> ratio -> loss and dL/dlp).
- torch-side helpers that turn the kernels' per-token outputs into the reduced loss and the metrics.

Conventions for the kernels using them: every float is fp32 after loading; hyperparameters and sizes
are runtime arguments; NaN is never swallowed (clamps are written with comparisons, which keep NaN,
rather than min/max, which may drop it on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cepo_kernels._params import LOG_RATIO_CLAMP, reduction_weights


@triton.jit
def lse_tile(b_z, m_i, s_i, t_i, nan_i):
    """Folds one tile of scaled logits into the running (max, sum exp, sum p*z, NaN count).

    b_z: [BLOCK_V] fp32 logits / T, -inf outside the vocabulary (and where the user masked them).
    Returns the updated (m_i, s_i, t_i, nan_i). At the end: lse = m + log(s), entropy = lse - t / s.
    """
    m_new = tl.maximum(m_i, tl.max(b_z, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid -inf - -inf
    alpha = tl.exp(m_i - m_ref)
    b_p = tl.exp(b_z - m_ref)  # [BLOCK_V], 0 at -inf
    s_new = s_i * alpha + tl.sum(b_p, axis=0)
    t_new = t_i * alpha + tl.sum(b_p * tl.where(b_p > 0, b_z, 0.0), axis=0)  # no 0 * -inf
    nan_new = nan_i + tl.sum((b_z != b_z).to(tl.int32), axis=0)
    return m_new, s_new, t_new, nan_new


@triton.jit
def lse_finish(m_i, s_i, t_i, nan_i):
    """(lse, entropy) from the running state; any NaN logit makes both NaN."""
    lse = m_i + tl.log(s_i)
    ent = lse - t_i / s_i
    lse = tl.where(nan_i > 0, float("nan"), lse)
    ent = tl.where(nan_i > 0, float("nan"), ent)
    return lse, ent


@triton.jit
def clamp_keep_nan(x, lo, hi):
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def cepo_token(lp, old, adv, delta, valid, lam, eps_w, eps_low, eps_high, clip_dual,
               HAS_OLD: tl.constexpr, HAS_TEACHERS: tl.constexpr, HAS_DUAL: tl.constexpr):
    """Per-token CEPO arithmetic (METHOD.md), elementwise on scalars or blocks, all fp32.

    lp: policy log-prob; old: old log-prob (ignored unless HAS_OLD: on-policy ratio 1);
    adv: the sequence's (or token's) advantage A; delta: pos_logp - neg_logp (ignored unless
    HAS_TEACHERS); valid: the mask. Returns (a_hat, loss, coef) where coef = dL/dlp, 0 where a clip
    (PPO, dual or the log-ratio clamp) is active or the token is masked.
    """
    sgn = tl.where(adv > 0, 1.0, tl.where(adv < 0, -1.0, 0.0))
    if HAS_TEACHERS:
        w = clamp_keep_nan(tl.exp(sgn * delta), 1.0 - eps_w, 1.0 + eps_w)
        # A = 0 gives exactly 0 whatever the teachers say (their rows may be skipped, METHOD.md prop. 4)
        a_hat = tl.where(adv == 0, 0.0, adv * ((1.0 - lam) + lam * w))
    else:
        a_hat = adv
    if HAS_OLD:
        log_ratio = lp - old
        in_range = (log_ratio >= -20.0) & (log_ratio <= 20.0)
        ratio = tl.exp(clamp_keep_nan(log_ratio, -20.0, 20.0))
    else:
        in_range = lp == lp
        ratio = tl.where(lp == lp, 1.0, lp)  # 1, or NaN for a NaN log-prob
    r_clip = clamp_keep_nan(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg1 = -a_hat * ratio
    pg2 = -a_hat * r_clip
    loss = tl.where(pg2 > pg1, pg2, pg1)
    clipped = ((a_hat > 0) & (ratio > 1.0 + eps_high)) | ((a_hat < 0) & (ratio < 1.0 - eps_low))
    if HAS_DUAL:
        dual = (a_hat < 0) & (loss > -clip_dual * a_hat)
        loss = tl.where(dual, -clip_dual * a_hat, loss)
        clipped = clipped | dual
    coef = tl.where(clipped | (~in_range), 0.0, -a_hat * ratio)
    a_hat = tl.where(valid, a_hat, 0.0)
    loss = tl.where(valid, loss, 0.0)
    coef = tl.where(valid, coef, 0.0)
    return a_hat, loss, coef


def reduce_loss(loss_tok, mask, reduction, num_tokens):
    """The reduced loss from the per-token losses [B, T] (differentiable; autograd forms dL/dL_t)."""
    if reduction == "none":
        return loss_tok
    return (reduction_weights(mask, reduction, num_tokens) * loss_tok).sum()


@torch.no_grad()
def loss_metrics(lp, old_logp, adv, a_hat, delta, mask, params):
    """Scalar metrics over the valid tokens, with one host sync for all of them.

    lp, adv, a_hat, mask [B, T]; old_logp and delta [B, T] or None. An empty selection gives 0.0.
    """
    m = mask.float()
    n = m.sum()

    def mean(x, sel=None):
        w = m if sel is None else m * sel.float()
        return (x.float() * w).sum() / w.sum().clamp_min(1.0)

    ratio = torch.ones_like(lp) if old_logp is None else torch.exp(
        (lp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    ratio = torch.where(mask, ratio, torch.ones_like(ratio))  # masked tokens may hold NaN
    clip_high = (a_hat > 0) & (ratio > 1.0 + params.eps_high)
    clip_low = (a_hat < 0) & (ratio < 1.0 - params.eps_low)
    if params.clip_dual is None:
        dual = torch.zeros_like(mask)
    else:
        dual = (a_hat < 0) & (ratio > params.clip_dual)
    delta_stats = delta_metrics(torch.zeros_like(lp) if delta is None else delta, adv, mask)
    safe_lp = torch.where(mask, lp, torch.zeros_like(lp))
    values = torch.stack([
        n,
        mean(clip_high | clip_low),
        mean(clip_low),
        mean(clip_high),
        mean(dual),
        mean(ratio),
        mean(-torch.log(ratio)),
        *delta_stats.values(),
        mean(torch.where(mask, adv.abs(), torch.zeros_like(adv))),
        mean(a_hat.abs()),
        mean(safe_lp),
    ]).tolist()
    return dict(zip(METRIC_NAMES, values, strict=True))


@torch.no_grad()
def delta_metrics(delta, adv, mask):
    """Statistics of the evidence Delta [B, T] (adv [B, T], mask [B, T] bool) as 0-dim tensors, no host sync.

    Over the valid tokens with A != 0, the only ones whose teachers matter (rows with A = 0 may be
    unscored): mean, std, mean on A > 0 and on A < 0, and the fraction with sign(Delta) = -sign(A).
    An empty selection gives 0.
    """
    used = mask & (adv != 0)
    d = torch.where(used, delta, torch.zeros_like(delta)).float()

    def mean(x, sel):
        w = sel.float()
        return (x.float() * w).sum() / w.sum().clamp_min(1.0)

    n_used = used.sum()
    d_mean = mean(d, used)
    d_var = ((d - d_mean) ** 2 * used.float()).sum() / (n_used - 1).clamp_min(1.0)
    return {
        "delta_mean": d_mean,
        "delta_std": torch.where(n_used > 1, d_var.sqrt(), torch.zeros_like(d_var)),
        "delta_mean_pos": mean(d, used & (adv > 0)),
        "delta_mean_neg": mean(d, used & (adv < 0)),
        "frac_wrong_dir": mean((torch.sign(d) * torch.sign(adv)) < 0, used),
    }


METRIC_NAMES = (
    "num_tokens", "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean",
    "approx_kl", "delta_mean", "delta_std", "delta_mean_pos", "delta_mean_neg", "frac_wrong_dir",
    "adv_abs_mean", "adv_hat_abs_mean", "logp_mean",
)
