"""The linear path's Triton kernels: the forward (logsumexp stats of hidden @ weight^T, the combine of the
vocabulary splits, the per-token loss) and the backward (the logits' gradient G of a chunk, G @ W, G^T @ h),
which share `grouped` and `logit_tile`.

Launchers: ops/_linear_launch.py (linear_scores, token_fwd, linear_bwd). Conventions: docs/kernels.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from cepo_kernels.ops._common import cepo_token, lse_rows


@triton.jit
def grouped(pid, n_a, n_b, GROUP: tl.constexpr):
    """L2-aware program order over an (n_a x n_b) grid: GROUP consecutive a-blocks sweep b together."""
    width = GROUP * n_b
    first = (pid // width) * GROUP
    size = tl.minimum(n_a - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def logit_tile(p_x, m_x, weight, bias, o_v, m_v, H, stride_wv, stride_b, HAS_BIAS: tl.constexpr,
               UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """[BLOCK_M, BLOCK_V] fp32 logits x @ weight[o_v]^T (+ bias[o_v]) of a block of rows.

    p_x [BLOCK_M, 1]: pointers to the rows (m_x [BLOCK_M] the valid ones); o_v, m_v [BLOCK_V]: the
    vocabulary columns and the valid ones. 0 at invalid rows and columns (before the bias).
    """
    p_w = weight + o_v.to(tl.int64)[None, :] * stride_wv  # [1, BLOCK_V]
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        o_h = k + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        b_x = tl.load(p_x + o_h[None, :], mask=m_x[:, None] & m_h[None, :], other=0.0)  # [BLOCK_M, BLOCK_H]
        b_w = tl.load(p_w + o_h[:, None], mask=m_h[:, None] & m_v[None, :], other=0.0)  # [BLOCK_H, BLOCK_V]
        if UPCAST_DOT:
            b_x = b_x.to(tl.float32)
            b_w = b_w.to(tl.float32)
        acc = tl.dot(b_x, b_w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + o_v * stride_b, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def scored_count(src, count, P, ROWS_FROM: tl.constexpr, HAS_ROWS: tl.constexpr):
    """How many positions source `src` scores: count[0] (at most P) for sources >= ROWS_FROM with a row
    list, else all P."""
    n_act = P
    if HAS_ROWS:
        n_act = tl.where(src >= ROWS_FROM, tl.minimum(tl.load(count), P), P)
    return n_act


@triton.jit
def scored_rows(o, m, src, rows, ROWS_FROM: tl.constexpr, HAS_ROWS: tl.constexpr):
    """int64 row ids of positions o (m: the scored ones): rows[o] for sources >= ROWS_FROM with a row list,
    else o itself."""
    r = o.to(tl.int64)
    if HAS_ROWS:
        r = tl.where(src >= ROWS_FROM, tl.load(rows + o, mask=m, other=0), r)
    return r


@triton.heuristics({
    "HAS_BIAS": lambda a: a["bias"] is not None,
    "HAS_ROWS": lambda a: a["rows"] is not None,
})
@triton.jit
def _linear_fwd_kernel(h0, h1, h2, weight, bias, targets, rows, count, stats, tgt,
                       P, V, H, n_split, tiles_per_split, inv_temp,
                       stride_h0, stride_h1, stride_h2, stride_wv, stride_b, stride_t,
                       stride_ss, stride_sk, stride_sp,
                       N_SRC: tl.constexpr, ROWS_FROM: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_ROWS: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_H: tl.constexpr):
    """Partial logsumexp stats of one row block of one source over one vocabulary split, rows on the MMA's M.

    Position i of source s is row rows[i] when HAS_ROWS and s >= ROWS_FROM (only i < count[0] are scored),
    else row i. stats [N_SRC, 3, n_split, P] fp32: running max, sum exp and sum p*z of z = logits / T over
    the split; tgt [N_SRC, P] fp32: the target's z, hidden . weight[y] (+ bias[y]), written by split 0.
    """
    pid = tl.program_id(0)
    vrb, split = grouped(pid, N_SRC * tl.cdiv(P, BLOCK_M), n_split, GROUP)
    rb = vrb // N_SRC
    src = vrb % N_SRC
    x = h0
    stride_x = stride_h0
    if N_SRC >= 2:
        if src == 1:
            x = h1
        stride_x = tl.where(src == 1, stride_h1, stride_x)
    if N_SRC >= 3:
        if src == 2:
            x = h2
        stride_x = tl.where(src == 2, stride_h2, stride_x)
    o_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] positions
    n_act = scored_count(src, count, P, ROWS_FROM, HAS_ROWS)
    if rb * BLOCK_M >= n_act:  # no scored row in this block (e.g. teachers of A = 0 rows)
        return
    m_m = o_m < n_act
    r = scored_rows(o_m, m_m, src, rows, ROWS_FROM, HAS_ROWS)
    p_x = x + r[:, None] * stride_x  # [BLOCK_M, 1]
    b_t = tl.load(targets + r * stride_t, mask=m_m, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(tiles_per_split):
        o_v = (split * tiles_per_split + i) * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        m_v = o_v < V
        acc = logit_tile(p_x, m_m, weight, bias, o_v, m_v, H, stride_wv, stride_b, HAS_BIAS, UPCAST_DOT,
                         PRECISION, BLOCK_M, BLOCK_V, BLOCK_H)
        # online logsumexp along the row (within a warp); NaN logits propagate through the sums
        b_z = tl.where(m_v[None, :], acc * inv_temp, float("-inf"))  # [BLOCK_M, BLOCK_V]
        m_i, s_i, t_i = lse_rows(b_z, m_i, s_i, t_i)
    p_s = stats + src * stride_ss + split * stride_sp + o_m
    tl.store(p_s, m_i, mask=m_m)
    tl.store(p_s + stride_sk, s_i, mask=m_m)
    tl.store(p_s + 2 * stride_sk, t_i, mask=m_m)
    if split == 0:  # the target logit as a dot of two H-vectors (no full-tile compare)
        # an id outside [0, V) is never read (its logp: 0 if < 0, NaN if >= V)
        m_y = m_m & (b_t >= 0) & (b_t < V)
        p_y = weight + tl.where(m_y, b_t, 0)[:, None] * stride_wv  # [BLOCK_M, 1]
        y = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k in range(0, H, BLOCK_H):
            o_h = k + tl.arange(0, BLOCK_H)
            m_h = o_h < H
            b_x = tl.load(p_x + o_h[None, :], mask=m_m[:, None] & m_h[None, :], other=0.0).to(tl.float32)
            b_w = tl.load(p_y + o_h[None, :], mask=m_y[:, None] & m_h[None, :], other=0.0).to(tl.float32)
            y += tl.sum(b_x * b_w, axis=1)
        if HAS_BIAS:
            y += tl.load(bias + b_t * stride_b, mask=m_y, other=0.0).to(tl.float32)
        tl.store(tgt + src * P + o_m, y * inv_temp, mask=m_m)


@triton.heuristics({"HAS_ROWS": lambda a: a["rows"] is not None})
@triton.jit
def _linear_combine_kernel(stats, tgt, targets, rows, count, lse, logp, ent, P, V, n_split,
                           stride_t, stride_ss, stride_sk, stride_sp, stride_out,
                           ROWS_FROM: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Fixed-order combine of the splits: lse, logp (0 for a negative target, NaN for one >= V) and entropy of
    the scored positions of source program_id(1), written at their rows of [N_SRC, N] outputs."""
    src = tl.program_id(1)
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < scored_count(src, count, P, ROWS_FROM, HAS_ROWS)
    r = scored_rows(o, m, src, rows, ROWS_FROM, HAS_ROWS)
    p_s = stats + src * stride_ss + o
    mx = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for k in range(n_split):
        mx = tl.maximum(mx, tl.load(p_s + k * stride_sp, mask=m, other=float("-inf")))
    m_ref = tl.where(mx == float("-inf"), 0.0, mx)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    t = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(n_split):
        w = tl.exp(tl.load(p_s + k * stride_sp, mask=m, other=float("-inf")) - m_ref)
        s += tl.load(p_s + k * stride_sp + stride_sk, mask=m, other=0.0) * w
        t += tl.load(p_s + k * stride_sp + 2 * stride_sk, mask=m, other=0.0) * w
    b_lse = mx + tl.log(s)
    b_t = tl.load(targets + r * stride_t, mask=m, other=0)
    b_y = tl.load(tgt + src * P + o, mask=m, other=0.0)
    b_lp = tl.where((b_t >= 0) & (b_t < V), b_y - b_lse, tl.where(b_t < 0, 0.0, float("nan")))
    p_out = src * stride_out + r
    tl.store(lse + p_out, b_lse, mask=m)
    tl.store(logp + p_out, b_lp, mask=m)
    tl.store(ent + p_out, b_lse - t / s, mask=m)


@triton.heuristics({
    "HAS_OLD": lambda a: a["old"] is not None,
    "HAS_TEACHERS": lambda a: a["pos"] is not None,
})
@triton.jit
def _linear_token_fwd_kernel(logp, old, adv, pos, neg, mask, a_hat, loss, coef, delta, N,
                             lam, eps_w, eps_low, eps_high, clip_dual,
                             HAS_OLD: tl.constexpr, HAS_TEACHERS: tl.constexpr, HAS_DUAL: tl.constexpr,
                             BLOCK: tl.constexpr):
    """Per token: Delta = pos - neg (0 where the mask is off or A = 0: those teachers are not scored),
    A_hat, the PPO-clip loss and coef = dL_t/dlp_t (cepo_token), on contiguous [N] arrays."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = o < N
    b_lp = tl.load(logp + o, mask=m, other=0.0)
    b_old = b_lp
    if HAS_OLD:
        b_old = tl.load(old + o, mask=m, other=0.0)
    b_adv = tl.load(adv + o, mask=m, other=0.0)
    b_valid = tl.load(mask + o, mask=m, other=0) != 0
    b_d = tl.zeros_like(b_lp)
    if HAS_TEACHERS:
        b_d = tl.load(pos + o, mask=m, other=0.0) - tl.load(neg + o, mask=m, other=0.0)
        b_d = tl.where(b_valid & (b_adv != 0), b_d, 0.0)
    b_ahat, b_loss, b_coef = cepo_token(b_lp, b_old, b_adv, b_d, b_valid, lam, eps_w, eps_low, eps_high,
                                        clip_dual, HAS_OLD, HAS_TEACHERS, HAS_DUAL)
    tl.store(a_hat + o, b_ahat, mask=m)
    tl.store(loss + o, b_loss, mask=m)
    tl.store(coef + o, b_coef, mask=m)
    tl.store(delta + o, b_d, mask=m)


# ---- the backward (launcher: ops/_linear_launch.py linear_bwd)

@triton.heuristics({
    "HAS_BIAS": lambda a: a["bias"] is not None,
    "HAS_ENT": lambda a: a["g_ent"] is not None,
    "HAS_DB": lambda a: a["db_part"] is not None,
    "FILTER": lambda a: a["tile_keep"] is not None,
})
@triton.jit
def _linear_bwd_kernel(hidden, weight, bias, targets, rows, count, lse, g_lp, ent, g_ent, grad_z, db_part,
                       tile_keep, r0, R, v0, C, V, H, inv_temp, filter_eps, stride_hn, stride_wv, stride_b,
                       stride_gz, stride_db, stride_tk,
                       HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, HAS_DB: tl.constexpr,
                       FILTER: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_H: tl.constexpr):
    """grad_z[i, j] = dL/dlogit of row rows[r0 + i], column v0 + j (i < R, j < C), logits recomputed.

    G = (g_lp (onehot - p) - g_ent p (log p + entropy)) / T with p = exp(z / T - lse). Row blocks past the
    active count are not computed (their column sums in db_part are 0). db_part [R / BLOCK_M, C] fp32: the
    block's column sums of G. tile_keep [R / BLOCK_M, C / BLOCK_V] int32 (FILTER): 1 when the tile holds a
    target or a probability >= filter_eps, else 0 (the matmuls then skip it).
    """
    pid = tl.program_id(0)
    rb, vb = grouped(pid, tl.cdiv(R, BLOCK_M), tl.cdiv(C, BLOCK_V), GROUP)
    o_i = rb * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of the chunk
    o_j = vb * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V] columns of the chunk
    m_j = o_j < C
    n_act = tl.load(count) - r0
    if rb * BLOCK_M >= n_act:
        if HAS_DB:
            tl.store(db_part + rb * stride_db + o_j, tl.zeros([BLOCK_V], dtype=tl.float32), mask=m_j)
        if FILTER:
            tl.store(tile_keep + rb * stride_tk + vb, 0)
        return
    m_i = (o_i < R) & (o_i < n_act)
    r = tl.load(rows + r0 + o_i, mask=m_i, other=0)  # [BLOCK_M] int64 row ids
    o_v = v0 + o_j
    m_v = m_j & (o_v < V)
    p_h = hidden + r[:, None] * stride_hn  # [BLOCK_M, 1]
    acc = logit_tile(p_h, m_i, weight, bias, o_v, m_v, H, stride_wv, stride_b, HAS_BIAS, UPCAST_DOT,
                     PRECISION, BLOCK_M, BLOCK_V, BLOCK_H)
    b_lse = tl.load(lse + r, mask=m_i, other=0.0)
    b_g = tl.load(g_lp + r, mask=m_i, other=0.0)
    b_t = tl.load(targets + r, mask=m_i, other=-1)
    b_logp = acc * inv_temp - b_lse[:, None]  # [BLOCK_M, BLOCK_V] log p
    b_p = tl.exp(b_logp)
    b_dz = tl.where(o_v[None, :] == b_t[:, None], b_g[:, None], 0.0) - b_g[:, None] * b_p
    if HAS_ENT:
        b_ent = tl.load(ent + r, mask=m_i, other=0.0)
        b_ge = tl.load(g_ent + r, mask=m_i, other=0.0)
        b_dz -= b_ge[:, None] * b_p * tl.where(b_p > 0, b_logp + b_ent[:, None], 0.0)
    b_dz = tl.where(m_i[:, None] & m_v[None, :], b_dz * inv_temp, 0.0)
    tl.store(grad_z + o_i.to(tl.int64)[:, None] * stride_gz + o_j[None, :], b_dz.to(grad_z.dtype.element_ty),
             mask=m_i[:, None] & m_j[None, :])
    if HAS_DB:
        tl.store(db_part + rb * stride_db + o_j, tl.sum(b_dz, axis=0), mask=m_j)
    if FILTER:
        m_t = m_i & (b_t >= v0 + vb * BLOCK_V) & (b_t < v0 + vb * BLOCK_V + BLOCK_V)
        big = tl.max(tl.where(m_i[:, None] & m_v[None, :], b_p, 0.0)) >= filter_eps
        tl.store(tile_keep + rb * stride_tk + vb, (big | (tl.max(m_t.to(tl.int32)) > 0)).to(tl.int32))


@triton.heuristics({"FILTER": lambda a: a["tile_keep"] is not None})
@triton.jit
def _linear_dh_kernel(grad_z, weight, dh, count, tile_keep, r0, R, v0, C, H, stride_gz, stride_wv, stride_dh,
                      stride_tk, TILE_M: tl.constexpr, TILE_V: tl.constexpr, FILTER: tl.constexpr,
                      ACCUMULATE: tl.constexpr, UPCAST_DOT: tl.constexpr,
                      PRECISION: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """dh[r0 + i, q] (+)= sum_j grad_z[i, j] * weight[v0 + j, q] (fp32 dh [rows, H]; i < R, active rows)."""
    pid = tl.program_id(0)
    pb, qb = grouped(pid, tl.cdiv(R, BLOCK_P), tl.cdiv(H, BLOCK_Q), GROUP)
    n_act = tl.load(count) - r0
    if pb * BLOCK_P >= n_act:
        return
    o_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    o_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_p = (o_p < R) & (o_p < n_act)
    m_q = o_q < H
    p_g = grad_z + o_p.to(tl.int64)[:, None] * stride_gz  # [BLOCK_P, 1]
    p_w = weight + o_q[None, :]  # [1, BLOCK_Q]
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for k in range(0, C, BLOCK_K):
        o_k = k + tl.arange(0, BLOCK_K)
        m_k = o_k < C
        keep = True
        if FILTER:  # the G kernel's tile holding rows pb * BLOCK_P.. and columns k..
            keep = tl.load(tile_keep + (pb * BLOCK_P // TILE_M) * stride_tk + k // TILE_V) != 0
        if keep:
            b_g = tl.load(p_g + o_k[None, :], mask=m_p[:, None] & m_k[None, :], other=0.0)  # [BP, BK]
            b_w = tl.load(p_w + (v0 + o_k).to(tl.int64)[:, None] * stride_wv,
                          mask=m_k[:, None] & m_q[None, :], other=0.0)  # [BLOCK_K, BLOCK_Q]
            if UPCAST_DOT:
                b_g = b_g.to(tl.float32)
                b_w = b_w.to(tl.float32)
            acc = tl.dot(b_g, b_w, acc, input_precision=PRECISION)
    p_dh = dh + (r0 + o_p).to(tl.int64)[:, None] * stride_dh + o_q[None, :]
    m_dh = m_p[:, None] & m_q[None, :]
    if ACCUMULATE:
        acc += tl.load(p_dh, mask=m_dh, other=0.0)
    tl.store(p_dh, acc, mask=m_dh)


@triton.heuristics({"FILTER": lambda a: a["tile_keep"] is not None})
@triton.jit
def _linear_dw_kernel(grad_z, hidden, rows, count, dw, tile_keep, r0, R, C, H, stride_gz, stride_hn,
                      stride_dw, stride_tk, TILE_M: tl.constexpr, TILE_V: tl.constexpr, FILTER: tl.constexpr,
                      ACCUMULATE: tl.constexpr, UPCAST_DOT: tl.constexpr,
                      PRECISION: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[j, q] (+)= sum_i grad_z[i, j] * hidden[rows[r0 + i], q] over the chunk's active rows i.

    dw is the chunk's rows of grad_weight (its dtype) or an fp32 accumulator (ACCUMULATE: several row chunks).
    """
    pid = tl.program_id(0)
    pb, qb = grouped(pid, tl.cdiv(C, BLOCK_P), tl.cdiv(H, BLOCK_Q), GROUP)
    o_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] vocabulary columns of the chunk
    o_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BLOCK_Q] hidden features
    m_p = o_p < C
    m_q = o_q < H
    n_act = tl.minimum(tl.load(count) - r0, R)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for k in range(0, n_act, BLOCK_K):
        o_k = k + tl.arange(0, BLOCK_K)
        m_k = o_k < n_act
        keep = True
        if FILTER:  # the G kernel's tile holding rows k.. and columns pb * BLOCK_P..
            keep = tl.load(tile_keep + (k // TILE_M) * stride_tk + pb * BLOCK_P // TILE_V) != 0
        if keep:
            r = tl.load(rows + r0 + o_k, mask=m_k, other=0)  # [BLOCK_K] int64
            b_g = tl.load(grad_z + o_k.to(tl.int64)[None, :] * stride_gz + o_p[:, None],
                          mask=m_p[:, None] & m_k[None, :], other=0.0)  # [BLOCK_P, BLOCK_K] (G^T)
            b_h = tl.load(hidden + r[:, None] * stride_hn + o_q[None, :], mask=m_k[:, None] & m_q[None, :],
                          other=0.0)  # [BLOCK_K, BLOCK_Q]
            if UPCAST_DOT:
                b_g = b_g.to(tl.float32)
                b_h = b_h.to(tl.float32)
            acc = tl.dot(b_g, b_h, acc, input_precision=PRECISION)
    p_dw = dw + o_p.to(tl.int64)[:, None] * stride_dw + o_q[None, :]
    m_dw = m_p[:, None] & m_q[None, :]
    if ACCUMULATE:
        acc += tl.load(p_dw, mask=m_dw, other=0.0)
    tl.store(p_dw, acc.to(dw.dtype.element_ty), mask=m_dw)
