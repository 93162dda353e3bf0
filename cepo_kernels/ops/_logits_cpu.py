"""The logits operators' native CPU kernels: the launchers of ops/_logits_launch.py (same arguments, same
outputs) in PyTorch, registered for the CPU by ops/_logits_ops.py (the default without a GPU; Triton's
interpreter with CEPO_KERNELS_CPU=interpreter).

Rows in chunks of about `_cpu.TILE_ELEMS` elements, so every temporary is a few MiB whatever B*T and V are;
only the rows that matter are read (the loss: valid rows, teachers of the rows with A != 0; the backward:
rows with a non-zero upstream gradient, the others get zeros without a read), as in the Triton kernels.
"""

from __future__ import annotations

import torch

from cepo_kernels.ops import _common, _cpu


def _flat(x):
    """The [B * T, V] view of a [B, T, V] tensor, or None when its strides allow none."""
    B, T, V = x.shape
    try:
        return x.view(B * T, V)
    except RuntimeError:
        return None


def _take(x, r0, r1, keep=None):
    """The rows r0..r1 (flat ids b * T + t) of a [B, T, V] tensor where `keep` [r1 - r0] holds:
    (rows [k, V], positions in the chunk or None for all). When most rows are kept and the tensor is viewable
    as [B * T, V]: a view of all of them (idx None: the caller discards the others' results, which never mix
    with the kept rows'), else a copy of the kept rows only."""
    T = x.shape[1]
    flat = _flat(x)
    dense = keep is None or (flat is not None and 2 * int(keep.sum()) >= keep.numel()) or bool(keep.all())
    idx = None if dense else keep.nonzero().squeeze(1)
    if idx is None and flat is not None:
        return flat[r0:r1], None
    rows = torch.arange(r0, r1, device=x.device) if idx is None else r0 + idx
    return (flat.index_select(0, rows) if flat is not None else x[rows // T, rows % T]), idx


def _put(out, r0, r1, idx, values):
    """Writes values [k, V] into the rows r0..r1 (idx: positions in the chunk, None for all) of out."""
    T = out.shape[1]
    flat = _flat(out)
    if flat is not None and idx is None:
        flat[r0:r1] = values
        return
    rows = torch.arange(r0, r1, device=out.device) if idx is None else r0 + idx
    if flat is not None:
        flat.index_copy_(0, rows, values.to(out.dtype))
    else:
        out[rows // T, rows % T] = values.to(out.dtype)


def _scaled(x, inv_temp, new):
    """fp32 z = x / T of a [r, V] block; `new`: always a new tensor (the caller writes into it), else x itself
    when it is fp32 and T = 1."""
    if x.dtype == torch.float32:
        return x * inv_temp if new or inv_temp != 1.0 else x
    z = x.float()
    return z.mul_(inv_temp) if inv_temp != 1.0 else z


def _lse_rows(x, inv_temp, with_entropy):
    """(lse, entropy) of the scaled rows of a [r, V] block."""
    stats = _cpu.fold_tile(_scaled(x, inv_temp, False), _cpu.empty_stats(x.shape[0], x.device), with_entropy)
    return _cpu.lse_entropy(stats)


def _target_z(x, targets, inv_temp):
    """The targets' scaled logits of a [r, V] block (0 for an id outside [0, V): never read)."""
    V = x.shape[1]
    in_range = (targets >= 0) & (targets < V)
    z = x.gather(1, torch.where(in_range, targets, 0)[:, None]).squeeze(1).float() * inv_temp
    return torch.where(in_range, z, 0.0)


def logprobs_fwd(logits, targets, temperature=1.0, with_entropy=True):
    """As _logits_launch.logprobs_fwd: logits [B, T, V], targets [B*T] -> (logp, lse, entropy or None)."""
    B, T, V = logits.shape
    N, inv_temp = B * T, 1.0 / temperature
    lp, lse = (_common.alloc((N,), torch.float32, logits.device) for _ in range(2))
    ent = _common.alloc((N,), torch.float32, logits.device) if with_entropy else None
    for r0, r1 in _cpu.chunks(N, _cpu.rows_per_tile(V)):
        x, _ = _take(logits, r0, r1)
        tg = targets[r0:r1]
        c_lse, c_ent = _lse_rows(x, inv_temp, with_entropy)
        lse[r0:r1] = c_lse
        lp[r0:r1] = _cpu.target_logp(_target_z(x, tg, inv_temp), tg, c_lse, V)
        if with_entropy:
            ent[r0:r1] = c_ent
    return lp, lse, ent


def _teacher_logp(rows, targets, inv_temp):
    """A teacher's target log-probs over a [u, V] block of its rows."""
    lse_t, _ = _lse_rows(rows, inv_temp, False)
    return _cpu.target_logp(_target_z(rows, targets, inv_temp), targets, lse_t, rows.shape[1])


def cepo_fwd(logits, targets, adv, mask, params, *, old_logp=None, pos_logits=None, neg_logits=None,
             pos_logp=None, neg_logp=None):
    """As _logits_launch.cepo_fwd: (logp, lse, a_hat, loss_tok, coef, delta or None), each [B*T] fp32."""
    B, T, V = logits.shape
    N, dev, inv_temp = B * T, logits.device, 1.0 / params.temperature
    valid = mask != 0
    used = valid & (adv != 0)
    lp, lse = torch.zeros(N, device=dev), torch.zeros(N, device=dev)  # 0 at masked rows (not read)
    has_teachers = pos_logits is not None or pos_logp is not None
    pos = pos_logp if pos_logp is not None else (torch.zeros(N, device=dev) if has_teachers else None)
    neg = neg_logp if neg_logp is not None else (torch.zeros(N, device=dev) if has_teachers else None)
    for r0, r1 in _cpu.chunks(N, _cpu.rows_per_tile(V)):
        x, idx = _take(logits, r0, r1, valid[r0:r1])
        if x.shape[0]:
            sel = slice(r0, r1) if idx is None else r0 + idx
            c_lse, _ = _lse_rows(x, inv_temp, False)
            c_lp = _cpu.target_logp(_target_z(x, targets[sel], inv_temp), targets[sel], c_lse, V)
            lse[sel], lp[sel] = torch.where(valid[sel], c_lse, 0.0), torch.where(valid[sel], c_lp, 0.0)
        for teacher, out in ((pos_logits, pos), (neg_logits, neg)):  # teachers of A = 0 rows are not read
            if teacher is not None and bool(used[r0:r1].any()):
                x, idx = _take(teacher, r0, r1, used[r0:r1])
                sel = slice(r0, r1) if idx is None else r0 + idx
                out[sel] = _teacher_logp(x, targets[sel], inv_temp)
    delta = torch.where(used, pos - neg, 0.0) if has_teachers else None
    p = params
    a_hat, loss, coef = _cpu.cepo_token(lp, old_logp, adv, delta, valid, p.lam, p.eps_w, p.eps_low,
                                        p.eps_high, p.clip_dual)
    coef = torch.where(loss != loss, loss, coef)  # a NaN loss gives a NaN gradient, not 0
    return lp, lse, a_hat, loss, coef, delta


def logprobs_bwd(logits, targets, lse, ent, grad_lp, grad_ent=None, temperature=1.0, inplace=False):
    """As _logits_launch.logprobs_bwd: dlogits [B, T, V] in the logits' dtype (in place: into `logits`)."""
    B, T, V = logits.shape
    inv_temp = 1.0 / temperature
    dlogits = logits if inplace else _common.alloc(logits.shape, logits.dtype, logits.device)
    g_lp = torch.where(targets < 0, 0.0, grad_lp)  # a negative id's log-prob is the constant 0
    active = g_lp != 0 if grad_ent is None else (g_lp != 0) | (grad_ent != 0)
    g_lp = torch.where(targets >= V, float("nan"), g_lp)  # an id >= V: the log-prob itself is NaN
    for r0, r1 in _cpu.chunks(B * T, _cpu.rows_per_tile(V)):
        keep = active[r0:r1]
        if not bool(keep.any()):  # masked, clipped or A_hat = 0: zero gradient, the logits are not read
            _put(dlogits, r0, r1, None, torch.zeros((), dtype=dlogits.dtype).expand(r1 - r0, V))
            continue
        x, idx = _take(logits, r0, r1, keep)
        sel = slice(r0, r1) if idx is None else r0 + idx
        g = _dlogits(x, targets[sel], lse[sel], g_lp[sel], None if grad_ent is None else ent[sel],
                     None if grad_ent is None else grad_ent[sel], inv_temp)
        if idx is None:  # every row computed: the inactive ones get zeros
            g = g.masked_fill_(~keep[:, None], 0.0)
        else:
            _put(dlogits, r0, r1, (~keep).nonzero().squeeze(1),
                 torch.zeros((), dtype=dlogits.dtype).expand(int((~keep).sum()), V))
        _put(dlogits, r0, r1, idx, g)
    return dlogits


def _dlogits(x, targets, lse, g_lp, ent, g_ent, inv_temp):
    """fp32 (g_lp (onehot - p) - g_ent p (log p + H)) / T of a [r, V] block, as the Triton kernel's pieces."""
    V = x.shape[1]
    in_range = (targets >= 0) & (targets < V)
    tgt = torch.where(in_range, targets, 0)[:, None]
    log_p = _scaled(x, inv_temp, True).sub_(lse[:, None])
    g_p = (-g_lp * inv_temp)[:, None]
    if g_ent is None:  # one [r, V] buffer: log p -> p -> d
        p = log_p.exp_()
        d_t = g_lp * (1.0 - p.gather(1, tgt).squeeze(1))
        d = p.mul_(g_p)
    else:
        p = torch.exp(log_p)
        p_t, lp_t = p.gather(1, tgt).squeeze(1), log_p.gather(1, tgt).squeeze(1)
        d_t = g_lp * (1.0 - p_t) - g_ent * torch.where(p_t > 0, p_t * (lp_t + ent), 0.0)
        d = torch.where(p > 0, p * (g_p - (g_ent * inv_temp)[:, None] * (log_p + ent[:, None])), p * g_p)
    d_t = torch.where(in_range, d_t * inv_temp, d.gather(1, tgt).squeeze(1))
    return d.scatter_(1, tgt, d_t[:, None])


def cepo_advantages_fwd(adv, pos_logp, neg_logp, mask, lam, eps_w):
    """As _logits_launch.cepo_advantages_fwd: A_hat [N] fp32, 0 at masked tokens."""
    return torch.where(mask != 0, _cpu.cepo_weight(adv, pos_logp - neg_logp, lam, eps_w), 0.0)
