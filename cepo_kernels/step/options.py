"""The CEPO options, defined and validated once (docs/method.md §2-4, §7).

`CEPOOptions` is what the reweight phase reads. Every front end carries these options under the same
names: `cepo-train`'s TrainConfig (each one a flag), TRL's CEPOConfig and verl's `algorithm.cepo`
settings declare their fields with `option_field(name)` (one default, one help text) and build a
CEPOOptions from them (`options_of`), so the checks and their messages are the same everywhere.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import ClassVar

from cepo_kernels.step.advantages import lam_at
from cepo_kernels.step.algorithms import ALGORITHMS, get_algorithm
from cepo_kernels.step.contexts import check_template
from cepo_kernels.step.distill_templates import DISTILL_TEACHERS, OPSD_TEMPLATE, SDPO_TEMPLATE
from cepo_kernels.step.negatives import NEGATIVE_MODES

__all__ = ["CEPOOptions", "option_field", "options_of", "OPTION_NAMES"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class CEPOOptions:
    """The options of the reweight phase; the constructor checks every one (ValueError / TypeError naming
    it). Subclasses may set `where`, a prefix of the names in the messages (verl: "algorithm.cepo.")."""

    where: ClassVar[str] = ""

    algo: str = field(default="cepo", metadata=_help(
        "the algorithm: cepo (both teachers), rlsd (the positive teacher against the rollout policy), grpo "
        "(no teacher), opsd or sdpo (distillation toward a teacher context, docs/divergence.md)"))
    lam0: float = field(default=0.5, metadata=_help(
        "lambda at step 0, in [0, 1]; lambda(step) = max(0, lam0 (1 - step / t_warm))"))
    t_warm: int = field(default=25, metadata=_help(
        "rollout batches over which lambda decays linearly to 0 (0: lambda = 0 throughout)"))
    eps_w: float = field(default=0.2, metadata=_help(
        "the token weight exp(sign(A) Delta) is clipped to [1 - eps_w, 1 + eps_w]; in [0, 1)"))
    teacher_template: str = field(default=" {answer}", metadata=_help(
        "text inserted after the prompt in the teachers' context, {answer} = r+ or r-; with {question} it "
        "replaces the user message instead; any other {name} is refused"))
    r_minus: str = field(default="ours", metadata=_help(
        "r- of a group: ours (the lowest-reward rejected rollout with an answer, else its first 50 "
        "characters) or official (the authors' choice)"))
    cot_teacher: bool = field(default=False, metadata=_help(
        "the authors' chain-of-thought teacher: r+ and r- are rollout tokens (see --cot-prefix-len)"))
    cot_prefix_len: int = field(default=512, metadata=_help(
        "with --cot-teacher: tokens of the best correct and of the r- rollout used as r+ and r-"))
    cot_suffix: bool = field(default=False, metadata=_help(
        "with --cot-teacher: the last cot_prefix_len tokens instead of the first"))
    teacher_sees_image: bool = field(default=True, metadata=_help(
        "vision-language policy: the teachers see the prompt's image (off: the authors' image-blind CEPO "
        "teachers; docs/vision.md)"))
    # opsd / sdpo (step.distill): the student-teacher divergence
    opsd_template: str = field(default=OPSD_TEMPLATE, metadata=_help(
        "opsd: the teacher's user message, {question} and {answer} = the reference solution"))
    sdpo_template: str = field(default=SDPO_TEMPLATE, metadata=_help(
        "sdpo: the teacher's user message, {question} and {answer} = a successful peer rollout"))
    distill_beta: float = field(default=0.5, metadata=_help(
        "opsd/sdpo: the generalized JSD's coefficient in [0, 1] (0: KL(teacher || student), 1: reverse KL)"))
    distill_teacher: str = field(default="live", metadata=_help(
        "opsd/sdpo teacher weights: live (the current policy, no gradient), initial (LoRA disabled, else a "
        "frozen copy) or ema (a copy, see --distill-ema-rate)"))
    distill_ema_rate: float = field(default=0.05, metadata=_help(
        "with --distill-teacher ema: teacher += rate (policy - teacher) per optimizer step, in (0, 1]"))
    sdpo_topk: int = field(default=100, metadata=_help(
        "sdpo: the JSD over the student's top-k ids plus a tail bucket; 0: the full vocabulary"))
    sdpo_is_clip: float = field(default=2.0, metadata=_help(
        "sdpo: the importance weight min(exp(logp - logp_old), is_clip) at the sampled token (> 0)"))
    distillation_weight: float = field(default=1.0, metadata=_help(
        "sdpo: loss = (1 - w) GRPO + w distillation, w in [0, 1] (TRL's distillation_weight)"))

    def __post_init__(self):
        w = self.where
        algo = get_algorithm(self.algo) if self.algo in ALGORITHMS else None
        if algo is None:
            raise ValueError(f"{w}algo: expected one of {tuple(ALGORITHMS)}, got {self.algo!r}")
        _number(f"{w}lam0", self.lam0, "[0, 1]", lambda v: 0.0 <= v <= 1.0)
        _number(f"{w}eps_w", self.eps_w, "[0, 1)", lambda v: 0.0 <= v < 1.0)
        if isinstance(self.t_warm, bool) or not isinstance(self.t_warm, int) or self.t_warm < 0:
            raise ValueError(f"{w}t_warm: expected an int >= 0, got {self.t_warm!r}")
        check_template(self.teacher_template, f"{w}teacher_template")
        if self.r_minus not in NEGATIVE_MODES:
            raise ValueError(f"{w}r_minus: expected one of {NEGATIVE_MODES}, got {self.r_minus!r}")
        for name in ("cot_teacher", "cot_suffix", "teacher_sees_image"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{w}{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("opsd_template", "sdpo_template"):
            check_template(getattr(self, name), f"{w}{name}")
        _number(f"{w}distill_beta", self.distill_beta, "[0, 1]", lambda v: 0.0 <= v <= 1.0)
        _number(f"{w}distillation_weight", self.distillation_weight, "[0, 1]", lambda v: 0.0 <= v <= 1.0)
        _number(f"{w}distill_ema_rate", self.distill_ema_rate, "(0, 1]", lambda v: 0.0 < v <= 1.0)
        _number(f"{w}sdpo_is_clip", self.sdpo_is_clip, "(0, inf)", lambda v: v > 0.0)
        if self.distill_teacher not in DISTILL_TEACHERS:
            raise ValueError(f"{w}distill_teacher: expected one of {DISTILL_TEACHERS}, "
                             f"got {self.distill_teacher!r}")
        k = self.sdpo_topk
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{w}sdpo_topk: expected an int >= 0 (0: full vocabulary), got {k!r}")
        k = self.cot_prefix_len
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{w}cot_prefix_len: expected a positive number of tokens, got {k!r}")

    @property
    def algorithm(self):
        """The algorithm's entry of the table (step.algorithms)."""
        return get_algorithm(self.algo)

    def lam(self, step: int) -> float:
        """lambda at the 0-based rollout batch `step` (docs/method.md §7); 0 for an algorithm without
        teachers."""
        return lam_at(step, self.lam0, self.t_warm) if self.algorithm.weighted else 0.0


def _number(name: str, value, interval: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or not ok(float(value)):
        raise ValueError(f"{name}: expected a value in {interval}, got {value}")


OPTION_NAMES = tuple(f.name for f in fields(CEPOOptions))
_FIELDS = {f.name: f for f in fields(CEPOOptions)}


def option_field(name: str, **metadata):
    """A dataclass field for the option `name` with CEPOOptions' default and help (metadata may add to or
    override the help, e.g. where a front end reads the option differently)."""
    f = _FIELDS[name]
    return field(default=f.default, metadata={**f.metadata, **metadata})


def options_of(config, cls=CEPOOptions, **overrides) -> CEPOOptions:
    """The CEPOOptions of a front end's configuration: its attributes named as the options (the others
    keep their defaults), then `overrides`. Raises what CEPOOptions raises."""
    values = {n: getattr(config, n) for n in OPTION_NAMES if hasattr(config, n)}
    return cls(**{**values, **overrides})
