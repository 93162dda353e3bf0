"""Fused linear path: log-probs and the CEPO/GRPO loss from hidden states + lm_head, logits never stored.

Forward: `_linear_fwd_kernel` tiles z = hidden @ weight^T with the rows (tokens) on the MMA's M axis and the
vocabulary on N, so the online logsumexp of a row reduces within a warp; the target logit is the dot
hidden . weight[y]. Up to three row sources (policy, positive and negative teacher) run in one launch as
separate 128-row blocks, the blocks of the same rows adjacent in a grouped (L2-aware) program order so they
read each weight tile while it is in L2. Teacher rows are scored only where needed (a device-side list and
count: no host sync). Each vocabulary split writes partial (max, sum, entropy sum) stats and
`_linear_combine_kernel` combines them in a fixed order; `_linear_token_fwd_kernel` then applies `cepo_token`.
The kernels: ops/_linear_kernels.py. Backward (linear_bwd.py) recomputes the logits from the saved fp32 lse,
only on rows with a non-zero gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from cepo_kernels._params import (
    LossParams,
    check_kernel_dtype,
    check_linear,
    check_loss_inputs,
    check_temperature,
    check_tensor,
    resolve_lam,
)
from cepo_kernels.ops import _common
from cepo_kernels.ops._common import check_metrics_option, interpreted, loss_output
from cepo_kernels.ops._linear_kernels import (
    _linear_combine_kernel,
    _linear_fwd_kernel,
    _linear_token_fwd_kernel,
)
from cepo_kernels.ops.linear_bwd import active_rows, dot_precision, upcast_dot

# per operand width: 16-bit dots run on the tensor cores (wgmma m64n128); fp32 IEEE dots run on the FMA
# units, whose operand fragments need smaller tiles to stay spill-free (docs/compile/linear-sm90.md)
_FWD_CONFIG = {
    16: dict(BLOCK_M=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    32: dict(BLOCK_M=128, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=2),
}
_FWD_PROGRAMS = 1024  # split the vocabulary until about this many programs run (small batches fill the GPU)
_INTERPRET_SPLITS = 2  # on a CPU (interpreter) programs cost time, not parallelism; 2 splits still combine
_GROUP = 16  # row blocks per group of the L2-aware order (the sources of the same rows are adjacent)
_COMBINE_BLOCK = 256
_TOKEN_BLOCK = 1024


class Scored(NamedTuple):
    """Per-row results of linear_fwd, each [S, N] fp32 (S row sources); 0 at rows a source did not score."""

    lse: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor


def linear_fwd(sources, weight, bias, targets, rows=None, count=None, *, rows_from=0, temperature=1.0):
    """Scored(lse, logp, entropy), the [3, S, N] result of linear_scores unbound."""
    return Scored(*linear_scores(sources, weight, bias, targets, rows, count, rows_from=rows_from,
                                 temperature=temperature))


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
    n_vrb, n_split, tiles_per_split = _splits(S, P, V, cfg, interpreted())
    stats = _common.alloc((S, 3, n_split, P), torch.float32, dev)
    tgt = _common.alloc((S, P), torch.float32, dev)
    h = list(sources) + [sources[0]] * (3 - S)
    _linear_fwd_kernel[(n_vrb * n_split,)](
        h[0], h[1], h[2], weight, bias, targets, rows, count, stats, tgt, P, V, H, n_split, tiles_per_split,
        1.0 / temperature, h[0].stride(0), h[1].stride(0), h[2].stride(0), weight.stride(0),
        0 if bias is None else bias.stride(0), targets.stride(0), *stats.stride()[:3], N_SRC=S,
        ROWS_FROM=rows_from, UPCAST_DOT=upcast_dot(weight.dtype), PRECISION=dot_precision(weight.dtype),
        GROUP=_GROUP, **cfg)
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


# ---- the custom operators torch.ops.cepo_kernels.linear_scores / token_loss (linear_bwd: in linear_bwd.py):
# the launchers as real implementation, fake output shapes, the autograd formulas. docs/kernels.md, Operators.
@torch.library.custom_op(
    "cepo_kernels::linear_scores", mutates_args=(),
    schema="(Tensor hidden, Tensor[] teachers, Tensor weight, Tensor? bias, Tensor targets, Tensor? rows, "
           "Tensor? count, int rows_from, float temperature, bool entropy_grad) -> Tensor")
def _linear_scores_op(hidden, teachers, weight, bias, targets, rows, count, rows_from, temperature,
                      entropy_grad):
    """[3, S, N] (lse, logp, entropy) of the sources [hidden, *teachers]; differentiable through source 0's
    logp (and its entropy with entropy_grad) w.r.t. hidden, weight and bias."""
    return linear_scores([hidden, *teachers], weight, bias, targets, rows, count, rows_from=rows_from,
                         temperature=temperature)


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
    params = LossParams(lam=lam, eps_w=eps_w, eps_low=eps_low, eps_high=eps_high, clip_dual=clip_dual)
    a_hat, loss, coef, delta = token_fwd(logp, old, adv, pos, neg, mask, params)
    return loss, a_hat, coef, delta


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


def _scores(sources, weight, bias, targets, rows=None, count=None, *, rows_from=0, temperature=1.0,
            entropy_grad=False):
    """Scored(lse, logp, entropy) through the operator (what the public functions trace)."""
    out = torch.ops.cepo_kernels.linear_scores(sources[0], list(sources[1:]), weight, bias, targets, rows,
                                               count, rows_from, float(temperature), entropy_grad)
    return Scored(*out)


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
        hidden: [..., H] fp32/bf16/fp16 (float64 raises TypeError: use cepo_ref), the same dtype as weight.
        weight: [V, H] the lm_head weight. bias: [V] or None.
        targets: [...] integer token ids. A negative id (Hugging Face's -100) gives logp = 0 with no
            gradient (the entropy as usual); an id >= V gives a NaN log-prob (no out-of-bounds read).
        temperature: > 0; the logits are divided by it before the softmax.
        return_entropy: also return the entropy of the tempered distribution.
    Returns:
        logp [...] fp32 (and entropy [...] fp32 with return_entropy); both differentiable w.r.t. hidden,
        weight and bias.
    """
    check_linear(hidden, weight, bias)
    check_kernel_dtype("hidden", hidden)
    check_tensor("targets", targets, dtypes="int", shape=hidden.shape[:-1], device=hidden.device)
    check_temperature(temperature)
    lead = hidden.shape[:-1]
    sc = _scores([_rows2d(hidden)], _lastdim(weight), bias, targets.reshape(-1), temperature=temperature,
                 entropy_grad=bool(return_entropy))
    logp, ent = sc.logp[0].reshape(lead), sc.entropy[0].reshape(lead)
    return (logp, ent) if return_entropy else logp


def linear_cepo_loss(hidden, weight, targets, advantages, mask, *, old_logp=None, pos_hidden=None,
                     neg_hidden=None, pos_logp=None, neg_logp=None, bias=None, lam=None, eps_w=0.2,
                     eps_low=0.2, eps_high=0.28, clip_dual=3.0, temperature=1.0, reduction="token-mean",
                     num_tokens=None, metrics=True):
    """The CEPO loss (as cepo_loss) from hidden states and the lm_head, logits never materialised.

    Args:
        hidden: [B, T, H] or [N, H] policy hidden states, fp32/bf16/fp16 (float64 raises TypeError), the
            weight's dtype; weight [V, H]; bias [V]/None.
        targets: [B, T] / [N] integer; a negative id (-100) counts as masked, an id >= V at an unmasked
            position gives a NaN loss (as cepo_loss). advantages: [B] (per sequence) or [B, T] / [N] float.
        mask: [B, T] / [N] bool or 0/1. old_logp: [B, T] / [N] float, or None (on-policy: ratio 1).
        pos_hidden, neg_hidden: teacher hidden states shaped like hidden (no gradient; scored with the same
            weight in the same launch as the policy rows, only where mask and advantage != 0), or
        pos_logp, neg_logp: the teachers' log-probs [B, T] / [N]. Each teacher independently; both or none
            (RLSD: pos_hidden and neg_logp = the old student log-probs).
        lam, eps_w, eps_low, eps_high, clip_dual, temperature, reduction, num_tokens, metrics: as cepo_loss
            (metrics="tensor" keeps them on the device: no host sync).
    Returns:
        CEPOOutput(loss, logp, advantages=A_hat, metrics). loss is differentiable w.r.t. hidden, weight and
        bias; logp and A_hat fp32 detached, shaped like targets. Metric delta_* statistics count the rows
        whose teachers were scored (Delta = 0 elsewhere).
    """
    check_metrics_option(metrics)
    check_linear(hidden, weight, bias)
    check_kernel_dtype("hidden", hidden)
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

    tgt, adv, msk = flat(b.targets), flat(b.advantages), flat(b.mask)
    teacher_h = [t for t in (pos_h, neg_h) if t is not None]
    rows = count = None
    if teacher_h:  # docs/method.md §4: rows with A = 0 (or masked) get A_hat = 0, teachers not scored
        rows, count = active_rows(msk & (adv != 0))
    sc = _scores([_rows2d(hidden), *teacher_h], _lastdim(weight), bias, tgt, rows, count, rows_from=1,
                 temperature=temperature)
    it = iter(sc.logp[1:].detach())
    pos = next(it) if pos_h is not None else flat(b.pos_logp)
    neg = next(it) if neg_h is not None else flat(b.neg_logp)
    lp = sc.logp[0]
    loss_tok, a_hat, _, delta = torch.ops.cepo_kernels.token_loss(lp, flat(b.old_logp), adv, pos, neg, msk,
                                                                  p.lam, p.eps_w, p.eps_low, p.eps_high,
                                                                  p.clip_dual)
    B, T = b.B, b.T
    lp, a_hat, delta = (x.detach().reshape(B, T) for x in (lp, a_hat, delta))
    loss_tok = loss_tok.reshape(B, T)
    has_teachers = pos_h is not None or neg_h is not None or b.pos_logp is not None
    return loss_output(loss_tok, lp, a_hat, delta if has_teachers else None, b, p, num_tokens, metrics)


def linear_grpo_loss(hidden, weight, targets, advantages, mask, *, old_logp=None, bias=None, eps_low=0.2,
                     eps_high=0.28, clip_dual=3.0, temperature=1.0, reduction="token-mean", num_tokens=None,
                     metrics=True):
    """linear_cepo_loss without teachers (A_hat = A): the PPO-clip GRPO loss from hidden states.

    Args and Returns: as linear_cepo_loss.
    """
    return linear_cepo_loss(hidden, weight, targets, advantages, mask, old_logp=old_logp, bias=bias,
                            eps_low=eps_low, eps_high=eps_high, clip_dual=clip_dual, temperature=temperature,
                            reduction=reduction, num_tokens=num_tokens, metrics=metrics)


@torch.no_grad()
def linear_teacher_logprobs(pos_hidden, neg_hidden, weight, targets, *, bias=None, temperature=1.0,
                            rows=None):
    """Both teachers' log-probs in one launch (each weight tile loaded once for both); no gradient.

    Args:
        pos_hidden, neg_hidden: [..., H] teacher hidden states of the same shape (cast to the weight's dtype);
            either may be None (e.g. RLSD scores only the positive teacher).
        weight: [V, H]; bias: [V] or None; targets: [...] integer (a negative id gives 0.0, an id >= V NaN);
            temperature: > 0 (the rollout's).
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
    check_kernel_dtype("weight", weight)
    check_tensor("targets", targets, dtypes="int", shape=first.shape[:-1], device=first.device)
    check_temperature(temperature)
    lead = first.shape[:-1]
    N = targets.numel()
    count = None
    if rows is not None:
        check_tensor("rows", rows, device=first.device)
        if rows.dtype == torch.bool:
            check_tensor("rows", rows, shape=lead)
            rows, count = active_rows(rows.reshape(-1))  # no host sync
        elif rows.is_floating_point() or rows.is_complex() or rows.dim() != 1:
            raise TypeError(f"rows: expected a bool mask of shape {tuple(lead)} or a 1-D integer index "
                            f"tensor, got dtype {rows.dtype} and shape {tuple(rows.shape)}")
        else:
            rows = rows.long().contiguous()
            if rows.numel() and not bool(((rows >= 0) & (rows < N)).all()):  # a check of explicit indices
                raise ValueError(f"rows: expected indices in [0, {N}), got values outside")
            count = torch.full((1,), rows.numel(), dtype=torch.int32, device=rows.device)
    srcs = [_rows2d(t.detach().to(weight.dtype)) for _, t in given]
    out = _scores(srcs, _lastdim(weight.detach()), None if bias is None else bias.detach(),
                  targets.reshape(-1), rows, count, temperature=temperature).logp
    it = iter(out.reshape(len(srcs), *lead))
    return tuple(next(it) if t is not None else None for t in (pos_hidden, neg_hidden))
