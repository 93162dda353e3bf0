"""What the native CPU kernels of both families share (ops/_logits_cpu.py, ops/_linear_cpu.py): the
per-token CEPO arithmetic of ops/_common.py (`cepo_weight`, `cepo_token`) written in PyTorch, the online
logsumexp statistics of a [rows, columns] tile, and the row / vocabulary chunking that bounds their memory.

Same arithmetic as the Triton kernels, in the same order (fp32; clamps written with comparisons, which keep
NaN); the kernels run on the tensors' own threads (torch's intra-op pool). docs/cpu-operators.md.
"""

from __future__ import annotations

import torch

from cepo_kernels._params import LOG_RATIO_CLAMP

TILE_ELEMS = 1 << 20  # fp32 elements of one [rows, columns] work tile (4 MiB): bounds every temporary
VOCAB_TILE = 8192  # vocabulary columns per tile of the linear kernels (16-bit weights: widened per tile)


def chunks(n, size):
    """(start, stop) pairs covering range(n) in steps of `size` (>= 1)."""
    size = max(1, int(size))
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def rows_per_tile(columns):
    """Rows of a work tile with `columns` fp32 columns (at least 1)."""
    return max(1, TILE_ELEMS // max(1, columns))


def clamp_keep_nan(x, lo, hi):
    return torch.where(x < lo, lo, torch.where(x > hi, hi, x))


def cepo_weight(adv, delta, lam, eps_w):
    """A_hat = A ((1 - lam) + lam w), w = clip(exp(sign(A) Delta), 1 - eps_w, 1 + eps_w); 0 at A = 0."""
    sgn = torch.where(adv > 0, 1.0, torch.where(adv < 0, -1.0, 0.0))
    w = clamp_keep_nan(torch.exp(sgn * delta), 1.0 - eps_w, 1.0 + eps_w)
    return torch.where(adv == 0, 0.0, adv * ((1.0 - lam) + lam * w))


def cepo_token(lp, old, adv, delta, valid, lam, eps_w, eps_low, eps_high, clip_dual):
    """(a_hat, loss, coef = dL/dlp) [N] fp32, as ops/_common.cepo_token: old None -> on-policy (ratio 1),
    delta None -> no teachers (A_hat = A), clip_dual None -> no dual clip; 0 where `valid` is false."""
    a_hat = adv if delta is None else cepo_weight(adv, delta, lam, eps_w)
    if old is not None:
        log_ratio = lp - old
        in_range = (log_ratio >= -LOG_RATIO_CLAMP) & (log_ratio <= LOG_RATIO_CLAMP)
        ratio = torch.exp(clamp_keep_nan(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    else:
        in_range = lp == lp
        ratio = torch.where(in_range, 1.0, lp)  # 1, or NaN for a NaN log-prob
    r_clip = clamp_keep_nan(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg1 = -a_hat * ratio
    pg2 = -a_hat * r_clip
    loss = torch.where(pg2 > pg1, pg2, pg1)
    clipped = ((a_hat > 0) & (ratio > 1.0 + eps_high)) | ((a_hat < 0) & (ratio < 1.0 - eps_low))
    if clip_dual is not None:
        dual = (a_hat < 0) & (loss > -clip_dual * a_hat)
        loss = torch.where(dual, -clip_dual * a_hat, loss)
        clipped = clipped | dual
    coef = torch.where(clipped | ~in_range, 0.0, -a_hat * ratio)
    return (torch.where(valid, a_hat, 0.0), torch.where(valid, loss, 0.0), torch.where(valid, coef, 0.0))


def empty_stats(n, device):
    """Initial online logsumexp state of n rows: (max, sum exp, sum exp * z) = (-inf, 0, 0)."""
    return (torch.full((n,), float("-inf"), device=device), torch.zeros(n, device=device),
            torch.zeros(n, device=device))


def fold_tile(z, stats, with_entropy=True):
    """Folds a [rows, columns] fp32 tile of scaled logits z (-inf allowed) into the rows' running
    (max, sum exp(z - max), sum exp(z - max) z), as ops/_common.lse_rows. NaN propagates through the sums."""
    m, s, t = stats
    m_new = torch.maximum(m, z.amax(1))
    m_ref = torch.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid -inf - -inf
    alpha = torch.exp(m - m_ref)
    e = torch.exp(z - m_ref[:, None])
    s = s * alpha + e.sum(1)
    if with_entropy:  # 0 * -inf is NaN: nansum drops it; a NaN logit already made the sum s NaN
        t = t * alpha + e.mul_(z).nansum(1)
    return m_new, s, t


def lse_entropy(stats):
    """(lse, entropy) of the rows from their folded statistics."""
    m, s, t = stats
    lse = torch.where(m == float("-inf"), 0.0, m) + torch.log(s)
    return lse, lse - t / s


def target_logp(z_t, targets, lse, V):
    """The target's log-prob from its scaled logit: 0 for a negative id, NaN for an id >= V."""
    in_range = (targets >= 0) & (targets < V)
    return torch.where(in_range, z_t - lse, torch.where(targets < 0, 0.0, float("nan")))
