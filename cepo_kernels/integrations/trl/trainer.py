"""`CEPOTrainer(GRPOTrainer)`: CEPO's per-token advantages after TRL's generation and scoring (see the
package docstring)."""

from __future__ import annotations

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id

from cepo_kernels.integrations.trl.config import CEPOConfig
from cepo_kernels.integrations.trl.distill import DistillMixin
from cepo_kernels.integrations.trl.head import KernelHead
from cepo_kernels.integrations.trl.vision import VisionTeachers
from cepo_kernels.step import RolloutBatch, extract_boxed, pack, reweight

__all__ = ["CEPOTrainer"]


def _completion_text(completion) -> str:
    """The text of a TRL completion: a string, or a conversational list of messages (contents joined)."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, list):  # typed content blocks
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        parts.append(content if isinstance(content, str) else "")
    return "".join(parts)


class CEPOTrainer(DistillMixin, VisionTeachers, KernelHead, GRPOTrainer):
    """GRPOTrainer with CEPO's per-token advantages (see the module docstring). Same arguments as GRPOTrainer,
    with `args` a CEPOConfig, plus `answer_extractor`: the function giving a rejected completion's answer
    (default: the content of its last \\boxed{...}, as cepo-train).

    After each generation, `self.cepo_last` holds what was decided for that batch: step, lam, the r- of every
    group of the gathered batch (`neg_answers`, `neg_how`, `neg_index`), the teacher rows (local, global) and
    the number of teacher forwards this process ran. `cepo_observer(record, tensors)`, when given, is called
    with it and the batch's tensors (`advantages` [B] as TRL computed them, `a_hat` [B, T], `mask`, `rows`,
    `pos_logp`, `neg_logp` [B, T]) after every generation.
    """

    def __init__(self, model, reward_funcs=None, args=None, *rest, answer_extractor=None, cepo_observer=None,
                 **kwargs):
        # reward_funcs optional as in GRPOTrainer (an environment may own the reward); with no reward source
        # at all, GRPOTrainer raises its own ValueError
        if args is None:  # as GRPOTrainer builds its default GRPOConfig
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = CEPOConfig(f"{name.split('/')[-1]}-CEPO")
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        if cepo_observer is not None and not callable(cepo_observer):
            raise TypeError(f"cepo_observer: expected a callable or None, got {type(cepo_observer).__name__}")
        self.cepo_observer = cepo_observer
        if not isinstance(self.args, CEPOConfig):
            raise TypeError(f"args: expected a CEPOConfig, got {type(self.args).__name__}")
        if answer_extractor is not None and not callable(answer_extractor):
            raise TypeError(
                f"answer_extractor: expected a callable or None, got {type(answer_extractor).__name__}"
            )
        self.answer_extractor = answer_extractor or extract_boxed
        column = self.args.answer_column
        for split, ds in (("train_dataset", self.train_dataset),) if self.args.reads_answers else ():
            names = getattr(ds, "column_names", None)
            if isinstance(names, list) and column not in names:
                raise ValueError(
                    f"{split}: expected a column {column!r} (CEPOConfig.answer_column) with the reference "
                    f"answers, got columns {names}"
                )
        self._cepo_scored = None
        self._cepo_head_checked = False
        self.cepo_last: dict | None = None
        if self.args.cepo_kernel_logprobs:
            self._cepo_head()  # fail at construction, not mid-training, on a model the kernels cannot serve
        self._distill_init()  # algo opsd / sdpo (integrations/trl/distill.py); nothing for cepo

    def cepo_generation(self) -> int:
        """The 0-based index of the current generation (rollout) batch: TRL generates once every
        steps_per_generation x num_iterations training steps (micro-batches), so several optimizer steps
        can share one batch; lambda counts these batches (docs/method.md §7)."""
        every = self.args.steps_per_generation * self.num_iterations
        return self._step // every

    def cepo_lambda(self, step: int | None = None) -> float:
        """lambda at a 0-based generation batch (default: the current one, `cepo_generation()`)."""
        step = self.cepo_generation() if step is None else step
        return self.args.options.lam(step)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._cepo_scored = (inputs, completions, rewards_per_func)  # rewards gathered over all processes
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._cepo_scored = None
        if self.args.cepo_kernel_logprobs and not self._cepo_head_checked:
            # the model is wrapped (FSDP, DeepSpeed) once train() has started: check it at the first batch
            self._cepo_head()
            self._cepo_head_checked = True
        output = super()._generate_and_score_completions(inputs)
        scored, self._cepo_scored = self._cepo_scored, None
        if scored is None:
            raise RuntimeError("CEPOTrainer: the batch's rewards were not seen (has GRPOTrainer changed?)")
        if self._distill_on():  # opsd / sdpo: teacher contexts instead of CEPO's advantages (GRPO's stay)
            return self._distill_scored(output, *scored)
        output["advantages"] = self._cepo_advantages(output, *scored)
        return output

    @torch.no_grad()
    def _cepo_advantages(self, output, inputs, completions, rewards_per_func):
        """A_hat [B, T] of this process's rows: TRL's batch as a RolloutBatch (r- read from the gathered
        batch), the reweight phase with this trainer's scorer (both teachers on the local rows with A != 0,
        while lambda > 0)."""
        mode = "train" if self.model.training else "eval"
        args = self.args
        mask = output["completion_mask"].bool()
        if "tool_mask" in output:
            mask = mask & output["tool_mask"].bool()
        step = self.cepo_generation()
        options = args.options
        G = self.num_generations if mode == "train" else self.num_generations_eval
        batch = self._cepo_batch(output, inputs, completions, rewards_per_func, mask, G,
                                 with_texts=options.lam(step) > 0.0)
        record = {"step": step, "lam": options.lam(step), "neg_answers": [], "neg_how": [], "neg_index": [],
                  "teacher_rows_local": 0, "teacher_rows": 0, "teacher_forwards": 0}
        result = reweight(batch, self._cepo_scorer(output, record), options, step, tokenizer=self._tokenizer,
                          extract=self.answer_extractor, gather=self._cepo_gathered,
                          contexts=self._cepo_vision_contexts(output))  # None: the text layout
        if result.negatives is not None:
            negatives = result.negatives
            record.update(neg_answers=[n.answer for n in negatives], neg_how=[n.how for n in negatives],
                          neg_index=[n.index for n in negatives], teacher_rows_local=len(result.rows))
        self._cepo_log(mode, record, result)
        self.cepo_last = record
        if self.cepo_observer is not None:
            self.cepo_observer(dict(record), {"advantages": result.advantages, "a_hat": result.a_hat,
                                              "mask": mask, "rows": result.rows, "pos_logp": result.pos_logp,
                                              "neg_logp": result.neg_logp})
        return result.a_hat

    def _cepo_batch(self, output, inputs, completions, rewards_per_func, mask, G, with_texts) -> RolloutBatch:
        """This process's rows as a RolloutBatch; with_texts: the texts, rewards and references of the batch
        gathered over all processes (for r-), else none (no r- is chosen)."""
        adv = output["advantages"].float()  # [B] this process's rows
        B = adv.shape[0]
        prompt_ids, prompt_mask = output["prompt_ids"].cpu(), output["prompt_mask"].bool().cpu()
        prompts = _LazyRows(lambda i: prompt_ids[i][prompt_mask[i]].tolist())  # only teacher rows are read
        host_ids, host_lengths = output["completion_ids"].cpu(), output["completion_mask"].sum(1).tolist()
        responses = _LazyRows(lambda i: host_ids[i, : host_lengths[i]].tolist(), B)
        texts = rewards = references = None
        if with_texts:
            rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
            rewards = rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan")).tolist()
            if self.args.reads_answers and any(self.args.answer_column not in x for x in inputs):
                raise ValueError(f"answer_column: expected every example to have a column "
                                 f"{self.args.answer_column!r} (reference answers), got keys "
                                 f"{sorted(inputs[0])}")
            texts = gather_object([_completion_text(c) for c in completions])
            references = gather_object([str(x.get(self.args.answer_column, "")) for x in inputs])
            if len(texts) != len(rewards) or len(texts) % G:
                raise RuntimeError(
                    f"CEPOTrainer: {len(texts)} gathered completions, {len(rewards)} rewards, group size {G}"
                )
        return RolloutBatch(prompts, responses, adv, mask, G, texts=texts, rewards=rewards,
                            references=references,
                            offset=self.accelerator.process_index * B if with_texts else 0)

    def _cepo_scorer(self, output, record):
        """The reweight phase's scorer: both teachers through TRL's model, every rank running as many teacher
        forwards as the busiest one (sharded models, FSDP or ZeRO-3, need all ranks in each forward)."""

        def score(ctx, teachers):
            device = output["completion_mask"].device
            counts = self.accelerator.gather(torch.tensor([len(ctx.rows)], device=device))
            record["teacher_rows"] = int(counts.sum().item())
            if int(counts.max()) == 0:
                return {}
            chunk = self.args.teacher_batch_size or 2 * self.args.per_device_train_batch_size
            n_chunks = -(-2 * int(counts.max()) // chunk)
            record["teacher_forwards"] = n_chunks
            teachers = self._cepo_vision_teacher_logprobs if self._is_vlm else self._cepo_teacher_logprobs
            pos, neg = teachers(output, ctx, n_chunks)
            return {} if pos is None else {"pos": pos, "neg": neg}

        return score

    def _cepo_gathered(self, delta, adv, mask):
        """Every process's Delta, A and mask (the statistics of Delta are those of the whole batch)."""
        pad = self.accelerator.pad_across_processes
        d = self.accelerator.gather(pad(delta.contiguous(), dim=1))
        m = self.accelerator.gather(pad(mask.to(torch.int32).contiguous(), dim=1)).bool()
        return d, self.accelerator.gather(adv.contiguous()), m

    def _cepo_teacher_logprobs(self, output, ctx, n_chunks):
        """Both teachers' log-probs [len(ctx.rows), R] of the completions of the local rows ctx.rows, in
        n_chunks forwards (extra ones run on a one-token input and are discarded, to keep in step with the
        other ranks)."""
        tok = self._tokenizer
        prompt_ids = output["prompt_ids"]
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        R = completion_ids.shape[1]
        lengths = completion_mask.sum(1)  # right-padded; rows TRL masked whole (truncated) are not in rows
        rows = ctx.rows
        prefixes = ctx.pos_prefixes + ctx.neg_prefixes
        host_ids, host_lengths = completion_ids.cpu(), lengths.tolist()  # one copy each, not one per row
        responses = [host_ids[i, : host_lengths[i]].tolist() for i in rows] * 2
        chunk = self.args.teacher_batch_size or 2 * self.args.per_device_train_batch_size
        kernels = self.args.cepo_kernel_logprobs
        out, targets, masks = [], [], []
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for s in range(0, n_chunks * chunk, chunk):
                if s >= len(prefixes):  # keep in step with the other ranks' forwards
                    self._cepo_idle_forward(input_ids=prompt_ids[:1, -1:])
                    continue
                packed = pack(prefixes[s : s + chunk], responses[s : s + chunk], tok.pad_token_id,
                              device=completion_ids.device, resp_len=R)
                if kernels:  # hidden states only; both teachers are scored together below
                    out.append(self._cepo_hidden(self.model, packed.input_ids, packed.attention_mask, R,
                                                 position_ids=packed.position_ids))
                    targets.append(packed.targets)
                    masks.append(packed.mask)
                    continue
                labels = packed.input_ids.masked_fill(packed.attention_mask == 0, -100)
                labels[:, : packed.start] = -100
                with self.accelerator.autocast():
                    res = self.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                     position_ids=packed.position_ids, labels=labels, fused_lm_head=True)
                out.append(res.log_probs[:, -R:].float())
        n = len(rows)
        if kernels:  # gathers a sharded head on every rank, rows or not (a collective under FSDP2)
            return self._cepo_kernel_teachers(out, targets, masks, n)
        if not n:
            return None, None
        logp = torch.cat(out, dim=0)
        return logp[:n], logp[n:]

    def _cepo_log(self, mode, record, result):
        metrics = self._metrics[mode]
        metrics["cepo/lambda"].append(record["lam"])
        metrics["cepo/teacher_rows"].append(float(record["teacher_rows"]))
        if record["lam"] <= 0.0:
            return
        metrics["cepo/r_minus_fallbacks"].append(float(sum(h == "fallback" for h in record["neg_how"])))
        if record["teacher_rows"] == 0:  # no evidence this batch: nothing to average
            return
        for name, value in result.delta_metrics.items():  # over every process's tokens (_cepo_gathered)
            metrics[f"cepo/{name}"].append(value)


class _LazyRows:
    """Per-row values made on first use (row i -> make(i)): host lists only for the rows read."""

    def __init__(self, make, n: int | None = None):
        self.make, self.n, self.cache = make, n, {}

    def __getitem__(self, i):
        if i not in self.cache:
            self.cache[i] = self.make(i)
        return self.cache[i]

    def __len__(self):
        return self.n
