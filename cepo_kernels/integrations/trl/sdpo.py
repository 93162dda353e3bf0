"""`FusedSDPOTrainer`: TRL 1.16's own `trl.experimental.sdpo.SDPOTrainer` with its self-distillation loss on
the fused `linear_divergence_loss` (from the last hidden states and the lm_head weight) instead of full
[B, T, V] student and teacher logits.

Everything else is TRL's SDPOTrainer, unchanged (its config, generation, rewards, teacher contexts, teacher
weights and callbacks, metrics). The fused loss is the same quantity as TRL's: per token the generalized JSD
(`distillation_alpha`) of softmax(logits / temperature) over the student's top `distillation_topk` ids with
or without the tail bucket (`distillation_add_tail`), or over the full vocabulary (`distillation_mode=
"full_logits"`), times min(exp(sg(log p - log p_old)), `distillation_is_clip`) when TRL has the rollout
log-probs, then the mean over each sequence's distilled tokens and over the rows (TRL's normalisation).
Differences (docs/divergence.md): TRL floors its tail bucket at ~1e-7 and clamps the log-ratio of the
importance weight to [-20, 20]; here neither (the same values unless the top-k hold all but 1e-7 of the mass
or the policy moved by e^20).

Left to TRL's own (full-logit) path: `distillation_mode="sampled_token"`, `0 < distillation_weight < 1` (the
policy-gradient term needs the student's logits there) or 0, and the teacher server (`use_teacher_server`).
The model's logits must be lm_head(last hidden state) with a plain nn.Linear head, checked at construction.
"""

from __future__ import annotations

import torch
from accelerate.utils import is_peft_model
from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

from cepo_kernels.integrations.trl.head import KernelHead, head_apply
from cepo_kernels.ops.divergence import linear_divergence_loss

__all__ = ["FusedSDPOTrainer", "SDPOConfig"]


class FusedSDPOTrainer(KernelHead, SDPOTrainer):
    """SDPOTrainer (same arguments, an SDPOConfig) whose self-distillation loss runs on the fused linear
    divergence kernel (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:  # a model whose logits are not lm_head(hidden): refused here, not mid-training
            self._cepo_head()
        except ValueError as e:  # KernelHead's reason, without its advice about CEPOConfig
            raise ValueError(f"model: FusedSDPOTrainer computes the loss from the last hidden states and the "
                             f"lm_head, {str(e).split(': ', 1)[-1].split('; set ')[0]}") from None

    def fused_loss_applies(self) -> bool:
        """Whether this configuration's loss runs on the fused kernel (else TRL's own path runs)."""
        a = self.args
        return (a.distillation_weight == 1.0 and not getattr(self, "use_teacher_server", False)
                and a.distillation_mode in ("topk_logits", "full_logits"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.fused_loss_applies():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.args.distillation_mode == "topk_logits" and self.args.distillation_topk is None:
            raise ValueError("distillation_topk: distillation_mode='topk_logits' needs a top-k, got None")
        loss = self._fused_self_distillation_loss(model, inputs)
        return loss / (self.current_gradient_accumulation_steps if self.model.training else 1.0)

    def _fused_hidden(self, model, input_ids, attention_mask, R):
        """The last hidden states [B, R, H] predicting the last R tokens, from the forward TRL runs."""
        kw = {"logits_to_keep": 1} if "logits_to_keep" in self.model_kwarg_keys else {}
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    output_hidden_states=True, **kw)
        return out.hidden_states[-1][:, -R - 1: -1]

    def _teacher_head(self):
        """The teacher's own lm_head when it is a separate model (an EMA or base copy), else None."""
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        student = self.accelerator.unwrap_model(self.model)
        if teacher is student:
            return None
        if is_peft_model(teacher):
            teacher = teacher.get_base_model()
        return teacher.get_output_embeddings()

    def _fused_self_distillation_loss(self, model, inputs):
        a = self.args
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        R = completion_ids.size(1)
        sd_mask = inputs.get("self_distillation_mask")
        loss_mask = completion_mask.bool()
        if sd_mask is not None:
            loss_mask = loss_mask & sd_mask.bool()[:, None]
        hidden = self._fused_hidden(model, torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                                    torch.cat([inputs["prompt_mask"], completion_mask], dim=1), R)
        mode = "train" if model.training else "eval"
        if not bool(loss_mask.any()):  # as TRL: a zero loss tied to the student's graph
            self._log_self_distillation_metric(mode, 0.0)
            return hidden.sum() * 0.0
        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            teacher_hidden = self._fused_hidden(self.teacher_model, inputs["teacher_input_ids"],
                                                inputs["teacher_attention_mask"], R)
        old = inputs.get("old_per_token_logps")
        kw = {}
        if a.distillation_is_clip is not None and old is not None:
            kw = dict(targets=completion_ids, old_logp=old, is_clip=a.distillation_is_clip)
        topk = a.distillation_topk if a.distillation_mode == "topk_logits" else None
        t_head = self._teacher_head()

        def fn(weight, bias, h):
            tw = tb = None
            if t_head is not None:
                tw = t_head.weight.to(weight.dtype)
                tb = None if t_head.bias is None else t_head.bias.to(weight.dtype)
            return linear_divergence_loss(
                h.to(weight.dtype), teacher_hidden, weight, loss_mask, bias=bias, teacher_weight=tw,
                teacher_bias=tb, beta=a.distillation_alpha, temperature=self.temperature, topk=topk,
                topk_from="student", add_tail=a.distillation_add_tail, reduction="seq-mean-token-mean",
                metrics=False, **kw)

        out = head_apply(self._cepo_head(), fn, hidden)
        mean = out.per_token.sum() / loss_mask.sum().clamp(min=1)  # TRL's logged token mean
        self._log_self_distillation_metric(mode, self.accelerator.gather(mean).mean().item())
        return out.loss

