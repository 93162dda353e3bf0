"""Teacher contexts (METHOD.md): the choice of r+ / r- and the packing of prompt + answer + response.

The positive teacher sees the reference answer r+, the negative teacher the answer r- of the group's
lowest-reward rejected rollout. Both read the same response tokens as the student; only the response
positions' log-probs are used, so every packing here aligns the responses in the same columns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from cepo_kernels.rl.reward import extract_boxed
from cepo_kernels.rl.task import encode, render_prompt

REJECT_BELOW = 0.5  # a rollout with reward < 0.5 is rejected (METHOD.md)
FALLBACK_CHARS = 50


class Packed(NamedTuple):
    """Sequences laid out as [left-padded prefix | right-padded response]; columns start: are the response."""

    input_ids: torch.Tensor  # [B, L + R] int64
    attention_mask: torch.Tensor  # [B, L + R] int64, 0 at pads
    position_ids: torch.Tensor  # [B, L + R] int64, 0..n-1 over the non-pad tokens of each row
    start: int  # L: the column of the first response token
    targets: torch.Tensor  # [B, R] int64 response tokens (pad id at pads)
    mask: torch.Tensor  # [B, R] bool, True at response tokens


def pack(
    prefixes: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    device="cpu",
    resp_len: int | None = None,
) -> Packed:
    """Left-pads the prefixes to a common length L and right-pads the responses to R (>= 1).

    Hidden state column start - 1 + t then predicts response token t for every row, whatever the
    row's prefix length. Position ids count the non-pad tokens only, so a left-padded row is numbered
    0, 1, ... from its first real token, as if it were alone.
    """
    if len(prefixes) != len(responses):
        raise ValueError(
            f"prefixes and responses: expected the same number of rows, got {len(prefixes)} "
            f"and {len(responses)}"
        )
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("prefixes: every row needs at least one token (the prompt)")
    B = len(prefixes)
    L = max((len(p) for p in prefixes), default=1)
    R = resp_len if resp_len is not None else max([len(r) for r in responses] + [1])
    ids = torch.full((B, L + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prefixes, responses, strict=True)):
        r = r[:R]
        ids[i, L - len(p) : L] = torch.tensor(p, dtype=torch.long)
        attn[i, L - len(p) : L] = 1
        if r:
            ids[i, L : L + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, L : L + len(r)] = 1
    pos = (attn.cumsum(dim=1) - 1).clamp_min(0)
    ids, attn, pos = ids.to(device), attn.to(device), pos.to(device)
    return Packed(ids, attn, pos, L, ids[:, L:], attn[:, L:].bool())


def fallback_answer(text: str, max_chars: int = FALLBACK_CHARS) -> str:
    """r- of a rejected rollout without an extractable answer: its first max_chars characters, whitespace
    collapsed ("" for an empty response). Never the string "None" (the bug of the authors' str(None))."""
    return "" if text is None else " ".join(str(text).split())[:max_chars]


def negative_answer(
    texts: list[str],
    rewards: list[float],
    reference: str,
    extract=extract_boxed,
    max_chars: int = FALLBACK_CHARS,
) -> tuple[str, int | None, str]:
    """r- of one group: the answer of its lowest-reward rejected rollout (reward < 0.5).

    Among rollouts tied at the lowest reward, the first with an extractable answer is taken; when none
    has one, the first's fallback_answer. A group with no rejected rollout gets r- = r+ (Delta = 0).
    Returns (answer, index of the rollout in the group or None, how: "answer", "fallback" or "all-correct").
    """
    rejected = [i for i, r in enumerate(rewards) if r < REJECT_BELOW]
    if not rejected:
        return reference, None, "all-correct"
    lowest = min(rewards[i] for i in rejected)
    tied = [i for i in rejected if rewards[i] == lowest]
    for i in tied:
        try:
            ans = extract(texts[i])
        except Exception:  # a user's extractor failing on one response: treat it as no answer
            ans = None
        if ans is not None and str(ans).strip():
            return str(ans).strip(), i, "answer"
    return fallback_answer(texts[tied[0]], max_chars), tied[0], "fallback"


def teacher_prefix(
    tokenizer,
    question: str,
    prompt_ids: list[int],
    answer: str,
    template: str = " {answer}",
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of a teacher's context before the response.

    Default (the authors' insertion): the templated prompt's ids followed by the ids of the template with
    {answer} filled in (" " + answer, no special tokens). A template containing {question} instead
    replaces the user message and goes through the chat template again.
    """
    if "{question}" in template:
        message = template.replace("{question}", question).replace("{answer}", answer)
        return encode(tokenizer, render_prompt(tokenizer, message, system_prompt))
    return list(prompt_ids) + encode(tokenizer, template.replace("{answer}", answer))


class TeacherPlan(NamedTuple):
    """Which rows get teacher passes and with which contexts."""

    rows: list[int]  # indices (into the rollout batch) of the sequences with A != 0
    pos_prefixes: list[list[int]]  # prompt + r+ context of each such row
    neg_prefixes: list[list[int]]  # prompt + r- context of each such row
    neg_answers: list[str]  # r- of each group
    neg_how: list[str]  # "answer" / "fallback" / "all-correct" per group


def plan_teachers(
    tokenizer,
    questions: list[str],
    prompt_ids: list[list[int]],
    references: list[str],
    texts: list[str],
    rewards: list[float],
    advantages: torch.Tensor,
    group_size: int,
    template: str = " {answer}",
    system_prompt: str | None = None,
    extract=extract_boxed,
) -> TeacherPlan:
    """Teacher contexts for a rollout batch of len(questions) groups of group_size contiguous responses.

    questions / prompt_ids / references: one per group (prompt_ids already templated);
    texts / rewards / advantages: one per response. Rows with advantage 0 are skipped: their A_hat is 0.
    """
    n_groups = len(questions)
    if len(texts) != n_groups * group_size or len(rewards) != len(texts) or advantages.numel() != len(texts):
        raise ValueError(
            f"texts, rewards, advantages: expected {n_groups} x {group_size} = "
            f"{n_groups * group_size} entries, got {len(texts)}, {len(rewards)}, {advantages.numel()}"
        )
    neg_answers, neg_how, rows, pos_prefixes, neg_prefixes = [], [], [], [], []
    adv = advantages.detach().cpu().tolist()
    for g in range(n_groups):
        sl = slice(g * group_size, (g + 1) * group_size)
        neg, _, how = negative_answer(texts[sl], rewards[sl], references[g], extract)
        neg_answers.append(neg)
        neg_how.append(how)
        active = [i for i in range(sl.start, sl.stop) if adv[i] != 0.0]
        if not active:
            continue
        pos_p = teacher_prefix(tokenizer, questions[g], prompt_ids[g], references[g], template, system_prompt)
        neg_p = teacher_prefix(tokenizer, questions[g], prompt_ids[g], neg, template, system_prompt)
        for i in active:
            rows.append(i)
            pos_prefixes.append(pos_p)
            neg_prefixes.append(neg_p)
    return TeacherPlan(rows, pos_prefixes, neg_prefixes, neg_answers, neg_how)
