"""`cepo` and `rlsd` in verl's advantage-estimator registry (`core_algos.register_adv_est`).

Both give the sequence advantage A of docs/method.md §1, verl's GRPO outcome advantage; the CEPO trainer
(`cepo_kernels.integrations.verl.trainer`) then adds the teachers. Outside that trainer they refuse to run,
so that `algorithm.adv_estimator=cepo` on verl's stock trainer is never GRPO in disguise.
"""

from __future__ import annotations

from cepo_kernels.integrations.verl.advantages import ALGOS, is_active
from cepo_kernels.integrations.verl.distill import DISTILL_ALGOS

__all__ = ["register_estimators"]


def _estimator(name: str):
    def estimate(token_level_rewards, response_mask, index=None, config=None, **kwargs):
        from verl.trainer.ppo import core_algos

        if not is_active():
            raise ValueError(
                f"algorithm.adv_estimator={name}: needs the CEPO trainer; set trainer.v1.trainer_mode=cepo "
                "and "
                "VERL_USE_EXTERNAL_MODULES=cepo_kernels.integrations.verl.trainer"
            )
        if index is None:
            raise ValueError(f"algorithm.adv_estimator={name}: expected verl's group ids (uid) in the batch")
        norm = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
        return core_algos.compute_grpo_outcome_advantage(
            token_level_rewards=token_level_rewards, response_mask=response_mask, index=index,
            norm_adv_by_std_in_grpo=norm, config=config)

    estimate.__name__ = f"compute_{name}_outcome_advantage"
    return estimate


_REGISTERED: dict = {}


def register_estimators() -> None:
    """Registers `cepo`, `rlsd`, `opsd` and `sdpo` once (idempotent: a second import registers the same
    functions). opsd / sdpo: the GRPO A of SDPO's optional PPO share (opsd does not use it)."""
    from verl.trainer.ppo import core_algos

    for name in ALGOS + DISTILL_ALGOS:
        fn = _REGISTERED.setdefault(name, _estimator(name))
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is not fn:
            core_algos.register_adv_est(name)(fn)
