"""The divergence as PyTorch custom operators, torch.ops.cepo_kernels: divergence_fwd / divergence_bwd (on
logits) and linear_divergence_fwd / linear_divergence_bwd (hidden states + lm_head weight).

Each has a device-generic implementation (the Triton launchers, or chunked torch for top-k), a native CPU
kernel registered with register_kernel("cpu") (chunked eager torch; CEPO_KERNELS_CPU=interpreter runs the
Triton kernels through Triton's interpreter instead: ops/_common.cpu_backend), a fake implementation and,
for the forwards, registered autograd (gradient to the student only). docs/divergence.md.
"""

from __future__ import annotations

import torch

from cepo_kernels._params import DivergenceParams
from cepo_kernels.ops import _common
from cepo_kernels.ops import _divergence_launch as launch
from cepo_kernels.ops._divergence_torch import GPU_CHUNK_BYTES

_OPTS = "float temperature, float beta, int topk, str topk_from, bool add_tail"


def _params(temperature, beta, topk, topk_from, add_tail):
    return DivergenceParams(beta=beta, temperature=temperature, topk=topk or None, topk_from=topk_from,
                            add_tail=add_tail)


def _native():
    return _common.cpu_backend() == "native"


def _rows(x):
    return x.numel() // max(x.shape[-1], 1)


def _fake_fwd(n, like):
    return (like.new_empty(n, dtype=torch.float32), like.new_empty(n, dtype=torch.float32),
            like.new_empty((n, 3), dtype=torch.float32))


@torch.library.custom_op("cepo_kernels::divergence_fwd", mutates_args=(),
                         schema=f"(Tensor logits, Tensor teacher, Tensor? targets, Tensor mask, {_OPTS}) "
                                "-> (Tensor, Tensor, Tensor)")
def _fwd_op(logits, teacher, targets, mask, temperature, beta, topk, topk_from, add_tail):
    """(D [N], logp_S(target) [N], stats [N, 3]) fp32 of [B, T, V] / [N, V] logits; topk 0 = full vocab."""
    p = _params(temperature, beta, topk, topk_from, add_tail)
    return launch.kernels(p, native=False)[0](logits, teacher, targets, mask, p)


@_fwd_op.register_kernel("cpu")
def _(logits, teacher, targets, mask, temperature, beta, topk, topk_from, add_tail):
    p = _params(temperature, beta, topk, topk_from, add_tail)
    return launch.kernels(p, native=_native())[0](logits, teacher, targets, mask, p)


@_fwd_op.register_fake
def _(logits, teacher, targets, mask, *args):
    return _fake_fwd(_rows(logits), logits)


@torch.library.custom_op("cepo_kernels::divergence_bwd", mutates_args=(),
                         schema=f"(Tensor logits, Tensor teacher, Tensor mask, Tensor stats, Tensor grad, "
                                f"{_OPTS}) -> Tensor")
def _bwd_op(logits, teacher, mask, stats, grad, temperature, beta, topk, topk_from, add_tail):
    p = _params(temperature, beta, topk, topk_from, add_tail)
    return launch.kernels(p, native=False)[1](logits, teacher, mask, stats, grad, p)


@_bwd_op.register_kernel("cpu")
def _(logits, teacher, mask, stats, grad, temperature, beta, topk, topk_from, add_tail):
    p = _params(temperature, beta, topk, topk_from, add_tail)
    return launch.kernels(p, native=_native())[1](logits, teacher, mask, stats, grad, p)


@_bwd_op.register_fake
def _(logits, *args):
    return logits.new_empty(logits.shape)


def _fwd_setup(ctx, inputs, output):
    logits, teacher, _, mask, *opts = inputs
    ctx.save_for_backward(logits, teacher, mask, output[2])
    ctx.opts = opts
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad_div, *_):
    """Only D is differentiated (logp and stats are constants: the importance weight is stop-gradient)."""
    if grad_div is None or not ctx.needs_input_grad[0]:
        return (None,) * 9
    logits, teacher, mask, stats = ctx.saved_tensors
    d = torch.ops.cepo_kernels.divergence_bwd(logits, teacher, mask, stats, grad_div.float().contiguous(),
                                              *ctx.opts)
    return (d,) + (None,) * 8


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)

_LIN_IN = ("Tensor hidden, Tensor teacher_hidden, Tensor weight, Tensor? bias, Tensor? teacher_weight, "
           "Tensor? teacher_bias")


@torch.library.custom_op("cepo_kernels::linear_divergence_fwd", mutates_args=(),
                         schema=f"({_LIN_IN}, Tensor? targets, Tensor mask, {_OPTS}) "
                                "-> (Tensor, Tensor, Tensor)")
def _lin_fwd_op(hidden, teacher_hidden, weight, bias, tw, tb, targets, mask, temperature, beta, topk,
                topk_from, add_tail):
    """(D, logp_S(target), stats) of hidden [N, H] through weight [V, H] (+ bias) against teacher_hidden
    [N, H] through the same head, or through teacher_weight (+ teacher_bias) when given."""
    p = _params(temperature, beta, topk, topk_from, add_tail)
    return launch.linear_divergence_fwd(hidden, teacher_hidden, weight, bias, tw, tb, targets, mask, p)


@_lin_fwd_op.register_kernel("cpu")
def _(hidden, teacher_hidden, weight, bias, tw, tb, targets, mask, temperature, beta, topk, topk_from,
      add_tail):
    p = _params(temperature, beta, topk, topk_from, add_tail)
    return launch.linear_divergence_fwd(hidden, teacher_hidden, weight, bias, tw, tb, targets, mask, p,
                                        native=_native())


def _workspace(hidden, weight, topk, backward):
    """Bytes of the linear path's temporaries on a GPU (memory tracers, bench/memory_fake.py): two logits
    chunks (three in the backward, with dz), the torch top-k's fp32 row chunks, the backward's fp32 d weight
    and d bias."""
    V, H = weight.shape
    if not all(isinstance(d, int) for d in (hidden.shape[0], V, H)):
        return 0
    e = hidden.element_size()
    rows = min(hidden.shape[0], launch._linear_rows(V, hidden.dtype, torch.device("cuda")))
    n = (3 if backward else 2) * rows * V * e + (8 * GPU_CHUNK_BYTES if topk else 0)
    if backward:
        n += V * H * 4 + V * 4
    return n


@_lin_fwd_op.register_fake
def _(hidden, teacher_hidden, weight, bias, tw, tb, targets, mask, temperature, beta, topk, *args):
    _common.report_workspace(_workspace(hidden, weight, topk, False))
    return _fake_fwd(hidden.shape[0], hidden)


@torch.library.custom_op("cepo_kernels::linear_divergence_bwd", mutates_args=(),
                         schema=f"({_LIN_IN}, Tensor mask, Tensor stats, Tensor grad, {_OPTS}, bool[] need) "
                                "-> (Tensor, Tensor, Tensor)")
def _lin_bwd_op(hidden, teacher_hidden, weight, bias, tw, tb, mask, stats, grad, temperature, beta, topk,
                topk_from, add_tail, need):
    """(d hidden, d weight, d bias); an output not needed (or d bias without a bias) is an empty tensor."""
    return _lin_bwd(hidden, teacher_hidden, weight, bias, tw, tb, mask, stats, grad,
                    _params(temperature, beta, topk, topk_from, add_tail), need, native=False)


@_lin_bwd_op.register_kernel("cpu")
def _(hidden, teacher_hidden, weight, bias, tw, tb, mask, stats, grad, temperature, beta, topk, topk_from,
      add_tail, need):
    return _lin_bwd(hidden, teacher_hidden, weight, bias, tw, tb, mask, stats, grad,
                    _params(temperature, beta, topk, topk_from, add_tail), need, native=_native())


def _lin_bwd(hidden, teacher_hidden, weight, bias, tw, tb, mask, stats, grad, p, need, native):
    out = launch.linear_divergence_bwd(hidden, teacher_hidden, weight, bias, tw, tb, mask, stats, grad, p,
                                       native, tuple(need))
    return tuple(hidden.new_empty(0) if o is None else o for o in out)


@_lin_bwd_op.register_fake
def _(hidden, teacher_hidden, weight, bias, tw, tb, mask, stats, grad, *args):
    need = args[-1]
    _common.report_workspace(_workspace(hidden, weight, args[2], True))
    has_db = need[2] and bias is not None
    return (hidden.new_empty(hidden.shape if need[0] else 0),
            weight.new_empty(weight.shape if need[1] else 0),
            weight.new_empty(weight.shape[0] if has_db else 0))


def _lin_setup(ctx, inputs, output):
    hidden, teacher_hidden, weight, bias, tw, tb, _, mask, *opts = inputs
    ctx.save_for_backward(hidden, teacher_hidden, weight, bias, tw, tb, mask, output[2])
    ctx.opts = opts
    ctx.set_materialize_grads(False)


def _lin_backward(ctx, grad_div, *_):
    needs = ctx.needs_input_grad
    hidden, teacher_hidden, weight, bias, tw, tb, mask, stats = ctx.saved_tensors
    need = [needs[0], needs[2], needs[3] and bias is not None]
    if grad_div is None or not any(need):
        return (None,) * 13
    dh, dw, db = torch.ops.cepo_kernels.linear_divergence_bwd(
        hidden, teacher_hidden, weight, bias, tw, tb, mask, stats, grad_div.float().contiguous(), *ctx.opts,
        need)
    return (dh if need[0] else None, None, dw if need[1] else None, db if need[2] else None) + (None,) * 9


_lin_fwd_op.register_autograd(_lin_backward, setup_context=_lin_setup)
