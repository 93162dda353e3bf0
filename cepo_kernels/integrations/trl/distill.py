"""CEPOTrainer's opsd and sdpo modes (`CEPOConfig(algo="opsd" | "sdpo")`): the distribution-matching relatives
the paper argues against, on TRL's generation, rewards and PPO mini-batches (docs/trl.md "OPSD and SDPO").

    after TRL has generated and scored a batch:
        step.distill.distill_contexts: each local row's teacher context (OPSD: the prompt re-asked with the
            reference answer; SDPO: with a successful peer rollout of its group, never itself; rows without
            one get no loss), rendered by TRL as it renders the prompts; kept in the batch as padded ids
    per micro-batch (compute_loss):
        the student's last hidden states (with gradient), the teacher's on [context | completion] (no
        gradient, step.distill.Teacher: live, initial or ema weights), then step.distill.distill_loss
        (the fused `linear_divergence_loss` on the lm_head: no [B, T, V] logits), token-mean over the
        distilled tokens of the optimizer step's micro-batches on all processes; sdpo may blend
        (1 - distillation_weight) x TRL's GRPO loss.

The hooks CEPOTrainer calls: `_distill_init` (end of __init__), `_distill_scored` (after TRL's scoring, in
place of the CEPO advantages) and `_compute_loss` (this class's override).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from trl.models.utils import disable_gradient_checkpointing

from cepo_kernels import linear_logprobs
from cepo_kernels.step import pack
from cepo_kernels.step.distill import Teacher, distill_contexts, distill_loss

__all__ = ["DistillMixin", "DISTILL_METRICS"]

DISTILL_METRICS = ("divergence_mean", "is_weight_mean", "is_clip_frac")  # token means over distilled tokens


def _question(prompt) -> str:
    """The question a {question} template re-asks: a plain prompt itself, or a conversation's last user
    text."""
    if isinstance(prompt, str):
        return prompt
    last = prompt[-1] if prompt else {}
    if last.get("role") != "user":
        raise ValueError(f"prompt: opsd/sdpo re-ask the last user message; expected a conversation ending "
                         f"with a user turn, got role {last.get('role')!r}")
    content = last.get("content", "")
    if isinstance(content, list):  # typed content blocks
        content = "".join(b.get("text", "") for b in content
                          if isinstance(b, dict) and b.get("type") == "text")
    return content


class _TeacherStep(TrainerCallback):
    """After every optimizer step, the EMA teacher follows the policy (step.distill.Teacher.after_step)."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    def on_step_end(self, args, state, control, **kwargs):
        self.teacher.after_step()


class DistillMixin:
    """CEPOTrainer's opsd / sdpo modes (see the module docstring); inert for algo="cepo"."""

    def _distill_on(self) -> bool:
        return self.args.options.algorithm.distills

    def _distill_init(self):
        """Checks the model, builds the teacher (its initial / EMA copy from the weights as given) and the EMA
        callback; nothing for algo="cepo"."""
        self.distill_teacher, self.distill_last = None, None
        if not self._distill_on():
            return
        if getattr(self, "_is_vlm", False):  # the re-asked prompts carry no image inputs
            raise ValueError(f"processing_class: algo {self.args.algo!r} re-renders the prompts as text and "
                             "needs a text-only model and tokenizer, got a vision-language processor")
        if getattr(self, "environment_factories", None) is not None:
            raise ValueError(f"algo: {self.args.algo!r} re-renders the prompts and does not support "
                             "environment_factories (per-environment tools)")
        self._distill_head()
        self.distill_teacher = Teacher(self.model, self.args.options)
        self.add_callback(_TeacherStep(self.distill_teacher))

    def _distill_head(self):
        try:
            return self._cepo_head()
        except ValueError as e:  # KernelHead's reasons, without its advice about cepo_kernel_logprobs
            raise ValueError(f"algo: {self.args.algo!r} computes its loss from the last hidden states and "
                             f"the lm_head, {str(e).split(': ', 1)[-1].split('; set ')[0]}") from None

    def _distill_check_copy(self):
        """A teacher copy (initial without LoRA, ema) of a sharded policy is not supported: refused at the
        first batch, once train() has wrapped the model."""
        if self.distill_teacher.copy is None:
            return
        from torch.distributed.tensor import DTensor

        from cepo_kernels.integrations.trl.head import zero3_partitioned

        head = self._cepo_head()
        if zero3_partitioned(head) or isinstance(head.weight, DTensor):
            raise ValueError(f"distill_teacher: {self.args.options.distill_teacher!r} keeps a copy of the "
                             "policy, which is not supported under FSDP or DeepSpeed ZeRO-3; use 'live', or "
                             "a LoRA policy with 'initial'")

    # ---- after generation: the teacher contexts -------------------------------------------------------

    @torch.no_grad()
    def _distill_scored(self, output, inputs, completions, rewards_per_func):
        """The batch's teacher contexts into `output` (distill_prefix_ids [B, L] left-padded,
        distill_prefix_len [B], 0 = no loss; distill_tokens: the distilled tokens of all processes) and
        `self.distill_last`."""
        mode = "train" if self.model.training else "eval"
        self._distill_check_copy()
        G = self.num_generations if mode == "train" else self.num_generations_eval
        mask = output["completion_mask"].bool()
        if "tool_mask" in output:
            mask = mask & output["tool_mask"].bool()
        batch = self._cepo_batch(output, inputs, completions, rewards_per_func, mask, G, with_texts=True)
        prompts = [x["prompt"] for x in inputs]
        batch.questions = [_question(p) for p in prompts]

        def render(i, message):  # through TRL's own prompt tokenisation, as the student's prompt
            p = prompts[i]
            p = message if isinstance(p, str) else list(p[:-1]) + [{"role": "user", "content": message}]
            return self._tokenize_prompts([p])[0][0]

        ctx = distill_contexts(batch, self.args.options, self._tokenizer, render=render)
        device, B = mask.device, mask.shape[0]
        lens = torch.zeros(B, dtype=torch.long)
        L = max((len(p) for p in ctx.prefixes), default=1)
        ids = torch.full((B, L), self._tokenizer.pad_token_id, dtype=torch.long)
        for r, p in zip(ctx.rows, ctx.prefixes, strict=True):
            lens[r] = len(p)
            ids[r, L - len(p):] = torch.tensor(p, dtype=torch.long)
        output["distill_prefix_ids"], output["distill_prefix_len"] = ids.to(device), lens.to(device)
        local = (mask & (lens.to(device) > 0)[:, None]).sum()
        local = torch.stack([local, torch.tensor(len(ctx.rows), device=device)])
        counts = self.accelerator.gather(local[None])
        output["distill_tokens"] = counts[:, 0].sum().float()  # 0-dim: TRL's splits keep it whole
        teacher_rows = int(counts[:, 1].sum())
        self._metrics[mode]["distill/teacher_rows"].append(float(teacher_rows))
        self.distill_last = {"step": self.cepo_generation(), "rows": list(ctx.rows),
                             "prefixes": list(ctx.prefixes), "batch": batch, "teacher_rows": teacher_rows}
        return output

    # ---- the loss -------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if not self._distill_on():
            return super()._compute_loss(model, inputs)
        options = self.args.options
        w = options.distillation_weight if options.algorithm.context == "peer" else 1.0
        loss = (1.0 - w) * super()._compute_loss(model, inputs) if w < 1.0 else 0.0
        if w > 0.0:
            loss = loss + w * self._distill_loss(model, inputs)
        return loss

    def _distill_loss(self, model, inputs):
        """This micro-batch's distillation loss (module docstring), its metrics logged."""
        mode = "train" if self.model.training else "eval"
        options = self.args.options
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        R = completion_ids.size(1)
        mask = completion_mask.bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        lens = inputs["distill_prefix_len"]
        dm = mask & (lens > 0)[:, None]
        hidden = self._cepo_hidden(model, torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                                   torch.cat([inputs["prompt_mask"], completion_mask], dim=1), R)
        teacher_hidden = self._distill_teacher_hidden(inputs, hidden, lens)
        # token-mean over the distilled tokens of the accumulation window (all processes), as TRL's "dapo"
        scale = self.accelerator.num_processes
        if mode == "train":
            scale = scale * self.args.steps_per_generation / self.current_gradient_accumulation_steps
        num_tokens = inputs["distill_tokens"].clamp_min(1.0) / scale
        old = inputs.get("old_per_token_logps")
        copy = self.distill_teacher.copy
        t_head = None if copy is None else copy.get_output_embeddings()

        def fn(weight, bias, h):
            h = h.to(weight.dtype)
            old_logp = old
            if old_logp is None and options.algorithm.context == "peer":  # on-policy: the current log-probs
                with torch.no_grad():
                    old_logp = linear_logprobs(h.detach(), weight, completion_ids, bias=bias,
                                               temperature=self.temperature)
            tw = tb = None
            if t_head is not None:  # a copy's own head, in the student head's dtype
                tw = t_head.weight.to(weight.dtype)
                tb = None if t_head.bias is None else t_head.bias.to(weight.dtype)
            return distill_loss(h, teacher_hidden, weight, bias, completion_ids, dm, options,
                                old_logp=old_logp, temperature=self.temperature, num_tokens=num_tokens,
                                metrics="tensor", teacher_weight=tw, teacher_bias=tb)

        out = self._cepo_apply(fn, hidden)
        n = dm.sum().float()
        sums = torch.stack([n] + [n * out.metrics[k] for k in DISTILL_METRICS])
        sums = self.accelerator.reduce(sums, reduction="sum").tolist()
        metrics = self._metrics[mode]
        metrics["distill/tokens"].append(sums[0])
        if sums[0] > 0:
            for k, v in zip(DISTILL_METRICS, sums[1:], strict=True):
                metrics[f"distill/{k}"].append(v / sums[0])
        return out.loss

    @torch.no_grad()
    def _distill_teacher_hidden(self, inputs, hidden, lens):
        """The teacher's last hidden states [b, R, H] at the completion positions of the rows with a context
        (zeros elsewhere, never read), in forwards of teacher_batch_size rows; every process runs as many
        forwards as the busiest (a sharded policy needs all ranks in each)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        R = completion_ids.size(1)
        rows = (lens > 0).nonzero().flatten().tolist()
        chunk = self.args.teacher_batch_size or 2 * self.args.per_device_train_batch_size
        counts = self.accelerator.gather(torch.tensor([len(rows)], device=hidden.device))
        n_chunks = -(-int(counts.max()) // chunk)
        teacher_hidden = torch.zeros_like(hidden, requires_grad=False)
        if not n_chunks:
            return teacher_hidden
        ids_host, lens_host = inputs["distill_prefix_ids"].cpu(), lens.tolist()
        L = ids_host.shape[1]
        lengths = completion_mask.sum(1).tolist()
        comp_host = completion_ids.cpu()
        prefixes = [ids_host[r, L - lens_host[r]:].tolist() for r in rows]
        responses = [comp_host[r, : lengths[r]].tolist() for r in rows]
        model, context = self.distill_teacher.model_and_context()
        gc = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
        with gc, context:
            for s in range(0, n_chunks * chunk, chunk):
                if s >= len(rows):  # keep in step with the other ranks' forwards
                    with self.accelerator.autocast():
                        model(input_ids=completion_ids[:1, :1], use_cache=False)
                    continue
                packed = pack(prefixes[s: s + chunk], responses[s: s + chunk], self._tokenizer.pad_token_id,
                              device=hidden.device, resp_len=R)
                th = self._cepo_hidden(model, packed.input_ids, packed.attention_mask, R,
                                       position_ids=packed.position_ids)
                teacher_hidden[rows[s: s + chunk]] = th.to(hidden.dtype)
        return teacher_hidden
