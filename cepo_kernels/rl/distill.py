"""cepo-train's distillation update (opsd, sdpo; step.distill): per micro-batch, the teacher's hidden
states on the rows that get a loss (no gradient), then the divergence of the student's against them."""

from __future__ import annotations

import logging

import torch

from cepo_kernels.step import lm_head
from cepo_kernels.step.contexts import to_device
from cepo_kernels.step.distill import DistillContexts, Teacher, distill_contexts, distill_loss, zero_loss

log = logging.getLogger("cepo_kernels.rl")

DISTILL_METRICS = ("divergence_mean", "is_weight_mean", "is_clip_frac")


class DistillUpdate:
    """What ppo_update needs to add a distillation loss: contexts (step.distill.distill_contexts) of this
    rollout batch, the options, the teacher (step.distill.Teacher) and forward(contexts, responses, model)
    (trainer.forward) that runs it."""

    def __init__(self, contexts: DistillContexts, options, teacher: Teacher, forward, n_rows: int, device):
        self.options, self.teacher, self.forward = options, teacher, forward
        self.prefix = contexts.prefix_of()
        keep = torch.zeros(n_rows, dtype=torch.bool)
        keep[contexts.rows] = True
        self.rows_mask = to_device(keep, device)  # [n] rows that get a loss
        self.sums, self.tokens, self.teacher_tokens, self.teacher_tokens_naive = {}, 0.0, 0, 0

    @property
    def weight(self) -> float:
        """The distillation's share of the loss (sdpo's blend with GRPO; opsd: 1, no policy term)."""
        return self.options.distillation_weight if self.options.algorithm.context == "peer" else 1.0

    def num_tokens(self, mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The distilled tokens of rows lo:hi (the token-mean's denominator; at least 1)."""
        return (mask[lo:hi] & self.rows_mask[lo:hi, None]).sum().clamp_min(1)

    def loss(self, rows, h, weight, bias, targets, m, old_logp, num_tokens, temperature, responses):
        """The micro-batch's distillation loss (graph to h) and its teacher pass on the rows with a loss."""
        idx = [k for k, r in enumerate(rows) if r in self.prefix]
        if not idx:
            return zero_loss(h)
        model, context = self.teacher.model_and_context()
        with torch.no_grad(), context:
            th, run, naive = self.forward([self.prefix[rows[k]] for k in idx],
                                          [responses[rows[k]] for k in idx], model)
        self.teacher_tokens += run
        self.teacher_tokens_naive += naive
        teacher_h = torch.zeros_like(h)  # rows without a loss are masked (never read)
        sel = to_device(torch.tensor(idx), h.device)
        teacher_h[sel, : th.shape[1]] = th.to(h.dtype)
        dm = m & self.rows_mask[to_device(torch.tensor(rows), h.device)][:, None]
        tw = tb = None
        if self.teacher.copy is not None:  # a copy (initial, ema) scores with its own head
            tw, tb = lm_head(self.teacher.copy)
            tw, tb = tw.to(weight.dtype), None if tb is None else tb.to(weight.dtype)
        out = distill_loss(h, teacher_h, weight, bias, targets, dm, self.options, old_logp=old_logp,
                           temperature=temperature, num_tokens=num_tokens, metrics="tensor",
                           teacher_weight=tw, teacher_bias=tb)
        n = dm.sum()
        self.tokens = self.tokens + n
        for k in DISTILL_METRICS:
            self.sums[k] = self.sums.get(k, 0.0) + n * out.metrics[k]
        return out.loss

    def after_step(self):
        """After each optimizer step: the EMA teacher follows the policy."""
        self.teacher.after_step()

    def metrics(self) -> dict:
        """Token-weighted means of DISTILL_METRICS over the distilled tokens, and the teacher tokens run."""
        names = list(self.sums)
        values = torch.stack([torch.as_tensor(self.tokens).float()]
                             + [self.sums[k].float() for k in names]).tolist() if names else [0.0]
        tokens = values[0]
        out = {k: (v / tokens if tokens else None) for k, v in zip(names, values[1:], strict=True)}
        for k in DISTILL_METRICS:
            out.setdefault(k, None)
        return {**out, "distill_tokens": int(tokens), "teacher_tokens": self.teacher_tokens,
                "teacher_tokens_naive": self.teacher_tokens_naive, "teacher_rows": len(self.prefix)}


def resumed_teacher(model, options, resume_from, device) -> Teacher:
    """The opsd / sdpo teacher (step.distill.Teacher) of `model`; a copy (initial, ema) resumes from the
    checkpoint's distill_teacher.pt when `resume_from` (a checkpoint directory) is given."""
    teacher = Teacher(model, options)
    saved = resume_from / "distill_teacher.pt" if resume_from is not None else None
    if teacher.copy is not None and saved is not None:
        if saved.is_file():
            teacher.copy.load_state_dict(torch.load(saved, map_location=device, weights_only=True))
        else:
            log.warning("distill_teacher=%s: %s has no teacher copy; it starts from the resumed policy",
                        options.distill_teacher, resume_from)
    return teacher


def distill_update(batch, options, tokenizer, teacher: Teacher, forward, device) -> DistillUpdate | None:
    """opsd / sdpo (step.distill): the teacher contexts of the rows of `batch` (a RolloutBatch) with a loss,
    as the update's DistillUpdate; None for the algorithms that do not distill."""
    if not options.algorithm.distills:
        return None
    ctx = distill_contexts(batch, options, tokenizer)
    return DistillUpdate(ctx, options, teacher, forward, batch.n_rows, device)
