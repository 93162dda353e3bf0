"""The linear kernels' launchers: tensors in, tensors out, no autograd (ops/_linear_ops.py wraps them as
PyTorch operators; ops/linear.py holds the public functions; the kernels: ops/_linear_kernels.py).

Forward (`linear_scores`, the one forward): `_linear_fwd_kernel` tiles z = hidden @ weight^T with the rows
(tokens) on the MMA's M axis and the vocabulary on N, so the online logsumexp of a row reduces within a warp;
the target logit is the dot hidden . weight[y]. Up to three row sources (policy, positive and negative
teacher) run in one launch as separate 128-row blocks, the blocks of the same rows adjacent in a grouped
(L2-aware) program order so they read each weight tile while it is in L2. Teacher rows are scored only where
needed (a device-side list and count: no host sync). Each vocabulary split writes partial (max, sum, entropy
sum) stats and `_linear_combine_kernel` combines them in a fixed order; `token_fwd` then applies
`cepo_token`.

Backward (`linear_bwd`): rows with a zero upstream gradient are skipped without a host sync: a stable sort
puts the active rows first and their count stays on the device; every kernel reads it and early-exits on row
blocks past it (row indices are gathered in the kernels, so hidden is never copied). The vocabulary is walked
in chunks of C columns (rows in chunks of R when there are very many): `_linear_bwd_kernel` recomputes the
logit tiles from the saved fp32 logsumexp and writes G = dL/dlogits [R, C]; `_linear_dh_kernel` adds
G @ W_chunk into an fp32 grad_hidden accumulator and `_linear_dw_kernel` writes G^T @ hidden as the chunk's
rows of grad_weight. C and R come from the free device memory (`chunk_budget`), with C >= _MIN_CHUNK so that
the accumulator's read-modify-write costs at most 4 / C bytes per matmul FLOP (linear in the rows, not
quadratic). Opt-in gradient filtering (CEPO_LINEAR_GRAD_FILTER=1, off by default: not exact,
docs/memory.md) skips, in both matmuls, the G tiles holding no target and no probability >= 2^-12, as
cut-cross-entropy does. Deterministic: no atomics, fixed reduction orders. Details: docs/memory.md.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton

from cepo_kernels.ops import _common
from cepo_kernels.ops._linear_kernels import (
    _linear_bwd_kernel,
    _linear_combine_kernel,
    _linear_dh_kernel,
    _linear_dw_kernel,
    _linear_fwd_kernel,
    _linear_token_fwd_kernel,
)

# per operand width: 16-bit dots run on the tensor cores (wgmma m64n128); fp32 IEEE dots run on the FMA
# units, whose operand fragments need smaller tiles to stay spill-free (docs/compile/linear-sm90.md)
_FWD_CONFIG = {
    16: dict(BLOCK_M=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    32: dict(BLOCK_M=128, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=2),
}
_FWD_PROGRAMS = 1024  # split the vocabulary until about this many programs run (small batches fill the GPU)
_INTERPRET_SPLITS = 2  # on a CPU (interpreter) programs cost time, not parallelism; 2 splits still combine
_FWD_GROUP = 16  # row blocks per group of the forward's L2-aware order (a row's sources adjacent)
_COMBINE_BLOCK = 256
_TOKEN_BLOCK = 1024
# per operand width (16-bit: wgmma; fp32 IEEE: FMA units, smaller tiles to stay spill-free)
_G_CONFIG = {
    16: dict(BLOCK_M=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    32: dict(BLOCK_M=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=2),
}
_MM_CONFIG = {
    16: dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_K=64, num_warps=8, num_stages=3),
    32: dict(BLOCK_P=64, BLOCK_Q=128, BLOCK_K=32, num_warps=8, num_stages=2),
}
_BWD_GROUP = 8  # row blocks per group of the backward's L2-aware program order
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


class Scored(NamedTuple):
    """Per-row results of linear_scores unbound, each [S, N] fp32 (S row sources); 0 at rows a source did not
    score."""

    lse: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor


def linear_scores(sources, weight, bias, targets, rows=None, count=None, *, rows_from=0, temperature=1.0):
    """Scores rows of 1-3 hidden-state sources against one weight in one launch; no autograd.

    sources: [N, H] tensors (last dim contiguous, the weight's dtype); weight [V, H] (last dim contiguous);
    bias [V] or None; targets [N] integer. rows: None (every row of every source), or int64 row ids [P]
    scored, for sources >= rows_from, at positions < count ([1] int32 on the device: no host sync); the
    sources before rows_from score every row. Returns [3, S, N] fp32: (lse, logp, entropy) of the scaled
    logits z / T; logp is 0 for a negative target and NaN for one >= V.
    """
    S = len(sources)
    N, H = sources[0].shape
    V = weight.shape[0]
    dev = weight.device
    P = N if rows is None else rows.numel()
    if rows is not None and rows_from == 0:
        out = torch.zeros(3, S, N, dtype=torch.float32, device=dev)
    else:
        out = _common.alloc((3, S, N), torch.float32, dev)
        if rows is not None:
            out[:, rows_from:].zero_()
    if P == 0 or N == 0:
        return out
    _common.require_backend(dev)
    cfg = _FWD_CONFIG[32 if weight.dtype == torch.float32 else 16]
    n_vrb, n_split, tiles_per_split = _splits(S, P, V, cfg, _common.interpreted())
    stats = _common.alloc((S, 3, n_split, P), torch.float32, dev)
    tgt = _common.alloc((S, P), torch.float32, dev)
    h = list(sources) + [sources[0]] * (3 - S)
    _linear_fwd_kernel[(n_vrb * n_split,)](
        h[0], h[1], h[2], weight, bias, targets, rows, count, stats, tgt, P, V, H, n_split, tiles_per_split,
        1.0 / temperature, h[0].stride(0), h[1].stride(0), h[2].stride(0), weight.stride(0),
        0 if bias is None else bias.stride(0), targets.stride(0), *stats.stride()[:3], N_SRC=S,
        ROWS_FROM=rows_from, UPCAST_DOT=upcast_dot(weight.dtype), PRECISION=dot_precision(weight.dtype),
        GROUP=_FWD_GROUP, **cfg)
    _linear_combine_kernel[(triton.cdiv(P, _COMBINE_BLOCK), S)](
        stats, tgt, targets, rows, count, out[0], out[1], out[2], P, V, n_split, targets.stride(0),
        *stats.stride()[:3], out.stride(1), ROWS_FROM=rows_from, BLOCK=_COMBINE_BLOCK)
    return out


def _splits(S, P, V, cfg, interpreter):
    """(row blocks, vocabulary splits, tiles per split) of the forward grid."""
    n_vrb = S * triton.cdiv(P, cfg["BLOCK_M"])
    n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    want = _INTERPRET_SPLITS if interpreter else triton.cdiv(_FWD_PROGRAMS, n_vrb)
    tiles_per_split = triton.cdiv(n_tiles, min(n_tiles, max(1, want)))
    return n_vrb, triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def token_fwd(logp, old, adv, pos, neg, mask, params):
    """(a_hat, loss, coef, delta) [N] fp32 from contiguous [N] inputs (old, pos/neg may be None)."""
    N = logp.numel()
    a_hat, loss, coef, delta = (_common.alloc(logp.shape, torch.float32, logp.device) for _ in range(4))
    if N:
        _common.require_backend(logp.device)
        dual = params.clip_dual is not None
        _linear_token_fwd_kernel[(triton.cdiv(N, _TOKEN_BLOCK),)](
            logp, old, adv, pos, neg, mask, a_hat, loss, coef, delta, N, params.lam, params.eps_w,
            params.eps_low, params.eps_high, params.clip_dual if dual else 0.0, HAS_DUAL=dual,
            BLOCK=_TOKEN_BLOCK)
    return a_hat, loss, coef, delta


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
                PRECISION=prec, GROUP=_BWD_GROUP, **g)
            gz = grad_z.to(hidden.dtype) if upcast else grad_z  # the interpreter: round G like a GPU would
            if need_h:
                grid = (triton.cdiv(rr, mm["BLOCK_P"]) * triton.cdiv(H, mm["BLOCK_Q"]),)
                _linear_dh_kernel[grid](gz, weight, dh32, count, tile_keep, r0, rr, v0, c, H, gz.stride(0),
                                        weight.stride(0), dh32.stride(0), **tk, ACCUMULATE=v0 > 0,
                                        UPCAST_DOT=upcast, PRECISION=prec, GROUP=_BWD_GROUP, **mm)
            if need_w:
                dw = grad_w[v0:v0 + c] if direct_w else dw32
                grid = (triton.cdiv(c, mm["BLOCK_P"]) * triton.cdiv(H, mm["BLOCK_Q"]),)
                _linear_dw_kernel[grid](gz, hidden, rows, count, dw, tile_keep, r0, rr, c, H, gz.stride(0),
                                        hidden.stride(0), dw.stride(0), **tk, ACCUMULATE=r0 > 0,
                                        UPCAST_DOT=upcast, PRECISION=prec, GROUP=_BWD_GROUP, **mm)
            if need_b:
                db32[v0:v0 + c] += db_part[: triton.cdiv(rr, g["BLOCK_M"]), :c].sum(0)
        if need_w and not direct_w:
            grad_w[v0:v0 + c] = dw32[:c]
    if need_h:
        grad_h.index_copy_(0, rows, dh32.to(hidden.dtype))
    if need_b:
        grad_b = db32.to(bias.dtype)
    return grad_h, grad_w, grad_b
