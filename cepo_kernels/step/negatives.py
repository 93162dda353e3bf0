"""The choice of r-, the negative teacher's answer, per group (docs/method.md §2).

Among a group's rejected rollouts (reward < 0.5) the one with the lowest reward gives r-: the answer its
extractor finds (by default the content of its last \\boxed{...}), else its first 50 characters. A group
with no rejected rollout gets r- = r+, so its evidence is exactly 0.

mode="official" is the authors' choice instead: the first rollout with the lowest reward, whatever its
answer; the content of its last "\\boxed{" when that box is closed, else the literal string "None" (what
mathruler's extract_boxed_content returns); its first 50 characters only for an empty box, and r+ when
that is empty too. So a truncated or unboxed r- reads "None" there, where the default tries the tied
rollouts for an answer and falls back to the text.
"""

from __future__ import annotations

from typing import NamedTuple

from cepo_kernels.step.rewards import extract_boxed

__all__ = ["REJECT_BELOW", "FALLBACK_CHARS", "NEGATIVE_MODES", "Negative", "fallback_answer",
           "negative_answer", "official_negative", "choose_negatives"]

REJECT_BELOW = 0.5  # a rollout with reward < 0.5 is rejected
FALLBACK_CHARS = 50
NEGATIVE_MODES = ("ours", "official")


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


def _last_box_official(text: str) -> str:
    """The content of the last "\\boxed{" when its braces close (stripped), else "None"."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return "None"
    depth = 0
    for i in range(start + len("\\boxed{"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[start + len("\\boxed{"):i].strip()
    return "None"


def official_negative(texts: list[str], rewards: list[float], reference: str) -> Negative:
    """r- of one group as the authors choose it (mode="official", see the module docstring)."""
    rejected = [i for i, r in enumerate(rewards) if r < REJECT_BELOW]
    if not rejected:
        return Negative(reference, None, "all-correct")
    i = min(rejected, key=lambda k: rewards[k])  # the first of the lowest
    text = "" if texts[i] is None else str(texts[i])
    answer = _last_box_official(text)
    how = "answer" if answer and answer != "None" else "fallback"
    answer = answer or text[:FALLBACK_CHARS]
    if not answer.strip():
        return Negative(reference, i, "fallback")
    return Negative(answer, i, how)


def choose_negatives(texts: list[str], rewards: list[float], references: list[str], group_size: int,
                     extract=extract_boxed, mode: str = "ours") -> list[Negative]:
    """r- of every group of a rollout batch: texts and rewards have one entry per response (groups of
    group_size contiguous), references one per group; mode "ours" (negative_answer, with `extract`) or
    "official" (official_negative). Every process that sees the same gathered batch makes the same
    choices."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"mode: expected one of {NEGATIVE_MODES}, got {mode!r}")
    n_groups = len(references)
    if len(texts) != n_groups * group_size or len(rewards) != len(texts):
        raise ValueError(
            f"texts, rewards: expected {n_groups} groups x {group_size} = {n_groups * group_size} entries "
            f"each, got {len(texts)} and {len(rewards)}"
        )
    def one(g):
        t, r = texts[g * group_size:(g + 1) * group_size], list(rewards[g * group_size:(g + 1) * group_size])
        if mode == "official":
            return official_negative(t, r, references[g])
        return negative_answer(t, r, references[g], extract)

    return [one(g) for g in range(n_groups)]
