"""Fused linear backward: gradients of per-row log-probs (and entropies) w.r.t. hidden, weight, bias.

Only rows with a non-zero gradient are processed (an index gather first). The vocabulary is walked in
chunks of at most `_G_CHUNK_BYTES` / (rows x element size) columns: for each chunk one kernel recomputes the
logit tiles from the saved fp32 logsumexp and writes G = dL/dlogits for the chunk, then two matmul kernels
(fp32 accumulation, fixed reduction order) add G @ W_chunk into grad_hidden and write G^T @ hidden as the
chunk's rows of grad_weight. Deterministic, 3 x 2 M H V FLOPs (recompute, dH, dW) on M kept rows, and an
extra-memory peak bounded by the chunk budget, independent of V (docs/memory.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_G_CHUNK_BYTES = int(os.environ.get("CEPO_LINEAR_CHUNK_BYTES", str(64 << 20)))
_G_CONFIG = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
_MM_CONFIG = dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_K=64, num_warps=8, num_stages=3)


def alloc(shape, dtype, device):
    """Every uninitialised buffer of the linear path comes from here (tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype):
    """IEEE fp32 dots for fp32 inputs (the GPU default would be TF32); 16-bit inputs are unaffected."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype):
    """True under Triton's interpreter with bf16 operands, whose tl.dot is wrong there (STYLE.md).

    The interpreter also truncates fp32 -> bf16 casts (a GPU rounds to nearest even), so there the bf16
    outputs of the backward are written in fp32 and rounded by torch.
    """
    return os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.bfloat16


@triton.heuristics({
    "HAS_BIAS": lambda a: a["bias"] is not None,
    "HAS_ENT": lambda a: a["g_ent"] is not None,
})
@triton.jit
def _linear_bwd_kernel(hidden, weight, bias, targets, lse, g_lp, ent, g_ent, grad_z,
                       M, v0, v1, H, inv_temp,
                       stride_hn, stride_wv, stride_b, stride_gn,
                       HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, UPCAST_DOT: tl.constexpr,
                       PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """grad_z[m, v - v0] = dL/dlogit for kept rows m < M and columns v0 <= v < v1 (logits recomputed).

    G = (g_lp (onehot - p) - g_ent p (log p + entropy)) / T  with p = exp(z / T - lse).
    """
    pid = tl.program_id(0).to(tl.int64)
    n_rb = tl.cdiv(M, BLOCK_N)
    o_n = (pid % n_rb) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
    o_v = v0 + (pid // n_rb) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)  # [BLOCK_V]
    m_n = o_n < M
    m_v = o_v < v1
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        o_h = k + tl.arange(0, BLOCK_H).to(tl.int64)
        m_h = o_h < H
        b_h = tl.load(hidden + o_n[:, None] * stride_hn + o_h[None, :], mask=m_n[:, None] & m_h[None, :],
                      other=0.0)  # [BLOCK_N, BLOCK_H]
        b_w = tl.load(weight + o_v[None, :] * stride_wv + o_h[:, None], mask=m_h[:, None] & m_v[None, :],
                      other=0.0)  # [BLOCK_H, BLOCK_V]
        if UPCAST_DOT:
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        acc = tl.dot(b_h, b_w, acc, input_precision=PRECISION)  # [BLOCK_N, BLOCK_V]
    if HAS_BIAS:
        acc += tl.load(bias + o_v * stride_b, mask=m_v, other=0.0).to(tl.float32)[None, :]
    b_lse = tl.load(lse + o_n, mask=m_n, other=0.0)
    b_g = tl.load(g_lp + o_n, mask=m_n, other=0.0)
    b_t = tl.load(targets + o_n, mask=m_n, other=-1)
    b_logp = acc * inv_temp - b_lse[:, None]  # [BLOCK_N, BLOCK_V] log p
    b_p = tl.exp(b_logp)
    b_dz = tl.where(o_v[None, :] == b_t[:, None], b_g[:, None], 0.0) - b_g[:, None] * b_p
    if HAS_ENT:
        b_ent = tl.load(ent + o_n, mask=m_n, other=0.0)
        b_ge = tl.load(g_ent + o_n, mask=m_n, other=0.0)
        b_dz -= tl.where(b_p > 0, b_ge[:, None] * b_p * (b_logp + b_ent[:, None]), 0.0)
    b_dz = b_dz * inv_temp
    o_c = o_v - v0
    tl.store(grad_z + o_n[:, None] * stride_gn + o_c[None, :], b_dz.to(grad_z.dtype.element_ty),
             mask=m_n[:, None] & m_v[None, :])


@triton.jit
def _linear_bwd_mm_kernel(a, b, c, P, Q, K,
                          stride_ap, stride_ak, stride_bk, stride_bq, stride_cp, stride_cq,
                          ACCUMULATE: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[P, Q] (+)= a[P, K] @ b[K, Q] with an fp32 accumulator; each output tile owned by one program."""
    pid = tl.program_id(0).to(tl.int64)
    n_pb = tl.cdiv(P, BLOCK_P)
    o_p = (pid % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # [BLOCK_P]
    o_q = (pid // n_pb) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)  # [BLOCK_Q]
    m_p = o_p < P
    m_q = o_q < Q
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        o_k = k + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        b_a = tl.load(a + o_p[:, None] * stride_ap + o_k[None, :] * stride_ak,
                      mask=m_p[:, None] & m_k[None, :], other=0.0)  # [BLOCK_P, BLOCK_K]
        b_b = tl.load(b + o_k[:, None] * stride_bk + o_q[None, :] * stride_bq,
                      mask=m_k[:, None] & m_q[None, :], other=0.0)  # [BLOCK_K, BLOCK_Q]
        if UPCAST_DOT:
            b_a = b_a.to(tl.float32)
            b_b = b_b.to(tl.float32)
        acc = tl.dot(b_a, b_b, acc, input_precision=PRECISION)
    p_c = c + o_p[:, None] * stride_cp + o_q[None, :] * stride_cq
    m_c = m_p[:, None] & m_q[None, :]
    if ACCUMULATE:
        acc += tl.load(p_c, mask=m_c, other=0.0).to(tl.float32)
    tl.store(p_c, acc.to(c.dtype.element_ty), mask=m_c)


def _mm(a, b, c, accumulate):
    """c (+)= a @ b for 2-D views with any strides (launcher of _linear_bwd_mm_kernel)."""
    P, K = a.shape
    Q = b.shape[1]
    cfg = _MM_CONFIG
    grid = (triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(Q, cfg["BLOCK_Q"]),)
    _linear_bwd_mm_kernel[grid](a, b, c, P, Q, K, *a.stride(), *b.stride(), *c.stride(),
                                ACCUMULATE=accumulate, UPCAST_DOT=upcast_dot(b.dtype),
                                PRECISION=dot_precision(b.dtype), **cfg)


def linear_bwd(hidden, weight, bias, targets, lse, g_lp, ent=None, g_ent=None, *, temperature=1.0,
               needs=(True, True, True)):
    """Gradients of sum(g_lp * logp + g_ent * entropy) w.r.t. (hidden, weight, bias); no autograd.

    hidden [N, H] (last dim contiguous), weight [V, H] (last dim contiguous), bias [V] or None; targets,
    lse, g_lp (and ent, g_ent) [N] (targets int64, the rest fp32). needs: which of the three are wanted
    (None is returned for the others). Rows where g_lp and g_ent are both 0 are skipped.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    keep = g_lp != 0 if g_ent is None else (g_lp != 0) | (g_ent != 0)
    rows = keep.nonzero().squeeze(1)
    M = rows.numel()
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = None
    if need_w:  # every row of grad_weight is written by one chunk below
        grad_w = torch.zeros_like(weight) if M == 0 else alloc(weight.shape, weight.dtype, weight.device)
    grad_b = torch.zeros_like(bias) if need_b else None
    if M == 0 or not (need_h or need_w or need_b):
        return grad_h, grad_w, grad_b
    h_nz = hidden.index_select(0, rows)  # [M, H] contiguous
    sel = [None if x is None else x.index_select(0, rows).contiguous()
           for x in (targets, lse, g_lp, ent, g_ent)]
    cfg = _G_CONFIG
    bv = cfg["BLOCK_V"]
    chunk = max(bv, min(triton.cdiv(V, bv) * bv, _G_CHUNK_BYTES // (M * hidden.element_size()) // bv * bv))
    upcast = upcast_dot(hidden.dtype)
    grad_z = alloc((M, chunk), torch.float32 if upcast else hidden.dtype, hidden.device)  # dL/dlogits chunk
    dh32 = torch.zeros(M, H, dtype=torch.float32, device=hidden.device) if need_h else None
    db32 = alloc((V,), torch.float32, hidden.device) if need_b else None
    n_rb = triton.cdiv(M, cfg["BLOCK_N"])
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        gz = grad_z[:, : v1 - v0]
        grid = (n_rb * triton.cdiv(v1 - v0, bv),)
        _linear_bwd_kernel[grid](h_nz, weight, bias, *sel, gz, M, v0, v1, H, 1.0 / temperature,
                                 h_nz.stride(0), weight.stride(0), 0 if bias is None else bias.stride(0),
                                 gz.stride(0), UPCAST_DOT=upcast,
                                 PRECISION=dot_precision(hidden.dtype), **cfg)
        if upcast:
            gz = gz.to(hidden.dtype)
        if need_h:
            _mm(gz, weight[v0:v1], dh32, True)  # [M, H] += [M, c] @ [c, H]
        if need_w:
            if upcast:
                out = alloc((v1 - v0, H), torch.float32, hidden.device)
                _mm(gz.t(), h_nz, out, False)
                grad_w[v0:v1] = out
            else:
                _mm(gz.t(), h_nz, grad_w[v0:v1], False)  # [c, H] = [c, M] @ [M, H]
        if need_b:
            db32[v0:v1] = gz.sum(0, dtype=torch.float32)
    if need_h:
        grad_h.index_copy_(0, rows, dh32.to(hidden.dtype))
    if need_b:
        grad_b = db32.to(bias.dtype)
    return grad_h, grad_w, grad_b
