"""CEPO and RLSD inside verl (>= 0.9, < 0.10): `algorithm.adv_estimator=cepo` (or `rlsd`) with
`trainer.v1.trainer_mode=cepo`.

Registered through verl's own extension points, nothing patched:
- `core_algos.register_adv_est("cepo")` / `("rlsd")`: the sequence advantage A of docs/method.md §1, which
  is verl's GRPO outcome advantage (so `norm_adv_by_std_in_grpo` keeps its meaning); it refuses to run
  outside the CEPO trainer, which adds the teachers.
- `verl.trainer.ppo.v1.register_trainer("cepo")` (module `cepo_kernels.integrations.verl.trainer`, loaded by
  `VERL_USE_EXTERNAL_MODULES=cepo_kernels.integrations.verl.trainer`): verl's synchronous trainer whose
  advantage stage, after verl has computed A, scores both teachers with the actor worker group's
  `compute_log_prob` (no gradient, the rollout temperature) on the rows with A != 0 while lambda > 0 and
  writes A_hat per token into `advantages`; verl's PPO loss, clip and KL options then apply unchanged.

OPSD and SDPO (`algorithm.adv_estimator=opsd|sdpo`, same trainer): the teacher contexts scored in the
driver, the registered policy losses `opsd` / `sdpo` in the actor (`integrations/verl/distill.py`).

The CEPO options live under `algorithm.cepo` (`+algorithm.cepo.lam0=0.5` etc., see `CEPOSettings`).
A vision-language policy's teacher batches carry the rows' images (`vision`, `teacher_sees_image`).
The per-batch work (`cepo_reweight`) is a function of a verl `DataProto` and a log-prob scorer, so it runs
(and is tested) without Ray or GPUs.
"""

from __future__ import annotations

from cepo_kernels.integrations._versions import require_version

VERL_MIN, VERL_BELOW = "0.9", "0.10"


def check_verl_version():
    """ImportError with the supported range when verl is missing or outside it (checked at import)."""
    require_version("verl", VERL_MIN, VERL_BELOW, extra="verl", allow_env="CEPO_VERL_ALLOW_ANY_VERSION")


check_verl_version()

from cepo_kernels.integrations.verl.advantages import (  # noqa: E402
    ALGOS,
    CEPOSettings,
    cepo_active,
    cepo_reweight,
    negatives_by_uid,
    sequence_advantage,
    teacher_batch,
    worker_group_scorer,
)
from cepo_kernels.integrations.verl.distill import DISTILL_ALGOS, register_policy_losses  # noqa: E402
from cepo_kernels.integrations.verl.estimators import register_estimators  # noqa: E402

register_estimators()
register_policy_losses()

__all__ = ["ALGOS", "DISTILL_ALGOS", "CEPOSettings", "cepo_active", "cepo_reweight", "check_verl_version",
           "negatives_by_uid", "register_estimators", "register_policy_losses", "sequence_advantage",
           "teacher_batch", "worker_group_scorer"]
