"""One RL update step on given token ids, built from the package's pieces (for bench/test_train_step.py).

A step, as docs/memory.md's anchor measures it: the teacher passes (no grad) and the policy's forward and
backward, the old log-probs given (computed once, outside the timed step, by the same path). The "shared"
and "plain" paths are the phases of cepo_kernels.step, as cepo-train calls them; "naive" is the peer
baseline. The paths:

- "shared": as cepo-train runs it. Each distinct context (prompt, prompt + r+, prompt + r-) runs once per
  group and its key/value cache is reused by the group's responses (step.forward.prefix_hidden); the policy
  pass shares the prompt too, except under gradient checkpointing, where it takes the plain path as the
  trainer does. Teachers only for rows with A != 0 and only when lambda > 0 (step.teacher_rows,
  step.teacher_logprobs: linear_teacher_logprobs), the loss by step.policy_loss (the logits never exist).
- "plain": every row's full context, left-padded (step.pack + step.forward.response_hidden), same phases.
- "naive": HF logits ([n, R, V] materialised) + log_softmax for the policy and both teachers, the loss in
  torch eager (cepo_ref.cepo_loss), every teacher row with A != 0 run in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import cepo_kernels.step as phases
import cepo_ref
from cepo_kernels.step import RolloutBatch, TeacherContexts, context_hidden, lm_head, pack, response_targets
from cepo_kernels.step.forward import base_model

PATHS = ("shared", "plain", "naive")


PAD = 0  # the pad id of make_batch's token ids (never a real token)


def context(batch: RolloutBatch, kind: str, row: int) -> list[int]:
    """The context a row is scored after: its prompt ("policy"), prompt + r+ ("pos") or prompt + r- ("neg");
    r+ and r- are token ids per group in batch.extra["pos_answers"] / ["neg_answers"]."""
    if kind == "policy":
        return batch.prompt_ids[row]
    return batch.prompt_ids[row] + batch.extra[f"{kind}_answers"][row // batch.group_size]


def make_batch(vocab: int, n_groups: int, group_size: int, prompt_len: int, resp_len: int, answer_len: int,
               *, zero_groups: int = 0, ragged: bool = False, seed: int = 0, device="cpu") -> RolloutBatch:
    """A RolloutBatch of random token ids in [1, vocab) (PAD = 0 is never a real token): n_groups groups of
    group_size responses. ragged: response lengths spread over [resp_len // 2, resp_len] (else all
    resp_len); the first zero_groups groups get A = 0. r+ and r- are answer_len token ids per group
    (batch.extra)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    B = n_groups * group_size
    lens = [resp_len] * B
    if ragged:
        lens = torch.randint(max(resp_len // 2, 1), resp_len + 1, (B,), generator=g).tolist()
    adv = torch.randn(B, generator=g)
    adv[: zero_groups * group_size] = 0.0
    prompts = [ids(prompt_len) for _ in range(n_groups)]
    extra = {"pos_answers": [ids(answer_len) for _ in range(n_groups)],
             "neg_answers": [ids(answer_len) for _ in range(n_groups)]}
    responses = [ids(n) for n in lens]
    _, mask = response_targets(responses, max(lens), PAD, device)
    return RolloutBatch([prompts[r // group_size] for r in range(B)], responses, adv.to(device), mask,
                        group_size, extra=extra)


@dataclass
class TokenCounter:
    """Counts the non-pad token ids fed to the decoder's embedding (what a path actually runs)."""

    pad_id: int
    tokens: int = 0
    positions: int = 0  # including pads
    handle: object = field(default=None, repr=False)

    def attach(self, model):
        emb = base_model(model).get_input_embeddings()

        def hook(_module, args):
            ids = args[0]
            self.tokens += int((ids != self.pad_id).sum())
            self.positions += ids.numel()

        self.handle = emb.register_forward_pre_hook(hook)
        return self

    def detach(self):
        self.handle.remove()


def targets_mask(batch: RolloutBatch, rows: list[int], R: int, device):
    return response_targets([batch.responses[r] for r in rows], R, PAD, device)


def _checkpointing(model) -> bool:
    base = base_model(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers >= 5 name first
        if hasattr(base, name):
            return bool(getattr(base, name))
    return False


def forward_of(model, batch: RolloutBatch, path: str, device):
    """The phases' forward(contexts, responses) -> (hidden [n, R, H], tokens, plain tokens): shared or
    plain as the trainer chooses (step.context_hidden; plain under gradient checkpointing with gradients)."""

    def forward(contexts, responses):
        shared = path == "shared" and not (torch.is_grad_enabled() and _checkpointing(model))
        return context_hidden(model, contexts, responses, pad_id=PAD, device=device, share=shared)

    return forward


def one_batch(rows):
    return [list(rows)]


def _naive_logits(model, batch, kind, rows, device):
    """HF logits [n, R, V] at the positions predicting the responses (the plain, padded layout)."""
    packed = pack([context(batch, kind, r) for r in rows], [batch.responses[r] for r in rows], PAD,
                  device)
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                   position_ids=packed.position_ids, use_cache=False).logits
    R = packed.targets.shape[1]
    return logits[:, packed.start - 1 : packed.start - 1 + R]


@torch.no_grad()
def old_logprobs(model, batch: RolloutBatch, path: str, device) -> torch.Tensor:
    """The policy's log-probs [B, R] of every response (the old log-probs of the update)."""
    was = model.training
    model.eval()
    rows = list(range(len(batch.responses)))
    try:
        if path == "naive":
            logits = _naive_logits(model, batch, "policy", rows, device)
            targets, _ = targets_mask(batch, rows, logits.shape[1], device)
            return cepo_ref.token_logprobs(logits, targets)
        weight, bias = lm_head(model)
        contexts = [context(batch, "policy", r) for r in rows]
        forward = forward_of(model, batch, path, device)
        return phases.policy_logprobs(forward, weight, bias, contexts, batch.responses, one_batch,
                                      pad_id=PAD, device=device).logp
    finally:
        model.train(was)


@torch.no_grad()
def teacher_logprobs(model, batch: RolloutBatch, path: str, old: torch.Tensor, device):
    """(pos_logp, neg_logp) [B, R]: both teachers on the rows with A != 0; other rows keep pos = neg = old."""
    was = model.training
    model.eval()
    rows = phases.teacher_rows(batch.advantages)
    try:
        if path != "naive":
            ctx = TeacherContexts(rows, [context(batch, "pos", r) for r in rows],
                                  [context(batch, "neg", r) for r in rows])
            weight, bias = lm_head(model)
            forward = forward_of(model, batch, path, device)
            scored = phases.teacher_logprobs(forward, weight, bias, ctx, batch.responses, one_batch,
                                             default=old, lam=1.0, pad_id=PAD)
            return scored.pos, scored.neg
        pos, neg = old.clone(), old.clone()
        if not rows:
            return pos, neg
        idx = torch.tensor(rows, device=device)
        for kind, dst in (("pos", pos), ("neg", neg)):
            logits = _naive_logits(model, batch, kind, rows, device)
            targets, _ = targets_mask(batch, rows, logits.shape[1], device)
            dst[idx, : logits.shape[1]] = cepo_ref.token_logprobs(logits, targets).to(dst.dtype)
            del logits
        return pos, neg
    finally:
        model.train(was)


def step(model, batch: RolloutBatch, *, algo: str, path: str, old: torch.Tensor, lam: float = 0.5,
         device="cpu", backward: bool = True) -> dict:
    """One update step's passes: teachers (cepo, lam > 0) then the policy's loss and its backward.

    Returns dict(loss (detached), pos_logp, neg_logp). The gradient accumulates into the parameters' .grad
    (zero them before the call).
    """
    if algo not in ("grpo", "cepo"):
        raise ValueError(f"algo: expected 'grpo' or 'cepo', got {algo!r}")
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    pos = neg = None
    if algo == "cepo" and lam > 0:
        pos, neg = teacher_logprobs(model, batch, path, old, device)
    model.train()
    rows = list(range(len(batch.responses)))
    teachers = {} if pos is None else dict(pos_logp=pos, neg_logp=neg, lam=lam)
    if path == "naive":
        logits = _naive_logits(model, batch, "policy", rows, device)
        targets, mask = targets_mask(batch, rows, logits.shape[1], device)
        out = cepo_ref.cepo_loss(logits, targets, batch.advantages, mask, old_logp=old, **teachers)
    else:
        contexts = [context(batch, "policy", r) for r in rows]
        h, _, _ = forward_of(model, batch, path, device)(contexts, batch.responses)
        targets, mask = targets_mask(batch, rows, h.shape[1], device)
        weight, bias = lm_head(model)
        out = phases.policy_loss(h, weight, targets, batch.advantages, mask, old_logp=old, bias=bias,
                                 metrics=True, **teachers)
    if backward:
        out.loss.backward()
    return dict(loss=out.loss.detach(), pos_logp=pos, neg_logp=neg)
