"""Fused linear path: log-probs and the CEPO/GRPO loss from hidden states + lm_head, logits never stored.

Forward: `_linear_fwd_kernel` tiles z^T = weight @ hidden^T on the tensor cores (fp32 accumulation), folds
each vocabulary tile into an online logsumexp (`lse_tile`) and picks the target logit by comparing offsets.
Up to three row sources (policy, positive teacher, negative teacher) share every weight tile. The grid is
(row blocks x vocabulary splits); each split writes its partial (max, sum, entropy sum, target logit) and a
fixed-order combine gives lse, logp and entropy. `_linear_token_fwd_kernel` then applies `cepo_token`.
Backward (linear_bwd.py) recomputes the logits from the saved fp32 lse, only on rows with a non-zero gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cepo_kernels._params import (
    CEPOOutput,
    LossParams,
    check_linear,
    check_loss_inputs,
    check_temperature,
    check_tensor,
    resolve_lam,
)
from cepo_kernels.ops._common import cepo_token, loss_metrics, lse_tile, reduce_loss
from cepo_kernels.ops.linear_bwd import alloc, dot_precision, linear_bwd, upcast_dot

# per number of row sources: tile sizes (three fp32 accumulators need a narrower vocabulary tile)
_FWD_CONFIG = {
    1: dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    2: dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, num_warps=8, num_stages=3),
    3: dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
}
_FWD_PROGRAMS = 1024  # split the vocabulary until about this many programs run (small batches fill the GPU)
_TOKEN_BLOCK = 1024


@triton.jit
def _fold_tile(acc, b_bias, o_v, m_v, b_t, inv_temp, m_i, s_i, t_i, n_i, y_i, HAS_BIAS: tl.constexpr):
    """Folds one [BLOCK_V, BLOCK_N] tile of raw logits^T into the running logsumexp and target logit."""
    if HAS_BIAS:
        acc += b_bias[:, None]
    b_z = tl.where(m_v[:, None], acc * inv_temp, float("-inf"))  # [BLOCK_V, BLOCK_N]
    m_i, s_i, t_i, n_i = lse_tile(b_z, m_i, s_i, t_i, n_i)
    y_i += tl.sum(tl.where(o_v[:, None] == b_t[None, :], b_z, 0.0), axis=0)
    return m_i, s_i, t_i, n_i, y_i


@triton.jit
def _store_stats(stats, o_n, m_n, stride_sk, m_i, s_i, t_i, n_i, y_i):
    tl.store(stats + o_n, tl.where(n_i > 0, float("nan"), m_i), mask=m_n)  # NaN logit -> NaN max
    tl.store(stats + stride_sk + o_n, s_i, mask=m_n)
    tl.store(stats + 2 * stride_sk + o_n, t_i, mask=m_n)
    tl.store(stats + 3 * stride_sk + o_n, y_i, mask=m_n)


@triton.heuristics({
    "HAS_BIAS": lambda a: a["bias"] is not None,
    "HAS_ROWS": lambda a: a["rows"] is not None,
})
@triton.jit
def _linear_fwd_kernel(h0, h1, h2, weight, bias, targets, rows, stats,
                       M, V, H, tiles_per_split, inv_temp,
                       stride_h0, stride_h1, stride_h2, stride_wv, stride_b, stride_t,
                       stride_ss, stride_sk, stride_sp,
                       N_SRC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr,
                       UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Partial logsumexp stats of rows `rows[j]` (or j) of h0..h{N_SRC-1} over one vocabulary split.

    stats [N_SRC, 4, n_split, M] fp32: running max (NaN if a NaN logit was seen), sum exp, sum p*z and
    the target's scaled logit (0 when the target is outside the split).
    """
    pid = tl.program_id(0).to(tl.int64)
    n_rb = tl.cdiv(M, BLOCK_N)
    split = pid // n_rb  # split-major: concurrent programs share weight tiles in L2
    o_n = (pid % n_rb) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
    m_n = o_n < M
    if HAS_ROWS:
        r = tl.load(rows + o_n, mask=m_n, other=0).to(tl.int64)
    else:
        r = o_n
    b_t = tl.load(targets + r * stride_t, mask=m_n, other=-1).to(tl.int64)
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    m0, s0, t0, n0, y0 = zero + float("-inf"), zero, zero, zero.to(tl.int32), zero
    if N_SRC >= 2:
        m1, s1, t1, n1, y1 = zero + float("-inf"), zero, zero, zero.to(tl.int32), zero
    if N_SRC >= 3:
        m2, s2, t2, n2, y2 = zero + float("-inf"), zero, zero, zero.to(tl.int32), zero
    for i in range(tiles_per_split):
        o_v = (split * tiles_per_split + i) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)  # [BLOCK_V]
        m_v = o_v < V
        a0 = tl.zeros([BLOCK_V, BLOCK_N], dtype=tl.float32)
        if N_SRC >= 2:
            a1 = tl.zeros([BLOCK_V, BLOCK_N], dtype=tl.float32)
        if N_SRC >= 3:
            a2 = tl.zeros([BLOCK_V, BLOCK_N], dtype=tl.float32)
        for k in range(0, H, BLOCK_H):
            o_h = k + tl.arange(0, BLOCK_H).to(tl.int64)
            m_h = o_h < H
            m_x = m_h[:, None] & m_n[None, :]
            b_w = tl.load(weight + o_v[:, None] * stride_wv + o_h[None, :], mask=m_v[:, None] & m_h[None, :],
                          other=0.0)  # [BLOCK_V, BLOCK_H], loaded once for every source
            b_x = tl.load(h0 + r[None, :] * stride_h0 + o_h[:, None], mask=m_x, other=0.0)  # [BLOCK_H, BN]
            if UPCAST_DOT:
                b_w = b_w.to(tl.float32)
                b_x = b_x.to(tl.float32)
            a0 = tl.dot(b_w, b_x, a0, input_precision=PRECISION)
            if N_SRC >= 2:
                b_x = tl.load(h1 + r[None, :] * stride_h1 + o_h[:, None], mask=m_x, other=0.0)
                if UPCAST_DOT:
                    b_x = b_x.to(tl.float32)
                a1 = tl.dot(b_w, b_x, a1, input_precision=PRECISION)
            if N_SRC >= 3:
                b_x = tl.load(h2 + r[None, :] * stride_h2 + o_h[:, None], mask=m_x, other=0.0)
                if UPCAST_DOT:
                    b_x = b_x.to(tl.float32)
                a2 = tl.dot(b_w, b_x, a2, input_precision=PRECISION)
        if HAS_BIAS:
            b_bias = tl.load(bias + o_v * stride_b, mask=m_v, other=0.0).to(tl.float32)
        else:
            b_bias = tl.zeros([BLOCK_V], dtype=tl.float32)  # defined in the loop: not loop-carried
        m0, s0, t0, n0, y0 = _fold_tile(a0, b_bias, o_v, m_v, b_t, inv_temp, m0, s0, t0, n0, y0, HAS_BIAS)
        if N_SRC >= 2:
            m1, s1, t1, n1, y1 = _fold_tile(a1, b_bias, o_v, m_v, b_t, inv_temp, m1, s1, t1, n1, y1, HAS_BIAS)
        if N_SRC >= 3:
            m2, s2, t2, n2, y2 = _fold_tile(a2, b_bias, o_v, m_v, b_t, inv_temp, m2, s2, t2, n2, y2, HAS_BIAS)
    p_s = stats + split * stride_sp
    _store_stats(p_s, o_n, m_n, stride_sk, m0, s0, t0, n0, y0)
    if N_SRC >= 2:
        _store_stats(p_s + stride_ss, o_n, m_n, stride_sk, m1, s1, t1, n1, y1)
    if N_SRC >= 3:
        _store_stats(p_s + 2 * stride_ss, o_n, m_n, stride_sk, m2, s2, t2, n2, y2)


@triton.heuristics({
    "HAS_OLD": lambda a: a["old"] is not None,
    "HAS_TEACHERS": lambda a: a["delta"] is not None,
})
@triton.jit
def _linear_token_fwd_kernel(logp, old, adv, delta, mask, a_hat, loss, coef, N,
                             lam, eps_w, eps_low, eps_high, clip_dual,
                             HAS_OLD: tl.constexpr, HAS_TEACHERS: tl.constexpr, HAS_DUAL: tl.constexpr,
                             BLOCK: tl.constexpr):
    """Per token: A_hat, the PPO-clip loss and coef = dL_t/dlp_t (cepo_token), on contiguous [N] arrays."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = o < N
    b_lp = tl.load(logp + o, mask=m, other=0.0)
    b_old = b_lp
    if HAS_OLD:
        b_old = tl.load(old + o, mask=m, other=0.0)
    b_d = b_lp
    if HAS_TEACHERS:
        b_d = tl.load(delta + o, mask=m, other=0.0)
    b_adv = tl.load(adv + o, mask=m, other=0.0)
    b_valid = tl.load(mask + o, mask=m, other=0) != 0
    b_ahat, b_loss, b_coef = cepo_token(b_lp, b_old, b_adv, b_d, b_valid, lam, eps_w, eps_low, eps_high,
                                        clip_dual, HAS_OLD, HAS_TEACHERS, HAS_DUAL)
    tl.store(a_hat + o, b_ahat, mask=m)
    tl.store(loss + o, b_loss, mask=m)
    tl.store(coef + o, b_coef, mask=m)


class Scored(NamedTuple):
    """Per-row results of linear_fwd, each [S, M] fp32 (S row sources, M scored rows)."""

    lse: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor


def linear_fwd(sources, weight, bias, targets, rows=None, *, temperature=1.0):
    """Scores rows of 1-3 hidden-state sources against one weight; no autograd.

    sources: [N, H] tensors (last dim contiguous, the weight's dtype); weight [V, H] (last dim contiguous);
    bias [V] or None; targets [N] integer; rows: None (all N rows) or int64 indices [M].
    Returns Scored(lse, logp, entropy) of the scaled logits z / T; logp is NaN for a target outside [0, V).
    """
    S = len(sources)
    N, H = sources[0].shape
    V = weight.shape[0]
    M = N if rows is None else rows.numel()
    dev = weight.device
    if M == 0:
        empty = torch.empty(S, 0, dtype=torch.float32, device=dev)
        return Scored(empty, empty, empty)
    cfg = _FWD_CONFIG[S]
    n_rb = triton.cdiv(M, cfg["BLOCK_N"])
    n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    tiles_per_split = triton.cdiv(n_tiles, min(n_tiles, max(1, triton.cdiv(_FWD_PROGRAMS, n_rb))))
    n_split = triton.cdiv(n_tiles, tiles_per_split)
    stats = alloc((S, 4, n_split, M), torch.float32, dev)
    h = list(sources) + [sources[0]] * (3 - S)
    _linear_fwd_kernel[(n_rb * n_split,)](
        h[0], h[1], h[2], weight, bias, targets, rows, stats, M, V, H, tiles_per_split, 1.0 / temperature,
        h[0].stride(0), h[1].stride(0), h[2].stride(0), weight.stride(0),
        0 if bias is None else bias.stride(0), targets.stride(0), *stats.stride()[:3],
        N_SRC=S, UPCAST_DOT=upcast_dot(weight.dtype), PRECISION=dot_precision(weight.dtype), **cfg)
    # fixed-order combine of the splits: [S, n_split, M] -> [S, M]
    m, s, t, y = stats.unbind(1)
    mx = m.amax(1)  # NaN propagates
    w = torch.exp(m - torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)[:, None])
    s_sum = (s * w).sum(1)
    lse = mx + torch.log(s_sum)
    ent = lse - (t * w).sum(1) / s_sum
    tgt = targets if rows is None else targets.index_select(0, rows)
    valid = (tgt >= 0) & (tgt < V)
    logp = torch.where(valid, y.sum(1) - lse, torch.full_like(lse, float("nan")))
    return Scored(lse, logp, ent)


def token_fwd(logp, old, adv, delta, mask, params):
    """(a_hat, loss, coef) [N] fp32 from contiguous [N] inputs (old, delta may be None); no autograd."""
    N = logp.numel()
    a_hat, loss, coef = (alloc(logp.shape, torch.float32, logp.device) for _ in range(3))
    if N:
        dual = params.clip_dual is not None
        _linear_token_fwd_kernel[(triton.cdiv(N, _TOKEN_BLOCK),)](
            logp, old, adv, delta, mask.to(torch.int8), a_hat, loss, coef, N, params.lam, params.eps_w,
            params.eps_low, params.eps_high, params.clip_dual if dual else 0.0, HAS_DUAL=dual,
            BLOCK=_TOKEN_BLOCK)
    return a_hat, loss, coef


class _LossSpec(NamedTuple):
    """The loss-only inputs of _LinearFn, all flattened to [N] (teacher hidden states [N, H])."""

    adv: torch.Tensor
    mask: torch.Tensor
    old: torch.Tensor | None
    pos_hidden: torch.Tensor | None
    neg_hidden: torch.Tensor | None
    pos_logp: torch.Tensor | None
    neg_logp: torch.Tensor | None
    params: LossParams


def _policy_and_teachers(hidden, weight, bias, targets, spec, T):
    """Policy (lse, logp, entropy) on all rows and teacher log-probs on the rows that need them."""
    N = hidden.shape[0]
    teacher_h = [t for t in (spec.pos_hidden, spec.neg_hidden) if t is not None]
    if not teacher_h:
        sc = linear_fwd([hidden], weight, bias, targets, temperature=T)
        return sc.lse[0], sc.logp[0], sc.entropy[0], spec.pos_logp, spec.neg_logp, None
    # METHOD.md property 4: rows with A = 0 (or masked) get A_hat = 0, so their teachers are not scored
    scored = spec.mask & (spec.adv != 0)
    lse, logp, ent = (alloc((N,), torch.float32, hidden.device) for _ in range(3))
    t_logp = torch.zeros(len(teacher_h), N, dtype=torch.float32, device=hidden.device)
    for sel, srcs in ((scored, [hidden, *teacher_h]), (~scored, [hidden])):
        rows = sel.nonzero().squeeze(1)
        if rows.numel():
            sc = linear_fwd(srcs, weight, bias, targets, rows, temperature=T)
            for dst, val in ((lse, sc.lse[0]), (logp, sc.logp[0]), (ent, sc.entropy[0])):
                dst.index_copy_(0, rows, val)
            if len(srcs) > 1:
                t_logp.index_copy_(1, rows, sc.logp[1:])
    it = iter(t_logp)
    pos = next(it) if spec.pos_hidden is not None else spec.pos_logp
    neg = next(it) if spec.neg_hidden is not None else spec.neg_logp
    return lse, logp, ent, pos, neg, scored


class _LinearFn(torch.autograd.Function):
    """(hidden [N, H], weight, bias) -> (logp, entropy[, per-token loss, A_hat, Delta]) [N] fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, spec):
        ctx.set_materialize_grads(False)
        if spec is None:
            sc = linear_fwd([hidden], weight, bias, targets, temperature=temperature)
            lse, logp, ent, coef, extra = sc.lse[0], sc.logp[0], sc.entropy[0], None, ()
        else:
            lse, logp, ent, pos, neg, scored = _policy_and_teachers(hidden, weight, bias, targets, spec,
                                                                    temperature)
            delta = None if pos is None else pos - neg
            if delta is not None and scored is not None:
                delta = torch.where(scored, delta, torch.zeros_like(delta))  # unscored rows: no evidence
            a_hat, loss, coef = token_fwd(logp, spec.old, spec.adv, delta, spec.mask, spec.params)
            extra = (loss, a_hat, torch.zeros_like(a_hat) if delta is None else delta)
            ctx.mark_non_differentiable(*extra[1:])
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent, coef)
        ctx.temperature = temperature
        return (logp, ent, *extra)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_loss=None, *_):
        hidden, weight, bias, targets, lse, ent, coef = ctx.saved_tensors
        g = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        if g_loss is not None:
            g = g + g_loss.float() * coef
        if g_ent is not None:
            g_ent = g_ent.float().contiguous()
        dh, dw, db = linear_bwd(hidden, weight, bias, targets, lse, g, None if g_ent is None else ent,
                                g_ent, temperature=ctx.temperature, needs=ctx.needs_input_grad[:3])
        return dh, dw, db, None, None, None


def _rows2d(x):
    """[..., H] -> [N, H] with a contiguous last dim (a copy only when needed)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _lastdim(w):
    return w if w.stride(-1) == 1 or w.shape[-1] <= 1 else w.contiguous()


def _teacher2d(name, t, like, weight):
    """A teacher's hidden states checked against the policy's, as [N, H] in the weight's dtype, detached."""
    check_tensor(name, t, dtypes="float", shape=like.shape, device=like.device)
    return _rows2d(t.detach().to(weight.dtype))


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False):
    """log_softmax((hidden @ weight.T + bias) / temperature)[target] without materialising the logits.

    Args:
        hidden: [..., H] float (fp32/bf16/fp16), the same dtype as weight.
        weight: [V, H] the lm_head weight. bias: [V] or None.
        targets: [...] integer token ids; an id outside [0, V) gives a NaN log-prob (no out-of-bounds read).
        temperature: > 0; the logits are divided by it before the softmax.
        return_entropy: also return the entropy of the tempered distribution.
    Returns:
        logp [...] fp32 (and entropy [...] fp32 with return_entropy); both differentiable w.r.t. hidden,
        weight and bias.
    """
    check_linear(hidden, weight, bias)
    check_tensor("targets", targets, dtypes="int", shape=hidden.shape[:-1], device=hidden.device)
    check_temperature(temperature)
    lead = hidden.shape[:-1]
    logp, ent = _LinearFn.apply(_rows2d(hidden), _lastdim(weight), bias, targets.reshape(-1),
                                float(temperature), None)
    logp, ent = logp.reshape(lead), ent.reshape(lead)
    return (logp, ent) if return_entropy else logp


def linear_cepo_loss(hidden, weight, targets, advantages, mask, *, old_logp=None, pos_hidden=None,
                     neg_hidden=None, pos_logp=None, neg_logp=None, bias=None, lam=None, eps_w=0.2,
                     eps_low=0.2, eps_high=0.28, clip_dual=3.0, temperature=1.0, reduction="token-mean",
                     num_tokens=None):
    """The CEPO loss (cepo_loss of API.md) from hidden states and the lm_head, logits never materialised.

    Args:
        hidden: [B, T, H] or [N, H] policy hidden states (the weight's dtype); weight [V, H]; bias [V]/None.
        targets: [B, T] / [N] integer. advantages: [B] (per sequence) or [B, T] / [N] float.
        mask: [B, T] / [N] bool or 0/1. old_logp: [B, T] / [N] float, or None (on-policy: ratio 1).
        pos_hidden, neg_hidden: teacher hidden states shaped like hidden (no gradient; scored with the same
            weight in the same launch as the policy rows, only where mask and advantage != 0), or
        pos_logp, neg_logp: the teachers' log-probs [B, T] / [N]. Each teacher independently; both or none
            (RLSD: pos_hidden and neg_logp = the old student log-probs).
        lam, eps_w, eps_low, eps_high, clip_dual, temperature, reduction, num_tokens: as cepo_loss.
    Returns:
        CEPOOutput(loss, logp, advantages=A_hat, metrics). loss is differentiable w.r.t. hidden, weight and
        bias; logp and A_hat fp32 detached, shaped like targets. Metric delta_* statistics count the rows
        whose teachers were scored (Delta = 0 elsewhere).
    """
    check_linear(hidden, weight, bias)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    p = LossParams(lam=lam, eps_w=eps_w, eps_low=eps_low, eps_high=eps_high, clip_dual=clip_dual,
                   temperature=temperature, reduction=reduction)
    p = resolve_lam(p, any(t is not None for t in (pos_hidden, neg_hidden, pos_logp, neg_logp)))
    pos_h = None if pos_hidden is None else _teacher2d("pos_hidden", pos_hidden, hidden, weight)
    neg_h = None if neg_hidden is None else _teacher2d("neg_hidden", neg_hidden, hidden, weight)
    b = check_loss_inputs(hidden.shape[:-1], hidden.device, targets, advantages, mask, old_logp=old_logp,
                          pos=pos_hidden, neg=neg_hidden, pos_logp=pos_logp, neg_logp=neg_logp,
                          num_tokens=num_tokens, reduction=reduction,
                          teacher_names=("pos_hidden", "neg_hidden"))

    def flat(x):
        return None if x is None else x.reshape(-1).contiguous()

    spec = _LossSpec(flat(b.advantages), flat(b.mask), flat(b.old_logp), pos_h, neg_h, flat(b.pos_logp),
                     flat(b.neg_logp), p)
    lp, _, loss_tok, a_hat, delta = _LinearFn.apply(_rows2d(hidden), _lastdim(weight), bias,
                                                    flat(b.targets), float(temperature), spec)
    B, T = b.B, b.T
    lp, loss_tok, a_hat, delta = (x.reshape(B, T) for x in (lp.detach(), loss_tok, a_hat, delta))
    loss = reduce_loss(loss_tok, b.mask, reduction, num_tokens)
    has_teachers = pos_h is not None or neg_h is not None or b.pos_logp is not None
    metrics = loss_metrics(lp, b.old_logp, b.advantages, a_hat, delta if has_teachers else None, b.mask, p)
    shape = (-1,) if b.flat else (B, T)
    if reduction == "none":
        loss = loss.reshape(shape)
    return CEPOOutput(loss, lp.reshape(shape), a_hat.reshape(shape), metrics)


def linear_grpo_loss(hidden, weight, targets, advantages, mask, *, old_logp=None, bias=None, eps_low=0.2,
                     eps_high=0.28, clip_dual=3.0, temperature=1.0, reduction="token-mean", num_tokens=None):
    """linear_cepo_loss without teachers (A_hat = A): the PPO-clip GRPO loss from hidden states.

    Args and Returns: as linear_cepo_loss.
    """
    return linear_cepo_loss(hidden, weight, targets, advantages, mask, old_logp=old_logp, bias=bias,
                            eps_low=eps_low, eps_high=eps_high, clip_dual=clip_dual, temperature=temperature,
                            reduction=reduction, num_tokens=num_tokens)


@torch.no_grad()
def linear_teacher_logprobs(pos_hidden, neg_hidden, weight, targets, *, bias=None, temperature=1.0,
                            rows=None):
    """Both teachers' log-probs in one launch (each weight tile loaded once for both); no gradient.

    Args:
        pos_hidden, neg_hidden: [..., H] teacher hidden states of the same shape (cast to the weight's dtype);
            either may be None (e.g. RLSD scores only the positive teacher).
        weight: [V, H]; bias: [V] or None; targets: [...] integer; temperature: > 0 (the rollout's).
        rows: None (score every row), a bool mask shaped like targets, or a 1-D integer tensor of indices
            into the flattened rows. Typically mask & (advantage != 0).
    Returns:
        (pos_logp, neg_logp), each [...] fp32 (None for a teacher given as None). Rows not selected by `rows`
        are 0.0, so Delta = pos - neg is 0 there ("no evidence"): they are harmless in any loss, and their
        A_hat is 0 anyway when they are the zero-advantage rows.
    """
    given = [(n, t) for n, t in (("pos_hidden", pos_hidden), ("neg_hidden", neg_hidden)) if t is not None]
    if not given:
        raise ValueError("pos_hidden and neg_hidden: expected at least one tensor, got None for both")
    first = given[0][1]
    for name, t in given:
        check_tensor(name, t, dtypes="float", shape=first.shape if t is not first else None,
                     device=weight.device if isinstance(weight, torch.Tensor) else None)
        check_linear(t.to(weight.dtype) if isinstance(weight, torch.Tensor) and t.is_floating_point() else t,
                     weight, bias, name=name)
    check_tensor("targets", targets, dtypes="int", shape=first.shape[:-1], device=first.device)
    check_temperature(temperature)
    lead = first.shape[:-1]
    N = targets.numel()
    if rows is not None:
        check_tensor("rows", rows, device=first.device)
        if rows.dtype == torch.bool:
            check_tensor("rows", rows, shape=lead)
            rows = rows.reshape(-1).nonzero().squeeze(1)
        elif rows.is_floating_point() or rows.is_complex() or rows.dim() != 1:
            raise TypeError(f"rows: expected a bool mask of shape {tuple(lead)} or a 1-D integer index "
                            f"tensor, got dtype {rows.dtype} and shape {tuple(rows.shape)}")
        else:
            rows = rows.long()
            if rows.numel() and not bool(((rows >= 0) & (rows < N)).all()):
                raise ValueError(f"rows: expected indices in [0, {N}), got values outside")
    srcs = [_rows2d(t.detach().to(weight.dtype)) for _, t in given]
    out = torch.zeros(len(srcs), N, dtype=torch.float32, device=first.device)
    if rows is None:
        out = linear_fwd(srcs, _lastdim(weight.detach()), None if bias is None else bias.detach(),
                         targets.reshape(-1), temperature=temperature).logp
    elif rows.numel():
        sc = linear_fwd(srcs, _lastdim(weight.detach()), None if bias is None else bias.detach(),
                        targets.reshape(-1), rows, temperature=temperature)
        out.index_copy_(1, rows, sc.logp)
    it = iter(out.reshape(len(srcs), *lead))
    return tuple(next(it) if t is not None else None for t in (pos_hidden, neg_hidden))
