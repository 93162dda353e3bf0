"""CEPO with Hugging Face TRL: a GRPOTrainer script with the class, the config and one dataset column changed.

    python examples/trl_cepo.py                       # offline, CPU or GPU: a tiny model built here, ~1 min
    python examples/trl_cepo.py --model /models/Qwen3-1.7B --data train.jsonl --steps 50 --output-dir runs/trl

Without --model it builds everything in code (a word-level tokenizer, a 1-layer Qwen2 with random weights,
arithmetic prompts), downloads nothing, and trains a few steps: the point is to show the wiring and the CEPO
metrics, not to learn anything. With --model DIR it loads a local checkpoint (AutoModelForCausalLM and its
tokenizer; nothing is downloaded) and a JSONL file with one {"prompt": ..., "answer": ...} per line.
Needs the trl extra: pip install -e ".[trl]" in a clone of cepo_kernels (trl 1.16).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

if not torch.cuda.is_available():  # the Triton kernels run through Triton's interpreter on a CPU (slow)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from datasets import Dataset  # noqa: E402

# was: from trl import GRPOConfig, GRPOTrainer
from cepo_kernels.integrations.trl import CEPOConfig, CEPOTrainer  # noqa: E402, I001
from cepo_kernels.step.rewards import boxed_reward, extract_boxed  # noqa: E402


def correct(completions, answer, **kwargs):
    """TRL reward function, as in the CEPO authors' runs: 0.9 when the last \\boxed{...} of the completion
    matches the `answer` column, + 0.1 when the completion has a \\boxed{...} at all."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # plain or conversational
    return [0.9 * boxed_reward(t, a) + 0.1 * (extract_boxed(t) is not None)
            for t, a in zip(texts, answer, strict=True)]


def tiny_setup():
    """A word-level tokenizer, a 1-layer Qwen2 with random weights and arithmetic prompts, all built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = ["<pad>", "<eos>", "<unk>", "what", "is", "plus", "?"] + [str(i) for i in range(1, 7)]
    words += [f"\\boxed{{{i}}}" for i in range(2, 7)]  # one token each: a random model can be right
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
        eos_token_id=1, bos_token_id=None))
    rows = [{"prompt": f"what is {a} plus {b} ?", "answer": str(a + b)} for a in (1, 2, 3) for b in (1, 2, 3)]
    return model, tokenizer, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local checkpoint directory (default: a tiny model built in this script)")
    p.add_argument("--data", help="JSONL with 'prompt' and 'answer' per line (needed with --model)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=6)
    p.add_argument("--output-dir", default="runs/trl-cepo")
    a = p.parse_args(argv)

    if a.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not a.data:
            p.error("--data is required with --model")
        model = AutoModelForCausalLM.from_pretrained(a.model, local_files_only=True, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
        with open(a.data, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        lr, lam_decay = 5e-6, 25
    else:
        model, tokenizer, rows = tiny_setup()
        lr, lam_decay = 1e-2, 10

    config = CEPOConfig(  # was: GRPOConfig(...) with the same options
        output_dir=a.output_dir, max_steps=a.steps, learning_rate=lr,
        per_device_train_batch_size=a.num_generations, num_generations=a.num_generations,
        max_completion_length=a.max_completion_length, beta=0.0,
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available() and a.model is not None,
        logging_steps=1, save_strategy="no", report_to="none", seed=0,
        lam0=0.5, t_warm=lam_decay, eps_w=0.2, answer_column="answer",  # the CEPO options
    )
    trainer = CEPOTrainer(  # was: GRPOTrainer(...), with the same arguments
        model=model, reward_funcs=correct, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    keys = ("reward", "cepo/lambda", "cepo/teacher_rows", "cepo/delta_mean_pos", "cepo/delta_mean_neg",
            "cepo/frac_wrong_dir")
    for h in trainer.state.log_history:
        if "loss" in h:
            print(json.dumps({"step": h["step"], "loss": round(h["loss"], 5),
                              **{k: round(h[k], 5) for k in keys if k in h}}))


if __name__ == "__main__":
    main()
