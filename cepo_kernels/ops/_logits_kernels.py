"""The logits path's Triton kernels (launchers: ops/_logits_launch.py).

`_logprobs_fwd_kernel` (token log-probs and entropy), `_cepo_fwd_kernel` (the single-pass loss forward),
`_logprobs_bwd_kernel` (every backward) and `_cepo_advantages_fwd_kernel` (A_hat alone): one program per
token row (blocks of tokens for the last). First the row-streaming pieces they share: the vocabulary scan of
up to three tensors (online logsumexp, per-lane sums, one max-reduction per tile; whole BLOCK_V tiles
unmasked, 128-bit loads on 16-byte aligned rows, only the tail tile masked, so V stays a runtime value) and
the per-element gradient. Math: docs/gradient.md. Conventions (interpreter workarounds, int64 addressing):
docs/kernels.md.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from cepo_kernels.ops._common import LOG2E, cepo_token, cepo_weight, lse_entropy, online_lse

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


# ---- the kernels

@triton.heuristics({"WITH_ENT": lambda a: a["ent"] is not None})
@triton.jit(do_not_specialize=["T", "V"])
def _logprobs_fwd_kernel(logits, targets, lp, lse, ent, T, V, s_b, s_t, inv_temp,
                         WITH_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    x_row = logits + b * s_b + (row - b * T) * s_t
    tgt = tl.load(targets + row)
    in_range = (tgt >= 0) & (tgt < V)
    z_t = _target_logit(x_row, tgt, in_range, inv_temp)
    c = inv_temp * LOG2E
    m_x, s_x, t_x, _, _, _, _ = _scan(x_row, x_row, x_row, V, c, False, False, WITH_ENT, BLOCK_V)
    b_lse, b_ent = lse_entropy(m_x, s_x, t_x, inv_temp)
    tl.store(lp + row, _target_logp(z_t, tgt, in_range, b_lse))
    tl.store(lse + row, b_lse)
    if WITH_ENT:
        tl.store(ent + row, b_ent)


@triton.heuristics({
    "HAS_POS_LOGITS": lambda a: a["pos_logits"] is not None,
    "HAS_NEG_LOGITS": lambda a: a["neg_logits"] is not None,
    "HAS_TEACHERS": lambda a: a["pos_logits"] is not None or a["pos_logp"] is not None,
    "HAS_OLD": lambda a: a["old_logp"] is not None,
})
@triton.jit(do_not_specialize=["T", "V"])
def _cepo_fwd_kernel(
    logits, pos_logits, neg_logits, targets, adv, mask, old_logp, pos_logp, neg_logp,
    lp, lse, a_hat, loss, coef, delta,
    T, V, s_b, s_t, s_pb, s_pt, s_nb, s_nt,
    inv_temp, lam, eps_w, eps_low, eps_high, clip_dual,
    HAS_POS_LOGITS: tl.constexpr, HAS_NEG_LOGITS: tl.constexpr, HAS_TEACHERS: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_DUAL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    tgt = tl.load(targets + row)
    in_range = (tgt >= 0) & (tgt < V)
    valid = tl.load(mask + row) != 0
    b_a = tl.load(adv + row)
    used = valid & (b_a != 0)
    c = inv_temp * LOG2E
    x_row = logits + b * s_b + t * s_t
    p_row = x_row
    n_row = x_row
    if HAS_POS_LOGITS:
        p_row = pos_logits + b * s_pb + t * s_pt
    if HAS_NEG_LOGITS:
        n_row = neg_logits + b * s_nb + t * s_nt
    # the target logits first (scalar loads, whose latency the scan hides); a masked row's logits are never
    # read (its loss, A_hat and gradient are 0; logp and lse are stored as 0), teachers only where used
    z_x = _target_logit(x_row, tgt, in_range & valid, inv_temp)
    z_p = 0.0
    z_n = 0.0
    if HAS_POS_LOGITS:
        z_p = _target_logit(p_row, tgt, in_range & used, inv_temp)
    if HAS_NEG_LOGITS:
        z_n = _target_logit(n_row, tgt, in_range & used, inv_temp)
    zero = tl.zeros([], tl.float32)
    ninf = zero - float("inf")
    m_x, s_x, m_p, s_p, m_n, s_n = ninf, zero, ninf, zero, ninf, zero
    if valid:
        if HAS_POS_LOGITS or HAS_NEG_LOGITS:
            # teachers of A = 0 tokens are not read: A_hat = 0 whatever Delta is
            if used:
                m_x, s_x, _, m_p, s_p, m_n, s_n = _scan(x_row, p_row, n_row, V, c, HAS_POS_LOGITS,
                                                        HAS_NEG_LOGITS, False, BLOCK_V)
            else:
                m_x, s_x, _, m_p, s_p, m_n, s_n = _scan(x_row, p_row, n_row, V, c, False, False, False,
                                                        BLOCK_V)
        else:
            m_x, s_x, _, m_p, s_p, m_n, s_n = _scan(x_row, p_row, n_row, V, c, False, False, False, BLOCK_V)
    b_lse, _ = lse_entropy(m_x, s_x, s_x, inv_temp)
    b_lse = tl.where(valid, b_lse, 0.0)
    b_lp = tl.where(valid, _target_logp(z_x, tgt, in_range, b_lse), 0.0)
    b_delta = 0.0
    if HAS_TEACHERS:
        if HAS_POS_LOGITS:
            lse_p, _ = lse_entropy(m_p, s_p, s_p, inv_temp)
            b_pos = _target_logp(z_p, tgt, in_range, lse_p)
        else:
            b_pos = tl.load(pos_logp + row)
        if HAS_NEG_LOGITS:
            lse_n, _ = lse_entropy(m_n, s_n, s_n, inv_temp)
            b_neg = _target_logp(z_n, tgt, in_range, lse_n)
        else:
            b_neg = tl.load(neg_logp + row)
        b_delta = tl.where(used, b_pos - b_neg, 0.0)
        tl.store(delta + row, b_delta)
    b_old = b_lp
    if HAS_OLD:
        b_old = tl.load(old_logp + row)
    b_ahat, b_loss, b_coef = cepo_token(b_lp, b_old, b_a, b_delta, valid, lam, eps_w, eps_low, eps_high,
                                        clip_dual, HAS_OLD, HAS_TEACHERS, HAS_DUAL)
    b_coef = tl.where(b_loss != b_loss, b_loss, b_coef)  # a NaN loss gives a NaN gradient, not 0
    tl.store(lp + row, b_lp)
    tl.store(lse + row, b_lse)
    tl.store(a_hat + row, b_ahat)
    tl.store(loss + row, b_loss)
    tl.store(coef + row, b_coef)


@triton.heuristics({"HAS_GRAD_ENT": lambda a: a["grad_ent"] is not None})
@triton.jit(do_not_specialize=["T", "V"])
def _logprobs_bwd_kernel(
    logits, dlogits, targets, lse, ent, grad_lp, grad_ent,
    T, V, s_b, s_t, s_db, s_dt, inv_temp,
    HAS_GRAD_ENT: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = logits + b * s_b + t * s_t
    d_row = dlogits + b * s_db + t * s_dt
    o_v = tl.arange(0, BLOCK_V)
    V_main = V - V % BLOCK_V
    tgt = tl.load(targets + row)
    g_lp = tl.where(tgt < 0, 0.0, tl.load(grad_lp + row))  # a negative id's log-prob is the constant 0
    skip = g_lp == 0.0
    g_ent = 0.0
    if HAS_GRAD_ENT:
        g_ent = tl.load(grad_ent + row)
        skip = skip & (g_ent == 0.0)
    if skip:
        # masked, clipped or A_hat = 0: zero gradient, the logits are not read
        b_zero = tl.zeros([BLOCK_V], tl.float32).to(dlogits.dtype.element_ty)
        for start in range(0, V_main, BLOCK_V):
            tl.store(d_row + start + o_v, b_zero)
        if V_main < V:
            tl.store(d_row + V_main + o_v, b_zero, mask=V_main + o_v < V)
    else:
        in_range = (tgt >= 0) & (tgt < V)
        g_lp = tl.where(tgt >= V, float("nan"), g_lp)  # an id >= V: the log-prob itself is NaN
        b_lse = tl.load(lse + row)
        b_ent = 0.0
        if HAS_GRAD_ENT:
            b_ent = tl.load(ent + row)
        # the target's entry (onehot = 1), from one scalar load before the row is overwritten (in place)
        tgt_c = tl.where(in_range, tgt, 0)
        d_t = _dlogit_target(tl.load(x_row + tgt_c).to(tl.float32), g_lp, g_ent, b_lse, b_ent, inv_temp,
                             HAS_GRAD_ENT, ROUND_BF16)
        for start in range(0, V_main, BLOCK_V):
            b_x = tl.load(x_row + start + o_v).to(tl.float32)
            b_d = _dlogits(b_x, g_lp, g_ent, b_lse, b_ent, inv_temp, HAS_GRAD_ENT, ROUND_BF16)
            tl.store(d_row + start + o_v, b_d.to(dlogits.dtype.element_ty))
        if V_main < V:
            m_v = V_main + o_v < V
            b_x = tl.load(x_row + V_main + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
            b_d = _dlogits(b_x, g_lp, g_ent, b_lse, b_ent, inv_temp, HAS_GRAD_ENT, ROUND_BF16)
            tl.store(d_row + V_main + o_v, b_d.to(dlogits.dtype.element_ty), mask=m_v)
        tl.debug_barrier()  # every thread's tile stores land before the target's entry is overwritten
        if in_range:
            tl.store(d_row + tgt_c, d_t.to(dlogits.dtype.element_ty))


@triton.jit
def _cepo_advantages_fwd_kernel(adv, pos_logp, neg_logp, mask, a_hat, N, lam, eps_w, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_a = tl.load(adv + o, mask=m, other=0.0)
    b_delta = tl.load(pos_logp + o, mask=m, other=0.0) - tl.load(neg_logp + o, mask=m, other=0.0)
    valid = tl.load(mask + o, mask=m, other=0) != 0
    tl.store(a_hat + o, tl.where(valid, cepo_weight(b_a, b_delta, lam, eps_w), 0.0), mask=m)
