"""Fused linear backward: gradients of per-row log-probs (and entropies) w.r.t. hidden, weight, bias.

Rows with a zero upstream gradient are skipped without a host sync: a stable sort puts the active rows first
and their count stays on the device; every kernel reads it and early-exits on row blocks past it (row indices
are gathered in the kernels, so hidden is never copied). The vocabulary is walked in chunks of C columns
(rows in chunks of R when there are very many): `_linear_bwd_kernel` recomputes the logit tiles from the saved
fp32 logsumexp and writes G = dL/dlogits [R, C]; `_linear_dh_kernel` adds G @ W_chunk into an fp32
grad_hidden accumulator and `_linear_dw_kernel` writes G^T @ hidden as the chunk's rows of grad_weight.
C and R come from the free device memory (`chunk_budget`), with C >= _MIN_CHUNK so that the accumulator's
read-modify-write costs at most 4 / C bytes per matmul FLOP (linear in the rows, not quadratic). Opt-in
gradient filtering (CEPO_LINEAR_GRAD_FILTER=1, off by default: not exact, docs/memory.md) skips, in both
matmuls, the G tiles holding no target and no probability >= 2^-12, as cut-cross-entropy does.
Deterministic: no atomics, fixed reduction orders. Details and numbers: docs/memory.md.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cepo_kernels.ops import _common
from cepo_kernels.ops._linear_kernels import grouped, logit_tile

# per operand width (16-bit: wgmma; fp32 IEEE: FMA units, smaller tiles to stay spill-free)
_G_CONFIG = {
    16: dict(BLOCK_M=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    32: dict(BLOCK_M=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=2),
}
_MM_CONFIG = {
    16: dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_K=64, num_warps=8, num_stages=3),
    32: dict(BLOCK_P=64, BLOCK_Q=128, BLOCK_K=32, num_warps=8, num_stages=2),
}
_GROUP = 8  # row blocks per group of the L2-aware program order
_MIN_CHUNK = 4096  # vocabulary columns per chunk, at least (bounds the grad_hidden read-modify-write)
_CPU_BUDGET = 64 << 20  # chunk budget in bytes without a GPU (interpreter runs)
_MAX_BUDGET = 512 << 20  # never more, whatever is free (keeps the extra memory < 1 GiB at the anchor shape)
_FILTER_EPS = 2.0 ** -12  # gradient filtering: a G tile whose probabilities are all below this is skipped


def dot_precision(dtype):
    """IEEE fp32 dots for fp32 inputs (the GPU default would be TF32); 16-bit inputs are unaffected."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype):
    """True under Triton's interpreter with bf16 operands, whose tl.dot is wrong there (docs/kernels.md).

    The interpreter also truncates fp32 -> bf16 casts (a GPU rounds to nearest even), so there the bf16
    outputs of the backward are written in fp32 and rounded by torch.
    """
    return _common.interpreted() and dtype == torch.bfloat16


def grad_filter():
    """True when gradient filtering is switched on (CEPO_LINEAR_GRAD_FILTER=1); off, the backward is exact."""
    return os.environ.get("CEPO_LINEAR_GRAD_FILTER", "0") == "1"


def chunk_budget(device):
    """Bytes for the G chunk: a quarter of the free device memory, at most _MAX_BUDGET (env override)."""
    env = os.environ.get("CEPO_LINEAR_CHUNK_BYTES")
    if env:
        return max(1, int(env))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(16 << 20, min(_MAX_BUDGET, free // 4))
    return _CPU_BUDGET


def active_rows(keep):
    """(rows [N] int64 with the kept rows first, count [1] int32) from a bool [N]; no host sync."""
    rows = torch.argsort((~keep).to(torch.uint8), stable=True)
    return rows, keep.sum(dtype=torch.int32).reshape(1)


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


def _width(dtype):
    return 32 if dtype == torch.float32 else 16


def _chunks(N, V, e, device, width=16, budget=None):
    """(R rows, C columns) of the G chunk: R C e <= budget, C >= _MIN_CHUNK (or V); R = N if that fits."""
    bm, bv = _G_CONFIG[width]["BLOCK_M"], _G_CONFIG[width]["BLOCK_V"]
    budget = chunk_budget(device) if budget is None else budget
    v_cols = triton.cdiv(V, bv) * bv
    min_cols = min(v_cols, _MIN_CHUNK)
    R = N if N * min_cols * e <= budget else max(bm, budget // (min_cols * e) // bm * bm)
    R = min(R, N)
    C = max(bv, min(v_cols, budget // (R * e) // bv * bv))
    return R, C


def linear_bwd(hidden, weight, bias, targets, lse, g_lp, ent=None, g_ent=None, *, temperature=1.0,
               needs=(True, True, True)):
    """Gradients of sum(g_lp * logp + g_ent * entropy) w.r.t. (hidden, weight, bias); no autograd.

    hidden [N, H] (last dim contiguous), weight [V, H] (last dim contiguous), bias [V] or None; targets,
    lse, g_lp (and ent, g_ent) [N] contiguous (targets int64, the rest fp32). needs: which of the three are
    wanted (None is returned for the others). Rows where g_lp and g_ent are both 0 cost nothing.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = None
    if need_w:  # every row of grad_weight is written by one chunk below
        grad_w = torch.zeros_like(weight) if N == 0 else _common.alloc(weight.shape, weight.dtype, dev)
    grad_b = torch.zeros_like(bias) if need_b else None
    if N == 0 or not (need_h or need_w or need_b):
        return grad_h, grad_w, grad_b
    _common.require_backend(dev)
    g_lp = g_lp.masked_fill(targets < 0, 0.0)  # a negative id's log-prob is the constant 0: no gradient
    rows, count = active_rows(g_lp != 0 if g_ent is None else (g_lp != 0) | (g_ent != 0))
    upcast = upcast_dot(hidden.dtype)
    gdt = torch.float32 if upcast else hidden.dtype
    R, C = _chunks(N, V, torch.finfo(gdt).bits // 8, dev, _width(hidden.dtype))
    g, mm = _G_CONFIG[_width(hidden.dtype)], _MM_CONFIG[_width(hidden.dtype)]
    prec = dot_precision(hidden.dtype)
    grad_z = _common.alloc((R, C), gdt, dev)  # G = dL/dlogits of one chunk
    dh32 = torch.zeros(N, H, dtype=torch.float32, device=dev) if need_h else None  # by active position
    direct_w = R == N and not upcast  # one row chunk: G^T @ hidden goes straight into grad_weight
    dw32 = _common.alloc((C, H), torch.float32, dev) if need_w and not direct_w else None
    db_part = _common.alloc((triton.cdiv(R, g["BLOCK_M"]), C), torch.float32, dev) if need_b else None
    db32 = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    tile_keep = None
    if grad_filter() and (need_h or need_w):
        assert g["BLOCK_M"] % mm["BLOCK_P"] == 0 and g["BLOCK_V"] % mm["BLOCK_P"] == 0
        assert g["BLOCK_M"] % mm["BLOCK_K"] == 0 and g["BLOCK_V"] % mm["BLOCK_K"] == 0
        tile_keep = torch.zeros(triton.cdiv(R, g["BLOCK_M"]), triton.cdiv(C, g["BLOCK_V"]), dtype=torch.int32,
                                device=dev)
    tk = dict(stride_tk=0 if tile_keep is None else tile_keep.stride(0), TILE_M=g["BLOCK_M"],
              TILE_V=g["BLOCK_V"])
    for v0 in range(0, V, C):
        c = min(C, V - v0)
        for r0 in range(0, N, R):
            rr = min(R, N - r0)
            grid = (triton.cdiv(rr, g["BLOCK_M"]) * triton.cdiv(c, g["BLOCK_V"]),)
            _linear_bwd_kernel[grid](
                hidden, weight, bias, targets, rows, count, lse, g_lp, ent, g_ent, grad_z, db_part, tile_keep,
                r0, rr, v0, c, V, H, 1.0 / temperature, _FILTER_EPS, hidden.stride(0), weight.stride(0),
                0 if bias is None else bias.stride(0), grad_z.stride(0),
                0 if db_part is None else db_part.stride(0), tk["stride_tk"], UPCAST_DOT=upcast,
                PRECISION=prec, GROUP=_GROUP, **g)
            gz = grad_z.to(hidden.dtype) if upcast else grad_z  # the interpreter: round G like a GPU would
            if need_h:
                grid = (triton.cdiv(rr, mm["BLOCK_P"]) * triton.cdiv(H, mm["BLOCK_Q"]),)
                _linear_dh_kernel[grid](gz, weight, dh32, count, tile_keep, r0, rr, v0, c, H, gz.stride(0),
                                        weight.stride(0), dh32.stride(0), **tk, ACCUMULATE=v0 > 0,
                                        UPCAST_DOT=upcast, PRECISION=prec, GROUP=_GROUP, **mm)
            if need_w:
                dw = grad_w[v0:v0 + c] if direct_w else dw32
                grid = (triton.cdiv(c, mm["BLOCK_P"]) * triton.cdiv(H, mm["BLOCK_Q"]),)
                _linear_dw_kernel[grid](gz, hidden, rows, count, dw, tile_keep, r0, rr, c, H, gz.stride(0),
                                        hidden.stride(0), dw.stride(0), **tk, ACCUMULATE=r0 > 0,
                                        UPCAST_DOT=upcast, PRECISION=prec, GROUP=_GROUP, **mm)
            if need_b:
                db32[v0:v0 + c] += db_part[: triton.cdiv(rr, g["BLOCK_M"]), :c].sum(0)
        if need_w and not direct_w:
            grad_w[v0:v0 + c] = dw32[:c]
    if need_h:
        grad_h.index_copy_(0, rows, dh32.to(hidden.dtype))
    if need_b:
        grad_b = db32.to(bias.dtype)
    return grad_h, grad_w, grad_b


@torch.library.custom_op(
    "cepo_kernels::linear_bwd", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, Tensor g_lp, "
           "Tensor? ent, Tensor? g_ent, float temperature, bool need_h, bool need_w, bool need_b) "
           "-> (Tensor, Tensor, Tensor)")
def _linear_bwd_op(hidden, weight, bias, targets, lse, g_lp, ent, g_ent, temperature, need_h, need_w, need_b):
    """linear_bwd as an operator: (grad_hidden, grad_weight, grad_bias), [0] for each one not needed."""
    grads = linear_bwd(hidden, weight, bias, targets, lse, g_lp, ent, g_ent, temperature=temperature,
                       needs=(need_h, need_w, need_b))
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@_linear_bwd_op.register_fake
def _(hidden, weight, bias, targets, lse, g_lp, ent, g_ent, temperature, need_h, need_w, need_b):
    N, H, V = hidden.shape[0], hidden.shape[1], weight.shape[0]
    if all(isinstance(d, int) for d in (N, H, V)) and N and (need_h or need_w or need_b):
        # the launcher's temporaries on a GPU with enough free memory (the largest budget)
        env = os.environ.get("CEPO_LINEAR_CHUNK_BYTES")
        e = hidden.element_size()
        R, C = _chunks(N, V, e, None, _width(hidden.dtype), int(env) if env else _MAX_BUDGET)
        nbytes = R * C * e + 12 * N  # G, the row list and the masked g_lp
        nbytes += 4 * N * H if need_h else 0  # fp32 grad_hidden accumulator
        nbytes += 4 * C * H if need_w and R != N else 0  # fp32 grad_weight accumulator
        nbytes += 4 * (triton.cdiv(R, _G_CONFIG[_width(hidden.dtype)]["BLOCK_M"]) * C + V) if need_b else 0
        _common.report_workspace(nbytes)

    def grad(x, need):
        return torch.empty_like(x) if need and x is not None else hidden.new_empty(0)

    return grad(hidden, need_h), grad(weight, need_w), grad(bias, need_b)
