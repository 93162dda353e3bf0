"""Graders users already trust, beside the built-in boxed grader (step/rewards.py):

- "official": the authors' score, mathruler's `grade_answer` on mathruler's `extract_boxed_content` of the
  response (the last `\\boxed{...}`), as 0.9 x accuracy + 0.1 x format, format = 1 when the response
  has a complete \\boxed{...} (extra `[official]`: mathruler and pylatexenc, which mathruler imports);
- "math-verify": Hugging Face's math-verify, `verify(parse(reference), parse(response))`, 1 or 0; it
  reads the answer anywhere in the response (a box, the last LaTeX or plain expression), so an unboxed
  or truncated response can still be right (extra `[math-verify]`);
- "boxed": the built-in grader (`step.rewards.boxed_reward`), no extra package.

Each is a plain `fn(response_text, reference) -> float` (cepo-train's `--reward`), and `trl_reward(fn)`
/ `verl_reward(fn)` wrap one for TRL (`f(completions, **columns) -> list[float]`) or verl
(`compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float`).
"""

from __future__ import annotations

from cepo_kernels.step.rewards import boxed_reward, extract_boxed

__all__ = ["GRADERS", "grader", "official_accuracy", "official_reward", "math_verify_reward", "trl_reward",
           "verl_reward"]

GRADERS = ("boxed", "official", "math-verify")
OFFICIAL_FORMAT_WEIGHT = 0.1
# grader: (module imported, setup.py extra, the packages that extra installs)
_EXTRA = {"official": ("mathruler.grader", "official", "mathruler pylatexenc"),
          "math-verify": ("math_verify", "math-verify", "math-verify")}


def _require(name: str):
    """The grader's package, or an ImportError naming the packages to install (and, in a clone, the extra)."""
    import importlib

    module, extra, packages = _EXTRA[name]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"reward: {name!r} needs the package {module.split('.')[0]!r} ({e}); install it with "
            f"`pip install {packages}` (or, in a clone of cepo_kernels, `pip install -e \".[{extra}]\"`)"
        ) from None


def official_accuracy(text: str, reference: str) -> float:
    """1.0 when mathruler grades the response's last \\boxed{} content equal to the reference, else 0.0."""
    mr = _require("official")
    return 1.0 if mr.grade_answer(mr.extract_boxed_content(str(text)), str(reference)) else 0.0


def official_reward(text: str, reference: str) -> float:
    """The authors' score: 0.9 x official_accuracy + 0.1 x (a complete \\boxed{...} in the response)."""
    fmt = 1.0 if extract_boxed(text) is not None else 0.0
    return (1.0 - OFFICIAL_FORMAT_WEIGHT) * official_accuracy(text, reference) + OFFICIAL_FORMAT_WEIGHT * fmt


def math_verify_reward(text: str, reference: str) -> float:
    """1.0 when math-verify finds the response's answer equivalent to the reference, else 0.0. The
    reference is parsed as LaTeX math (inside $...$), or as written when that finds nothing."""
    mv = _require("math-verify")
    gold = mv.parse(f"${reference}$") or mv.parse(str(reference))
    return 1.0 if gold and mv.verify(gold, mv.parse(str(text))) else 0.0


def grader(name: str):
    """The fn(text, reference) of a grader name in GRADERS; its package is imported now, so a missing
    extra fails before training starts."""
    if name not in GRADERS:
        raise ValueError(f"reward: expected one of {GRADERS}, got {name!r}")
    if name in _EXTRA:
        _require(name)
    return {"boxed": boxed_reward, "official": official_reward, "math-verify": math_verify_reward}[name]


def _completion_text(completion) -> str:
    """A TRL completion: a string, or a conversation (a list of {"role", "content"} messages: the last
    message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completions: expected strings or lists of messages, got {type(completion).__name__}")


def trl_reward(fn, answer_key: str = "answer"):
    """fn(text, reference) as a TRL reward function, `f(completions, **columns) -> list[float]`: the
    reference of each completion is the dataset column `answer_key`, which TRL passes as a keyword."""

    def reward(completions, **columns):
        if answer_key not in columns:
            raise KeyError(f"answer_key: the dataset has no column {answer_key!r} (columns passed: "
                           f"{sorted(columns)})")
        refs = columns[answer_key]
        return [float(fn(_completion_text(c), str(r))) for c, r in zip(completions, refs, strict=True)]

    reward.__name__ = getattr(fn, "__name__", "reward")  # TRL logs each reward function by its name
    return reward


def verl_reward(fn):
    """fn(text, reference) as verl's custom reward function, compute_score(data_source, solution_str,
    ground_truth, extra_info=None) -> float."""

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return float(fn(solution_str, str(ground_truth)))

    return compute_score
