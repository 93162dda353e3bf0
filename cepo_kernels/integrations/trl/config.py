"""`CEPOConfig(GRPOConfig)`: GRPOConfig plus the CEPO options (docs/method.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from cepo_kernels._params import check_number

__all__ = ["CEPOConfig"]


@dataclass
class CEPOConfig(GRPOConfig):
    """GRPOConfig plus the CEPO options (docs/method.md). Every GRPOConfig option keeps its meaning.

    lam0, t_warm: lambda(step) = max(0, lam0 * (1 - step / t_warm)), step = trainer.state.global_step
        (0-based) when the batch is generated.
    eps_w: clip of the token weight exp(sign(A) Delta) to [1 - eps_w, 1 + eps_w].
    teacher_template: inserted between the prompt and the completion in the teachers' context, "{answer}"
        replaced by r+ (positive teacher) or r- (negative teacher); tokenised without special tokens.
    answer_column: the dataset column with each prompt's reference answer (r+).
    teacher_batch_size: sequences per teacher forward (both teachers' rows together); None = 2 x
        per_device_train_batch_size.
    cepo_kernel_logprobs: compute the per-token log-probs and entropies (policy with gradient, old policy and
        both teachers without) with `linear_logprobs` / `linear_teacher_logprobs` from the decoder's last
        hidden states and the lm_head weight, logits never materialised, instead of TRL's chunked LM head.
        TRL's loss (every loss_type, KL, entropy terms) is applied to them unchanged. For text-only causal LMs
        whose logits are lm_head(last hidden state) (no soft-capping or scaling), with a plain nn.Linear head
        (no adapter on it; FSDP2 shards are gathered, ZeRO-3 runs it through the head module). A reference
        model (beta > 0) keeps TRL's head.
    """

    lam0: float = field(default=0.5, metadata={"help": "CEPO: initial lambda, in [0, 1]."})
    t_warm: int = field(default=25, metadata={"help": "CEPO: steps over which lambda decays linearly to 0."})
    eps_w: float = field(default=0.2, metadata={"help": "CEPO: token weight clip, in [0, 1)."})
    teacher_template: str = field(
        default=" {answer}",
        metadata={"help": "CEPO: inserted after the prompt in the teachers' context; {answer} = r+ or r-."},
    )
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
        check_number("lam0", self.lam0, lo=0.0, hi=1.0)
        check_number("eps_w", self.eps_w, lo=0.0, hi=1.0, hi_open=True)
        if isinstance(self.t_warm, bool) or not isinstance(self.t_warm, int) or self.t_warm < 0:
            raise ValueError(f"t_warm: expected an int >= 0, got {self.t_warm!r}")
        if not isinstance(self.teacher_template, str) or "{answer}" not in self.teacher_template:
            raise ValueError(
                f"teacher_template: expected a string containing {{answer}}, got {self.teacher_template!r}"
            )
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

