"""The logits kernels' launchers: tensors in, tensors out, no autograd (ops/_logits_ops.py wraps them as
PyTorch operators; ops/logits.py holds the public functions). One program per token row; BLOCK_V and
num_warps from ops/configs.py, autotuning only with CEPO_KERNELS_AUTOTUNE=1."""

from __future__ import annotations

import os

import torch
import triton

from cepo_kernels.ops import _common, configs
from cepo_kernels.ops._logits_kernels import (
    _cepo_advantages_fwd_kernel,
    _cepo_fwd_kernel,
    _logprobs_bwd_kernel,
    _logprobs_fwd_kernel,
)


def _autotuned(kernel, key, inplace=False):
    """CEPO_KERNELS_AUTOTUNE=1 opts into autotuning BLOCK_V / num_warps over configs.SWEEP (never for
    in-place writes, which a re-run would corrupt)."""
    if inplace or os.environ.get("CEPO_KERNELS_AUTOTUNE", "0") != "1":
        return None
    if (kernel, key) not in _AUTOTUNED:
        candidates = [triton.Config({"BLOCK_V": c["BLOCK_V"]}, num_warps=c["num_warps"])
                      for c in configs.SWEEP[key]]
        _AUTOTUNED[(kernel, key)] = triton.autotune(candidates, key=["V"])(kernel)
    return _AUTOTUNED[(kernel, key)]


_AUTOTUNED = {}


def _launch(kernel, n, x, key, *args, inplace=False, **kwargs):
    """One program per row; BLOCK_V and num_warps from configs.get(key, device) (ops/configs.py)."""
    if n == 0:
        return
    _common.require_backend(x.device)
    tuned = _autotuned(kernel, key, inplace) if x.device.type == "cuda" else None
    if tuned is not None:
        tuned[(n,)](*args, **kwargs)
    else:
        kernel[(n,)](*args, **kwargs, **configs.get(key, x.device))


def logprobs_fwd(logits, targets, temperature=1.0, with_entropy=True):
    """logits [B, T, V] (last dim contiguous), targets [B*T] int64 -> (logp, lse, entropy or None), fp32."""
    B, T, V = logits.shape
    lp, lse = (_common.alloc((B * T,), torch.float32, logits.device) for _ in range(2))
    ent = _common.alloc((B * T,), torch.float32, logits.device) if with_entropy else None
    _launch(_logprobs_fwd_kernel, B * T, logits, "logprobs_fwd", logits, targets, lp, lse, ent, T, V,
            logits.stride(0), logits.stride(1), 1.0 / temperature)
    return lp, lse, ent


def cepo_fwd(logits, targets, adv, mask, params, *, old_logp=None, pos_logits=None, neg_logits=None,
             pos_logp=None, neg_logp=None):
    """The loss forward on [B, T, V] logits (teachers: [B, T, V] logits or [B*T] log-probs).

    targets [B*T] int64, adv [B*T] fp32, mask [B*T] uint8, old_logp [B*T] fp32 or None.
    Returns (logp, lse, a_hat, loss_tok, coef = dloss_tok/dlogp, delta or None), each [B*T] fp32.
    """
    B, T, V = logits.shape
    N = B * T
    lp, lse, a_hat, loss, coef = (_common.alloc((N,), torch.float32, logits.device) for _ in range(5))
    has_teachers = pos_logits is not None or pos_logp is not None
    delta = _common.alloc((N,), torch.float32, logits.device) if has_teachers else None
    pos_s = (0, 0) if pos_logits is None else pos_logits.stride()[:2]
    neg_s = (0, 0) if neg_logits is None else neg_logits.stride()[:2]
    p = params
    key = f"cepo_fwd_x{1 + (pos_logits is not None) + (neg_logits is not None)}"
    _launch(_cepo_fwd_kernel, N, logits, key,
            logits, pos_logits, neg_logits, targets, adv, mask, old_logp, pos_logp, neg_logp,
            lp, lse, a_hat, loss, coef, delta,
            T, V, logits.stride(0), logits.stride(1), *pos_s, *neg_s,
            1.0 / p.temperature, float(p.lam), float(p.eps_w), float(p.eps_low), float(p.eps_high),
            float(p.clip_dual or 0.0), HAS_DUAL=p.clip_dual is not None)
    return lp, lse, a_hat, loss, coef, delta


def logprobs_bwd(logits, targets, lse, ent, grad_lp, grad_ent=None, temperature=1.0, inplace=False):
    """dlogits [B, T, V] in the logits' dtype from the per-token upstream gradients grad_lp, grad_ent [B*T].

    inplace=True writes into (and returns) `logits` itself.
    """
    B, T, V = logits.shape
    dlogits = logits if inplace else _common.alloc(logits.shape, logits.dtype, logits.device)
    _launch(_logprobs_bwd_kernel, B * T, logits, "logits_bwd", logits, dlogits, targets, lse, ent,
            grad_lp.float().contiguous(), None if grad_ent is None else grad_ent.float().contiguous(),
            T, V, logits.stride(0), logits.stride(1), dlogits.stride(0), dlogits.stride(1),
            1.0 / temperature, ROUND_BF16=dlogits.device.type == "cpu" and dlogits.dtype == torch.bfloat16,
            inplace=inplace)
    return dlogits


def cepo_advantages_fwd(adv, pos_logp, neg_logp, mask, lam, eps_w):
    """A_hat [N] fp32 from contiguous [N] fp32 adv, pos_logp, neg_logp and uint8 mask."""
    N = adv.numel()
    out = _common.alloc((N,), torch.float32, adv.device)
    if N:
        _common.require_backend(adv.device)
        BLOCK = 1024
        _cepo_advantages_fwd_kernel[(triton.cdiv(N, BLOCK),)](adv, pos_logp, neg_logp, mask, out, N,
                                                               float(lam), float(eps_w), BLOCK=BLOCK)
    return out
