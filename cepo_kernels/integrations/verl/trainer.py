"""The CEPO trainer of verl's v1 trainer registry: `trainer.v1.trainer_mode=cepo`.

Load it in the driver (the TaskRunner actor) with verl's external-module hook,
`VERL_USE_EXTERNAL_MODULES=cepo_kernels.integrations.verl.trainer`, and select the algorithm with
`algorithm.adv_estimator=cepo` (or `rlsd`; `opsd` / `sdpo`: integrations/verl/distill.py). It is verl's
synchronous trainer with one stage extended:
after verl's advantage stage has written A (the registered estimator), the batch's rows are read back from
verl's TransferQueue, `cepo_reweight` scores the teachers with the actor worker group's `compute_log_prob`
and A_hat replaces `advantages` per token; the actor update (verl's PPO loss) is unchanged.
lambda counts rollout batches: step = global_steps - 1 (verl counts training steps from 1).
The rows verl adds to make a batch divide evenly (tagged `is_padding`) keep verl's own advantages and never
reach the CEPO stage; `algorithm._target_` is pointed at `CEPOAlgoConfig` so that verl's config conversion
accepts `algorithm.cepo`.
"""

from __future__ import annotations

import numpy as np
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo.v1 import PPOTrainerSync, register_trainer
from verl.workers.utils.padding import response_to_nested

from cepo_kernels.integrations.verl.advantages import (
    ALGOS,
    CEPOSettings,
    _pad_id,
    cepo_active,
    cepo_reweight,
    teacher_batch,
    worker_group_scorer,
)
from cepo_kernels.integrations.verl.config import canonical_order, real_rows, use_cepo_algo_config
from cepo_kernels.integrations.verl.distill import (
    DISTILL_ALGOS,
    actor_loss_fn,
    check_distill_settings,
    distill_stage,
    teacher_worker_group,
    use_distill_loss_mode,
)
from cepo_kernels.integrations.verl.vision import VISION_FIELDS, attach_images

__all__ = ["CEPOPPOTrainer"]

_FIELDS = ["uid", "prompts", "responses", "response_mask", "advantages", "rm_scores", "old_log_probs",
           "reward_model"]


def _rows(t) -> list[list]:
    """Per-row values of a TransferQueue field (nested or padded) as lists."""
    return [x.tolist() for x in (t.unbind() if getattr(t, "is_nested", False) else t)]


def _log_prob_micro_batch(rollout) -> int:
    """The per-rank multiple verl's engine needs for `compute_log_prob` (1 with dynamic batch sizes)."""
    if rollout.get("log_prob_use_dynamic_bsz", False):
        return 1
    return int(rollout.get("log_prob_micro_batch_size_per_gpu", None) or 1)


@register_trainer("cepo")
class CEPOPPOTrainer(PPOTrainerSync):
    """verl's PPOTrainerSync with CEPO / RLSD token advantages (see the module docstring)."""

    def __init__(self, config):
        use_cepo_algo_config(config)
        use_distill_loss_mode(config)  # opsd / sdpo: the actor's policy loss is the registered one
        super().__init__(config)

    def on_init_end(self):
        super().on_init_end()
        if self._algo() in DISTILL_ALGOS:  # the actor's loss reads the teacher fields (verl/distill.py)
            from verl.utils.config import omega_conf_to_dataclass

            settings = CEPOSettings.from_config(self.config.algorithm)
            check_distill_settings(self.config.algorithm, settings)
            teacher_worker_group(self, settings)  # refuses an initial teacher without verl's reference policy
            actor = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            self.actor_rollout_wg.set_loss_fn(actor_loss_fn(actor, settings))

    def _algo(self) -> str:
        return str(getattr(self.config.algorithm.adv_estimator, "value", self.config.algorithm.adv_estimator))

    def _compute_advantage(self, batch, metrics: dict):
        algo = self._algo()
        if algo not in ALGOS + DISTILL_ALGOS:
            raise ValueError(f"trainer.v1.trainer_mode=cepo: expected algorithm.adv_estimator in "
                             f"{ALGOS + DISTILL_ALGOS}, got {algo!r}")
        settings = CEPOSettings.from_config(self.config.algorithm)  # checked before any work
        if algo in DISTILL_ALGOS:
            check_distill_settings(self.config.algorithm, settings)
        # the tags as the stage received them; the rows in an order independent of verl's dp balancing
        keys = canonical_order([batch.keys[i] for i in real_rows(batch.tags)])
        with cepo_active():
            batch = super()._compute_advantage(batch, metrics)
        if not keys:
            return batch
        if algo in DISTILL_ALGOS:
            return distill_stage(self, batch, keys, metrics, algo, settings)
        data, response_mask = self._driver_batch(keys, batch.partition_id)
        rollout = self.config.actor_rollout_ref.rollout
        scorer = worker_group_scorer(self.actor_rollout_wg, rollout.temperature,
                                     _log_prob_micro_batch(rollout))
        metrics.update(cepo_reweight(data, self.tokenizer, scorer, settings, self.global_steps - 1, algo))
        fields = TensorDict({"advantages": response_to_nested(data.batch["advantages"], response_mask),
                             "returns": response_to_nested(data.batch["advantages"], response_mask)},
                            batch_size=len(keys))
        tq.kv_batch_put(keys=keys, partition_id=batch.partition_id, fields=fields)
        return batch

    def _driver_batch(self, keys, partition_id, extra=()):
        """The rows `keys` from the TransferQueue as a padded verl DataProto (verl's rollout layout); `extra`:
        more per-row fields copied into non_tensor_batch (opsd / sdpo: `raw_prompt`)."""
        vision = getattr(self, "processor", None) is not None  # a vision-language policy (verl's processor)
        td = tq.kv_batch_get(keys=keys, partition_id=partition_id,
                             select_fields=_FIELDS + (VISION_FIELDS if vision else []) + list(extra))
        response_mask = td["response_mask"]
        prompts, responses = _rows(td["prompts"]), _rows(td["responses"])
        R = max(len(r) for r in responses)
        data = teacher_batch(prompts, responses, _pad_id(self.tokenizer), R, "cpu")
        padded = td.select("response_mask", "advantages", "rm_scores", "old_log_probs").to_padded_tensor()
        for key in ("response_mask", "advantages", "old_log_probs"):
            data.batch[key] = padded[key][:, :R]
        data.batch["token_level_rewards"] = padded["rm_scores"][:, :R]
        data.non_tensor_batch["uid"] = np.array(list(td["uid"]), dtype=object)
        data.non_tensor_batch["reward_model"] = np.array(list(td["reward_model"]), dtype=object)
        for key in extra:
            if key in td.keys():
                values = np.empty(len(keys), dtype=object)  # one object per row (a list stays one entry)
                for i, v in enumerate(td[key]):
                    values[i] = v
                data.non_tensor_batch[key] = values
        if vision:  # the teachers take each row's images and M-RoPE positions (integrations/verl/vision.py)
            attach_images(data, list(td["position_ids"].unbind()), list(td["multi_modal_inputs"]))
        return data, response_mask

