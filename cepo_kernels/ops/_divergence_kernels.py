"""The divergence's Triton kernels over the full vocabulary (launchers: ops/_divergence_launch.py).

One program per token row. `_divergence_fwd_kernel` makes two passes over the vocabulary tiles of the
student's and the teacher's logits: the first folds both into online log-sum-exps (the normalisers), the
second sums the divergence D and sum_v h[v] (h = p_S dD/dp_S, the backward's row constant), which need the
normalised probabilities (the mixture M = (1 - beta) p_S + beta p_T has no online form). It saves the fp32
(lse_S, lse_T, sum h) per row, never logits. `_divergence_bwd_kernel` writes dD/dz_S = (h - p_S sum h) / T
tile by tile, rows with a zero upstream gradient (masked) as zeros without reading their logits.
MODE (constexpr): 0 forward KL(p_T || p_S) (beta = 0), 1 reverse KL(p_S || p_T) (beta = 1), 2 the
generalized JSD. Math: docs/divergence.md. Conventions: docs/kernels.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from cepo_kernels.ops._common import LOG2E, lse_entropy, online_lse


@triton.jit
def _load_pair(x_row, y_row, o, V, MASKED: tl.constexpr):
    """[BLOCK_V] fp32 tiles of both rows; unmasked (wide loads on aligned rows) except for the vocab tail."""
    if MASKED:
        b_x = tl.load(x_row + o, mask=o < V, other=float("-inf")).to(tl.float32)
        b_y = tl.load(y_row + o, mask=o < V, other=float("-inf")).to(tl.float32)
    else:
        b_x = tl.load(x_row + o).to(tl.float32)
        b_y = tl.load(y_row + o).to(tl.float32)
    return b_x, b_y


@triton.jit
def _lse_step(x_row, y_row, o, V, c, m_x, s_x, m_y, s_y, MASKED: tl.constexpr):
    b_x, b_y = _load_pair(x_row, y_row, o, V, MASKED)
    m_x, s_x, _ = online_lse(b_x, tl.max(b_x, axis=0), m_x, s_x, s_x, c, False)
    m_y, s_y, _ = online_lse(b_y, tl.max(b_y, axis=0), m_y, s_y, s_y, c, False)
    return m_x, s_x, m_y, s_y


@triton.jit
def _lse_pair(x_row, y_row, V, inv_temp, BLOCK_V: tl.constexpr):
    """(lse_S, lse_T) of the scaled logits x / T and y / T of one row (online, per-lane sums)."""
    o_v = tl.arange(0, BLOCK_V)
    c = inv_temp * LOG2E
    m_x = tl.full([], float("-inf"), tl.float32)
    m_y = tl.full([], float("-inf"), tl.float32)
    s_x = tl.zeros([BLOCK_V], tl.float32)
    s_y = tl.zeros([BLOCK_V], tl.float32)
    V_main = V - V % BLOCK_V
    for start in range(0, V_main, BLOCK_V):
        m_x, s_x, m_y, s_y = _lse_step(x_row, y_row, start + o_v, V, c, m_x, s_x, m_y, s_y, False)
    if V_main < V:
        m_x, s_x, m_y, s_y = _lse_step(x_row, y_row, V_main + o_v, V, c, m_x, s_x, m_y, s_y, True)
    lse_x, _ = lse_entropy(m_x, tl.sum(s_x, axis=0), 0.0, inv_temp)
    lse_y, _ = lse_entropy(m_y, tl.sum(s_y, axis=0), 0.0, inv_temp)
    return lse_x, lse_y


@triton.jit
def _xlogy_diff(q, a, b):
    return tl.where(q == 0, 0.0, q * (a - b))  # 0 log 0 = 0; a NaN q stays NaN


@triton.jit
def _terms(x_row, y_row, o, V, inv_temp, lse_x, lse_y, beta, MODE: tl.constexpr,
           MASKED: tl.constexpr):
    """Per vocabulary entry o of one tile: (d, h, p_S) with D = sum d and h = p_S dD/dp_S (up to a multiple
    of p_S). -inf logits (the tail lanes, vocabulary masking) give p = 0 and d = h = 0."""
    b_x, b_y = _load_pair(x_row, y_row, o, V, MASKED)
    l_s = b_x * inv_temp - lse_x
    l_t = b_y * inv_temp - lse_y
    p_s = tl.exp(l_s)
    p_t = tl.exp(l_t)
    if MODE == 0:
        d = _xlogy_diff(p_t, l_t, l_s)
        h = -p_t
    elif MODE == 1:
        d = _xlogy_diff(p_s, l_s, l_t)
        h = d
    else:
        # log M from the probabilities (one log, no logaddexp): where both underflow, M = 0 and both terms are
        # 0 (p = 0); an entry whose p is denormal contributes ~1e-38, whatever its log
        l_m = tl.log((1.0 - beta) * p_s + beta * p_t)
        h = (1.0 - beta) * _xlogy_diff(p_s, l_s, l_m)
        d = beta * _xlogy_diff(p_t, l_t, l_m) + h
    return d, h, p_s


@triton.heuristics({"HAS_TARGETS": lambda a: a["targets"] is not None})
@triton.jit(do_not_specialize=["T", "V"])
def _divergence_fwd_kernel(student, teacher, targets, mask, div, logp, stats,
                           T, V, s_b, s_t, s_tb, s_tt, inv_temp, beta,
                           MODE: tl.constexpr, HAS_TARGETS: tl.constexpr, BLOCK_V: tl.constexpr):
    """div [N]: D of each row; logp [N]: log p_S(target) (0 without targets, NaN for an id >= V);
    stats [N, 3]: (lse_S, lse_T, sum h). A masked row is not read: zeros."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = student + b * s_b + t * s_t
    y_row = teacher + b * s_tb + t * s_tt
    valid = tl.load(mask + row) != 0
    zero = tl.zeros([], tl.float32)
    lse_x, lse_y, b_d, b_h, b_lp = zero, zero, zero, zero, zero
    if valid:
        lse_x, lse_y = _lse_pair(x_row, y_row, V, inv_temp, BLOCK_V)
        o_v = tl.arange(0, BLOCK_V)
        acc_d = tl.zeros([BLOCK_V], tl.float32)
        acc_h = tl.zeros([BLOCK_V], tl.float32)
        V_main = V - V % BLOCK_V
        for start in range(0, V_main, BLOCK_V):
            d, h, _ = _terms(x_row, y_row, start + o_v, V, inv_temp, lse_x, lse_y, beta, MODE,
                             False)
            acc_d += d
            acc_h += h
        if V_main < V:
            d, h, _ = _terms(x_row, y_row, V_main + o_v, V, inv_temp, lse_x, lse_y, beta, MODE,
                             True)
            acc_d += d
            acc_h += h
        b_d = tl.sum(acc_d, axis=0)
        b_h = tl.sum(acc_h, axis=0)
        if HAS_TARGETS:
            tgt = tl.load(targets + row)
            in_range = (tgt >= 0) & (tgt < V)
            z_y = tl.load(x_row + tl.where(in_range, tgt, 0)).to(tl.float32) * inv_temp
            b_lp = tl.where(in_range, z_y - lse_x, tl.where(tgt < 0, 0.0, float("nan")))
    tl.store(div + row, b_d)
    tl.store(logp + row, b_lp)
    tl.store(stats + 3 * row, lse_x)
    tl.store(stats + 3 * row + 1, lse_y)
    tl.store(stats + 3 * row + 2, b_h)


@triton.jit(do_not_specialize=["T", "V"])
def _divergence_bwd_kernel(student, teacher, dstudent, mask, stats, grad,
                           T, V, s_b, s_t, s_tb, s_tt, s_db, s_dt, inv_temp, beta,
                           MODE: tl.constexpr, BLOCK_V: tl.constexpr):
    """dstudent[row] = grad[row] * dD/dz_S = grad (h - p_S sum h) / T; zeros (logits unread) where the mask
    is off or grad = 0. A NaN grad or logit gives NaN (never a silent 0)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = student + b * s_b + t * s_t
    y_row = teacher + b * s_tb + t * s_tt
    d_row = dstudent + b * s_db + t * s_dt
    o_v = tl.arange(0, BLOCK_V)
    valid = tl.load(mask + row) != 0
    g = tl.where(valid, tl.load(grad + row), 0.0)
    if g == 0.0:
        b_zero = tl.zeros([BLOCK_V], tl.float32).to(dstudent.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            tl.store(d_row + start + o_v, b_zero, mask=start + o_v < V)
    else:
        lse_x = tl.load(stats + 3 * row)
        lse_y = tl.load(stats + 3 * row + 1)
        hs = tl.load(stats + 3 * row + 2)
        scale = g * inv_temp
        V_main = V - V % BLOCK_V
        for start in range(0, V_main, BLOCK_V):
            _, h, p_s = _terms(x_row, y_row, start + o_v, V, inv_temp, lse_x, lse_y, beta, MODE,
                               False)
            tl.store(d_row + start + o_v, ((h - p_s * hs) * scale).to(dstudent.dtype.element_ty))
        if V_main < V:
            o = V_main + o_v
            _, h, p_s = _terms(x_row, y_row, o, V, inv_temp, lse_x, lse_y, beta, MODE, True)
            tl.store(d_row + o, ((h - p_s * hs) * scale).to(dstudent.dtype.element_ty), mask=o < V)
