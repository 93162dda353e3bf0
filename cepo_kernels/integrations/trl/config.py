"""`CEPOConfig(GRPOConfig)`: GRPOConfig plus the CEPO options (docs/method.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from cepo_kernels.step.options import CEPOOptions, option_field, options_of

__all__ = ["CEPOConfig"]

TRL_ALGOS = ("cepo", "opsd", "sdpo")  # what CEPOTrainer runs
DEFAULT_TEACHER = {"opsd": "initial", "sdpo": "ema"}  # the authors' teacher weights (docs/trl.md)


@dataclass
class CEPOConfig(GRPOConfig):
    """GRPOConfig plus the CEPO options (docs/method.md). Every GRPOConfig option keeps its meaning.

    lam0, t_warm: lambda(step) = max(0, lam0 * (1 - step / t_warm)), step = trainer.state.global_step
        (0-based) when the batch is generated.
    eps_w: clip of the token weight exp(sign(A) Delta) to [1 - eps_w, 1 + eps_w].
    teacher_template: inserted between the prompt and the completion in the teachers' context, "{answer}"
        replaced by r+ (positive teacher) or r- (negative teacher); tokenised without special tokens.
    teacher_sees_image: with a vision-language policy (a processor as processing_class), the teachers see
        the prompt's image (default); False: the authors' image-blind CEPO teachers (docs/trl.md).
    answer_column: the dataset column with each prompt's reference answer (r+).
    teacher_batch_size: sequences per teacher forward (both teachers' rows together); None = 2 x
        per_device_train_batch_size.
    algo: "cepo" (default), or one of the distribution-matching relatives the paper argues against, "opsd" or
        "sdpo" (docs/trl.md "OPSD and SDPO", integrations/trl/distill.py): their loss, the divergence between
        the policy and a teacher shown privileged context, replaces the reweighting. opsd_template,
        sdpo_template, distill_beta, distill_teacher, distill_ema_rate, sdpo_topk, sdpo_is_clip and
        distillation_weight are theirs (as cepo-train's --algo opsd|sdpo); distill_teacher None: the authors'
        default, "initial" for opsd and "ema" for sdpo.
    cepo_kernel_logprobs: compute the per-token log-probs and entropies (policy with gradient, old policy and
        both teachers without) with `linear_logprobs` / `linear_teacher_logprobs` from the decoder's last
        hidden states and the lm_head weight, logits never materialised, instead of TRL's chunked LM head.
        TRL's loss (every loss_type, KL, entropy terms) is applied to them unchanged. For causal LMs (and
        Qwen-VL's language model) whose logits are lm_head(last hidden state) (no soft-capping or scaling),
        with a plain nn.Linear head (no adapter on it; FSDP2 shards are gathered, ZeRO-3 runs it through the
        head module). A reference model (beta > 0) keeps TRL's head.
    """

    # the CEPO options: defaults, help and checks are step.options.CEPOOptions' (`self.options`)
    algo: str = option_field("algo", help="cepo (default), opsd or sdpo (docs/trl.md)")
    lam0: float = option_field("lam0")
    t_warm: int = option_field("t_warm")
    eps_w: float = option_field("eps_w")
    teacher_template: str = option_field("teacher_template", help=(
        "text inserted after the prompt in the teachers' context, {answer} = r+ or r-; any other {name} is "
        "refused ({question} too: TRL renders the prompt)"))
    opsd_template: str = option_field("opsd_template")
    sdpo_template: str = option_field("sdpo_template")
    distill_beta: float = option_field("distill_beta")
    distill_teacher: str | None = field(default=None, metadata={"help": (
        "opsd/sdpo teacher weights: live (the current policy), initial (LoRA disabled, else a frozen copy) "
        "or ema (a copy moved by distill_ema_rate per optimizer step); None: initial for opsd, ema for "
        "sdpo")})
    distill_ema_rate: float = option_field("distill_ema_rate")
    sdpo_topk: int = option_field("sdpo_topk")
    sdpo_is_clip: float = option_field("sdpo_is_clip")
    distillation_weight: float = option_field("distillation_weight")
    teacher_sees_image: bool = option_field("teacher_sees_image")
    answer_column: str = field(
        default="answer", metadata={"help": "CEPO: dataset column with the reference answer of each prompt."}
    )
    teacher_batch_size: int | None = field(
        default=None, metadata={"help": "CEPO: sequences per teacher forward (default 2 x per-device batch)."}
    )
    cepo_kernel_logprobs: bool = field(
        default=False,
        metadata={"help": "CEPO: per-token log-probs (policy, old policy, teachers) from cepo_kernels' fused "
                          "linear kernels instead of TRL's chunked LM head; TRL's loss is unchanged."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.options  # noqa: B018 (the one validator of the CEPO options)
        if self.algo not in TRL_ALGOS:
            raise ValueError(f"algo: expected one of {TRL_ALGOS} with CEPOTrainer (grpo: TRL's GRPOTrainer; "
                             f"rlsd: cepo-train), got {self.algo!r}")
        if not isinstance(self.cepo_kernel_logprobs, bool):
            raise TypeError(f"cepo_kernel_logprobs: expected a bool, got {self.cepo_kernel_logprobs!r}")
        if "{question}" in self.teacher_template:
            raise ValueError(
                "teacher_template: {question} templates are not supported by CEPOTrainer (TRL renders the "
                "prompt); use one inserted after the prompt, e.g. ' {answer}'; "
                f"got {self.teacher_template!r}"
            )
        if not isinstance(self.answer_column, str) or not self.answer_column:
            raise ValueError(f"answer_column: expected a non-empty column name, got {self.answer_column!r}")
        if self.teacher_batch_size is not None and (
            isinstance(self.teacher_batch_size, bool)
            or not isinstance(self.teacher_batch_size, int)
            or self.teacher_batch_size < 1
        ):
            raise ValueError(
                f"teacher_batch_size: expected None or an int >= 1, got {self.teacher_batch_size!r}"
            )

    @property
    def options(self) -> CEPOOptions:
        """The options of `algo` (checked), distill_teacher None resolved to the algorithm's default."""
        teacher = self.distill_teacher or DEFAULT_TEACHER.get(self.algo, "live")
        return options_of(self, distill_teacher=teacher)

    @property
    def reads_answers(self) -> bool:
        """Whether the dataset's answer_column is read (every algorithm but sdpo, whose teacher reads a
        successful peer rollout instead)."""
        return self.algo != "sdpo"
