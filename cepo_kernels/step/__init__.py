"""One CEPO step as public phase functions, above the kernels and below every front end.

    rollouts --rewards--> A --> r- --> teacher contexts --> teacher log-probs --> A_hat --> loss --> update

phase                          function(s)                                  module       docs/method.md
rewards of a rollout batch     safe_rewards, boxed_reward                   rewards
A (group-normalised)           group_advantages                             advantages   §1
r- per group                   choose_negatives, negative_answer            negatives    §2
rows that need teachers        teacher_rows                                 contexts     §4 (inv. 4)
teacher contexts               teacher_contexts, teacher_prefix, pack       contexts     §2
hidden states of the contexts  context_hidden (shared prefixes or plain)    forward
old and teacher log-probs      policy_logprobs, teacher_logprobs            scoring      §3
A_hat                          cepo_advantages                              advantages   §3-4
loss (A_hat + PPO clip fused)  policy_loss                                  loss         §4-5
lambda(step)                   lam_at                                       advantages   §7

and composed: the rollout batch (`RolloutBatch`, batch) and the reweight phase (`reweight`, reweight):
r- -> teacher rows -> contexts -> a front end's scorer -> Delta -> w -> A_hat, once per rollout batch,
for the algorithm of the table (`ALGORITHMS`, algorithms) that the options (`CEPOOptions`, options) name.

Depends on torch and the kernels only (tokenizers and models are duck-typed Hugging Face objects;
transformers is imported only by the shared-prefix cache). `cepo-train` (cepo_kernels.rl), the TRL
adapter (cepo_kernels.integrations.trl) and the verl adapter run `reweight` with their own scorer;
bench/step_harness.py times the same phases.
"""

from cepo_kernels.step.advantages import cepo_advantages, delta_metrics, group_advantages, lam_at
from cepo_kernels.step.algorithms import ALGORITHMS, Algorithm, get_algorithm, register_algorithm
from cepo_kernels.step.batch import RolloutBatch
from cepo_kernels.step.contexts import (
    Packed,
    TeacherContexts,
    encode,
    pack,
    render_prompt,
    response_targets,
    teacher_contexts,
    teacher_prefix,
    teacher_rows,
)
from cepo_kernels.step.forward import SharedPrefixUnsupported, context_hidden, lm_head, prefix_hidden
from cepo_kernels.step.loss import policy_loss
from cepo_kernels.step.negatives import REJECT_BELOW, Negative, choose_negatives, negative_answer
from cepo_kernels.step.options import CEPOOptions, option_field, options_of
from cepo_kernels.step.rewards import answers_match, boxed_reward, extract_boxed, safe_rewards
from cepo_kernels.step.reweight import Reweighted, Scorer, reweight
from cepo_kernels.step.scoring import micro_batches, policy_logprobs, teacher_logprobs

__all__ = [
    "group_advantages", "lam_at", "cepo_advantages", "delta_metrics",
    "REJECT_BELOW", "Negative", "choose_negatives", "negative_answer",
    "teacher_rows", "TeacherContexts", "teacher_contexts", "teacher_prefix", "encode", "render_prompt",
    "Packed", "pack", "response_targets",
    "SharedPrefixUnsupported", "context_hidden", "prefix_hidden", "lm_head",
    "micro_batches", "policy_logprobs", "teacher_logprobs",
    "policy_loss",
    "answers_match", "boxed_reward", "extract_boxed", "safe_rewards",
    "RolloutBatch", "CEPOOptions", "option_field", "options_of", "Algorithm", "ALGORITHMS", "get_algorithm",
    "register_algorithm", "Reweighted", "Scorer", "reweight",
]
