"""The training configuration: one dataclass and its checks (the flags are generated from it in
rl/options.py).

Every field is a flag (`--prompts-per-step 8`, booleans as `--flag/--no-flag`); `--config file.json|yaml`
loads a dict of fields first, and flags given on the command line override it. Unknown keys are rejected
with the list of valid ones. The defaults run the embedded arithmetic task on a CPU in a few minutes; the
README gives the paper's recipe for a real model.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields

from cepo_kernels._params import REDUCTIONS, LossParams
from cepo_kernels.rl.task import DIGITS_MAX_TOKENS, TASKS
from cepo_kernels.step.algorithms import ALGORITHMS
from cepo_kernels.step.distill_templates import DISTILL_TEACHERS
from cepo_kernels.step.negatives import NEGATIVE_MODES
from cepo_kernels.step.options import CEPOOptions, option_field, options_of

ALGOS = tuple(ALGORITHMS)
DTYPES = ("auto", "float32", "bfloat16", "float16")
ADV_SCALES = ("group", "batch", "none")
# training needs a scalar loss: every reduction but "none"
TRAIN_REDUCTIONS = tuple(r for r in REDUCTIONS if r != "none")
REWARDS = ("boxed", "official", "math-verify")  # cepo_kernels.step.graders.GRADERS
CHOICES = {"algo": ALGOS, "dtype": DTYPES, "adv_scale": ADV_SCALES, "reduction": TRAIN_REDUCTIONS,
           "task": TASKS, "reward": REWARDS, "r_minus": NEGATIVE_MODES,
           "distill_teacher": DISTILL_TEACHERS}


def opt(default, help: str):
    """A TrainConfig field: its default and its flag's one-line help (`cepo-train --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """All options of a run; each field's metadata["help"] is its flag's help. The CEPO options (algo, lam0,
    t_warm, eps_w, teacher_template, r_minus, cot_*) are step.options.CEPOOptions' (`cfg.options`)."""

    # model
    model: str | None = opt(None, "a local Hugging Face causal-LM directory; none: the embedded tiny Qwen2 "
                            "model")
    lora_rank: int = opt(0, "LoRA rank; 0: full fine-tuning")
    lora_alpha: float = opt(32.0, "LoRA alpha (the adapter's scale is alpha / rank)")
    lora_dropout: float = opt(0.0, "dropout of the LoRA adapters, in [0, 1)")
    lora_target_modules: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                   "comma-separated names of the modules LoRA adapts")
    gradient_checkpointing: bool = opt(False, "recompute the decoder's activations in the backward pass")
    dtype: str = opt("auto", "model dtype; auto: bfloat16 on a GPU, float32 on a CPU")
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")

    # data
    data: str | None = opt(None, "a JSONL file with one problem per line; none: the embedded task (--task)")
    task: str = opt("arith", "the embedded task, without --data: arith (one-digit a+b, a-b), digits "
                    "(operands up to 99, worked solution; needs --max-new-tokens 24) or count (multimodal: "
                    "how many shapes in a drawn image, a tiny Qwen3-VL-shaped model; docs/vision.md)")
    teacher_sees_image: bool = option_field("teacher_sees_image")
    eval_data: str | None = opt(None, "held-out JSONL for the greedy evaluation; none: the last --eval-size "
                                "problems of the data")
    prompt_key: str = opt("prompt", "the JSONL key of each problem's prompt")
    answer_key: str = opt("answer", "the JSONL key of each problem's reference answer (r+)")
    system_prompt: str | None = opt(None, "system message of the chat template (none: no system message)")
    prompt_suffix: str = opt("", "appended to every prompt (e.g. an instruction to put the answer in "
                             "\\boxed{})")
    eval_size: int = opt(64, "held-out problems taken from the data when --eval-data is not given")
    reward_fn: str | None = opt(None, "'module:function' or 'path/to/file.py:function', called as "
                                "fn(response_text, reference) -> float; none: the --reward grader")
    format_bonus: float = opt(0.0, "the authors' format bonus b: reward = (1 - b) accuracy + b (an answer in "
                              "\\boxed{}); 0.1 in their runs")
    reward: str = opt("boxed", "grader without --reward-fn: boxed (built in), official (the authors' "
                      "mathruler, extra [official]) or math-verify (extra [math-verify])")

    # rollouts
    prompts_per_step: int = opt(16, "prompts per rollout batch (each gets --group-size responses)")
    group_size: int = opt(8, "sampled responses per prompt (at least 2)")
    max_new_tokens: int = opt(8, "longest response, in tokens")
    max_prompt_tokens: int = opt(1024, "longest prompt, in tokens (longer ones are cut to their last tokens, "
                                 "or dropped with --filter-long-prompts)")
    filter_long_prompts: bool = opt(False, "drop problems whose templated prompt is longer than "
                                    "--max-prompt-tokens (verl's filter, as the authors run)")
    temperature: float = opt(1.0, "sampling temperature (also of every log-prob)")
    top_p: float = opt(1.0, "nucleus sampling threshold, in (0, 1]")

    # the algorithm (docs/method.md): lambda(step) = max(0, lam0 (1 - step / t_warm))
    algo: str = option_field("algo")
    lam0: float = option_field("lam0")
    t_warm: int = option_field("t_warm")
    eps_w: float = option_field("eps_w")
    eps_low: float = opt(0.2, "PPO clip below: the ratio is clipped to [1 - eps_low, 1 + eps_high]")
    eps_high: float = opt(0.28, "PPO clip above (clip-higher)")
    clip_dual: float = opt(3.0, "dual-clip constant for A < 0 (> 1 + eps_high); <= 0 disables it")
    reduction: str = opt("token-mean", "loss reduction: token-mean, seq-mean-token-mean, "
                         "seq-mean-token-sum-norm or sum")
    adv_scale: str = opt("group", "advantage scale: group (group std), batch (batch std) or none "
                         "(centred only)")
    teacher_template: str = option_field("teacher_template")
    r_minus: str = option_field("r_minus")
    cot_teacher: bool = option_field("cot_teacher")
    cot_prefix_len: int = option_field("cot_prefix_len")
    cot_suffix: bool = option_field("cot_suffix")
    opsd_template: str = option_field("opsd_template")
    sdpo_template: str = option_field("sdpo_template")
    distill_beta: float = option_field("distill_beta")
    distill_teacher: str = option_field("distill_teacher")
    distill_ema_rate: float = option_field("distill_ema_rate")
    sdpo_topk: int = option_field("sdpo_topk")
    sdpo_is_clip: float = option_field("sdpo_is_clip")
    distillation_weight: float = option_field("distillation_weight")

    # optimisation: one optimizer update per mini-batch, gradient accumulation over micro-batches
    steps: int = opt(40, "rollout batches (training steps)")
    lr: float = opt(3e-4, "peak learning rate (AdamW)")
    lr_warmup_steps: int = opt(2, "steps of linear learning-rate warm-up, then cosine decay")
    min_lr_ratio: float = opt(0.1, "the cosine decay ends at min_lr_ratio x lr, in [0, 1]")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    max_grad_norm: float = opt(1.0, "gradient clipping by global norm; 0: no clipping (the norm is still "
                               "logged)")
    mini_batch_prompts: int = opt(4, "prompts per optimizer update (groups stay whole); 0: the whole rollout "
                                  "batch in one update")
    micro_batch_size: int = opt(64, "sequences per forward / backward pass")
    ppo_epochs: int = opt(1, "passes over each rollout batch")
    share_prefix: bool = opt(True, "run a context shared by a group's responses once and reuse its key/value "
                             "cache (falls back to full contexts where the model cannot)")
    max_nan_steps: int = opt(3, "consecutive steps with a NaN/inf loss tolerated before the run aborts")

    # embedded task only: the supervised warm-up
    sft_steps: int = opt(150, "embedded task: supervised warm-up steps on the answer format before RL "
                         "(0: none)")
    sft_lr: float = opt(3e-3, "embedded task: learning rate of the warm-up")
    sft_batch_size: int = opt(64, "embedded task: demonstrations per warm-up step")
    sft_noise: float = opt(0.3, "embedded task: fraction of deliberately wrong warm-up demonstrations")
    sft_hints: bool = opt(True, "embedded task: also show each warm-up demonstration in the teachers' "
                          "context")

    # the run
    out_dir: str | None = opt(None, "run directory, new or empty; none: runs/<algo>-<time> (with --resume: "
                              "the resumed run's)")
    seed: int = opt(0, "seed of the model's initialisation, the prompt order and the sampling")
    eval_every: int = opt(10, "greedy held-out evaluation before step 1, every N steps and after the last "
                          "(0: none)")
    save_every: int = opt(10, "checkpoint every N steps (0: only at the end)")
    keep_last: int = opt(2, "checkpoints kept")
    resume: str | None = opt(None, "continue a run: its directory, its checkpoints/ folder or one checkpoint "
                             "(its options are the defaults)")
    progress: bool = opt(True, "a progress bar (--no-progress: none, and quiet model libraries)")
    credit_every: int = opt(10, "credit maps (cepo-viz): save Delta, w, A_hat at step 1 and every N steps "
                            "(0: never)")
    credit_samples: int = opt(4, "groups (prompts with all their responses) saved per credit file")

    @property
    def options(self) -> CEPOOptions:
        """The reweight phase's options (checked)."""
        return options_of(self)

    def __post_init__(self):
        check_config(self)

    @property
    def lora_targets(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier of a 0-based step: linear warm-up, then cosine decay to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _positive(cfg, *names, allow_zero=False):
    for name in names:
        v = getattr(cfg, name)
        if v < 0 or (v == 0 and not allow_zero):
            raise ValueError(
                f"{name}: expected a {'non-negative' if allow_zero else 'positive'} value, got {v}"
            )


def check_config(cfg: TrainConfig):
    """Type and range checks of every field, with the field's name in the message."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        base, optional = _base_type(hints[f.name])
        if value is None and optional:
            continue
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(cfg, f.name, value)
        if not isinstance(value, base) or (base is int and isinstance(value, bool)):
            raise TypeError(
                f"{f.name}: expected {base.__name__}{' or None' if optional else ''}, "
                f"got {type(value).__name__} {value!r}"
            )
        if base is float and not math.isfinite(value):
            raise ValueError(f"{f.name}: expected a finite number, got {value}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {getattr(cfg, name)!r}")
    if cfg.group_size < 2:
        raise ValueError(
            f"group_size: expected at least 2 responses per prompt (with {cfg.group_size}, every "
            f"group-normalised advantage is 0 and nothing trains), got {cfg.group_size}"
        )
    _positive(
        cfg,
        "prompts_per_step",
        "max_new_tokens",
        "max_prompt_tokens",
        "steps",
        "micro_batch_size",
        "ppo_epochs",
        "max_nan_steps",
        "sft_batch_size",
        "temperature",
        "lr",
        "keep_last",
        "eval_size",
    )
    _positive(
        cfg,
        "lora_rank",
        "lr_warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "mini_batch_prompts",
        "sft_steps",
        "sft_lr",
        "eval_every",
        "save_every",
        "credit_every",
        "credit_samples",
        allow_zero=True,
    )
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout: expected a value in [0, 1), got {cfg.lora_dropout}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], got {cfg.top_p}")
    if not 0.0 <= cfg.eps_low < 1.0:
        raise ValueError(f"eps_low: expected a value in [0, 1), got {cfg.eps_low}")
    if not 0.0 <= cfg.sft_noise <= 1.0:
        raise ValueError(f"sft_noise: expected a value in [0, 1], got {cfg.sft_noise}")
    if not 0.0 <= cfg.format_bonus <= 1.0:
        raise ValueError(f"format_bonus: expected a value in [0, 1], got {cfg.format_bonus}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio: expected a value in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.task == "digits" and cfg.data is None and cfg.max_new_tokens < DIGITS_MAX_TOKENS:
        raise ValueError(
            f"max_new_tokens: the digits task's worked solutions take up to {DIGITS_MAX_TOKENS} tokens; "
            f"expected >= {DIGITS_MAX_TOKENS} with task='digits', got {cfg.max_new_tokens} (the README's "
            f"digits runs: --max-new-tokens 24 --sft-steps 400 --lr 3e-5)"
        )
    cfg.options  # noqa: B018 (the CEPO options' one validator: step.options.CEPOOptions)
    if cfg.task != "arith" and cfg.data is not None:
        raise ValueError(f"task: --task {cfg.task} is an embedded task and --data {cfg.data!r} a data file; "
                         "give one of them")
    clip_dual = cfg.clip_dual if cfg.clip_dual > 0 else None  # the loss's own checks, before the run starts
    LossParams(lam=cfg.lam0, eps_w=cfg.eps_w, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
               temperature=cfg.temperature, clip_dual=clip_dual, reduction=cfg.reduction)
    if cfg.reward != "boxed" and cfg.reward_fn is not None:
        raise ValueError(f"reward: {cfg.reward!r} and reward_fn {cfg.reward_fn!r} both choose the grader; "
                         "give one of them")
    if cfg.reward == "official" and cfg.format_bonus > 0:
        raise ValueError(f"format_bonus: reward='official' includes the authors' 0.1 format score already; "
                         f"expected 0, got {cfg.format_bonus}")
    if cfg.reward_fn is not None and not all(cfg.reward_fn.rpartition(":")[::2]):
        raise ValueError(
            f"reward_fn: expected 'module:function' or 'path/to/file.py:function', got {cfg.reward_fn!r}"
        )


def _base_type(hint):
    """(type, optional) of a field annotation such as `int`, `str | None`."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return hint, False


def valid_keys() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def config_from_dict(values: dict, source: str = "config") -> TrainConfig:
    """A TrainConfig from a dict; keys may use '-' or '_'. Unknown keys raise, listing the valid ones."""
    if not isinstance(values, dict):
        raise TypeError(
            f"{source}: expected a mapping of option names to values, got {type(values).__name__}"
        )
    clean = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(clean) - set(valid_keys()))
    if unknown:
        raise ValueError(
            f"{source}: unknown option(s) {unknown}; valid options are: {', '.join(valid_keys())}"
        )
    return TrainConfig(**{k: _coerce(k, v) for k, v in clean.items()})


def _coerce(name: str, value):
    """Numbers and booleans written as strings in a config file (YAML reads `5e-6` as a string)."""
    if not isinstance(value, str):
        return value
    base, _ = _base_type(typing.get_type_hints(TrainConfig)[name])
    text = value.strip()
    try:
        if base is float:
            return float(text)
        if base is int:
            return int(text)
    except ValueError:
        raise TypeError(f"{name}: expected {base.__name__}, got str {value!r}") from None
    if base is bool and text.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return text.lower() in ("true", "yes", "on", "1")
    return value


__all__ = [
    "TrainConfig",
    "lr_factor",
    "config_from_dict",
    "valid_keys",
]
