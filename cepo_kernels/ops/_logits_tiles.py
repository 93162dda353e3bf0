"""Row-streaming pieces of the logits kernels (ops/_logits_kernels.py): the vocabulary scan of up to three
tensors (online logsumexp, per-lane sums, one max-reduction per tile) and the per-element gradient.

The scan walks whole BLOCK_V tiles unmasked (128-bit loads when the rows are 16-byte aligned) and masks
only the tail tile, so V stays a runtime value. Math: docs/gradient.md.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from cepo_kernels.ops._common import LOG2E, online_lse

# Triton's CPU interpreter (TRITON_INTERPRET=1, read at import like triton itself does)
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _max2(a0, b0, a1, b1):
    return tl.maximum(a0, a1), tl.maximum(b0, b1)


@triton.jit
def _max3(a0, b0, c0, a1, b1, c1):
    return tl.maximum(a0, a1), tl.maximum(b0, b1), tl.maximum(c0, c1)


@triton.jit
def _load_tile(row, o_v, V, MASKED: tl.constexpr):
    """[BLOCK_V] fp32 raw logits; unmasked (128-bit loads on aligned rows) except for the vocabulary tail."""
    if MASKED:
        return tl.load(row + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32)
    else:
        return tl.load(row + o_v).to(tl.float32)


@triton.jit
def _step(x_row, p_row, n_row, o_v, V, c, m_x, s_x, t_x, m_p, s_p, m_n, s_n,
          READ_P: tl.constexpr, READ_N: tl.constexpr, WITH_ENT: tl.constexpr, MASKED: tl.constexpr):
    """One vocabulary tile of up to three tensors: every load first, then one (tuple) max reduction."""
    b_x = _load_tile(x_row, o_v, V, MASKED)
    if READ_P:
        b_p = _load_tile(p_row, o_v, V, MASKED)
    if READ_N:
        b_n = _load_tile(n_row, o_v, V, MASKED)
    if _INTERPRETED:  # the interpreter runs a custom combine function element by element: ~15x slower
        mx_x = tl.max(b_x, axis=0)
        if READ_P:
            mx_p = tl.max(b_p, axis=0)
        if READ_N:
            mx_n = tl.max(b_n, axis=0)
    elif READ_P and READ_N:
        mx_x, mx_p, mx_n = tl.reduce((b_x, b_p, b_n), 0, _max3)
    elif READ_P:
        mx_x, mx_p = tl.reduce((b_x, b_p), 0, _max2)
    elif READ_N:
        mx_x, mx_n = tl.reduce((b_x, b_n), 0, _max2)
    else:
        mx_x = tl.max(b_x, axis=0)
    m_x, s_x, t_x = online_lse(b_x, mx_x, m_x, s_x, t_x, c, WITH_ENT)
    if READ_P:
        m_p, s_p, _ = online_lse(b_p, mx_p, m_p, s_p, s_p, c, False)
    if READ_N:
        m_n, s_n, _ = online_lse(b_n, mx_n, m_n, s_n, s_n, c, False)
    return m_x, s_x, t_x, m_p, s_p, m_n, s_n


@triton.jit
def _scan(x_row, p_row, n_row, V, c, READ_P: tl.constexpr, READ_N: tl.constexpr, WITH_ENT: tl.constexpr,
          BLOCK_V: tl.constexpr):
    """Online logsumexp over one row of the policy (x) and optionally the teachers (p, n).

    Returns (m, s, t) for x and (m, s) for p and n: the max raw logit, sum exp((x - m) / T) and
    sum exp(...) * x (0 unless WITH_ENT); see lse_entropy. The sums are kept per lane and reduced once.
    """
    o_v = tl.arange(0, BLOCK_V)
    m_x = tl.full([], float("-inf"), tl.float32)
    m_p, m_n = m_x, m_x
    s_x = tl.zeros([BLOCK_V], tl.float32)
    t_x, s_p, s_n = s_x, s_x, s_x
    V_main = V - V % BLOCK_V
    for start in range(0, V_main, BLOCK_V):
        m_x, s_x, t_x, m_p, s_p, m_n, s_n = _step(x_row + start, p_row + start, n_row + start, o_v, V - start,
                                                  c, m_x, s_x, t_x, m_p, s_p, m_n, s_n, READ_P, READ_N,
                                                  WITH_ENT, False)
    if V_main < V:
        m_x, s_x, t_x, m_p, s_p, m_n, s_n = _step(x_row + V_main, p_row + V_main, n_row + V_main, o_v,
                                                  V - V_main, c, m_x, s_x, t_x, m_p, s_p, m_n, s_n, READ_P,
                                                  READ_N, WITH_ENT, True)
    return (m_x, tl.sum(s_x, axis=0), tl.sum(t_x, axis=0), m_p, tl.sum(s_p, axis=0), m_n,
            tl.sum(s_n, axis=0))


@triton.jit
def _target_logit(row, tgt, read, inv_temp):
    """The target's scaled logit from one scalar load; nothing is read where `read` is false (an id outside
    [0, V), a masked row): 0 there."""
    return tl.load(row + tl.where(read, tgt, 0), mask=read, other=0.0).to(tl.float32) * inv_temp


@triton.jit
def _target_logp(z_t, tgt, in_range, lse):
    """The target's log-prob: 0 for a negative id (ignored, as F.cross_entropy's ignore_index), NaN for an
    id >= V (never read)."""
    return tl.where(in_range, z_t - lse, tl.where(tgt < 0, 0.0, float("nan")))


@triton.jit
def _round_bf16(b_d, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        # Triton's interpreter truncates fp32 -> bf16; round to nearest even as a GPU does
        b_bits = b_d.to(tl.uint32, bitcast=True)
        b_bits = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & 0xFFFF0000
        b_d = tl.where(b_d == b_d, b_bits.to(tl.float32, bitcast=True), b_d)
    return b_d


@triton.jit
def _dlogits(b_x, g_lp, g_ent, b_lse, b_ent, inv_temp, HAS_GRAD_ENT: tl.constexpr, ROUND_BF16: tl.constexpr):
    """(-g_lp p - g_ent p (log p + H)) / T at the non-target entries, from raw logits b_x [BLOCK_V].

    Scalars folded first, so that without entropy an element costs one FMA, one ex2 and one multiply.
    """
    g_p = -g_lp * inv_temp
    if HAS_GRAD_ENT:
        b_lp = b_x * inv_temp - b_lse
        b_p = tl.exp(b_lp)
        # p = 0 (a -inf logit): 0, not 0 * inf; a NaN p stays NaN
        b_d = tl.where(b_p > 0, b_p * (g_p - g_ent * inv_temp * (b_lp + b_ent)), b_p * g_p)
    else:
        b_p = tl.math.exp2(b_x * (inv_temp * LOG2E) - b_lse * LOG2E)
        b_d = b_p * g_p
    return _round_bf16(b_d, ROUND_BF16)


@triton.jit
def _dlogit_target(x_t, g_lp, g_ent, b_lse, b_ent, inv_temp, HAS_GRAD_ENT: tl.constexpr,
                   ROUND_BF16: tl.constexpr):
    """The target's entry: (g_lp (1 - p) - g_ent p (log p + H)) / T from its raw logit x_t (a scalar)."""
    b_lp = x_t * inv_temp - b_lse
    b_p = tl.exp(b_lp)
    b_d = g_lp * (1.0 - b_p)
    if HAS_GRAD_ENT:
        b_d -= g_ent * tl.where(b_p > 0, b_p * (b_lp + b_ent), 0.0)
    return _round_bf16(b_d * inv_temp, ROUND_BF16)
