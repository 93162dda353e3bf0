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
from dataclasses import dataclass, fields

from cepo_kernels._params import REDUCTIONS, LossParams
from cepo_kernels.rl.task import DIGITS_MAX_TOKENS, TASKS
from cepo_kernels.step.contexts import check_template

ALGOS = ("cepo", "rlsd", "grpo")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ADV_SCALES = ("group", "batch", "none")
# training needs a scalar loss: every reduction but "none"
TRAIN_REDUCTIONS = tuple(r for r in REDUCTIONS if r != "none")
REWARDS = ("boxed", "official", "math-verify")  # cepo_kernels.step.graders.GRADERS
CHOICES = {"algo": ALGOS, "dtype": DTYPES, "adv_scale": ADV_SCALES, "reduction": TRAIN_REDUCTIONS,
           "task": TASKS, "reward": REWARDS, "r_minus": ("ours", "official")}


@dataclass
class TrainConfig:
    """All options of a run. Field comments are the flags' help text."""

    # model: a local Hugging Face causal-LM directory; None -> the embedded tiny Qwen2 model
    model: str | None = None
    # LoRA rank; 0 -> full fine-tuning
    lora_rank: int = 0
    lora_alpha: float = 32.0
    # in [0, 1)
    lora_dropout: float = 0.0
    # comma-separated module names LoRA adapts
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    gradient_checkpointing: bool = False
    # auto -> bfloat16 on a GPU, float32 on a CPU
    dtype: str = "auto"
    # auto -> cuda when available, else cpu; or cpu, cuda, cuda:N
    device: str = "auto"

    # data: a JSONL file with one problem per line; None -> the embedded arithmetic task
    data: str | None = None
    # the embedded task when data is None: arith (a+b, a-b of one digit; the answer is one token) or digits
    # (operands up to 99, a digit-by-digit worked solution before the boxed answer; 256 held-out problems,
    # whatever eval_size; needs max_new_tokens >= 24; the README's runs add --sft-steps 400 --lr 3e-5)
    task: str = "arith"
    # held-out JSONL for the greedy evaluation; None -> the last eval_size problems of the data
    eval_data: str | None = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    system_prompt: str | None = None
    # appended to every prompt (e.g. an instruction to put the answer in \boxed{})
    prompt_suffix: str = ""
    eval_size: int = 64
    # "module:function" or "path/to/file.py:function", called as fn(response_text, reference_answer) ->
    # float; a module is looked up in the current directory first. None -> \boxed{} match
    reward_fn: str | None = None
    # the authors' format bonus: reward = (1 - b) x accuracy + b x (an answer in \boxed{}); 0.1 in their runs
    format_bonus: float = 0.0
    # the grader when reward_fn is None: boxed (built in), official (the authors' mathruler grade_answer,
    # 0.9 x accuracy + 0.1 x format; extra [official]) or math-verify (Hugging Face; extra [math-verify])
    reward: str = "boxed"

    # rollouts
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 8
    max_prompt_tokens: int = 1024
    # drop the problems whose templated prompt is longer than max_prompt_tokens (verl's filter of overlong
    # prompts, as the authors run); off: such a prompt is cut to its last max_prompt_tokens tokens
    filter_long_prompts: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    # docs/method.md §7: lambda(step) = max(0, lam0 * (1 - step / t_warm))
    algo: str = "cepo"
    lam0: float = 0.5
    t_warm: int = 25
    eps_w: float = 0.2
    eps_low: float = 0.2
    eps_high: float = 0.28
    # dual-clip constant; <= 0 disables it
    clip_dual: float = 3.0
    reduction: str = "token-mean"
    adv_scale: str = "group"
    # text inserted between the templated prompt and the response in the teacher contexts; "{answer}" is
    # replaced by r+ or r-. With "{question}" in it, it replaces the user message instead (re-templated).
    # Any other {name} is refused (braces right after a letter or backslash, as in \boxed{x}, are text).
    teacher_template: str = " {answer}"
    # r- of a group: ours (the lowest-reward rejected rollout with an extractable answer, else its first 50
    # characters) or official (the authors': the first lowest-reward one; "None" when its last box is not
    # closed); see cepo_kernels/step/negatives.py
    r_minus: str = "ours"
    # the authors' chain-of-thought teacher: r+ and r- are the first cot_prefix_len tokens of the group's best
    # correct and of its r- rollout (the reference answer when no rollout is correct) instead of answers
    cot_teacher: bool = False
    cot_prefix_len: int = 512
    # take the last cot_prefix_len tokens instead (their CEPO_IS_PREFIX=0, as in their geometry scripts)
    cot_suffix: bool = False

    # optimisation: one optimizer update per mini-batch, gradient accumulation over micro-batches
    steps: int = 40
    lr: float = 3e-4
    # linear warm-up of the learning rate (steps), then cosine decay to min_lr_ratio * lr
    lr_warmup_steps: int = 2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # gradient clipping by global norm; 0 -> no clipping (the norm is still logged)
    max_grad_norm: float = 1.0
    # prompts per optimizer update (their groups stay whole); 0 -> the whole rollout batch (one update)
    mini_batch_prompts: int = 4
    # sequences per forward/backward pass
    micro_batch_size: int = 64
    ppo_epochs: int = 1
    # run a context shared by a group's responses (prompt, prompt + r+, prompt + r-) once and reuse its
    # key/value cache (falls back to full contexts, with a warning, where the model's cache cannot be reused)
    share_prefix: bool = True
    # consecutive steps with a NaN/inf loss tolerated before the run aborts
    max_nan_steps: int = 3

    # embedded task only: supervised warm-up steps on the answer format before RL (0 -> none)
    sft_steps: int = 150
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    # fraction of deliberately wrong warm-up demonstrations (unboxed or off by one)
    sft_noise: float = 0.3
    # also show every warm-up demonstration in the teachers' context (prompt + answer), see rl/sft.py
    sft_hints: bool = True

    # run: out_dir must be new or empty (a run directory belongs to one run); None -> runs/<algo>-<time>.
    # With --resume, the run continues in the resumed run's directory.
    out_dir: str | None = None
    seed: int = 0
    eval_every: int = 10
    save_every: int = 10
    keep_last: int = 2
    # continue a run: its run directory (newest checkpoint), its checkpoints/ folder or one checkpoint; the
    # options saved in the checkpoint are the defaults, flags given now override them
    resume: str | None = None
    progress: bool = True
    # credit maps (cepo-viz): save per-token Delta, w, A_hat at step 1 and every credit_every steps (0: never)
    credit_every: int = 10
    # groups (prompts, with all their responses) saved per credit file
    credit_samples: int = 4

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
        "cot_prefix_len",
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
        "t_warm",
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
    if not 0.0 <= cfg.lam0 <= 1.0:
        raise ValueError(f"lam0: expected a value in [0, 1], got {cfg.lam0}")
    for name in ("eps_w", "eps_low"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"{name}: expected a value in [0, 1), got {getattr(cfg, name)}")
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
    check_template(cfg.teacher_template)
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
