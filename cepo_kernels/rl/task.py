"""Data and models: the embedded tasks (problems, tokenizer, tiny Qwen2 model), JSONL loading, the warm-up
demonstrations, and each problem's first wrong step in a response (the credit diagnostic).

Two embedded tasks, built in code: `arith` (single-digit a+b and a-b; the response is "\\boxed{8}", one
token decides the reward) and `digits` ("47+38=": a+b and a-b with two-digit operands and a digit-by-digit
worked solution before the boxed answer, "7+8+0=15,4+3+1=08,\\boxed{85}": a wrong response is wrong from
one step on and most of its tokens are filler).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cepo_kernels.step.contexts import encode, render_prompt

SPECIALS = ["<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = list("0123456789+-*=(){}\\ .,?abcdefghijklmnopqrstuvwxyz")
BOX_TOKEN = "\\boxed{"
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


TASKS = ("arith", "digits", "count")  # count: multimodal (rl/vision_task.py)
DIGITS_EVAL = 256  # held-out problems of the digits task
DIGITS_TRAIN = 2000
DIGITS_MAX_TOKENS = 24  # the longest worked solution ("9+9+0=18,9+9+1=19,\\boxed{198}") + eos, in tokens
_OPERATION = re.compile(r"(\d+)([+-])(\d+)=")


@dataclass(frozen=True)
class Problem:
    prompt: str  # the question (the user message, before the chat template)
    answer: str  # the reference answer (r+)
    # the embedded tasks' canonical response, step by step (joined, it is the demonstration); () -> unknown
    solution: tuple[str, ...] = ()


def arithmetic_problems(seed: int = 0, max_operand: int = 7) -> list[Problem]:
    """All a+b and a-b (a >= b) with operands in [0, max_operand], shuffled by seed: "12+7=" -> "19"."""
    pairs = [(a, "+", b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    pairs += [(a, "-", b) for a in range(max_operand + 1) for b in range(a + 1)]
    answers = [str(a + b if op == "+" else a - b) for a, op, b in pairs]
    probs = [Problem(f"{a}{op}{b}=", ans, (boxed(ans),))
             for (a, op, b), ans in zip(pairs, answers, strict=True)]
    random.Random(seed).shuffle(probs)
    return probs


def boxed(answer) -> str:
    return f"{BOX_TOKEN}{answer}}}"


def digit_steps(a: int, op: str, b: int, error: tuple[int, str, int] | None = None) -> tuple[str, ...]:
    """The worked solution of a+b or a-b (a >= b), units first: one fixed-width step per digit,
    "x+y+c=kd," (c: the carry in; x + y + c = 10 k + d) or "x-y-c=kd," (c: the borrow in, k: the borrow
    out; x - y - c = d - 10 k), then the boxed answer made of the written digits (and the last carry).

    error = (k, kind, sign) makes step k wrong and continues consistently from it: kind "sum" writes the
    step's result off by sign (+-1; -sign where that cannot be written), kind "carry" uses the wrong carry
    (borrow) in; the later steps use the carry the wrong step writes, and the answer is assembled from the
    written digits.
    """
    n = max(len(str(a)), len(str(b)), 2)
    xs, ys = str(a).zfill(n)[::-1], str(b).zfill(n)[::-1]
    steps, digits, carry = [], [], 0
    for k in range(n):
        x, y = int(xs[k]), int(ys[k])
        wrong = error is not None and error[0] == k
        c = 1 - carry if wrong and error[1] == "carry" else carry
        r = x + y + c if op == "+" else x - y - c
        if wrong and error[1] == "sum":
            lo, hi = (0, 19) if op == "+" else (-10, 9)  # what a step can write
            r += error[2] if lo <= r + error[2] <= hi else -error[2]
        carry, d = (r // 10, r % 10) if op == "+" else (int(r < 0), r % 10)
        steps.append(f"{x}{op}{y}{op}{c}={carry}{d},")
        digits.append(d)
    if op == "+" and carry:
        digits.append(carry)
    answer = "".join(str(d) for d in reversed(digits)).lstrip("0") or "0"
    return (*steps, boxed(answer))


def digits_problems(seed: int = 0, max_operand: int = 99,
                    n: int = DIGITS_TRAIN + DIGITS_EVAL) -> list[Problem]:
    """n distinct problems a+b and a-b (a >= b, operands in [0, max_operand]) with their worked solutions
    (digit_steps), drawn and ordered by seed."""
    rng = random.Random(seed)
    seen, probs = set(), []
    while len(probs) < n:
        op = rng.choice("+-")
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "-" and a < b:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        answer = str(a + b if op == "+" else a - b)
        probs.append(Problem(f"{a:02d}{op}{b:02d}=", answer, digit_steps(a, op, b)))
    return probs


def noisy_steps(problem: Problem, rng: random.Random) -> tuple[str, ...]:
    """A wrong demonstration of a digits problem: one step wrong (digit_steps' error, its step, kind and
    sign drawn by rng), the rest consistent with it; the boxed answer always differs from the reference."""
    a, op, b = _operation(problem.prompt)
    n = len(problem.solution) - 1
    while True:
        k, kind = rng.randrange(n), rng.choice(("sum", "carry"))
        steps = digit_steps(a, op, b, (k, kind, rng.choice((-1, 1))))
        if steps[-1] != problem.solution[-1]:
            return steps


def _operation(prompt: str) -> tuple[int, str, int]:
    m = _OPERATION.fullmatch(prompt)
    if m is None:
        raise ValueError(f"prompt: expected 'a+b=' or 'a-b=' of the digits task, got {prompt!r}")
    return int(m.group(1)), m.group(2), int(m.group(3))


def first_wrong_span(problem: Problem, text: str) -> tuple[int, int] | None:
    """Characters [start, end) of the first wrong step of a response to an embedded problem, None when
    every step of problem.solution is there (or the problem has no known solution).

    The response is read step by step against the canonical solution: the first step that is not
    character-for-character the canonical one is wrong; it ends after the response's next "," (a digit
    step) or "}" (the boxed answer), or at the end of the text. Exact for responses that keep the task's
    format (the embedded model's); a response in another format is wrong from where the format differs.
    """
    if not problem.solution:
        return None
    pos = 0
    for step in problem.solution:
        if text.startswith(step, pos):
            pos += len(step)
            continue
        stop = "}" if text.startswith(BOX_TOKEN, pos) else ","
        end = text.find(stop, pos)
        return pos, (len(text) if end < 0 else end + 1)
    return None


def token_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) characters of each token of `ids` in their decoded text (skip_special_tokens)."""
    spans, pos = [], 0
    for t in ids:
        n = len(tokenizer.decode([t], skip_special_tokens=True))
        spans.append((pos, pos + n))
        pos += n
    return spans


def first_wrong_tokens(tokenizer, problem: Problem, ids: list[int], text: str) -> tuple[int, int] | None:
    """Tokens [first, end) of the response `ids` (decoded: `text`) that overlap its first wrong step;
    None when no step is wrong or the step has no token (a response cut off before it)."""
    span = first_wrong_span(problem, text)
    if span is None:
        return None
    hit = [i for i, (s, e) in enumerate(token_spans(tokenizer, ids)) if s < span[1] and e > span[0]]
    return (hit[0], hit[-1] + 1) if hit else None


def build_tokenizer(specials=SPECIALS, chat_template=CHAT_TEMPLATE, *, pad="<pad>", unk="<unk>",
                    eos="<|end|>", chars=CHARS, max_length: int = 256):
    """A character-level tokenizer (plus one `\\boxed{` token) with a minimal chat template, built in code.
    specials (with pad, unk and eos among them), the chat template and the characters can be swapped (the
    vision-language task's tokenizer, rl/vision_model.py, has Qwen-VL's special tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(specials) + list(chars) + [BOX_TOKEN])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(BOX_TOKEN, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        unk_token=unk,
        eos_token=eos,
        chat_template=chat_template,
        padding_side="left",
        model_max_length=max_length,
    )


def build_tiny_model(tokenizer, seed: int = 0):
    """A 2-layer Qwen2 model with random weights sized for the embedded task (~0.1M parameters)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
    )
    return seeded_model(Qwen2ForCausalLM, config, tokenizer, seed)


def seeded_model(cls, config, tokenizer, seed: int):
    """cls(config) with random weights drawn under `seed` (the global RNG left as it was), generating with the
    tokenizer's pad and eos ids."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def first_wrong_credit(spans, adv: torch.Tensor, a_hat: torch.Tensor | None, mask: torch.Tensor) -> dict:
    """The credit diagnostic of a rollout batch, over its wrong responses with A != 0 and a known first
    wrong step (spans[i] = tokens [first, end) or None; adv [B], a_hat and mask [B, T]):

    - credit_first_wrong_share: the mean over those responses of the share of sum_t |A_hat_t - A| that
      lands on the first wrong step's tokens (the teachers' change of the advantage; the share does not
      depend on lambda > 0 or on |A|). None without teachers (GRPO, lambda = 0: A_hat = A, so GRPO's
      credit is uniform by construction);
    - credit_first_wrong_baseline: the mean of (first wrong step's tokens / response tokens), the share a
      uniform credit gives: a share above it means the teachers move the advantage of the first wrong
      step more than that of the rest;
    - credit_first_wrong_rows: how many responses the two means are over.
    """
    adv_l = adv.tolist()
    rows = [i for i, sp in enumerate(spans) if sp is not None and adv_l[i] != 0.0]
    shares, base = [], []
    n_tok = mask.sum(dim=1).tolist()
    change = None if a_hat is None else ((a_hat - adv[:, None]).abs() * mask).float().cpu()
    for i in rows:
        first, end = spans[i]
        base.append((end - first) / n_tok[i])
        if change is not None and float(change[i].sum()) > 0:
            shares.append(float(change[i, first:end].sum() / change[i].sum()))
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"credit_first_wrong_share": mean(shares) if change is not None else None,
            "credit_first_wrong_baseline": mean(base), "credit_first_wrong_rows": len(rows)}


def jsonl_rows(path: str | Path, arg: str = "data"):
    """(line number, JSON object) of each non-blank line of a JSONL file; errors name the file, the line and
    what was expected."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{arg}: {str(path)!r} is a directory, expected a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"{arg}: file {str(path)!r} does not exist")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{arg}: {path}:{lineno}: not UTF-8 text ({e.reason} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{arg}: {path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{arg}: {path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def row_problem(row: dict, where: str, prompt_key: str, answer_key: str) -> tuple[str, str]:
    """(prompt, answer) of a JSONL row; `where` ("data: file:line") starts each error."""
    for key, flag in ((prompt_key, "--prompt-key"), (answer_key, "--answer-key")):
        if key not in row:
            raise ValueError(
                f"{where}: missing key {key!r} (keys present: {sorted(row)}; choose another with {flag})"
            )
    prompt, answer = row[prompt_key], row[answer_key]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: {prompt_key!r} must be a non-empty string, got {prompt!r}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"{where}: {answer_key!r} must be a string or a number, got {answer!r}")
    return prompt, str(answer)


def load_jsonl(
    path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer", arg: str = "data"
) -> list[Problem]:
    """Problems from a JSONL file; errors name the file, the line and what was expected."""
    problems = [Problem(*row_problem(row, f"{arg}: {path}:{lineno}", prompt_key, answer_key))
                for lineno, row in jsonl_rows(path, arg)]
    if not problems:
        raise ValueError(f"{arg}: {path}: no problems found (the file is empty)")
    return problems


def drop_long_prompts(train: list[Problem], held: list[Problem], n_tokens, limit: int):
    """(train, held) without the problems whose prompt has more than `limit` tokens (n_tokens(problem));
    logs how many were dropped; ValueError when every training prompt (or every held-out one) is."""
    kept = [p for p in train if n_tokens(p) <= limit], [p for p in held if n_tokens(p) <= limit]
    for arg, before, after in (("data", train, kept[0]), ("eval_data", held, kept[1])):
        if before and not after:
            raise ValueError(f"max_prompt_tokens: every {arg} prompt is longer than {limit} tokens, so "
                             f"filter_long_prompts drops them all; raise max_prompt_tokens")
    logging.getLogger("cepo_kernels.rl").info(
        "filter_long_prompts: dropped %d of %d training and %d of %d held-out problems over %d tokens",
        len(train) - len(kept[0]), len(train), len(held) - len(kept[1]), len(held), limit)
    return kept


def load_problems(cfg) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems: the configured JSONL files, or the embedded task (eval = held-out tail)."""
    if cfg.data is None and cfg.task == "digits":
        probs = digits_problems(cfg.seed)
        eval_set = probs[-DIGITS_EVAL:] if cfg.eval_data is None else load_jsonl(
            cfg.eval_data, cfg.prompt_key, cfg.answer_key, arg="eval_data")
        return probs[:-DIGITS_EVAL], eval_set
    if cfg.data is None:
        probs = arithmetic_problems(cfg.seed)
    else:
        probs = load_jsonl(cfg.data, cfg.prompt_key, cfg.answer_key)
    if cfg.eval_data is not None:
        return probs, load_jsonl(cfg.eval_data, cfg.prompt_key, cfg.answer_key, arg="eval_data")
    n_eval = min(cfg.eval_size, len(probs) // 5)
    if n_eval == 0:
        return probs, []
    return probs[:-n_eval], probs[-n_eval:]


def sft_texts(
    tokenizer, problems: list[Problem], system_prompt=None, suffix="", noise: float = 0.0, seed: int = 0
) -> list[tuple[list[int], list[int], str]]:
    """(prompt ids, target ids, answer shown) of the embedded task's warm-up: "\\boxed{answer}" + eos, or
    the worked solution + eos for a digits problem.

    A fraction `noise` of the demonstrations is deliberately wrong (arith: half unboxed, half off by one;
    digits: wrong at one step and consistent after it, noisy_steps), so the warmed-up policy is right
    only part of the time and RL has something to fix within minutes.
    """
    rng = random.Random(seed)
    out = []
    for p in problems:
        prompt = encode(tokenizer, render_prompt(tokenizer, p.prompt + suffix, system_prompt))
        out.append((prompt, *sft_target(tokenizer, p, rng, noise)))
    return out


def sft_target(tokenizer, p, rng: random.Random, noise: float) -> tuple[list[int], str]:
    """(target ids, answer shown) of one warm-up demonstration (sft_texts; a fraction `noise` wrong)."""
    if len(p.solution) > 1:  # a worked solution (digits)
        steps = noisy_steps(p, rng) if rng.random() < noise else p.solution
        shown = steps[-1][len(BOX_TOKEN):-1]
        return encode(tokenizer, "".join(steps)) + [tokenizer.eos_token_id], shown
    text = f"{BOX_TOKEN}{p.answer}}}"
    shown = p.answer
    if rng.random() < noise:
        wrong = (
            str(int(p.answer) + rng.choice((-1, 1))) if p.answer.lstrip("-").isdigit() else p.answer + "0"
        )
        text = p.answer if rng.random() < 0.5 else f"{BOX_TOKEN}{wrong}}}"
        shown = p.answer if text == p.answer else wrong
    return encode(tokenizer, text) + [tokenizer.eos_token_id], shown


def step_problems(train_set: list, seed: int, per_step: int, step: int) -> list:
    """The `per_step` problems of a 0-based step: a pure function of (seed, step), each epoch a new order."""
    n, out = len(train_set), []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(train_set[order[i]])
    return out
