"""A tiny offline TRL setup for the CEPOTrainer tests, and the script the two-process test launches.

Everything is built in code (nothing downloaded): a word-level tokenizer wrapped in PreTrainedTokenizerFast, a
1-layer Qwen2 from a config, arithmetic prompts with an `answer` column, and a reward that gives mixed rewards
within groups even for a random model (the vocabulary has one token per boxed answer, and a boxed answer
scores 0.1 even when wrong).

As a script (`torchrun --nproc_per_node N tests/trl_helpers.py OUT_DIR PER_DEVICE`): trains CEPO for a few
steps with completions sampled with a seed per global row (so that N processes x G/N completions draw what one
process x G draws), and writes OUT_DIR/rank{r}.json: the logged losses, the r- choices of every step, the
advantages handed to the loss, and the final parameters. With CEPO_TEST_DIE_RANK=r, rank r raises at its
first generation (the bounded-failure test).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>", "what", "is", "plus", "?"] + [str(i) for i in range(1, 7)] + [
    f"\\boxed{{{i}}}" for i in range(2, 7)
]


def tiny_tokenizer(chat: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    if chat:  # a chat template in the tokenizer's own words, for conversational prompts
        tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def tiny_model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def tiny_dataset(chat: bool = False):
    from datasets import Dataset

    rows = [{"prompt": f"what is {a} plus {b} ?", "answer": str(a + b)} for a in (1, 2, 3) for b in (1, 2, 3)]
    if chat:
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    return Dataset.from_list(rows)


def boxed_reward(completions, answer, **kwargs):
    """TRL reward function, as in the authors' runs: 0.9 x (the last \\boxed{} is the reference answer)
    + 0.1 x (a \\boxed{} is present). A random model's groups get mixed rewards even when none is right."""
    from cepo_kernels.step.rewards import boxed_reward as score
    from cepo_kernels.step.rewards import extract_boxed

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # plain or conversational
    return [0.9 * score(t, a) + 0.1 * (extract_boxed(t) is not None)
            for t, a in zip(texts, answer, strict=True)]


def always_right(completions, **kwargs):
    return [1.0] * len(completions)


def tiny_config(cls, out_dir, **kw):
    opts = dict(output_dir=str(out_dir), per_device_train_batch_size=8, num_generations=8,
                max_completion_length=6, max_steps=2, learning_rate=1e-2, beta=0.0, use_cpu=True, bf16=False,
                fp16=False, logging_steps=1, report_to="none", seed=0, data_seed=0, save_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0)
    opts.update(kw)
    return cls(**opts)


def recording(base):
    """A subclass of `base` (GRPOTrainer or CEPOTrainer) that records what the loss sees, the teacher passes,
    the per-step CEPO decisions, and samples each completion with a seed of its global row in the batch."""

    class Recording(base):
        def __init__(self, *args, row_seeded=False, **kwargs):
            if hasattr(base, "cepo_lambda"):  # CEPOTrainer: its public observer hook records each batch
                kwargs["cepo_observer"] = self._observe
            super().__init__(*args, **kwargs)
            self.row_seeded = row_seeded
            self.seen = []  # per loss call: the advantages and mask given to the loss
            self.scored = []  # per generation: TRL's A [B], A_hat, the teachers' rows and log-probs
            self.teacher_calls = 0  # generations in which this process ran teacher forwards
            self.history = []  # per generation: the decisions (trainer.cepo_last)

        def _observe(self, record, tensors):
            self.history.append(record)
            self.teacher_calls += record["teacher_forwards"] > 0
            rows = tensors["rows"]
            rec = {"adv": tensors["advantages"].clone(), "a_hat": tensors["a_hat"].clone(),
                   "mask": tensors["mask"].clone(), "pos": None, "neg": None}
            if rows:
                rec.update(rows=list(rows), pos=tensors["pos_logp"][rows].clone(),
                           neg=tensors["neg_logp"][rows].clone())
            self.scored.append(rec)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *a, **k):
            generate = super()._generate_single_turn
            if not self.row_seeded:
                return generate(prompt_ids, images, multimodal_fields, num_generations, *a, **k)
            completion_ids, logprobs = [], None
            first = self.accelerator.process_index * len(prompt_ids)
            for i, p in enumerate(prompt_ids):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(1000 * self.state.global_step + first + i)
                    c, _ = generate([p], images, multimodal_fields, num_generations, *a, **k)
                completion_ids += c
            return completion_ids, logprobs

        def compute_loss(self, model, inputs, *args, **kwargs):
            self.seen.append({"advantages": inputs["advantages"].detach().clone(),
                              "mask": inputs["completion_mask"].detach().clone()})
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Recording


def main(out_dir: str, per_device: int, steps: int = 2):
    from cepo_kernels.integrations.trl import CEPOConfig, CEPOTrainer

    # plain SGD: the update is linear in the gradient, so two runs' updates compare like their gradients
    # ddp_timeout: a collective waiting on a dead rank fails within a minute instead of TRL's 30
    args = tiny_config(CEPOConfig, os.path.join(out_dir, "trainer"), per_device_train_batch_size=per_device,
                       max_steps=steps, lam0=0.5, t_warm=10, optim="sgd", lr_scheduler_type="constant",
                       max_grad_norm=0.0, ddp_timeout=60)
    model = tiny_model(0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = recording(CEPOTrainer)(model=model, reward_funcs=boxed_reward, args=args,
                                     train_dataset=tiny_dataset(), processing_class=tiny_tokenizer(),
                                     row_seeded=True)
    die = os.environ.get("CEPO_TEST_DIE_RANK")  # the failure test: this rank raises at its first generation
    if die is not None and int(die) == trainer.accelerator.process_index:
        def dying(record, tensors):
            raise RuntimeError(f"rank {die} dies (test)")

        trainer.cepo_observer = dying
    trainer.train()
    rank = trainer.accelerator.process_index
    final = trainer.accelerator.unwrap_model(trainer.model).named_parameters()
    updates = {n: (p.detach() - initial[n]).double().flatten().tolist() for n, p in final}
    result = {
        "world_size": trainer.accelerator.num_processes,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "history": trainer.history,
        "a_hat": [s["a_hat"].tolist() for s in trainer.scored],
        "adv": [s["adv"].tolist() for s in trainer.scored],
        "updates": updates,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
