"""A tiny offline TRL setup for the CEPOTrainer tests, and the script the two-process test launches.

Everything is built in code (nothing downloaded): a word-level tokenizer wrapped in PreTrainedTokenizerFast, a
1-layer Qwen2 from a config, arithmetic prompts with an `answer` column, and a reward that gives mixed rewards
within groups even for a random model (the vocabulary has one token per boxed answer, and a boxed answer
scores 0.1 even when wrong).

As a script (`torchrun --nproc_per_node N tests/trl_helpers.py OUT_DIR PER_DEVICE`): trains CEPO for a few
steps with completions sampled with a seed per global row (so that N processes x G/N completions draw what one
process x G draws), and writes OUT_DIR/rank{r}.json: the logged losses, the r- choices of every step, the
advantages handed to the loss, and the final parameters. With CEPO_TEST_DIE_RANK=r, rank r raises at its
first generation (the bounded-failure test); CEPO_TEST_FSDP2, CEPO_TEST_KERNELS, CEPO_TEST_GA: see main.
`--fsdp-head OUT`: the FSDP2 test of the kernel head alone (fsdp_head).
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


def any_boxed(completions, **kwargs):
    """1 for a completion with a \\boxed{} (about a quarter of a random model's tokens are), else 0: groups
    with successful rollouts for SDPO's teacher."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float("\\boxed" in t) for t in texts]


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


def force_fsdp2_on_cpu(wrap=("Qwen2DecoderLayer",)):
    """Makes accelerate take its FSDP2 path on CPU processes (gloo). accelerate 1.16 keeps a CPU run's
    distributed type MULTI_CPU whatever FSDP options it is given (`accelerate launch --use_fsdp` then runs
    DDP, silently), so the FSDP plugin is installed here by hand: the trainer's model is then `fully_shard`-ed
    (each module of a class named in `wrap`, Qwen2's decoder layers by default, and the root) and every
    parameter is a DTensor, which the script records."""
    import accelerate.state as st
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = st.AcceleratorState.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if "fsdp_plugin" in kwargs and self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = kwargs["fsdp_plugin"] or FullyShardedDataParallelPlugin(
                fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=list(wrap))
            self.distributed_type = DistributedType.FSDP
            st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    st.AcceleratorState.__init__ = patched


def main(out_dir: str, per_device: int, steps: int = 2):
    from torch.distributed.tensor import DTensor

    from cepo_kernels.integrations.trl import CEPOConfig, CEPOTrainer

    # CEPO_TEST_FSDP2=1: FSDP2 on 2+ processes; CEPO_TEST_KERNELS=1: cepo_kernel_logprobs;
    # CEPO_TEST_GA: the gradient accumulation (and steps per generation); CEPO_TEST_ALGO: opsd or sdpo
    # (top-5 + tail, its EMA teacher, rewarded for any \boxed{}) instead of cepo
    if os.environ.get("CEPO_TEST_FSDP2") == "1" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        force_fsdp2_on_cpu()
    ga = int(os.environ.get("CEPO_TEST_GA", "1"))
    zero3 = os.environ.get("CEPO_TEST_ZERO3") == "1" and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # CEPO_TEST_ZERO3=1: DeepSpeed ZeRO-3 through accelerate (gloo on CPU), every parameter partitioned
    algo = os.environ.get("CEPO_TEST_ALGO", "cepo")
    ds = ({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
           "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
           "zero_allow_untested_optimizer": True} if zero3 else None)

    # plain SGD: the update is linear in the gradient, so two runs' updates compare like their gradients
    # ddp_timeout: a collective waiting on a dead rank fails within a minute instead of TRL's 30
    args = tiny_config(CEPOConfig, os.path.join(out_dir, "trainer"), per_device_train_batch_size=per_device,
                       max_steps=steps, lam0=0.5, t_warm=10, optim="sgd", lr_scheduler_type="constant",
                       max_grad_norm=0.0, ddp_timeout=60, gradient_accumulation_steps=ga, deepspeed=ds,
                       **({"ddp_backend": "gloo"} if zero3 else {}),
                       cepo_kernel_logprobs=os.environ.get("CEPO_TEST_KERNELS") == "1",
                       **({"algo": algo, "sdpo_topk": 5} if algo != "cepo" else {}))
    model = tiny_model(0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = recording(CEPOTrainer)(model=model, reward_funcs=any_boxed if algo == "sdpo" else boxed_reward,
                                     args=args,
                                     train_dataset=tiny_dataset(), processing_class=tiny_tokenizer(),
                                     row_seeded=True)
    die = os.environ.get("CEPO_TEST_DIE_RANK")  # the failure test: this rank raises at its first generation
    if die is not None and int(die) == trainer.accelerator.process_index:
        def dying(record, tensors):
            raise RuntimeError(f"rank {die} dies (test)")

        trainer.cepo_observer = dying
    trainer.train()
    rank = trainer.accelerator.process_index
    final = list(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    dtensors = all(isinstance(p, DTensor) for _, p in final)
    partitioned = all(getattr(p, "ds_id", None) is not None for _, p in final)
    if partitioned:  # ZeRO-3: the parameters whole, gathered from every rank's partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in final], modifier_rank=None):
            whole = {n: p.detach().clone() for n, p in final}
    else:
        whole = {n: p.detach().full_tensor() if isinstance(p, DTensor) else p.detach() for n, p in final}
    updates = {n: (p - initial[n]).double().flatten().tolist() for n, p in whole.items()}
    result = {
        "world_size": trainer.accelerator.num_processes,
        "dtensors": dtensors,
        "zero3_partitioned": partitioned,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "history": trainer.history,
        "a_hat": [s["a_hat"].tolist() for s in trainer.scored],
        "adv": [s["adv"].tolist() for s in trainer.scored],
        "updates": updates,
        "param_absmax": {n: float(p.abs().max()) for n, p in whole.items()},  # the resolution of an update
    }
    last = getattr(trainer, "distill_last", None)
    if last is not None:  # opsd / sdpo: the last batch's teacher contexts, rows numbered in the whole batch
        result["distill"] = {str(last["batch"].offset + r): p
                             for r, p in zip(last["rows"], last["prefixes"], strict=True)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    import torch.distributed as dist

    if dist.is_initialized():  # leave the collectives together, before the interpreter's teardown
        dist.barrier()
        dist.destroy_process_group()


def fsdp_head(out_dir: str):
    """`torchrun --nproc_per_node 2 tests/trl_helpers.py --fsdp-head OUT` (or 1 process): the policy's
    log-prob loss of 2 micro-batches per rank (gradient accumulation 2, every row of rank 1's second one
    masked), with the kernel head (`linear_logprobs` on `full_weight(lm_head.weight)`) and with HF's logits,
    the tiny model sharded by FSDP2 (`fully_shard` per decoder layer and at the root) when 2 processes run.
    One process computes both ranks' micro-batches and averages, as FSDP2 averages over ranks. Writes
    OUT/fsdp{world}.json: the full gradients per mode, whether the parameters were DTensors, how many times
    the head weight was a DTensor before a forward."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from cepo_kernels import linear_logprobs
    from cepo_kernels.integrations.trl.head import full_weight

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model(0)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    result = {"dtensors": all(isinstance(p, DTensor) for p in model.parameters()), "sharded_head": 0}
    modes = ("hf", "kernels", "kernels_gathered_first")
    # one process: both ranks' micro-batches, and again in reverse order ("<mode>_reordered": the same sums in
    # another order, the rounding noise the test's tolerance is derived from)
    order = [(rank, m) for m in range(2)] if world > 1 else [(r, m) for r in (0, 1) for m in range(2)]
    runs = [(mode, order) for mode in modes]
    if world == 1:
        runs += [(mode + "_reordered", order[::-1]) for mode in modes]
    for name, pairs in runs:
        mode = name.removesuffix("_reordered")
        kernels = mode != "hf"
        model.zero_grad(set_to_none=True)
        for r, micro in pairs:
            g = torch.Generator().manual_seed(100 * r + micro)
            ids = torch.randint(3, len(WORDS), (4, 7), generator=g)
            mask = torch.ones(4, 6)
            if r == 1 and micro == 1:
                mask.zero_()  # all rows masked: a zero loss, still tied to the weights
            # the head whole before the forward (then a DTensor shard: the all-gather path) or after it
            # (FSDP2's root still unsharded: a plain tensor)
            w = model.lm_head.weight
            result["sharded_head"] += isinstance(w, DTensor)
            w = full_weight(w) if mode == "kernels_gathered_first" else None
            out = model(input_ids=ids, output_hidden_states=kernels, logits_to_keep=1 if kernels else 0)
            if kernels:
                w = full_weight(model.lm_head.weight) if w is None else w
                lp = linear_logprobs(out.hidden_states[-1][:, :-1].contiguous(), w, ids[:, 1:])
            else:
                lp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(2, ids[:, 1:, None])[..., 0]
            loss = -(lp * mask).sum() / mask.sum().clamp_min(1.0)
            (loss / (1 if world > 1 else 2)).backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[n] = g.double().flatten().tolist()
        result[name] = grads
    if rank == 0:
        with open(os.path.join(out_dir, f"fsdp{world}.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "--fsdp-head":
        fsdp_head(sys.argv[2])
    else:
        main(sys.argv[1], int(sys.argv[2]))
    # the results are written: skip the interpreter's teardown, where DeepSpeed's and gloo's background
    # threads can abort the process ("terminate called without an active exception", seen once in CI)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
