"""Pieces shared by the logits and the linear kernels.

- `online_lse` / `lse_entropy`: the logits kernels' online logsumexp over one row, kept per lane (one max
  per tile, exp2 with the temperature folded in: the bandwidth-bound scan does no per-tile sum).
- `lse_rows`: the linear kernels' online logsumexp over a [rows, vocabulary] tile of an MMA result,
  reduced per row within a warp. Two helpers because the layouts differ: per-lane [BLOCK_V] sums for one
  row, per-row sums for a block of rows (per-lane sums there would cost a [BLOCK_M, BLOCK_V] accumulator).
- `cepo_weight`: the token weight w and A_hat (docs/method.md §3, §4); `cepo_token`: the per-token
  CEPO/PPO arithmetic (Delta -> A_hat -> ratio -> loss and dL/dlp, docs/method.md §5, §6).
- torch-side helpers: `alloc` (every uninitialised output buffer), `cpu_backend` (native CPU kernels or
  Triton's interpreter on CPU tensors), `require_backend` (the launchers' check that the kernels can run on
  the inputs' device), the reduced loss, the metrics and the output.

Conventions for the kernels using them: every float is fp32 after loading; hyperparameters and sizes
are runtime arguments; NaN is never swallowed (clamps are written with comparisons, which keep NaN,
rather than min/max, which may drop it on a GPU). Kernel conventions: docs/kernels.md.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cepo_kernels._params import LOG_RATIO_CLAMP, CEPOOutput, reduction_weights


def alloc(shape, dtype, device):
    """Every uninitialised output buffer of the kernels comes from here (tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


# Memory tracers (bench/memory_fake.py) append a callable(nbytes) here: the operators' fake implementations
# report the bytes of the temporaries their kernels' launchers allocate and free inside the real one.
WORKSPACE_HOOKS = []


def report_workspace(nbytes):
    for hook in WORKSPACE_HOOKS:
        hook(int(nbytes))


def interpreted() -> bool:
    """Whether the kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpu_backend() -> str:
    """Which kernels run on CPU tensors: "native" (default: the PyTorch kernels of ops/_*_cpu.py) or
    "interpreter" (CEPO_KERNELS_CPU=interpreter: the Triton kernels through Triton's interpreter, which then
    needs TRITON_INTERPRET=1 set before triton is imported). Read at every call."""
    choice = os.environ.get("CEPO_KERNELS_CPU", "") or "native"
    if choice == "native":
        return "native"
    if choice != "interpreter":
        raise ValueError(f"CEPO_KERNELS_CPU: expected 'native' or 'interpreter', got {choice!r}")
    if not interpreted():
        raise ValueError("CEPO_KERNELS_CPU=interpreter runs the Triton kernels through Triton's interpreter: "
                         "expected TRITON_INTERPRET=1 set before triton/cepo_kernels are imported, got "
                         f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}")
    return "interpreter"


def register_cpu(op, impl, launchers, native):
    """Registers the CPU kernel of a custom operator: impl(module, *args) with module = `native` (the PyTorch
    kernels) or, under CEPO_KERNELS_CPU=interpreter, launchers() (the Triton launchers), chosen per call."""
    op.register_kernel("cpu")(lambda *args: impl(native if cpu_backend() == "native" else launchers(), *args))


def require_backend(device):
    """Raises a clear error when the kernels cannot run on `device`: CPU tensors need Triton's interpreter.

    Called by every launcher before its first kernel launch (without it, Triton fails with an opaque
    "0 active drivers" error). Meta tensors pass: the compile-only report (bench/compile_report.py)
    launches on them with a stand-in driver.
    """
    if device.type == "cpu" and not interpreted():
        raise RuntimeError("cepo_kernels: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before importing triton/cepo_kernels, or move the inputs to a GPU")


@triton.jit
def lse_rows(b_z, m_i, s_i, t_i):
    """Folds a [BLOCK_M, BLOCK_V] tile of scaled logits z = logits / T into per-row running stats.

    b_z: fp32, -inf outside the vocabulary. m_i, s_i, t_i [BLOCK_M]: running max, sum exp(z - m) and
    sum exp(z - m) * z. Returns the updated (m_i, s_i, t_i); at the end lse = m + log(s) and
    entropy = lse - t / s. NaN logits propagate through the sums.
    """
    m_new = tl.maximum(m_i, tl.max(b_z, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid -inf - -inf
    alpha = tl.exp(m_i - m_ref)
    b_p = tl.exp(b_z - m_ref[:, None])
    s_new = s_i * alpha + tl.sum(b_p, axis=1)
    t_new = t_i * alpha + tl.sum(b_p * tl.where(b_p > 0, b_z, 0.0), axis=1)  # no 0 * -inf
    return m_new, s_new, t_new


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def online_lse(b_x, mx, m_i, s_i, t_i, c, WITH_ENT: tl.constexpr):
    """Folds a tile of raw logits b_x [BLOCK_V] (tile max mx) into per-lane sums, for lse = logsumexp(x / T).

    m_i: running max of the raw logits (scalar); s_i [BLOCK_V]: sum exp((x - m) / T) per lane;
    t_i [BLOCK_V]: sum exp((x - m) / T) * x per lane (only when WITH_ENT); c = log2(e) / T.
    No per-tile sum reduction; NaN needs no counter: a NaN logit makes its lane's sum NaN (whatever
    max does with it) and a NaN max makes every sum NaN.
    """
    m_new = tl.maximum(m_i, mx)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid -inf - -inf
    alpha = tl.math.exp2((m_i - m_ref) * c)
    b_p = tl.math.exp2(b_x * c - m_ref * c)  # [BLOCK_V], one FMA and one ex2 per element; 0 at -inf
    s_i = s_i * alpha + b_p
    if WITH_ENT:
        t_i = t_i * alpha + b_p * tl.where(b_p > 0, b_x, 0.0)  # no 0 * -inf
    return m_new, s_i, t_i


@triton.jit
def lse_entropy(m, s, t, inv_temp):
    """(lse, entropy) of x / T from the reduced online_lse state (entropy meaningful only with WITH_ENT)."""
    lse = tl.where(m == float("-inf"), 0.0, m) * inv_temp + tl.log(s)
    return lse, lse - t / s * inv_temp


@triton.jit
def clamp_keep_nan(x, lo, hi):
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def cepo_weight(adv, delta, lam, eps_w):
    """A_hat = A ((1 - lam) + lam w), w = clip(exp(sign(A) Delta), 1 - eps_w, 1 + eps_w), elementwise, fp32.

    docs/method.md §3 (token weight) and §4: A = 0 gives exactly 0 whatever Delta is (the teachers of
    those rows may be skipped, leaving Delta undefined there). Masking is the caller's.
    """
    sgn = tl.where(adv > 0, 1.0, tl.where(adv < 0, -1.0, 0.0))
    w = clamp_keep_nan(tl.exp(sgn * delta), 1.0 - eps_w, 1.0 + eps_w)
    return tl.where(adv == 0, 0.0, adv * ((1.0 - lam) + lam * w))


@triton.jit
def cepo_token(lp, old, adv, delta, valid, lam, eps_w, eps_low, eps_high, clip_dual,
               HAS_OLD: tl.constexpr, HAS_TEACHERS: tl.constexpr, HAS_DUAL: tl.constexpr):
    """Per-token CEPO arithmetic (docs/method.md §4-§6), elementwise on scalars or blocks, all fp32.

    lp: policy log-prob; old: old log-prob (ignored unless HAS_OLD: on-policy ratio 1);
    adv: the sequence's (or token's) advantage A; delta: pos_logp - neg_logp (ignored unless
    HAS_TEACHERS); valid: the mask. Returns (a_hat, loss, coef) where coef = dL/dlp, 0 where a clip
    (PPO, dual or the log-ratio clamp) is active or the token is masked.
    """
    if HAS_TEACHERS:
        a_hat = cepo_weight(adv, delta, lam, eps_w)
    else:
        a_hat = adv
    if HAS_OLD:
        log_ratio = lp - old
        in_range = (log_ratio >= -20.0) & (log_ratio <= 20.0)
        ratio = tl.exp(clamp_keep_nan(log_ratio, -20.0, 20.0))
    else:
        in_range = lp == lp
        ratio = tl.where(lp == lp, 1.0, lp)  # 1, or NaN for a NaN log-prob
    r_clip = clamp_keep_nan(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg1 = -a_hat * ratio
    pg2 = -a_hat * r_clip
    loss = tl.where(pg2 > pg1, pg2, pg1)
    clipped = ((a_hat > 0) & (ratio > 1.0 + eps_high)) | ((a_hat < 0) & (ratio < 1.0 - eps_low))
    if HAS_DUAL:
        dual = (a_hat < 0) & (loss > -clip_dual * a_hat)
        loss = tl.where(dual, -clip_dual * a_hat, loss)
        clipped = clipped | dual
    coef = tl.where(clipped | (~in_range), 0.0, -a_hat * ratio)
    a_hat = tl.where(valid, a_hat, 0.0)
    loss = tl.where(valid, loss, 0.0)
    coef = tl.where(valid, coef, 0.0)
    return a_hat, loss, coef


def reduce_loss(loss_tok, mask, reduction, num_tokens):
    """The reduced loss from the per-token losses [B, T] (differentiable; autograd forms dL/dL_t)."""
    if reduction == "none":
        return loss_tok
    return (reduction_weights(mask, reduction, num_tokens) * loss_tok).sum()


def loss_output(loss_tok, lp, a_hat, delta, batch, params, num_tokens, metrics):
    """The CEPOOutput of a loss from its per-token [B, T] results (loss_tok differentiable; lp, a_hat
    detached; delta None without teachers): the reduction, the metrics and the caller's shape."""
    loss = reduce_loss(loss_tok, batch.mask, params.reduction, num_tokens)
    if metrics:
        metrics = loss_metrics(lp, batch.old_logp, batch.advantages, a_hat, delta, batch.mask, params,
                               as_tensors=metrics == "tensor")
    else:
        metrics = {}
    shape = (-1,) if batch.flat else (batch.B, batch.T)
    if params.reduction == "none":
        loss = loss.reshape(shape)
    return CEPOOutput(loss, lp.reshape(shape), a_hat.reshape(shape), metrics)


def check_metrics_option(metrics):
    if metrics not in (True, False, "tensor"):
        raise ValueError(f"metrics: expected True, False or 'tensor', got {metrics!r}")


@torch.no_grad()
def loss_metrics(lp, old_logp, adv, a_hat, delta, mask, params, as_tensors=False):
    """Scalar metrics over the valid tokens: a dict of floats read with one host sync, or (as_tensors)
    of 0-dim tensors with none.

    lp, adv, a_hat, mask [B, T]; old_logp and delta [B, T] or None. An empty selection gives 0.0.
    The means over the valid tokens are one weighted sum of a stacked [K, B*T] matrix (few eager ops).
    """
    m = mask.reshape(-1).float()
    zero = torch.zeros_like(lp)
    if old_logp is None:
        log_ratio = zero
    else:  # masked tokens may hold NaN
        log_ratio = torch.where(mask, (lp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), zero)
    ratio = torch.exp(log_ratio)
    clip_high = (a_hat > 0) & (ratio > 1.0 + params.eps_high)
    clip_low = (a_hat < 0) & (ratio < 1.0 - params.eps_low)
    dual = zero.bool() if params.clip_dual is None else (a_hat < 0) & (ratio > params.clip_dual)
    per_token = torch.stack([
        clip_high | clip_low, clip_low, clip_high, dual, ratio, -log_ratio,
        torch.where(mask, adv.abs(), zero), a_hat.abs(), torch.where(mask, lp, zero),
    ]).reshape(9, -1).float()  # [K, B*T]
    n = m.sum()
    means = per_token @ m / n.clamp_min(1.0)
    delta_stats = delta_metrics(zero if delta is None else delta, adv, mask)
    values = torch.cat([n[None], means[:6], torch.stack(list(delta_stats.values())), means[6:]])
    if as_tensors:
        return dict(zip(METRIC_NAMES, values.unbind(), strict=True))
    return dict(zip(METRIC_NAMES, values.tolist(), strict=True))


@torch.no_grad()
def delta_metrics(delta, adv, mask):
    """Statistics of the evidence Delta [B, T] (adv [B, T], mask [B, T] bool) as 0-dim tensors, no host sync.

    Over the valid tokens with A != 0, the only ones whose teachers matter (rows with A = 0 may be
    unscored): mean, std, mean on A > 0 and on A < 0, and the fraction with sign(Delta) = -sign(A).
    An empty selection gives 0.
    """
    used = mask & (adv != 0)
    d = torch.where(used, delta, torch.zeros_like(delta)).float()

    def mean(x, sel):
        w = sel.float()
        return (x.float() * w).sum() / w.sum().clamp_min(1.0)

    n_used = used.sum()
    d_mean = mean(d, used)
    d_var = ((d - d_mean) ** 2 * used.float()).sum() / (n_used - 1).clamp_min(1.0)
    return {
        "delta_mean": d_mean,
        "delta_std": torch.where(n_used > 1, d_var.sqrt(), torch.zeros_like(d_var)),
        "delta_mean_pos": mean(d, used & (adv > 0)),
        "delta_mean_neg": mean(d, used & (adv < 0)),
        "frac_wrong_dir": mean((torch.sign(d) * torch.sign(adv)) < 0, used),
    }


METRIC_NAMES = (
    "num_tokens", "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean",
    "approx_kl", "delta_mean", "delta_std", "delta_mean_pos", "delta_mean_neg", "frac_wrong_dir",
    "adv_abs_mean", "adv_hat_abs_mean", "logp_mean",
)
