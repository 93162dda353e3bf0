"""The divergence kernels' launchers (ops/_divergence_kernels.py): tensors in, tensors out, no autograd.
ops/_divergence_ops.py wraps them (and the chunked-torch implementation, ops/_divergence_torch.py) as PyTorch
operators; ops/divergence.py holds the public functions. One program per token row."""

from __future__ import annotations

import torch

from cepo_kernels.ops import _common, configs
from cepo_kernels.ops import _divergence_torch as tch
from cepo_kernels.ops._divergence_kernels import _divergence_bwd_kernel, _divergence_fwd_kernel

_GPU_CONFIG = {"BLOCK_V": 4096, "num_warps": 8}


def _config(device):
    return dict(configs.INTERPRETER) if device.type == "cpu" else dict(_GPU_CONFIG)


def mode(beta):
    """The kernels' MODE: 0 forward KL (beta = 0), 1 reverse KL (beta = 1), 2 the generalized JSD."""
    return 0 if beta == 0.0 else 1 if beta == 1.0 else 2


def _as3d(x):
    return x if x.dim() == 3 else x.unsqueeze(0)


def divergence_fwd(student, teacher, targets, mask, params):
    """student, teacher [B, T, V] or [N, V] (last dim contiguous), targets [N] int64 or None, mask [N] uint8.

    Full vocabulary only (params.topk None). Returns (div [N], logp [N], stats [N, 3]) fp32 as
    _divergence_torch.torch_fwd.
    """
    x, y = _as3d(student), _as3d(teacher)
    B, T, V = x.shape
    N = B * T
    div, lp = (_common.alloc((N,), torch.float32, x.device) for _ in range(2))
    stats = _common.alloc((N, 3), torch.float32, x.device)
    if N:
        _common.require_backend(x.device)
        _divergence_fwd_kernel[(N,)](x, y, targets, mask, div, lp, stats, T, V, x.stride(0), x.stride(1),
                                     y.stride(0), y.stride(1), 1.0 / params.temperature,
                                     float(params.beta), MODE=mode(params.beta), **_config(x.device))
    return div, lp, stats


def divergence_bwd(student, teacher, mask, stats, grad, params, out_dtype=None):
    """d(sum_t grad_t D_t) / d student, shaped like student, in out_dtype (default: the student's).

    Under the interpreter a bf16 result is written in fp32 and rounded by torch (the interpreter truncates
    fp32 -> bf16 casts: docs/interpreter.md)."""
    x, y = _as3d(student), _as3d(teacher)
    B, T, V = x.shape
    dtype = out_dtype or student.dtype
    write = torch.float32 if _common.interpreted() and dtype == torch.bfloat16 else dtype
    out = _common.alloc((B, T, V), write, x.device)
    if B * T:
        _common.require_backend(x.device)
        _divergence_bwd_kernel[(B * T,)](x, y, out, mask, stats, grad.float().contiguous(), T, V,
                                         x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0),
                                         out.stride(1), 1.0 / params.temperature, float(params.beta),
                                         MODE=mode(params.beta), **_config(x.device))
    return out.to(dtype).reshape(student.shape)


def kernels(params, native):
    """(fwd, bwd) on logits: the chunked torch implementation for top-k (every device) or when `native`
    (the operators' CPU kernel), else the Triton launchers above."""
    if native or params.topk is not None:
        return tch.torch_fwd, tch.torch_bwd
    return divergence_fwd, divergence_bwd


def _linear_rows(V, dtype, device):
    """Rows per chunk of the linear path: two [rows, V] logits chunks of about 32 MiB each on a CPU, 512 MiB
    each on a GPU (each chunk reads the whole weight once per GEMM: fewer, larger chunks there)."""
    nbytes = (32 << 20) if device.type == "cpu" else (512 << 20)
    return tch.chunk_rows(V, nbytes * 4 // torch.empty((), dtype=dtype).element_size())


_MM_OUT_DTYPE = "out_dtype" in (torch.addmm.__doc__ or "")


def _addmm_fp32(acc, a, b):
    """acc += a @ b into an fp32 acc without rounding the product to the inputs' 16-bit dtype first (per-chunk
    rounding would bias the summed gradient): cuBLAS's fp32 output where torch offers it, else fp32 inputs."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _MM_OUT_DTYPE and acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _logit_chunk(h, weight, bias):
    z = h @ weight.T
    return z if bias is None else z + bias


def _teacher_head(weight, bias, teacher_weight, teacher_bias):
    """The teacher's (weight, bias): the student's unless teacher_weight is given (e.g. an EMA teacher)."""
    return (weight, bias) if teacher_weight is None else (teacher_weight.detach(), teacher_bias)


def linear_divergence_fwd(hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, targets, mask,
                          params, native=False):
    """hidden, teacher_hidden [N, H] (the weight's dtype), weight [V, H], bias [V] or None, teacher_weight
    [V, H] / teacher_bias [V] or None (None: the student's head), targets [N] or None, mask [N] uint8. The
    logits exist one row chunk at a time (in the inputs' dtype, as an eager lm_head computes them), each
    scored by kernels(params, native). Returns (div, logp, stats) as divergence_fwd."""
    N, V = hidden.shape[0], weight.shape[0]
    fwd, _ = kernels(params, native)
    tw, tb = _teacher_head(weight, bias, teacher_weight, teacher_bias)
    outs = [torch.zeros(N, dtype=torch.float32, device=hidden.device) for _ in range(2)]
    outs.append(torch.zeros(N, 3, dtype=torch.float32, device=hidden.device))
    step = _linear_rows(V, hidden.dtype, hidden.device)
    for r0 in range(0, N, step):
        sl = slice(r0, min(N, r0 + step))
        z_s, z_t = _logit_chunk(hidden[sl], weight, bias), _logit_chunk(teacher_hidden[sl], tw, tb)
        res = fwd(z_s, z_t, None if targets is None else targets[sl], mask[sl], params)
        for o, r in zip(outs, res, strict=True):
            o[sl] = r
    return tuple(outs)


def linear_divergence_bwd(hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, mask, stats,
                          grad, params, native=False, need=(True, True, True)):
    """(d hidden [N, H], d weight [V, H], d bias [V] or None) of sum_t grad_t D_t, the logits recomputed per
    row chunk; rows whose gradient is zero (masked) are skipped within the chunk by the kernels. d weight and
    d bias accumulate in fp32 and come back in the weight's dtype."""
    N, V = hidden.shape[0], weight.shape[0]
    _, bwd = kernels(params, native)
    tw, tb = _teacher_head(weight, bias, teacher_weight, teacher_bias)
    dh = torch.zeros_like(hidden) if need[0] else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
    db = torch.zeros(V, dtype=torch.float32, device=weight.device) if need[2] and bias is not None else None
    step = _linear_rows(V, hidden.dtype, hidden.device)
    for r0 in range(0, N, step):
        sl = slice(r0, min(N, r0 + step))
        z_s, z_t = _logit_chunk(hidden[sl], weight, bias), _logit_chunk(teacher_hidden[sl], tw, tb)
        dz = bwd(z_s, z_t, mask[sl], stats[sl], grad[sl], params)
        del z_s, z_t
        if dh is not None:
            dh[sl] = dz @ weight
        if dw is not None:
            _addmm_fp32(dw, dz.T, hidden[sl])
        if db is not None:
            db += dz.float().sum(0)
    return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(weight.dtype))
