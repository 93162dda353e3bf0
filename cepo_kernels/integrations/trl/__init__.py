"""CEPO inside Hugging Face TRL: `CEPOConfig(GRPOConfig)` and `CEPOTrainer(GRPOTrainer)`.

Switching a GRPOTrainer script to CEPO: replace `GRPOTrainer` by `CEPOTrainer`, `GRPOConfig` by `CEPOConfig`
(the same options, plus lam0, t_warm, eps_w, teacher_template, answer_column), and give the dataset a column
`answer` (or `answer_column=...`) holding the reference answer of each prompt.

What changes against GRPO, after TRL has generated and scored a batch (docs/method.md; the phases are those of
`cepo_kernels.step`, the same ones cepo-train calls):
1. r- of every group is chosen from the rewards and completions gathered over all processes
   (`step.choose_negatives`): every rank makes the same choices.
2. For the local rows with a non-zero advantage, and only while lambda > 0, both teachers run without gradient
   on [prompt | template(answer) | completion] (positions renumbered over the non-pad tokens), through the
   same fused log-prob head and temperature TRL uses for the policy.
3. The (B, T) advantages `step.cepo_advantages(A, pos_logp, neg_logp, mask, lam, eps_w)` replace TRL's (B,)
   ones;
   TRL's loss (every `loss_type`) accepts per-token advantages. lambda = max(0, lam0 (1 - step / t_warm)) with
   step = the trainer's `state.global_step` when the batch was generated.
4. `cepo/lambda`, `cepo/teacher_rows`, `cepo/r_minus_fallbacks` and the Delta statistics of
   `step.delta_metrics` (`cepo/delta_mean`, `cepo/delta_std`, `cepo/delta_mean_pos`, `cepo/delta_mean_neg`,
   `cepo/frac_wrong_dir`, over all processes' tokens with A != 0) go into TRL's metrics.

Vision-language policies (Qwen2.5-VL, Qwen3-VL; a processor as processing_class, `image` / `images`
dataset columns as GRPOTrainer takes them): the teachers' contexts keep the prompt's image
(`teacher_sees_image`, default True; False: the authors' image-blind teachers), built by `step.vision`
(integrations/trl/vision.py, docs/trl.md).

Supported TRL: >= 1.16, < 1.17 (the hooks used are GRPOTrainer's `_calculate_rewards` and
`_generate_and_score_completions`, which are not a public API). CEPO_TRL_ALLOW_ANY_VERSION=1 tries another.

`CEPOConfig(algo="opsd" | "sdpo")` runs the distribution-matching relatives instead
(integrations/trl/distill.py, docs/trl.md "OPSD and SDPO"); `FusedSDPOTrainer` is TRL's own experimental
SDPOTrainer with its self-distillation loss on the fused divergence kernel (integrations/trl/sdpo.py).
"""

from __future__ import annotations

from cepo_kernels.integrations.trl._version import TRL_BELOW, TRL_MIN, check_trl_version

check_trl_version()

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from cepo_kernels.integrations.trl.config import CEPOConfig  # noqa: E402
from cepo_kernels.integrations.trl.trainer import CEPOTrainer  # noqa: E402

__all__ = ["CEPOConfig", "CEPOTrainer", "check_trl_version", "TRL_MIN", "TRL_BELOW", "GRPOConfig",
           "GRPOTrainer", "FusedSDPOTrainer"]


def __getattr__(name):
    # TRL's experimental SDPOTrainer is imported only when FusedSDPOTrainer is asked for
    if name == "FusedSDPOTrainer":
        from cepo_kernels.integrations.trl.sdpo import FusedSDPOTrainer

        return FusedSDPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
