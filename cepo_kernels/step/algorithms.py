"""The algorithms as data: which teachers each runs and how its token weights are formed.

Each entry is read by the reweight phase (`step.reweight`: which teacher contexts are scored, what Delta
subtracts) and by the updates of the front ends (whether the loss gets teacher log-probs at all). Adding
an algorithm is one `register_algorithm(Algorithm(...))`, as verl's `register_adv_est`.

    name   teachers      Delta (docs/method.md §3)            lambda (§7)
    cepo   pos, neg      log P_T+ - log P_T-                   lam_at(step, lam0, t_warm)
    rlsd   pos           log P_T+ - log P_old                  lam_at(step, lam0, t_warm)
    grpo   (none)        0 (w = 1, A_hat = A)                  0

and the distribution-matching relatives the paper argues against (loss "divergence", step.distill): no
token weight; the loss is the divergence between the student and a teacher that reads `context`:
    opsd   context "reference" (prompt + the reference solution), pure distillation (JSD beta 0.5)
    sdpo   context "peer" (the prompt re-asked with a successful rollout of the same group), JSD over the
           student's top-k with tail, times SDPO's clipped importance weight; blend with GRPO optional
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Algorithm", "ALGORITHMS", "register_algorithm", "get_algorithm", "TEACHERS", "BASELINES",
           "LOSSES", "CONTEXTS"]

TEACHERS = ("pos", "neg")  # the teacher contexts: prompt + r+ and prompt + r- (docs/method.md §2)
# what Delta subtracts from the positive teacher: the negative teacher's or the rollout policy's log-probs
BASELINES = ("neg", "old")
LOSSES = ("policy", "divergence")  # the reweighted PPO loss, or a student-teacher divergence (step.distill)
CONTEXTS = ("reference", "peer")  # a divergence algorithm's teacher context (step.distill.distill_contexts)


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of the table.

    teachers: the teacher contexts it scores, a subset of TEACHERS in that order (() = no teacher: GRPO).
    baseline: the log-probs Delta subtracts from the positive teacher's, "neg" (the negative teacher's) or
        "old" (the rollout policy's, as RLSD); None without teachers (w = 1, and lambda is 0).
    loss: "policy" (the PPO loss of A_hat) or "divergence" (the student-teacher divergence of step.distill;
        no reweight teachers then).
    context: a divergence algorithm's teacher context, one of CONTEXTS; None for a policy loss.
    """

    name: str
    teachers: tuple[str, ...]
    baseline: str | None
    summary: str = ""
    loss: str = "policy"
    context: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"name: expected an identifier, got {self.name!r}")
        if tuple(t for t in TEACHERS if t in self.teachers) != tuple(self.teachers):
            raise ValueError(f"teachers: expected a subset of {TEACHERS} in that order, "
                             f"got {self.teachers!r}")
        if self.teachers and "pos" not in self.teachers:
            raise ValueError(f"teachers: every weighted algorithm runs the positive teacher, "
                             f"got {self.teachers!r}")
        expected = None if not self.teachers else ("neg" if "neg" in self.teachers else "old")
        if self.baseline != expected:
            raise ValueError(f"baseline: expected {expected!r} with teachers {self.teachers!r}, "
                             f"got {self.baseline!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.loss == "divergence" and (self.teachers or self.context not in CONTEXTS):
            raise ValueError(f"context: a divergence algorithm needs no reweight teachers and a context in "
                             f"{CONTEXTS}, got teachers {self.teachers!r}, context {self.context!r}")
        if self.loss == "policy" and self.context is not None:
            raise ValueError(f"context: expected None for a policy-loss algorithm, got {self.context!r}")

    @property
    def weighted(self) -> bool:
        """Whether the token weight (and so lambda) is used at all."""
        return bool(self.teachers)

    @property
    def distills(self) -> bool:
        """Whether the loss is a student-teacher divergence (step.distill)."""
        return self.loss == "divergence"


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Adds an algorithm to the table (a second registration of the same entry is a no-op)."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm: expected an Algorithm, got {type(algorithm).__name__}")
    old = ALGORITHMS.get(algorithm.name)
    if old is not None and old != algorithm:
        raise ValueError(f"algorithm {algorithm.name!r} is registered already, as {old}")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name) -> Algorithm:
    """The table's entry for `name` (an Algorithm passes through); ValueError listing the known names."""
    if isinstance(name, Algorithm):
        return name
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"algo: expected one of {tuple(ALGORITHMS)}, got {name!r}") from None


register_algorithm(Algorithm("cepo", ("pos", "neg"), "neg", "both teachers: Delta = log P_T+ - log P_T-"))
register_algorithm(Algorithm("rlsd", ("pos",), "old", "the positive teacher against the rollout policy"))
register_algorithm(Algorithm("grpo", (), None, "no teacher: A_hat = A"))
register_algorithm(Algorithm("opsd", (), None, "distillation toward the policy shown the reference answer",
                             loss="divergence", context="reference"))
register_algorithm(Algorithm("sdpo", (), None, "distillation toward the policy shown a successful peer",
                             loss="divergence", context="peer"))
