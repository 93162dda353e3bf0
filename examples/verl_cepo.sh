#!/usr/bin/env bash
# CEPO with verl 0.9.x on one node: Qwen3-4B on 8 GPUs, FSDP2 actor, vLLM rollouts, the paper's settings
# (G = 8, lr 5e-6, PPO clip 0.2 / 0.28, dual clip 3.0, no KL; lambda 0.5 -> 0 over 25 rollout batches,
# eps_w 0.2). NOT RUN: written against verl 0.9.1's configuration and tested only on CPU through
# tests/test_integrations_verl.py (see README, "CEPO in verl").
#
#   pip install -e ".[verl]"   # in a clone of cepo_kernels; plus verl's GPU stack (vLLM, flash-attn) as verl's docs say
#   MODEL=/models/Qwen3-4B TRAIN=train.parquet TEST=test.parquet bash examples/verl_cepo.sh [overrides...]
#
# The parquet files are verl's format (a `prompt` chat, `reward_model.ground_truth` = r+, `data_source`).
# RLSD instead of CEPO: ALGO=rlsd.
set -euo pipefail
MODEL=${MODEL:?set MODEL to a local Qwen3-4B checkpoint}
TRAIN=${TRAIN:?set TRAIN to a verl parquet file}
TEST=${TEST:-$TRAIN}
ALGO=${ALGO:-cepo}

# verl's own hook for external modules: registers trainer.v1.trainer_mode=cepo (and the cepo / rlsd
# estimators) in every process that imports verl; Ray workers inherit it from this shell
export VERL_USE_EXTERNAL_MODULES=cepo_kernels.integrations.verl.trainer

python3 -m verl.trainer.main_ppo \
    trainer.use_v1=true \
    trainer.v1.trainer_mode=cepo \
    algorithm.adv_estimator="$ALGO" \
    algorithm.norm_adv_by_std_in_grpo=true \
    algorithm.use_kl_in_reward=false \
    +algorithm.cepo.lam0=0.5 \
    +algorithm.cepo.t_warm=25 \
    +algorithm.cepo.eps_w=0.2 \
    data.train_files="$TRAIN" \
    data.val_files="$TEST" \
    data.train_batch_size=64 \
    data.max_prompt_length=1024 \
    data.max_response_length=2048 \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=5e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.28 \
    actor_rollout_ref.actor.clip_ratio_c=3.0 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.use_kl_loss=false \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.model.enable_gradient_checkpointing=true \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=1 \
    trainer.total_epochs=1 \
    trainer.logger='["console"]' \
    trainer.project_name=cepo \
    trainer.experiment_name="qwen3-4b-$ALGO" \
    "$@"
