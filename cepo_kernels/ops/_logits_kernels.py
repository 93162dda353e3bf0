"""The logits path's Triton kernels (launchers: ops/logits.py).

`_logprobs_fwd_kernel` (token log-probs and entropy), `_cepo_fwd_kernel` (the single-pass loss forward),
`_logprobs_bwd_kernel` (every backward) and `_cepo_advantages_fwd_kernel` (A_hat alone): one program per
token row (blocks of tokens for the last). The row scan and gradient pieces: ops/_logits_tiles.py.
Conventions (interpreter workarounds, int64 addressing): docs/kernels.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from cepo_kernels.ops._common import LOG2E, cepo_token, cepo_weight, lse_entropy
from cepo_kernels.ops._logits_tiles import _dlogit_target, _dlogits, _scan, _target_logit, _target_logp


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
