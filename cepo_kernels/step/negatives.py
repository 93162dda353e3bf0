"""The choice of r-, the negative teacher's answer, per group (docs/method.md §2).

Among a group's rejected rollouts (reward < 0.5) the one with the lowest reward gives r-: the answer its
extractor finds (by default the content of its last \\boxed{...}), else its first 50 characters. A group
with no rejected rollout gets r- = r+, so its evidence is exactly 0.
"""

from __future__ import annotations

from typing import NamedTuple

from cepo_kernels.step.rewards import extract_boxed

__all__ = ["REJECT_BELOW", "FALLBACK_CHARS", "Negative", "fallback_answer", "negative_answer",
           "choose_negatives"]

REJECT_BELOW = 0.5  # a rollout with reward < 0.5 is rejected
FALLBACK_CHARS = 50


class Negative(NamedTuple):
    """r- of one group."""

    answer: str
    index: int | None  # the rollout it came from (within the group); None when r- = r+
    how: str  # "answer" (extracted), "fallback" (first characters) or "all-correct" (r- = r+)


def fallback_answer(text: str, max_chars: int = FALLBACK_CHARS) -> str:
    """r- of a rejected rollout without an extractable answer: its first max_chars characters, whitespace
    collapsed ("" for an empty response), never the string "None"."""
    return "" if text is None else " ".join(str(text).split())[:max_chars]


def negative_answer(texts: list[str], rewards: list[float], reference: str, extract=extract_boxed,
                    max_chars: int = FALLBACK_CHARS) -> Negative:
    """r- of one group from its responses' texts and rewards.

    Among rollouts tied at the lowest reward below REJECT_BELOW, the first with an extractable answer is
    taken; when none has one, the first's fallback_answer. No rejected rollout: r- = r+ (`reference`).
    A reward that is NaN is not a rejection.
    """
    rejected = [i for i, r in enumerate(rewards) if r < REJECT_BELOW]
    if not rejected:
        return Negative(reference, None, "all-correct")
    lowest = min(rewards[i] for i in rejected)
    tied = [i for i in rejected if rewards[i] == lowest]
    for i in tied:
        try:
            ans = extract(texts[i])
        except Exception:  # a user's extractor failing on one response: treat it as no answer
            ans = None
        if ans is not None and str(ans).strip():
            return Negative(str(ans).strip(), i, "answer")
    return Negative(fallback_answer(texts[tied[0]], max_chars), tied[0], "fallback")


def choose_negatives(texts: list[str], rewards: list[float], references: list[str], group_size: int,
                     extract=extract_boxed) -> list[Negative]:
    """r- of every group of a rollout batch: texts and rewards have one entry per response (groups of
    group_size contiguous), references one per group. Every process that sees the same gathered batch
    makes the same choices."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    n_groups = len(references)
    if len(texts) != n_groups * group_size or len(rewards) != len(texts):
        raise ValueError(
            f"texts, rewards: expected {n_groups} groups x {group_size} = {n_groups * group_size} entries "
            f"each, got {len(texts)} and {len(rewards)}"
        )
    return [negative_answer(texts[g * group_size:(g + 1) * group_size],
                            list(rewards[g * group_size:(g + 1) * group_size]), references[g], extract)
            for g in range(n_groups)]
