"""The reweight phase: one rollout batch in, A_hat out (docs/method.md §2-4, §7).

    r- per group -> teacher rows (A != 0) -> teacher contexts -> scorer -> Delta -> w -> A_hat

Every front end runs this one function; each supplies only its scorer (how it runs its model on the
teacher contexts) and its conversion to and from a `RolloutBatch`. A_hat is computed here once per
rollout batch; the result also holds what the diagnostics read (Delta, w, r-, the teacher rows, the
statistics of Delta), so nothing downstream recomputes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from cepo_kernels.step.advantages import cepo_advantages, delta_metrics
from cepo_kernels.step.algorithms import Algorithm
from cepo_kernels.step.batch import RolloutBatch
from cepo_kernels.step.contexts import TeacherContexts, cot_answers, teacher_contexts, teacher_rows
from cepo_kernels.step.negatives import Negative, choose_negatives
from cepo_kernels.step.options import CEPOOptions
from cepo_kernels.step.rewards import extract_boxed

__all__ = ["Scorer", "Reweighted", "reweight"]

# scorer(contexts, teachers) -> {teacher: log-probs [len(contexts.rows), R'] (R' <= R)} for each teacher
# named in `teachers` ("pos", "neg"). Called on every process at lambda > 0, also when this process has
# no teacher rows (a sharded model needs every process in each forward); it then returns {}.
Scorer = Callable[[TeacherContexts, tuple], Mapping]


@dataclass
class Reweighted:
    """The reweight phase's result for this process's rows ([n, R] tensors, fp32).

    a_hat: A_hat; pos_logp, neg_logp: what Delta is made of (rows without a teacher pass hold the batch's
    old log-probs, or 0, in both: Delta = 0 there); negatives: r- of every group of the whole batch (None
    when the batch has no texts or the algorithm no teacher); rows: this process's teacher rows (A != 0
    with a valid token); contexts: their teacher contexts (None when not built); scored: whether the
    teachers ran (lambda > 0). `delta`, `weights` (w) and `delta_metrics` (the statistics of Delta) are
    read off on demand.
    """

    lam: float
    algorithm: Algorithm
    eps_w: float
    advantages: torch.Tensor
    mask: torch.Tensor
    a_hat: torch.Tensor
    pos_logp: torch.Tensor
    neg_logp: torch.Tensor
    negatives: list[Negative] | None
    rows: list[int]
    contexts: TeacherContexts | None
    scored: bool
    gather: Callable | None = None

    @property
    def delta(self) -> torch.Tensor:
        """Delta = pos_logp - neg_logp [n, R] (docs/method.md §3)."""
        return self.pos_logp - self.neg_logp

    @cached_property
    def weights(self) -> torch.Tensor:
        """w = clip(exp(sign(A) Delta), 1 - eps_w, 1 + eps_w) [n, R] at valid tokens of rows with A != 0, 1
        elsewhere: the kernel's own w (A_hat at lambda = 1 of sign(A), whose magnitude is w exactly)."""
        sign = torch.sign(self.advantages)
        w = cepo_advantages(sign, self.pos_logp, self.neg_logp, self.mask, lam=1.0, eps_w=self.eps_w).abs()
        used = self.mask.bool() & (sign != 0)[:, None]
        return torch.where(used, w, torch.ones_like(w))

    @cached_property
    def delta_metrics(self) -> dict[str, float]:
        """delta_metrics of Delta over the valid tokens with A != 0, of the whole batch when the phase was
        given `gather` (every process's rows), else of this process's."""
        tensors = (self.delta, self.advantages, self.mask.bool())
        if self.gather is not None:
            tensors = self.gather(*tensors)
        return delta_metrics(*tensors)

    def teacher_tokens_plain(self, responses) -> int:
        """Tokens the teacher passes run when every teacher context runs in full (no sharing), whatever
        lambda: the plain path's count."""
        if self.contexts is None:
            return 0
        rows = self.contexts.rows
        return sum(_n_tokens(pre) + len(responses[r])
                   for name in self.algorithm.teachers
                   for pre, r in zip(getattr(self.contexts, f"{name}_prefixes"), rows, strict=True))


def _n_tokens(prefix) -> int:
    """Tokens of a teacher prefix: token ids, or a vision context (its `n_tokens`)."""
    return prefix.n_tokens if hasattr(prefix, "n_tokens") else len(prefix)


def _negatives(batch: RolloutBatch, mode: str, extract) -> list[Negative]:
    out = []
    for g in range(len(batch.groups)):
        texts, rewards, reference = batch.group(g)
        out += choose_negatives(texts, rewards, [reference], len(texts), extract, mode=mode)
    return out


@torch.no_grad()
def reweight(batch: RolloutBatch, scorer: Scorer, options: CEPOOptions, step: int, *, tokenizer,
             extract=extract_boxed, gather: Callable | None = None,
             contexts: Callable | None = None) -> Reweighted:
    """A_hat of `batch` at the 0-based rollout batch `step` (see the module docstring).

    With texts in the batch and an algorithm with teachers (options.algo), r- is chosen per group
    (options.r_minus, `extract` reads a rollout's answer) and the teacher contexts of this process's rows
    with A != 0 are built (options.teacher_template, or the chain-of-thought teacher); the scorer runs
    them only while lambda(step) > 0. A_hat = A ((1 - lambda) + lambda w) (the kernel `cepo_advantages`).
    `gather(delta, adv, mask)` may return the tensors of every process (for the statistics).
    `contexts(batch, rows, pos_answers, neg_answers, options) -> TeacherContexts` replaces the text
    layout (a vision-language policy's prompts hold images: rl/vision_trainer.py).
    """
    if not isinstance(batch, RolloutBatch):
        raise TypeError(f"batch: expected a RolloutBatch, got {type(batch).__name__}")
    if not isinstance(options, CEPOOptions):
        raise TypeError(f"options: expected a CEPOOptions, got {type(options).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected the 0-based number of rollout batches so far, got {step!r}")
    algo, lam = options.algorithm, options.lam(step)
    adv, mask = batch.advantages.float(), batch.mask.bool()
    if algo.baseline == "old" and batch.old_logp is None:
        raise ValueError(f"old_logp: {algo.name} needs the rollout policy's log-probs in the batch")
    default = (batch.old_logp.float() if batch.old_logp is not None
               else torch.zeros(mask.shape, dtype=torch.float32, device=mask.device))
    pos, neg = default.clone(), default.clone()
    negatives, rows, ctx = None, [], None
    if algo.weighted and batch.texts is not None:
        negatives = _negatives(batch, options.r_minus, extract)
        rows = teacher_rows(adv, mask)
        pos_answers = {i: batch.references[batch.offset + i] for i in rows}
        neg_answers = {i: negatives[batch.group_of(i)].answer for i in rows}
        if options.cot_teacher:  # the authors' chain-of-thought teacher: rollout tokens as r+ / r-
            if not batch.whole or batch.group_size is None:
                raise ValueError("cot_teacher: needs the whole batch in this process, in groups of "
                                 "group_size")
            pos_answers, neg_answers = cot_answers(batch.responses, batch.rewards, negatives,
                                                   [batch.group(g)[2] for g in range(len(negatives))],
                                                   batch.group_size, options.cot_prefix_len,
                                                   suffix=options.cot_suffix)
        ctx = contexts(batch, rows, pos_answers, neg_answers, options) if contexts else teacher_contexts(
            tokenizer, rows, prompt_ids=batch.prompt_ids, pos_answers=pos_answers,
                               neg_answers=neg_answers, questions=batch.questions,
                               template=options.teacher_template, system_prompt=batch.system_prompt)
    scored = lam > 0.0 and ctx is not None
    if scored:
        logp = scorer(ctx, algo.teachers)
        if rows:
            for name in algo.teachers:
                dst = {"pos": pos, "neg": neg}[name]
                if name not in logp:
                    raise RuntimeError(f"scorer: returned no log-probs for the {name!r} teacher")
                t = logp[name]
                dst[rows, : t.shape[1]] = t.to(dst.device, torch.float32)
    a_hat = cepo_advantages(adv, pos, neg, mask, lam=lam, eps_w=options.eps_w)
    return Reweighted(lam, algo, options.eps_w, adv, mask, a_hat, pos, neg, negatives, rows, ctx, scored,
                      gather)
