"""The linear path's Triton kernels: the forward (logsumexp stats of hidden @ weight^T, the combine of the
vocabulary splits, the per-token loss) and the pieces the backward shares (`grouped`, `logit_tile`).

Launchers: ops/linear.py (linear_fwd, token_fwd) and ops/linear_bwd.py. Conventions: docs/kernels.md.
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
