"""The linear operators' native CPU kernels: the launchers of ops/_linear_launch.py (same arguments, same
outputs) in PyTorch, registered for the CPU by ops/_linear_ops.py (the default without a GPU; Triton's
interpreter with CEPO_KERNELS_CPU=interpreter).

The logits are never stored: the vocabulary is walked in tiles of `_cpu.VOCAB_TILE` columns and the rows in
chunks, so a logit tile is about `_cpu.TILE_ELEMS` fp32 elements, folded into running logsumexp statistics
(forward) or turned into the tile's gradient G and multiplied out at once (backward). As on a GPU the matmuls
take the operands in their dtype and accumulate in fp32: 16-bit operands are widened to fp32 (exact) one
weight tile at a time, and G is rounded to the operands' dtype before its matmuls. Only the rows that
matter are computed (teacher rows in `rows`; backward rows with a non-zero upstream gradient).
"""

from __future__ import annotations

import torch

from cepo_kernels.ops import _cpu


def _vocab_tiles(weight, bias):
    """(v0, v1, fp32 weight tile [C, H], fp32 bias tile [C] or None) over the vocabulary."""
    V = weight.shape[0]
    for v0, v1 in _cpu.chunks(V, _cpu.VOCAB_TILE):
        yield (v0, v1, weight[v0:v1].float(), None if bias is None else bias[v0:v1].float())


def _logit_tile(h, w, b):
    """fp32 logits h @ w^T (+ b) of fp32 rows h [r, H] and a weight tile w [C, H]."""
    return torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())


def linear_scores(sources, weight, bias, targets, rows=None, count=None, *, rows_from=0, temperature=1.0):
    """As _linear_launch.linear_scores: [3, S, N] fp32 (lse, logp, entropy), 0 at rows a source did not score
    (sources >= rows_from with a row list score rows[:count])."""
    S, N, V = len(sources), sources[0].shape[0], weight.shape[0]
    out = torch.zeros(3, S, N, device=weight.device)
    inv_temp = 1.0 / temperature
    for s, src in enumerate(sources):
        idx = None if rows is None or s < rows_from else rows[: int(count[0])]
        P = N if idx is None else idx.numel()
        if P == 0:
            continue
        h = (src if idx is None else src.index_select(0, idx)).float()  # [P, H] fp32
        tg = targets if idx is None else targets.index_select(0, idx)
        stats = _cpu.empty_stats(P, weight.device)
        step = _cpu.rows_per_tile(min(V, _cpu.VOCAB_TILE))
        for _, _, w, b in _vocab_tiles(weight, bias):
            parts = [_cpu.fold_tile(_logit_tile(h[a:c], w, b).mul_(inv_temp), [x[a:c] for x in stats])
                     for a, c in _cpu.chunks(P, step)]
            stats = [torch.cat(x) for x in zip(*parts, strict=True)]
        lse, ent = _cpu.lse_entropy(stats)
        z_t = _target_logit(h, weight, bias, tg) * inv_temp
        sel = slice(None) if idx is None else idx
        out[0, s, sel], out[1, s, sel], out[2, s, sel] = lse, _cpu.target_logp(z_t, tg, lse, V), ent
    return out


def _target_logit(h, weight, bias, targets):
    """hidden . weight[y] (+ bias[y]) of fp32 rows h [P, H]; 0 for an id outside [0, V) (never read)."""
    V = weight.shape[0]
    in_range = (targets >= 0) & (targets < V)
    y = torch.where(in_range, targets, 0)
    z = (h * weight.index_select(0, y).float()).sum(1)
    if bias is not None:
        z = z + bias.index_select(0, y).float()
    return torch.where(in_range, z, 0.0)


def token_fwd(logp, old, adv, pos, neg, mask, params):
    """As _linear_launch.token_fwd: (a_hat, loss, coef, delta) [N] fp32; Delta is 0 without teachers and where
    the mask is off or A = 0 (those teachers are not scored)."""
    valid = mask != 0
    delta = None if pos is None else torch.where(valid & (adv != 0), pos - neg, 0.0)
    p = params
    a_hat, loss, coef = _cpu.cepo_token(logp, old, adv, delta, valid, p.lam, p.eps_w, p.eps_low, p.eps_high,
                                        p.clip_dual)
    return a_hat, loss, coef, torch.zeros_like(logp) if delta is None else delta


def linear_bwd(hidden, weight, bias, targets, lse, g_lp, ent=None, g_ent=None, *, temperature=1.0,
               needs=(True, True, True)):
    """As _linear_launch.linear_bwd: gradients of sum(g_lp * logp + g_ent * entropy) w.r.t. (hidden, weight,
    bias), None for those not needed; rows where g_lp and g_ent are both 0 cost nothing."""
    N, H = hidden.shape
    V, dev = weight.shape[0], hidden.device
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    grad_b = torch.zeros_like(bias) if need_b else None
    if N == 0 or not (need_h or need_w or need_b):
        return grad_h, grad_w, grad_b
    g_lp = g_lp.masked_fill(targets < 0, 0.0)  # a negative id's log-prob is the constant 0: no gradient
    idx = (g_lp != 0 if g_ent is None else (g_lp != 0) | (g_ent != 0)).nonzero().squeeze(1)
    A = idx.numel()
    if A == 0:
        return grad_h, grad_w, grad_b
    inv_temp, low = 1.0 / temperature, hidden.dtype != torch.float32
    h = hidden.index_select(0, idx).float()  # [A, H]
    tg, l_a, g_a = targets[idx], lse[idx], g_lp[idx]
    e_a, ge_a = (None, None) if g_ent is None else (ent[idx], g_ent[idx])
    dh = torch.zeros(A, H, device=dev) if need_h else None
    db = torch.zeros(V, device=dev) if need_b else None
    step = _cpu.rows_per_tile(min(V, _cpu.VOCAB_TILE))
    for v0, v1, w, b in _vocab_tiles(weight, bias):
        dw = (grad_w[v0:v1] if not low else torch.zeros(v1 - v0, H, device=dev)) if need_w else None
        for a, c in _cpu.chunks(A, step):
            gz = _grad_tile(_logit_tile(h[a:c], w, b), v0, tg[a:c], l_a[a:c], g_a[a:c],
                            None if e_a is None else e_a[a:c], None if ge_a is None else ge_a[a:c], inv_temp)
            if low:  # G in the operands' dtype, as the Triton kernel stores it before its matmuls
                gz = gz.to(hidden.dtype).float()
            if need_h:
                dh[a:c].addmm_(gz, w)
            if need_w:
                dw.addmm_(gz.t(), h[a:c])
            if need_b:
                db[v0:v1] += gz.sum(0)
        if need_w and low:
            grad_w[v0:v1] = dw
    if need_h:
        grad_h.index_copy_(0, idx, dh.to(hidden.dtype))
    if need_b:
        grad_b = db.to(bias.dtype)
    return grad_h, grad_w, grad_b


def _grad_tile(z, v0, targets, lse, g_lp, ent, g_ent, inv_temp):
    """G = dL/dlogits of a tile of raw logits z [r, C] (columns v0..), in place of z:
    (g_lp (onehot - p) - g_ent p (log p + H)) / T with p = exp(z / T - lse)."""
    log_p = z.mul_(inv_temp).sub_(lse[:, None])
    p = torch.exp(log_p)
    if g_ent is None:
        g = p.mul_(-g_lp[:, None])
    else:
        g = p * torch.where(p > 0, log_p.add_(ent[:, None]), 0.0)
        g = g.mul_(-g_ent[:, None]).sub_(p * g_lp[:, None])
    C = z.shape[1]
    hit = (targets >= v0) & (targets < v0 + C)
    if bool(hit.any()):
        r = hit.nonzero().squeeze(1)
        g.index_put_((r, targets[r] - v0), g_lp[r], accumulate=True)
    return g.mul_(inv_temp)
