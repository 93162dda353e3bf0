"""Verifiable rewards: the answer in the last \\boxed{...}, normalised, against the reference answer, and
the scoring of a rollout batch with a user's reward function (a failing call scores 0 and is counted)."""

from __future__ import annotations

import math
import numbers
import re

BOXED = "\\boxed"


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in text (nested braces allowed); None when there is none.

    An unclosed last box (a truncated response) is not an answer: the previous complete one is used.
    """
    if not isinstance(text, str):
        return None
    start = text.rfind(BOXED + "{")
    while start != -1:
        depth, i = 0, start + len(BOXED)
        for i in range(start + len(BOXED), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len(BOXED) + 1 : i]
        start = text.rfind(BOXED + "{", 0, start)
    return None


_STRIP = ("\\left", "\\right", "\\!", "\\,", "\\;", "$", "\\%", "%", "^\\circ", "^{\\circ}", "\\displaystyle")


def normalize_answer(ans: str) -> str:
    """A canonical form for comparison: no spaces, no $ or \\left/\\right, \\text{} unwrapped,
    \\dfrac/\\tfrac -> \\frac, trailing period dropped, lower case."""
    s = str(ans).strip()
    s = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", s)
    for token in _STRIP:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    return s


def _as_number(s: str) -> float | None:
    s = s.replace(",", "")
    m = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(r"(-?[\d.]+)/(-?[\d.]+)", s)
    try:
        if m:
            return float(m.group(1)) / float(m.group(2))
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str | None, ref: str) -> bool:
    """Equal after normalisation, or equal as numbers (relative tolerance 1e-6)."""
    if pred is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(ref)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def boxed_reward(response: str, answer: str) -> float:
    """1.0 when the last \\boxed{} of the response matches the reference answer, else 0.0."""
    return 1.0 if answers_match(extract_boxed(response), answer) else 0.0


# a reward beyond this magnitude is a bug in the reward function, not a signal (the advantages would be
# dominated by one response, and an accuracy read off rewards would be meaningless)
MAX_ABS_REWARD = 1e6


def _reward_value(r) -> float:
    """r as a float when it is a real number (int, float, bool, a numpy scalar); ValueError otherwise."""
    kind = getattr(getattr(r, "dtype", None), "kind", None) if getattr(r, "shape", None) == () else None
    if isinstance(r, str) or not (isinstance(r, (numbers.Real, bool)) or kind in ("b", "i", "u", "f")):
        raise TypeError(f"expected a real number (int, float, bool), got {type(r).__name__} {r!r:.40}")
    value = float(r)
    if not math.isfinite(value):
        raise ValueError(f"non-finite reward {value}")
    if abs(value) > MAX_ABS_REWARD:
        raise ValueError(f"absurd reward {value:g} (|reward| > {MAX_ABS_REWARD:g})")
    return value


def safe_rewards(fn, responses: list[str], answers: list[str], failures: list | None = None):
    """Scores every (response, answer) pair; a call that raises, or returns anything but a finite real
    number of magnitude <= MAX_ABS_REWARD (a string "1.0" included), scores 0 and counts as failed.

    Returns (rewards, number of failed calls); `failures`, when given, receives a one-line description of
    each failure (the trainer warns with the first one, and stops when every call failed).
    """
    rewards, errors = [], 0
    for response, answer in zip(responses, answers, strict=True):
        try:
            r = _reward_value(fn(response, answer))
        except Exception as e:  # a user's reward function may fail in any way: that sample scores 0
            r, errors = 0.0, errors + 1
            if failures is not None:
                failures.append(f"{type(e).__name__}: {e}")
        rewards.append(r)
    return rewards, errors


def with_format_bonus(fn, bonus: float, extract=extract_boxed):
    """The authors' reward shape: (1 - bonus) x fn + bonus x format, format = 1 when the response has an
    extractable answer (a complete \\boxed{...} by default). bonus = 0.1 gives their 0.9 x accuracy +
    0.1 x format, so an all-wrong group with boxed and unboxed answers still has non-zero advantages."""
    if not 0.0 <= bonus <= 1.0:
        raise ValueError(f"format_bonus: expected a value in [0, 1], got {bonus}")

    def reward(text, ref):
        try:
            has_answer = extract(text) is not None
        except Exception:  # a user's extractor failing on one response: no format credit
            has_answer = False
        return (1.0 - bonus) * _reward_value(fn(text, ref)) + bonus * float(has_answer)

    return reward
