"""The distillation relatives the paper argues against (OPSD, SDPO): teacher contexts and the loss.

    rows with a teacher context -> teacher hidden states (no gradient) -> divergence(student || teacher)

OPSD: every row's teacher reads prompt + the reference solution (options.opsd_template); the loss is the
generalized JSD (options.distill_beta) over the full vocabulary, token-mean, with no policy-gradient term.
SDPO: a row's teacher reads the prompt re-asked with a successful rollout (reward >= 0.5) of its group
other than itself (options.sdpo_template); rows without one get no loss. The JSD runs over the student's
top-k ids plus a tail bucket (options.sdpo_topk; 0: full), times min(exp(sg(logp - logp_old)), is_clip),
token-mean; optionally blended with the GRPO loss (options.distillation_weight).
Both use the fused `linear_divergence_loss` on the student's and the teacher's hidden states.
"""

from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple

import torch

from cepo_kernels.ops.divergence import linear_divergence_loss
from cepo_kernels.step.batch import RolloutBatch
from cepo_kernels.step.contexts import teacher_prefix
from cepo_kernels.step.options import CEPOOptions

__all__ = ["DistillContexts", "successful_peer", "distill_contexts", "distill_loss", "Teacher",
           "SUCCESS"]

SUCCESS = 0.5  # a rollout with reward >= SUCCESS is a successful peer (SDPO)


class DistillContexts(NamedTuple):
    """rows[k] (this process's rows that get a loss) is scored by the teacher after prefixes[k]."""

    rows: list[int]
    prefixes: list[list[int]]

    def prefix_of(self) -> dict[int, list[int]]:
        return dict(zip(self.rows, self.prefixes, strict=True))


def successful_peer(rewards, group: list[int], row: int) -> int | None:
    """The whole batch's row of the first successful rollout (reward >= SUCCESS) of `group` other than
    `row` itself, or None."""
    return next((i for i in group if i != row and rewards[i] >= SUCCESS), None)


def distill_contexts(batch: RolloutBatch, options: CEPOOptions, tokenizer, render=None) -> DistillContexts:
    """The teacher contexts of this process's rows with a valid token (OPSD: all; SDPO: those with a
    successful peer). Needs the batch's texts, rewards and references.

    render(i, message) -> token ids: row i's context for a {question} template's filled-in user message, for
    a front end whose prompts are more than one question and a system prompt (TRL's conversations, rendered
    by TRL); None: `teacher_prefix`'s chat template with batch.system_prompt."""
    algo = options.algorithm
    if not algo.distills:
        raise ValueError(f"options.algo: expected a distillation algorithm, got {algo.name!r}")
    if batch.texts is None:
        raise ValueError("batch: the distillation contexts need texts, rewards and references")
    valid = batch.mask.bool().any(dim=1).tolist()
    rows, prefixes, memo = [], [], {}
    for i in range(batch.n_rows):
        if not valid[i]:
            continue
        whole = batch.offset + i
        if algo.context == "reference":
            answer, template = batch.references[whole], options.opsd_template
        else:
            peer = successful_peer(batch.rewards, batch.groups[batch.group_of(i)], whole)
            if peer is None:
                continue
            answer, template = batch.texts[peer], options.sdpo_template
        question = "" if batch.questions is None else batch.questions[i]
        key = (question, answer) if render is None else (tuple(batch.prompt_ids[i]), question, answer)
        if key not in memo:
            if render is not None and "{question}" in template:
                message = template.replace("{question}", question).replace("{answer}", answer)
                memo[key] = list(render(i, message))
            else:
                memo[key] = teacher_prefix(tokenizer, question, batch.prompt_ids[i], answer, template,
                                           batch.system_prompt)
        rows.append(i)
        prefixes.append(memo[key])
    return DistillContexts(rows, prefixes)


def distill_loss(hidden, teacher_hidden, weight, bias, targets, mask, options: CEPOOptions, *, old_logp=None,
                 temperature: float = 1.0, num_tokens=None, metrics="tensor", teacher_weight=None,
                 teacher_bias=None):
    """The algorithm's divergence (a DivergenceOutput) of the student's hidden [b, R, H] against the
    teacher's [b, R, H] at the tokens of `mask`: OPSD's full JSD, or SDPO's top-k JSD with its importance
    weight (needs old_logp [b, R]). Token-mean over num_tokens (default: mask's count). A top-k of at least
    the vocabulary is the full JSD (the tail is empty). teacher_weight, teacher_bias: a teacher copy's own
    lm_head (None: the student's)."""
    algo = options.algorithm
    kw = {}
    if algo.context == "peer":
        if old_logp is None:
            raise ValueError("old_logp: sdpo's importance weight needs the rollout policy's log-probs")
        kw = dict(targets=targets, old_logp=old_logp, is_clip=options.sdpo_is_clip,
                  topk=options.sdpo_topk if 0 < options.sdpo_topk < weight.shape[0] else None,
                  topk_from="student", add_tail=True)
    return linear_divergence_loss(hidden, teacher_hidden, weight, mask, bias=bias, beta=options.distill_beta,
                                  temperature=temperature, reduction="token-mean", num_tokens=num_tokens,
                                  metrics=metrics, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                                  **kw)


class Teacher:
    """The teacher's weights (options.distill_teacher): live (the policy as it is, no gradient), initial
    (the policy at the first distillation step: its LoRA adapter disabled when it has one, else a frozen
    copy), or ema (a copy updated after every optimizer step, theta_T <- theta_T + rate (theta - theta_T),
    rate = options.distill_ema_rate). `model_and_context()` gives the model to run and the context to run
    it in; `after_step()` moves the EMA copy."""

    def __init__(self, model, options: CEPOOptions):
        self.policy, self.rate, self.copy, self.disable = model, options.distill_ema_rate, None, False
        mode = options.distill_teacher
        if mode == "initial" and hasattr(model, "disable_adapter"):
            self.disable = True
        elif mode in ("initial", "ema"):
            self.copy = copy.deepcopy(model).eval()
            self.copy.requires_grad_(False)
        self.ema = mode == "ema"

    def model_and_context(self):
        if self.disable:
            return self.policy, self.policy.disable_adapter()
        return (self.copy if self.copy is not None else self.policy), contextlib.nullcontext()

    @torch.no_grad()
    def after_step(self):
        if self.ema:
            for t, p in zip(self.copy.parameters(), self.policy.parameters(), strict=True):
                t.lerp_(p.detach().to(t.dtype), self.rate)


def zero_loss(hidden: torch.Tensor) -> torch.Tensor:
    """A 0 loss connected to hidden's graph (a micro-batch without distilled tokens)."""
    return hidden.sum() * 0.0
