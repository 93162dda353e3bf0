"""The public boundary shared by every entry point: options, the output type and the input checks.

Nothing here computes the method; it only validates and normalises what callers pass, so that the
kernels and the reference (cepo_ref) reject the same bad input with the same message.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # logits / hidden states the kernels read
LOG_RATIO_CLAMP = 20.0


class CEPOOutput(NamedTuple):
    """What every loss returns.

    loss:       scalar (or [B, T] / [N] with reduction="none"), differentiable w.r.t. the policy inputs.
    logp:       [B, T] (or [N]) fp32 policy log-probs of the targets, detached.
    advantages: [B, T] (or [N]) fp32 A_hat (the reweighted advantage, zero at masked tokens), detached.
    metrics:    dict of Python floats (see README, "Metrics").
    """

    loss: torch.Tensor
    logp: torch.Tensor
    advantages: torch.Tensor
    metrics: dict


@dataclass(frozen=True)
class LossParams:
    """Non-tensor options of the CEPO/GRPO losses, validated once. Numbers may be given as Python or numpy
    scalars or one-element tensors; they are stored as Python floats. lam=None means "unset": the
    losses resolve it with resolve_lam (0.5 with teachers, 0 without)."""

    lam: float | None = 0.5
    eps_w: float = 0.2
    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_dual: float | None = 3.0
    temperature: float = 1.0
    reduction: str = "token-mean"

    def __post_init__(self):
        for f in ("lam", "eps_w", "eps_low", "eps_high", "clip_dual", "temperature"):
            if getattr(self, f) is not None:
                object.__setattr__(self, f, as_float(f, getattr(self, f)))
        if self.lam is not None:
            check_number("lam", self.lam, lo=0.0, hi=1.0)
        check_number("eps_w", self.eps_w, lo=0.0, hi=1.0, hi_open=True)
        check_number("eps_low", self.eps_low, lo=0.0, hi=1.0, hi_open=True)
        check_number("eps_high", self.eps_high, lo=0.0)
        check_temperature(self.temperature)
        if self.clip_dual is not None:
            check_number("clip_dual", self.clip_dual)
            if not self.clip_dual > 1.0 + self.eps_high:
                raise ValueError(
                    f"clip_dual: expected None or a number > 1 + eps_high = {1.0 + self.eps_high}, "
                    f"got {self.clip_dual}"
                )
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {self.reduction!r}")


def resolve_lam(params: LossParams, has_teachers: bool) -> LossParams:
    """lam of a loss call: unset -> 0.5 with teachers, 0 (GRPO) without; a non-zero lam without teachers is
    an error rather than a silent GRPO run."""
    if params.lam is None:
        return dataclasses.replace(params, lam=0.5 if has_teachers else 0.0)
    if not has_teachers and params.lam != 0.0:
        raise ValueError(
            f"lam: {params.lam} given without teachers; CEPO's reweighting needs both teachers "
            "(pos_logits/pos_hidden/pos_logp and neg_logits/neg_hidden/neg_logp): pass them, or use "
            "grpo_loss (or lam=0) for plain GRPO"
        )
    return params


def as_float(name, value) -> float:
    """A Python float from a Python/numpy real number or a one-element real tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name}: expected a number or a one-element real tensor, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        return float(value.reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    return float(value)


def check_number(name, value, lo=None, hi=None, hi_open=False):
    value = as_float(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if lo is not None and value < lo:
        raise ValueError(f"{name}: expected a value >= {lo}, got {value}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name}: expected a value {'<' if hi_open else '<='} {hi}, got {value}")


def check_temperature(temperature):
    check_number("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature: expected a value > 0, got {temperature}")


def check_tensor(name, t, *, dtypes=None, shape=None, device=None, ndim=None):
    """Type, dtype, shape and device check of one tensor argument, with a message naming it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"{name}: device 'meta' is not supported (the values are needed: use a CUDA or a "
                         "CPU tensor)")
    if dtypes == "float" and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if dtypes == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor (int64), got dtype {t.dtype}")
    if isinstance(dtypes, tuple) and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {dtypes}, got {t.dtype}")
    if ndim is not None and t.dim() not in ndim:
        expected = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like the first input), got {t.device}")


def check_kernel_dtype(name, t):
    """The kernels read logits and hidden states as fp32, bf16 or fp16 (fp32 accumulation); float64 is
    refused rather than silently computed in fp32 (the reference, cepo_ref, accepts it)."""
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16 (the kernels compute in fp32; "
                        f"cast with .float(), or use cepo_ref for float64), got {t.dtype}")


def check_logits_and_targets(logits, targets, name="logits"):
    """logits [..., V] float, targets [...] integer on the same device."""
    check_tensor(name, logits, dtypes="float")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    check_tensor("targets", targets, dtypes="int", shape=logits.shape[:-1], device=logits.device)


def check_linear(hidden, weight, bias, name="hidden"):
    """hidden [..., H] and weight [V, H] of the same float dtype; bias [V] or None."""
    check_tensor(name, hidden, dtypes="float")
    check_tensor("weight", weight, dtypes="float", ndim=(2,), device=hidden.device)
    if weight.shape[0] == 0:
        raise ValueError(f"weight: expected shape [V, H] with V >= 1, got {tuple(weight.shape)}")
    if hidden.dim() >= 1 and hidden.shape[-1] == 0:
        raise ValueError(f"{name}: expected a hidden size >= 1, got shape {tuple(hidden.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: expected shape [..., H] with H = weight.shape[1] = {weight.shape[1]}, "
            f"got {tuple(hidden.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"{name} and weight: expected the same dtype (the matmul runs in one dtype with fp32 "
            "accumulation; cast one of them, e.g. hidden.to(weight.dtype)), "
            f"got {hidden.dtype} and {weight.dtype}"
        )
    if bias is not None:
        check_tensor("bias", bias, dtypes="float", shape=(weight.shape[0],), device=hidden.device)


def check_mask(mask, shape, device):
    """mask: bool, or numeric with values in {0, 1}. Returns a bool tensor."""
    check_tensor("mask", mask, shape=shape, device=device)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"mask: expected a bool or 0/1 tensor, got dtype {mask.dtype}")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask: expected a bool tensor or values in {0, 1}, got other values")
    return mask != 0


class Batch(NamedTuple):
    """Loss inputs normalised to [B, T] (a flattened [N] input is one sequence: B = 1, T = N)."""

    B: int
    T: int
    flat: bool
    targets: torch.Tensor  # [B, T] int64
    advantages: torch.Tensor  # [B, T] fp32 (per-sequence advantages broadcast along T)
    mask: torch.Tensor  # [B, T] bool
    old_logp: torch.Tensor | None  # [B, T] fp32
    pos_logp: torch.Tensor | None  # [B, T] fp32, detached
    neg_logp: torch.Tensor | None  # [B, T] fp32, detached


def check_loss_inputs(lead, device, targets, advantages, mask, *, old_logp=None, pos=None, neg=None,
                      pos_logp=None, neg_logp=None, num_tokens=None, reduction="token-mean",
                      teacher_names=("pos_logits", "neg_logits"), float_dtype=torch.float32):
    """Checks the per-token inputs of a loss against the policy's leading shape `lead` ([B, T] or [N]).

    pos / neg are the teachers given as full inputs (logits or hidden states), checked by the caller;
    here only the rule "each teacher exactly once, both or neither" is enforced. Float inputs come back
    as float_dtype (fp32 for the kernels; the reference passes fp64 for fp64 inputs).
    """
    lead = tuple(lead)
    if len(lead) not in (1, 2):
        raise ValueError(f"logits/hidden: expected [B, T, ...] or [N, ...] inputs, got leading shape {lead}")
    check_tensor("targets", targets, dtypes="int", shape=lead, device=device)
    flat = len(lead) == 1
    B, T = (1, lead[0]) if flat else lead
    check_tensor("advantages", advantages, dtypes="float", device=device)
    if tuple(advantages.shape) == lead:
        adv = advantages
    elif not flat and tuple(advantages.shape) == (B,):
        adv = advantages[:, None].expand(B, T)
    else:
        allowed = f"{lead}" if flat else f"({B},) or {lead}"
        raise ValueError(f"advantages: expected shape {allowed}, got {tuple(advantages.shape)}")
    # a negative target id (Hugging Face's -100) counts as masked, as in F.cross_entropy(ignore_index=-100):
    # an elementwise AND on the device, no host sync
    mask_b = check_mask(mask, lead, device) & (targets >= 0)
    if old_logp is not None:
        check_tensor("old_logp", old_logp, dtypes="float", shape=lead, device=device)
    for name, full, lp in ((teacher_names[0], pos, pos_logp), (teacher_names[1], neg, neg_logp)):
        lp_name = name.split("_")[0] + "_logp"
        if full is not None and lp is not None:
            raise ValueError(f"{name} and {lp_name}: expected at most one of them, got both")
        if lp is not None:
            check_tensor(lp_name, lp, dtypes="float", shape=lead, device=device)
    has_pos = pos is not None or pos_logp is not None
    has_neg = neg is not None or neg_logp is not None
    if has_pos != has_neg:
        raise ValueError(
            "teachers: expected both the positive and the negative teacher (pos_* and neg_*) or neither, "
            f"got only the {'positive' if has_pos else 'negative'} one"
        )
    if num_tokens is not None:
        if reduction != "token-mean":
            raise ValueError(
                f"num_tokens: only used with reduction='token-mean', got reduction={reduction!r}"
            )
        if isinstance(num_tokens, torch.Tensor):  # used as given on the device (token_mean_scale)
            if num_tokens.numel() != 1:
                raise ValueError(f"num_tokens: expected a number or a 1-element tensor, got shape "
                                 f"{tuple(num_tokens.shape)}")
            if num_tokens.dtype == torch.bool or num_tokens.is_complex():
                raise TypeError(f"num_tokens: expected a real tensor, got dtype {num_tokens.dtype}")
        else:
            check_number("num_tokens", num_tokens)
            if not as_float("num_tokens", num_tokens) > 0:
                raise ValueError(
                    "num_tokens: expected a positive count (the valid tokens of the whole "
                    f"gradient-accumulation batch), got {num_tokens}"
                )

    def as2d(t):
        return None if t is None else t.reshape(B, T)

    return Batch(
        B, T, flat,
        targets.reshape(B, T).long(),
        adv.reshape(B, T).to(float_dtype),
        mask_b.reshape(B, T),
        None if old_logp is None else as2d(old_logp).to(float_dtype),
        None if pos_logp is None else as2d(pos_logp).detach().to(float_dtype),
        None if neg_logp is None else as2d(neg_logp).detach().to(float_dtype),
    )


def check_logits_loss(logits, targets, advantages, mask, *, old_logp, pos_logits, neg_logits, pos_logp,
                      neg_logp, num_tokens, float_dtype=torch.float32, **options):
    """All checks of cepo_loss: returns (LossParams, Batch). options: the LossParams fields."""
    check_logits_and_targets(logits, targets)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected [B, T, V] or [N, V], got shape {tuple(logits.shape)}")
    has_teachers = any(t is not None for t in (pos_logits, neg_logits, pos_logp, neg_logp))
    params = resolve_lam(LossParams(**options), has_teachers)
    for name, t in (("pos_logits", pos_logits), ("neg_logits", neg_logits)):
        if t is not None:
            check_tensor(name, t, dtypes="float", shape=logits.shape, device=logits.device)
    batch = check_loss_inputs(logits.shape[:-1], logits.device, targets, advantages, mask,
                              old_logp=old_logp, pos=pos_logits, neg=neg_logits, pos_logp=pos_logp,
                              neg_logp=neg_logp, num_tokens=num_tokens, reduction=params.reduction,
                              float_dtype=float_dtype)
    return params, batch


def token_mean_scale(num_tokens, n_valid, dtype=torch.float32):
    """The token-mean factor 1 / d, with d = num_tokens when given (gradient accumulation), else the valid
    count n_valid (a 0-dim tensor). docs/method.md §5 (reductions).

    A number num_tokens (checked > 0 by check_loss_inputs) is used as given: 0.5 doubles the sum.
    A tensor d (n_valid, or num_tokens given as a tensor) is used as given on the device, with no host
    sync: d = 0 means "no valid tokens" and gives the factor 0 (a zero loss and gradient, not NaN);
    a negative or NaN tensor num_tokens gives NaN (a NaN loss: visible, not silently clamped).
    Returns a Python float for a number, else a 0-dim tensor of `dtype`.
    """
    if num_tokens is not None and not isinstance(num_tokens, torch.Tensor):
        return 1.0 / float(num_tokens)
    d = (n_valid if num_tokens is None else num_tokens).double().reshape(())
    return torch.where(d > 0, 1.0 / d, torch.where(d == 0, 0.0, float("nan"))).to(dtype)


def reduction_weights(mask, reduction, num_tokens=None):
    """Per-token weights W [B, T] fp32 such that the reduced loss is sum(W * L) (not used for "none").

    token-mean:              mask / (num_tokens or number of valid tokens)
    seq-mean-token-mean:     mask / (valid tokens of the sequence) / B  (an empty sequence contributes 0)
    seq-mean-token-sum-norm: mask / (B * T)
    sum:                     mask
    """
    m = mask.float()
    B, T = mask.shape
    if reduction == "token-mean":
        return m * token_mean_scale(num_tokens, m.sum())
    if reduction == "seq-mean-token-mean":
        return m / m.sum(dim=1, keepdim=True).clamp_min(1.0) / max(B, 1)
    if reduction == "seq-mean-token-sum-norm":
        return m / max(B * T, 1)
    if reduction in ("sum", "none"):
        return m
    raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


# ---- self-distillation divergence (OPSD, SDPO): docs/divergence.md
TOPK_FROM = ("student", "teacher")


class DivergenceOutput(NamedTuple):
    """What divergence_loss / linear_divergence_loss return.

    loss:      scalar (or [B, T] / [N] with reduction="none"), differentiable w.r.t. the student only.
    per_token: [B, T] (or [N]) fp32 D_t times the importance weight (when given), 0 at masked tokens,
               detached.
    metrics:   dict of Python floats (or 0-dim tensors with metrics="tensor"): num_tokens,
               divergence_mean (D_t over the valid tokens, before the importance weight), is_weight_mean
               and is_clip_frac (1 and 0 without an importance weight).
    """

    loss: torch.Tensor
    per_token: torch.Tensor
    metrics: dict


@dataclass(frozen=True)
class DivergenceParams:
    """Non-tensor options of the divergence losses, validated once.

    beta in [0, 1]: 0 is KL(p_T || p_S), 1 is KL(p_S || p_T), between them the generalized JSD.
    topk: None (the full vocabulary) or k >= 1 ids taken from `topk_from` ("student" or "teacher");
    add_tail: with topk, one more bucket holding the probability outside the k ids (else both
    distributions are renormalised over the k ids). is_clip: None, or the cap > 0 of SDPO's importance
    weight min(exp(logp_S(target) - old_logp), is_clip).
    """

    beta: float = 0.5
    temperature: float = 1.0
    topk: int | None = None
    topk_from: str = "student"
    add_tail: bool = True
    is_clip: float | None = None
    reduction: str = "token-mean"

    def __post_init__(self):
        object.__setattr__(self, "beta", as_float("beta", self.beta))
        check_number("beta", self.beta, lo=0.0, hi=1.0)
        object.__setattr__(self, "temperature", as_float("temperature", self.temperature))
        check_temperature(self.temperature)
        if self.topk is not None:
            if isinstance(self.topk, bool) or not isinstance(self.topk, numbers.Integral):
                raise TypeError(f"topk: expected None or an int >= 1, got {type(self.topk).__name__}")
            if self.topk < 1:
                raise ValueError(f"topk: expected None or an int >= 1, got {self.topk}")
            object.__setattr__(self, "topk", int(self.topk))
        if self.topk_from not in TOPK_FROM:
            raise ValueError(f"topk_from: expected one of {TOPK_FROM}, got {self.topk_from!r}")
        if not isinstance(self.add_tail, bool):
            raise TypeError(f"add_tail: expected a bool, got {type(self.add_tail).__name__}")
        if self.is_clip is not None:
            object.__setattr__(self, "is_clip", as_float("is_clip", self.is_clip))
            check_number("is_clip", self.is_clip)
            if not self.is_clip > 0:
                raise ValueError(f"is_clip: expected None or a number > 0, got {self.is_clip}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {self.reduction!r}")

