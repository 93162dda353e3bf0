"""Teacher contexts (docs/method.md §2): which rows get teacher passes, and the token layout of
prompt + answer + response that the positive (r+) and negative (r-) teachers read.

Both teachers read the same response tokens as the student; only the response positions' log-probs
are used, so every layout here puts the responses in the same columns. Tokenizers are duck-typed
(a Hugging Face tokenizer: `__call__(text, add_special_tokens=False)` and `apply_chat_template`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

__all__ = ["encode", "render_prompt", "check_template", "teacher_prefix", "teacher_rows", "TeacherContexts",
           "teacher_contexts", "cot_answers", "Packed", "pack", "response_targets", "to_device"]


def render_prompt(tokenizer, question: str, system_prompt: str | None = None) -> str:
    """The question through the tokenizer's chat template (generation prompt added); raw text without one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (system_prompt + "\n" if system_prompt else "") + question


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text with no special tokens added (templates already carry theirs)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


TEMPLATE_FIELDS = ("answer", "question")
# a {name} not right after a letter or backslash: \boxed{x} and \text{...} are LaTeX, not placeholders
_PLACEHOLDER = re.compile(r"(?<![A-Za-z\\])\{(\w+)\}")


def check_template(template: str, name: str = "teacher_template") -> str:
    """template, when it holds {answer} and no placeholder but {answer} and {question}; else ValueError
    naming the unknown placeholder and the allowed ones."""
    if not isinstance(template, str):
        raise TypeError(f"{name}: expected a string, got {type(template).__name__}")
    allowed = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    unknown = [m for m in _PLACEHOLDER.findall(template) if m not in TEMPLATE_FIELDS]
    if unknown:
        raise ValueError(f"{name}: unknown placeholder {{{unknown[0]}}} in {template!r}; allowed: {allowed}")
    if "{answer}" not in template:
        raise ValueError(f"{name}: expected a string containing '{{answer}}', got {template!r}")
    return template


def teacher_prefix(tokenizer, question: str, prompt_ids: list[int], answer: str, template: str = " {answer}",
                   system_prompt: str | None = None) -> list[int]:
    """Token ids of a teacher's context before the response.

    Default (the authors' insertion): the templated prompt's ids followed by the ids of the template with
    {answer} filled in (" " + answer, no special tokens). A template containing {question} instead
    replaces the user message and goes through the chat template again. An answer given as a list of
    token ids (the chain-of-thought teacher, cot_answers) follows the prompt's ids as it is, no template.
    """
    if isinstance(answer, (list, tuple)):  # token ids of a rollout (cot_answers): right after the prompt
        return list(prompt_ids) + list(answer)
    if "{question}" in template:
        message = template.replace("{question}", question).replace("{answer}", answer)
        return encode(tokenizer, render_prompt(tokenizer, message, system_prompt))
    return list(prompt_ids) + encode(tokenizer, template.replace("{answer}", answer))


def teacher_rows(advantages: torch.Tensor, mask: torch.Tensor | None = None) -> list[int]:
    """The rows whose teachers can change the update: A != 0 (docs/method.md §4, invariant 4), and at
    least one valid token when `mask` [B, T] is given. One host sync."""
    keep = advantages.detach().reshape(-1) != 0
    if mask is not None:
        keep = keep & mask.bool().any(dim=1)
    return [i for i, k in enumerate(keep.tolist()) if k]


class TeacherContexts(NamedTuple):
    """The teacher passes of a batch: rows[k] is scored after pos_prefixes[k] and after neg_prefixes[k]."""

    rows: list[int]
    pos_prefixes: list[list[int]]  # prompt + r+
    neg_prefixes: list[list[int]]  # prompt + r-


def teacher_contexts(tokenizer, rows: list[int], *, prompt_ids, pos_answers, neg_answers, questions=None,
                     template: str = " {answer}", system_prompt: str | None = None) -> TeacherContexts:
    """The contexts of `rows`: prompt_ids, pos_answers (r+), neg_answers (r-) and questions are indexed by
    row (lists over the batch, or mappings). Rows of one group share their prefixes' token lists."""
    memo: dict = {}

    def prefix(r, answer):
        question = "" if questions is None else questions[r]
        key = (question, tuple(prompt_ids[r]), tuple(answer) if isinstance(answer, list) else answer)
        if key not in memo:
            memo[key] = teacher_prefix(tokenizer, question, prompt_ids[r], answer, template, system_prompt)
        return memo[key]

    rows = list(rows)
    return TeacherContexts(rows, [prefix(r, pos_answers[r]) for r in rows],
                           [prefix(r, neg_answers[r]) for r in rows])


def cot_answers(responses: list[list[int]], rewards: list[float], negatives, references: list[str],
                group_size: int, k: int, suffix: bool = False) -> tuple[list, list]:
    """r+ and r- per row for the chain-of-thought teacher (the authors' cepo_use_cot_teacher): r+ = the
    first k tokens (suffix: the last k) of the group's best correct rollout (reward >= 0.5; the first on
    ties), or the reference answer (text) when the group has none; r- = the same k tokens of the rollout
    that gave the group's r- (negatives[g].index), or r+ when the group has no rejected rollout.
    `negatives` as from choose_negatives, one per group; responses and rewards one per row."""
    if k < 1:
        raise ValueError(f"cot_prefix_len: expected a positive number of tokens, got {k}")

    def part(i):
        ids = list(responses[i])
        return ids[-k:] if suffix else ids[:k]

    pos, neg = [], []
    for g, negative in enumerate(negatives):
        rows = range(g * group_size, (g + 1) * group_size)
        correct = [i for i in rows if rewards[i] >= 0.5]
        best = max(correct, key=lambda i: rewards[i]) if correct else None  # max keeps the first on ties
        r_pos = part(best) if best is not None else references[g]
        r_neg = r_pos if negative.index is None else part(g * group_size + negative.index)
        pos += [r_pos] * group_size
        neg += [r_neg] * group_size
    return pos, neg


class Packed(NamedTuple):
    """Sequences laid out as [left-padded prefix | right-padded response]; columns start: are the response."""

    input_ids: torch.Tensor  # [B, L + R] int64
    attention_mask: torch.Tensor  # [B, L + R] int64, 0 at pads
    position_ids: torch.Tensor  # [B, L + R] int64, 0..n-1 over the non-pad tokens of each row
    start: int  # L: the column of the first response token
    targets: torch.Tensor  # [B, R] int64 response tokens (pad id at pads)
    mask: torch.Tensor  # [B, R] bool, True at response tokens


def pack(prefixes: list[list[int]], responses: list[list[int]], pad_id: int, device="cpu",
         resp_len: int | None = None) -> Packed:
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


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on the device without a blocking copy (pinned memory, non_blocking) on a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def response_targets(responses: list[list[int]], R: int, pad_id: int, device):
    """targets [n, R] (pad_id past each response) and mask [n, R] bool, on the device."""
    t = torch.full((len(responses), R), pad_id, dtype=torch.long)
    m = torch.zeros((len(responses), R), dtype=torch.bool)
    for i, ids in enumerate(responses):
        ids = ids[:R]
        t[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        m[i, : len(ids)] = True
    return to_device(t, device), to_device(m, device)
