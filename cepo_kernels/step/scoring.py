"""Log-probs of the responses without gradient: the old policy's and both teachers' (docs/method.md §2-3).

A front end gives a `forward(contexts, responses) -> (hidden [n, R, H], tokens run, tokens of the plain
path)` (for example `forward.context_hidden` bound to its model) and the lm_head (weight, bias); the
kernels turn hidden states into log-probs without materialising logits. `batches(rows)` splits rows
into micro-batches (for example `micro_batches`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from cepo_kernels.ops.linear import linear_logprobs, linear_teacher_logprobs
from cepo_kernels.step.contexts import TeacherContexts, response_targets, to_device

__all__ = ["micro_batches", "PolicyLogprobs", "policy_logprobs", "TeacherLogprobs", "teacher_logprobs"]

Forward = Callable[[list, list], tuple]


def micro_batches(rows, lengths, group_size: int, size: int) -> list[list[int]]:
    """Rows split into micro-batches of at most `size`: whole groups (rows // group_size) where they fit,
    groups of similar response length together (lengths[row]), so padding follows the real lengths."""
    groups: dict[int, list[int]] = {}
    for r in rows:
        groups.setdefault(r // group_size, []).append(r)
    ordered = sorted(groups.values(), key=lambda g: -max(lengths[r] for r in g))
    chunks, cur = [], []
    for g in ordered:
        for lo in range(0, len(g), size):
            part = g[lo : lo + size]
            if cur and len(cur) + len(part) > size:
                chunks.append(cur)
                cur = []
            cur = cur + part
    return chunks + ([cur] if cur else [])


class PolicyLogprobs(NamedTuple):
    logp: torch.Tensor  # [B, R] fp32, 0 past each response
    entropy: torch.Tensor  # [B, R] fp32
    tokens: int  # tokens the forwards ran
    tokens_plain: int  # tokens the plain path (every context in full) would run


@torch.no_grad()
def policy_logprobs(forward: Forward, weight, bias, contexts, responses: list[list[int]], batches, *,
                    pad_id: int, device, temperature: float = 1.0) -> PolicyLogprobs:
    """log softmax(z / T)[y_t] and the entropy of every response token, z = hidden @ weight.T + bias, under
    the current weights (the old log-probs of a PPO update). contexts[row]: the row's prompt ids."""
    B, R = len(responses), max([len(r) for r in responses] + [1])
    logp = torch.zeros(B, R, device=device)
    ent = torch.zeros(B, R, device=device)
    tokens = plain = 0
    for rows in batches(list(range(B))):
        h, t, nv = forward([contexts[r] for r in rows], [responses[r] for r in rows])
        targets, _ = response_targets([responses[r] for r in rows], h.shape[1], pad_id, device)
        lp, en = linear_logprobs(h, weight, targets, bias=bias, temperature=temperature, return_entropy=True)
        idx = to_device(torch.tensor(rows), device)
        logp[idx, : h.shape[1]] = lp.float()
        ent[idx, : h.shape[1]] = en.float()
        tokens, plain = tokens + t, plain + nv
    return PolicyLogprobs(logp, ent, tokens, plain)


class TeacherLogprobs(NamedTuple):
    pos: torch.Tensor  # [B, R] fp32: log P_T+(y_t)
    neg: torch.Tensor  # [B, R] fp32: log P_T-(y_t) (RLSD: the old student's)
    tokens: int  # tokens the teacher forwards ran


@torch.no_grad()
def teacher_logprobs(forward: Forward, weight, bias, contexts: TeacherContexts, responses: list[list[int]],
                     batches, *, default: torch.Tensor, lam: float, pad_id: int, temperature: float = 1.0,
                     negative: str = "teacher") -> TeacherLogprobs:
    """Both teachers' log-probs of the responses of `contexts.rows`, scored together by one kernel launch
    per micro-batch (`linear_teacher_logprobs`). Rows not in contexts.rows keep pos = neg = default
    (Delta = 0; their A_hat is 0 anyway), and at lam <= 0 nothing runs: A_hat = A exactly.

    negative="old" (RLSD): only the positive teacher runs; neg is `default` (the old log-probs).
    """
    if negative not in ("teacher", "old"):
        raise ValueError(f"negative: expected 'teacher' or 'old', got {negative!r}")
    pos, neg = default.clone(), default.clone()
    if lam <= 0.0 or not contexts.rows:
        return TeacherLogprobs(pos, neg, 0)
    device, tokens = default.device, 0
    where = {r: k for k, r in enumerate(contexts.rows)}
    for rows in batches(contexts.rows):
        resp = [responses[r] for r in rows]
        h_pos, t, _ = forward([contexts.pos_prefixes[where[r]] for r in rows], resp)
        tokens += t
        R = h_pos.shape[1]
        targets, _ = response_targets(resp, R, pad_id, device)
        dst = to_device(torch.tensor(rows), device)
        if negative == "teacher":
            h_neg, t, _ = forward([contexts.neg_prefixes[where[r]] for r in rows], resp)
            tokens += t
            p, n = linear_teacher_logprobs(h_pos, h_neg, weight, targets, bias=bias, temperature=temperature)
            neg[dst, :R] = n.float()
        else:
            p = linear_logprobs(h_pos, weight, targets, bias=bias, temperature=temperature)
        pos[dst, :R] = p.float()
    return TeacherLogprobs(pos, neg, tokens)
