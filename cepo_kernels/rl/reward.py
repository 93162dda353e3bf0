"""Verifiable rewards: the answer in the last \\boxed{...}, normalised, against the reference answer."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import sys
from pathlib import Path

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


def load_reward_fn(spec: str):
    """A reward function from "module:function" (the module is looked up in the current directory
    first, then on the Python path) or "path/to/file.py:function"."""
    source, _, name = spec.rpartition(":")
    if not source or not name:
        raise ValueError(f"reward_fn: expected 'module:function' or 'path/to/file.py:function', got {spec!r}")
    try:
        if source.endswith(".py") or os.sep in source or "/" in source:
            path = Path(source)
            if not path.is_file():
                raise ValueError(f"reward_fn: file {source!r} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"cepo_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(source)
    except ValueError:
        raise
    except ImportError as e:
        raise ValueError(
            f"reward_fn: cannot import {source!r} ({e}); looked in {os.getcwd()} and on the Python path"
        ) from None
    except Exception as e:  # the user's module failed while loading (syntax error, ...)
        raise ValueError(f"reward_fn: loading {source!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"reward_fn: {source!r} has no attribute {name!r}")
    if not callable(fn):
        raise TypeError(f"reward_fn: {spec!r} is not callable")
    return fn


def safe_rewards(fn, responses: list[str], answers: list[str], failures: list | None = None):
    """Scores every (response, answer) pair; a call that raises or returns a non-finite value scores 0.

    Returns (rewards, number of failed calls); `failures`, when given, receives a one-line description of
    each failure (the trainer warns with the first one, and stops when every call failed).
    """
    rewards, errors = [], 0
    for response, answer in zip(responses, answers, strict=True):
        try:
            r = float(fn(response, answer))
            if not math.isfinite(r):
                raise ValueError(f"non-finite reward {r}")
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
        return (1.0 - bonus) * float(fn(text, ref)) + bonus * float(has_answer)

    return reward
