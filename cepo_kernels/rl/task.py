"""Data and models: the embedded arithmetic task (problems, tokenizer, tiny Qwen2 model), JSONL loading,
and the warm-up demonstrations."""

from __future__ import annotations

import json
import random
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


@dataclass(frozen=True)
class Problem:
    prompt: str  # the question (the user message, before the chat template)
    answer: str  # the reference answer (r+)


def arithmetic_problems(seed: int = 0, max_operand: int = 7) -> list[Problem]:
    """All a+b and a-b (a >= b) with operands in [0, max_operand], shuffled by seed: "12+7=" -> "19"."""
    probs = [Problem(f"{a}+{b}=", str(a + b)) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    probs += [Problem(f"{a}-{b}=", str(a - b)) for a in range(max_operand + 1) for b in range(a + 1)]
    random.Random(seed).shuffle(probs)
    return probs


def build_tokenizer():
    """A character-level tokenizer (plus one `\\boxed{` token) with a minimal chat template, built in code."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS + [BOX_TOKEN])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.add_tokens([AddedToken(BOX_TOKEN, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=256,
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
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_jsonl(
    path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer", arg: str = "data"
) -> list[Problem]:
    """Problems from a JSONL file; errors name the file, the line and what was expected."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{arg}: {str(path)!r} is a directory, expected a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"{arg}: file {str(path)!r} does not exist")
    problems = []
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
            for key, flag in ((prompt_key, "--prompt-key"), (answer_key, "--answer-key")):
                if key not in row:
                    raise ValueError(
                        f"{arg}: {path}:{lineno}: missing key {key!r} (keys present: "
                        f"{sorted(row)}; choose another with {flag})"
                    )
            prompt, answer = row[prompt_key], row[answer_key]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(
                    f"{arg}: {path}:{lineno}: {prompt_key!r} must be a non-empty string, got {prompt!r}"
                )
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise ValueError(
                    f"{arg}: {path}:{lineno}: {answer_key!r} must be a string or a number, got {answer!r}"
                )
            problems.append(Problem(prompt, str(answer)))
    if not problems:
        raise ValueError(f"{arg}: {path}: no problems found (the file is empty)")
    return problems


def load_problems(cfg) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems: the configured JSONL files, or the embedded task (eval = held-out tail)."""
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
    """(prompt ids, target ids, answer shown) of the embedded task's warm-up: "\\boxed{answer}" + eos.

    A fraction `noise` of the demonstrations is deliberately wrong (half unboxed, half off by one), so the
    warmed-up policy is right only part of the time and RL has something to fix within minutes.
    """
    rng = random.Random(seed)
    out = []
    for p in problems:
        prompt = encode(tokenizer, render_prompt(tokenizer, p.prompt + suffix, system_prompt))
        text = f"{BOX_TOKEN}{p.answer}}}"
        shown = p.answer
        if rng.random() < noise:
            wrong = (
                str(int(p.answer) + rng.choice((-1, 1))) if p.answer.lstrip("-").isdigit() else p.answer + "0"
            )
            text = p.answer if rng.random() < 0.5 else f"{BOX_TOKEN}{wrong}}}"
            shown = p.answer if text == p.answer else wrong
        out.append((prompt, encode(tokenizer, text) + [tokenizer.eos_token_id], shown))
    return out
