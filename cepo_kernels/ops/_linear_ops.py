"""The linear kernels' launchers (ops/_linear_launch.py) as PyTorch custom operators, torch.ops.cepo_kernels:
linear_scores, token_loss, linear_bwd.

Each has the launcher as its real implementation (Triton's launch runs there, never in a trace), a native CPU
kernel (ops/_linear_cpu.py, the same arithmetic in PyTorch; Triton's interpreter instead with
CEPO_KERNELS_CPU=interpreter, `_common.cpu_backend`), a fake
implementation (output shapes, dtypes and strides: FakeTensorMode, meta tensors, torch.compile; the launchers'
temporaries reported to bench/memory_fake.py) and, for the differentiable ones, registered autograd.
docs/kernels.md, "Operators".
"""

import os

import torch
import triton

from cepo_kernels._params import LossParams
from cepo_kernels.ops import _common, _linear_cpu, _linear_launch
from cepo_kernels.ops._linear_launch import _FWD_CONFIG, _G_CONFIG, _MAX_BUDGET, _chunks, _splits, _width


def _launchers():
    """The launchers (read at call time, so that a test or bench/ may replace one)."""
    return _linear_launch


@torch.library.custom_op(
    "cepo_kernels::linear_scores", mutates_args=(),
    schema="(Tensor hidden, Tensor[] teachers, Tensor weight, Tensor? bias, Tensor targets, Tensor? rows, "
           "Tensor? count, int rows_from, float temperature, bool entropy_grad) -> Tensor")
def _linear_scores_op(hidden, teachers, weight, bias, targets, rows, count, rows_from, temperature,
                      entropy_grad):
    """[3, S, N] (lse, logp, entropy) of the sources [hidden, *teachers]; differentiable through source 0's
    logp (and its entropy with entropy_grad) w.r.t. hidden, weight and bias."""
    return _linear_scores(_launchers(), hidden, teachers, weight, bias, targets, rows, count, rows_from,
                          temperature, entropy_grad)


def _linear_scores(launch, hidden, teachers, weight, bias, targets, rows, count, rows_from, temperature,
                   entropy_grad):
    return launch.linear_scores([hidden, *teachers], weight, bias, targets, rows, count, rows_from=rows_from,
                                temperature=temperature)


_common.register_cpu(_linear_scores_op, _linear_scores, _launchers, _linear_cpu)


@_linear_scores_op.register_fake
def _(hidden, teachers, weight, bias, targets, rows, count, rows_from, temperature, entropy_grad):
    S, N, V = 1 + len(teachers), hidden.shape[0], weight.shape[0]
    P = N if rows is None else rows.shape[0]
    if all(isinstance(d, int) for d in (N, V, P)) and P:  # the split stats and target logits, on a GPU
        _, n_split, _ = _splits(S, P, V, _FWD_CONFIG[32 if weight.dtype == torch.float32 else 16], False)
        _common.report_workspace(4 * S * P * (3 * n_split + 1))
    return hidden.new_empty((3, S, N), dtype=torch.float32)


def _scores_setup(ctx, inputs, output):
    hidden, _, weight, bias, targets, _, _, _, temperature, entropy_grad = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[0, 0], output[2, 0])
    ctx.temperature, ctx.entropy_grad, ctx.n_teachers = temperature, entropy_grad, len(inputs[1])
    ctx.set_materialize_grads(False)


def _scores_backward(ctx, grad):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    needs = ctx.needs_input_grad
    none_t = [None] * ctx.n_teachers  # the teachers are constants
    if grad is None or not (needs[0] or needs[2] or needs[3]):
        return (None, none_t) + (None,) * 8
    g_ent = grad[2, 0].float().contiguous() if ctx.entropy_grad else None
    dh, dw, db = torch.ops.cepo_kernels.linear_bwd(
        hidden, weight, bias, targets, lse, grad[1, 0].float().contiguous(),
        ent if ctx.entropy_grad else None, g_ent, ctx.temperature, needs[0], needs[2],
        needs[3] and bias is not None)
    return (dh if needs[0] else None, none_t, dw if needs[2] else None,
            db if needs[3] and bias is not None else None) + (None,) * 6


_linear_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup)


@torch.library.custom_op(
    "cepo_kernels::token_loss", mutates_args=(),
    schema="(Tensor logp, Tensor? old, Tensor adv, Tensor? pos, Tensor? neg, Tensor mask, float lam, "
           "float eps_w, float eps_low, float eps_high, float? clip_dual) "
           "-> (Tensor, Tensor, Tensor, Tensor)")
def _token_loss_op(logp, old, adv, pos, neg, mask, lam, eps_w, eps_low, eps_high, clip_dual):
    """(per-token loss, A_hat, coef = dL_t/dlogp, Delta) [N] fp32 from per-token log-probs."""
    return _token_loss(_launchers(), logp, old, adv, pos, neg, mask, lam, eps_w, eps_low, eps_high, clip_dual)


def _token_loss(launch, logp, old, adv, pos, neg, mask, lam, eps_w, eps_low, eps_high, clip_dual):
    params = LossParams(lam=lam, eps_w=eps_w, eps_low=eps_low, eps_high=eps_high, clip_dual=clip_dual)
    a_hat, loss, coef, delta = launch.token_fwd(logp, old, adv, pos, neg, mask, params)
    return loss, a_hat, coef, delta


_common.register_cpu(_token_loss_op, _token_loss, _launchers, _linear_cpu)


@_token_loss_op.register_fake
def _(logp, *args):
    return tuple(logp.new_empty(logp.shape, dtype=torch.float32) for _ in range(4))


def _token_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.set_materialize_grads(False)


def _token_loss_backward(ctx, grad_loss, *_):
    """dL/dlogp = dL/dL_t * coef; A_hat, coef and Delta are constants, the teachers' log-probs get none."""
    (coef,) = ctx.saved_tensors
    return (None if grad_loss is None else grad_loss.float() * coef,) + (None,) * 10


_token_loss_op.register_autograd(_token_loss_backward, setup_context=_token_loss_setup)


@torch.library.custom_op(
    "cepo_kernels::linear_bwd", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, Tensor g_lp, "
           "Tensor? ent, Tensor? g_ent, float temperature, bool need_h, bool need_w, bool need_b) "
           "-> (Tensor, Tensor, Tensor)")
def _linear_bwd_op(hidden, weight, bias, targets, lse, g_lp, ent, g_ent, temperature, need_h, need_w, need_b):
    """linear_bwd as an operator: (grad_hidden, grad_weight, grad_bias), [0] for each one not needed."""
    return _linear_bwd(_launchers(), hidden, weight, bias, targets, lse, g_lp, ent, g_ent, temperature,
                       need_h, need_w, need_b)


def _linear_bwd(launch, hidden, weight, bias, targets, lse, g_lp, ent, g_ent, temperature, need_h, need_w,
                need_b):
    grads = launch.linear_bwd(hidden, weight, bias, targets, lse, g_lp, ent, g_ent, temperature=temperature,
                              needs=(need_h, need_w, need_b))
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


_common.register_cpu(_linear_bwd_op, _linear_bwd, _launchers, _linear_cpu)


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
