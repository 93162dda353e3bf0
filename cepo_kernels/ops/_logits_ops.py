"""The logits kernels' launchers (ops/_logits_launch.py) as PyTorch custom operators, torch.ops.cepo_kernels:
token_logprobs, cepo_fwd, logprobs_bwd, logprobs_bwd_ (in place), cepo_advantages.

Each has the launcher as its real implementation (the config lookup, the backend check and Triton's launch run
there, never in a trace), a native CPU kernel (ops/_logits_cpu.py, the same arithmetic in PyTorch; Triton's
interpreter instead with CEPO_KERNELS_CPU=interpreter, `_common.cpu_backend`), a fake implementation (output
shapes, dtypes and strides: FakeTensorMode, meta tensors, torch.compile) and, for the differentiable ones,
registered autograd. docs/kernels.md, "Operators".
"""

import torch

from cepo_kernels._params import LossParams
from cepo_kernels.ops import _common, _logits_cpu, _logits_launch


def _launchers():
    """The launchers (read at call time, so that a test or bench/ may replace one)."""
    return _logits_launch


_LP_SCHEMA = "(Tensor logits, Tensor targets, float temperature, bool with_entropy, bool inplace)"
_BWD_ARGS = "Tensor targets, Tensor lse, Tensor ent, Tensor grad_lp, Tensor? grad_ent, float temperature"


def _rows(logits):
    return logits.shape[0] * logits.shape[1]


@torch.library.custom_op("cepo_kernels::token_logprobs", mutates_args=(),
                         schema=_LP_SCHEMA + " -> (Tensor, Tensor, Tensor)")
def _token_logprobs_op(logits, targets, temperature, with_entropy, inplace):
    """(logp, lse, entropy) [B*T] fp32 of [B, T, V] logits; entropy is [0] without with_entropy."""
    return _token_logprobs(_launchers(), logits, targets, temperature, with_entropy, inplace)


def _token_logprobs(launch, logits, targets, temperature, with_entropy, inplace):
    lp, lse, ent = launch.logprobs_fwd(logits, targets, temperature, with_entropy)
    return lp, lse, lse.new_empty(0) if ent is None else ent


_common.register_cpu(_token_logprobs_op, _token_logprobs, _launchers, _logits_cpu)


@_token_logprobs_op.register_fake
def _(logits, targets, temperature, with_entropy, inplace):
    n = _rows(logits)
    return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n if with_entropy else 0, dtype=torch.float32))


@torch.library.custom_op("cepo_kernels::logprobs_bwd", mutates_args=(),
                         schema=f"(Tensor logits, {_BWD_ARGS}) -> Tensor")
def _logprobs_bwd_op(logits, targets, lse, ent, grad_lp, grad_ent, temperature):
    return _logprobs_bwd(_launchers(), logits, targets, lse, ent, grad_lp, grad_ent, temperature)


def _logprobs_bwd(launch, logits, targets, lse, ent, grad_lp, grad_ent, temperature, inplace=False):
    return launch.logprobs_bwd(logits, targets, lse, ent, grad_lp, grad_ent, temperature, inplace=inplace)


_common.register_cpu(_logprobs_bwd_op, _logprobs_bwd, _launchers, _logits_cpu)


@_logprobs_bwd_op.register_fake
def _(logits, targets, lse, ent, grad_lp, grad_ent, temperature):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("cepo_kernels::logprobs_bwd_", mutates_args=("logits",),
                         schema=f"(Tensor(a!) logits, {_BWD_ARGS}) -> ()")
def _logprobs_bwd_inplace_op(logits, targets, lse, ent, grad_lp, grad_ent, temperature):
    """The in-place backward: dlogits overwrite the logits (the op bumps their version counter, so a later
    reader of the saved logits gets autograd's "modified by an inplace operation" error)."""
    _logprobs_bwd_inplace(_launchers(), logits, targets, lse, ent, grad_lp, grad_ent, temperature)


def _logprobs_bwd_inplace(launch, logits, targets, lse, ent, grad_lp, grad_ent, temperature):
    launch.logprobs_bwd(logits, targets, lse, ent, grad_lp, grad_ent, temperature, inplace=True)


_common.register_cpu(_logprobs_bwd_inplace_op, _logprobs_bwd_inplace, _launchers, _logits_cpu)


@_logprobs_bwd_inplace_op.register_fake
def _(logits, targets, lse, ent, grad_lp, grad_ent, temperature):
    return None


def _dlogits(logits, targets, lse, ent, grad_lp, grad_ent, temperature, inplace):
    if inplace:
        torch.ops.cepo_kernels.logprobs_bwd_(logits, targets, lse, ent, grad_lp, grad_ent, temperature)
        return logits
    return torch.ops.cepo_kernels.logprobs_bwd(logits, targets, lse, ent, grad_lp, grad_ent, temperature)


def _token_logprobs_setup(ctx, inputs, output):
    logits, targets, temperature, with_entropy, inplace = inputs
    _, lse, ent = output
    ctx.save_for_backward(logits, targets, lse, ent if with_entropy else lse)
    ctx.temperature, ctx.inplace, ctx.with_entropy = temperature, inplace, with_entropy
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no entropy term then


def _token_logprobs_backward(ctx, grad_lp, grad_lse, grad_ent):
    """lse is an internal output (saved for the backward), not differentiated."""
    logits, targets, lse, ent = ctx.saved_tensors
    grad_ent = grad_ent if ctx.with_entropy else None
    if grad_lp is None and grad_ent is None:
        return None, None, None, None, None
    grad_lp = torch.zeros_like(lse) if grad_lp is None else grad_lp.float().contiguous()
    grad_ent = None if grad_ent is None else grad_ent.float().contiguous()
    d = _dlogits(logits, targets, lse, ent, grad_lp, grad_ent, ctx.temperature, ctx.inplace)
    return d, None, None, None, None


_token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)

_CEPO_SCHEMA = ("(Tensor logits, Tensor targets, Tensor adv, Tensor mask, Tensor? old_logp, "
                "Tensor? pos_logits, Tensor? neg_logits, Tensor? pos_logp, Tensor? neg_logp, "
                "float temperature, float lam, float eps_w, float eps_low, float eps_high, float? clip_dual, "
                "bool inplace) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("cepo_kernels::cepo_fwd", mutates_args=(), schema=_CEPO_SCHEMA)
def _cepo_fwd_op(logits, targets, adv, mask, old_logp, pos_logits, neg_logits, pos_logp, neg_logp,
                 temperature, lam, eps_w, eps_low, eps_high, clip_dual, inplace):
    """(per-token loss, logp, lse, A_hat, coef, Delta) [B*T] fp32; Delta is [0] without teachers; logp and lse
    are 0 at masked rows (not read)."""
    return _cepo_fwd(_launchers(), logits, targets, adv, mask, old_logp, pos_logits, neg_logits, pos_logp,
                     neg_logp, temperature, lam, eps_w, eps_low, eps_high, clip_dual, inplace)


def _cepo_fwd(launch, logits, targets, adv, mask, old_logp, pos_logits, neg_logits, pos_logp, neg_logp,
              temperature, lam, eps_w, eps_low, eps_high, clip_dual, inplace):
    params = LossParams(lam=lam, eps_w=eps_w, eps_low=eps_low, eps_high=eps_high, clip_dual=clip_dual,
                        temperature=temperature)
    lp, lse, a_hat, loss, coef, delta = launch.cepo_fwd(
        logits, targets, adv, mask, params, old_logp=old_logp, pos_logits=pos_logits, neg_logits=neg_logits,
        pos_logp=pos_logp, neg_logp=neg_logp)
    return loss, lp, lse, a_hat, coef, lse.new_empty(0) if delta is None else delta


_common.register_cpu(_cepo_fwd_op, _cepo_fwd, _launchers, _logits_cpu)


@_cepo_fwd_op.register_fake
def _(logits, targets, adv, mask, old_logp, pos_logits, neg_logits, pos_logp, neg_logp, *args):
    n = _rows(logits)
    teachers = pos_logits is not None or pos_logp is not None
    out = [logits.new_empty(n, dtype=torch.float32) for _ in range(5)]
    return (*out, logits.new_empty(n if teachers else 0, dtype=torch.float32))


def _cepo_setup(ctx, inputs, output):
    _, _, lse, _, coef, _ = output
    ctx.save_for_backward(inputs[0], inputs[1], lse, coef, inputs[3])
    ctx.temperature, ctx.inplace = inputs[9], inputs[15]
    ctx.set_materialize_grads(False)


def _cepo_backward(ctx, grad_loss, grad_lp, *_):
    """dL/dlogits from dL/dL_t (dL_t/dlp = coef) and, if used, dL/dlogp; the other outputs are constants."""
    logits, targets, lse, coef, mask = ctx.saved_tensors
    g = None if grad_loss is None else grad_loss.float() * coef
    if grad_lp is not None:  # logp is the constant 0 at masked rows
        g_lp = torch.where(mask != 0, grad_lp.float(), 0.0)
        g = g_lp if g is None else g + g_lp
    if g is None:
        return (None,) * 16
    d = _dlogits(logits, targets, lse, lse, g.contiguous(), None, ctx.temperature, ctx.inplace)
    return (d,) + (None,) * 15


_cepo_fwd_op.register_autograd(_cepo_backward, setup_context=_cepo_setup)


@torch.library.custom_op("cepo_kernels::cepo_advantages", mutates_args=(),
                         schema="(Tensor adv, Tensor pos_logp, Tensor neg_logp, Tensor mask, float lam, "
                                "float eps_w) -> Tensor")
def _cepo_advantages_op(adv, pos_logp, neg_logp, mask, lam, eps_w):
    return _cepo_advantages(_launchers(), adv, pos_logp, neg_logp, mask, lam, eps_w)


def _cepo_advantages(launch, adv, pos_logp, neg_logp, mask, lam, eps_w):
    return launch.cepo_advantages_fwd(adv, pos_logp, neg_logp, mask, lam, eps_w)


_common.register_cpu(_cepo_advantages_op, _cepo_advantages, _launchers, _logits_cpu)


@_cepo_advantages_op.register_fake
def _(adv, pos_logp, neg_logp, mask, lam, eps_w):
    return adv.new_empty(adv.numel(), dtype=torch.float32)
