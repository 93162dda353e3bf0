"""The PPO updates of one rollout batch: mini-batches of whole groups, gradient accumulation over
micro-batches, gradient clipping, and a skipped update when the loss or gradient is not finite."""

from __future__ import annotations

import math

import numpy as np
import torch

from cepo_kernels.rl.model import trainable_parameters
from cepo_kernels.step.algorithms import get_algorithm
from cepo_kernels.step.contexts import response_targets, to_device
from cepo_kernels.step.forward import lm_head
from cepo_kernels.step.loss import policy_loss
from cepo_kernels.step.scoring import micro_batches

LOSS_METRICS = ("clip_frac", "adv_abs_mean", "adv_hat_abs_mean", "approx_kl", "ratio_mean")


def ppo_update(model, optimizer, forward, cfg, *, pad_id: int, prompts, responses, mask, adv, old_logp,
               pos_logp, neg_logp, lam: float, distill=None) -> tuple[dict, int]:
    """cfg.ppo_epochs passes over mini-batches of cfg.mini_batch_prompts groups, one optimizer step each.

    prompts[row]: the row's context; forward(contexts, responses) -> (hidden, tokens run, plain tokens).
    distill: a rl.distill.DistillUpdate for a divergence algorithm (opsd, sdpo): its loss replaces the
    policy loss (sdpo: blended, (1 - w) policy + w divergence); its metrics join the returned ones.
    Returns the metrics (token-weighted means of LOSS_METRICS, mean loss and gradient norm of the
    updates taken, the number skipped as non-finite) and the policy tokens run.
    """
    G, device = cfg.group_size, adv.device
    B = adv.shape[0]
    mini = min(cfg.mini_batch_prompts or cfg.prompts_per_step, cfg.prompts_per_step) * G
    weight, bias = lm_head(model)
    # the algorithm's entry (step.algorithms): with no teacher the loss gets none (plain GRPO)
    teachers = {"pos_logp": pos_logp, "neg_logp": neg_logp} if get_algorithm(cfg.algo).weighted else {}
    w_distill = distill.weight if distill is not None else 0.0
    opts = dict(bias=bias, lam=lam if teachers else 0.0, eps_w=cfg.eps_w, eps_low=cfg.eps_low,
                eps_high=cfg.eps_high, clip_dual=cfg.clip_dual if cfg.clip_dual > 0 else None,
                temperature=cfg.temperature, reduction=cfg.reduction)
    lengths = [len(r) for r in responses]
    seq_tokens = np.asarray(lengths, dtype=np.float64)
    params = trainable_parameters(model)
    sums, tokens, losses, grad_norms, n_nan, run = {}, 0.0, [], [], 0, 0
    model.train()
    for _ in range(cfg.ppo_epochs):
        for lo in range(0, B, mini):
            hi = min(lo + mini, B)
            num_tokens = mask[lo:hi].sum()
            d_tokens = distill.num_tokens(mask, lo, hi) if distill is not None else None
            optimizer.zero_grad(set_to_none=True)
            loss_total = torch.zeros((), device=device)
            for rows in micro_batches(range(lo, hi), lengths, G, cfg.micro_batch_size):
                h, t, _ = forward([prompts[r] for r in rows], [responses[r] for r in rows])
                run += t
                R = h.shape[1]
                idx = to_device(torch.tensor(rows), device)
                targets, m = response_targets([responses[r] for r in rows], R, pad_id, device)
                loss = torch.zeros((), device=device)
                n_tok = float(seq_tokens[rows].sum())
                if w_distill < 1.0:
                    out = policy_loss(
                        h, weight, targets, adv[idx], m, old_logp=old_logp[idx, :R],
                        num_tokens=num_tokens if cfg.reduction == "token-mean" else None, metrics="tensor",
                        **opts, **{k: v[idx, :R] for k, v in teachers.items()},
                    )  # fmt: skip
                    loss = (1.0 - w_distill) * out.loss
                    tokens += n_tok
                    for k in LOSS_METRICS:
                        sums[k] = sums.get(k, 0.0) + n_tok * out.metrics[k]
                if w_distill > 0.0:
                    loss = loss + w_distill * distill.loss(
                        rows, h, weight, bias, targets, m, old_logp[idx, :R], d_tokens, cfg.temperature,
                        responses)
                loss.backward()
                loss_total = loss_total + loss.detach().float()
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf  # 0: no clipping
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            # the one host sync of an update: a non-finite loss or gradient skips it
            loss_value, grad_norm = torch.stack([loss_total, norm.float().to(loss_total.device)]).tolist()
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                n_nan += 1
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            if distill is not None:
                distill.after_step()
            losses.append(loss_value)
            grad_norms.append(grad_norm)
    optimizer.zero_grad(set_to_none=True)  # no gradients held through the next rollouts
    names = list(sums)
    values = torch.stack([sums[k].float() for k in names]).tolist() if names else []
    metrics = {k: v / max(tokens, 1.0) for k, v in zip(names, values, strict=True)}
    metrics.update(
        loss=float(np.mean(losses)) if losses else None,  # None: every update was skipped
        grad_norm=float(np.mean(grad_norms)) if grad_norms else None,
        nan_updates=n_nan,
    )
    if distill is not None:
        metrics.update(distill.metrics())
    return metrics, run
