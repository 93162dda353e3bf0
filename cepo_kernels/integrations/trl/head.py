"""cepo_kernel_logprobs=True: the policy's, old policy's and teachers' log-probs from the fused linear kernels
(`linear_logprobs`, `linear_teacher_logprobs`) on the decoder's last hidden states and the lm_head weight."""

from __future__ import annotations

from functools import partial

import torch

from cepo_kernels import linear_logprobs, linear_teacher_logprobs

__all__ = ["KernelHead", "full_weight", "head_apply", "zero3_partitioned"]


def full_weight(param: torch.Tensor) -> torch.Tensor:
    """A parameter whole, for the kernels: an FSDP2 (`fully_shard`) DTensor shard is all-gathered, and its
    gradient reduce-scattered back averaged over the mesh, as FSDP2 averages every other gradient; a plain
    tensor (unsharded, or FSDP2's root between its forward and its reshard) is returned as it is."""
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(param, DTensor):
        return param.full_tensor(grad_placements=[Partial("avg")] * param.device_mesh.ndim)
    return param


def zero3_partitioned(head: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the head's parameters (deepspeed.zero leaves a `ds_id` on them)."""
    return getattr(head.weight, "ds_id", None) is not None


def head_apply(head: torch.nn.Module, fn, hidden: torch.Tensor, *, fp32: bool = False):
    """fn(weight, bias, hidden) with the head's parameters whole.

    FSDP2: the shards are all-gathered (`full_weight`). DeepSpeed ZeRO-3: fn runs as the head module's
    forward, so that DeepSpeed's own module hooks gather the partitioned parameters for the forward and
    again for the backward (where the kernels' gradient is computed and reduce-scattered by ZeRO-3's
    gradient hooks); every rank must make the same calls (each gathers collectively).
    """

    def run(weight, bias, h):
        if fp32:
            weight, bias = weight.float(), None if bias is None else bias.float()
        return fn(weight, bias, h)

    if zero3_partitioned(head):
        plain = head.forward
        head.forward = lambda h: run(head.weight, head.bias, h)
        try:
            return head(hidden)
        finally:
            head.forward = plain
    return run(full_weight(head.weight), None if head.bias is None else full_weight(head.bias), hidden)


class KernelHead:
    """Mixin of CEPOTrainer (a GRPOTrainer): the kernel head in place of TRL's chunked LM head."""

    def _cepo_head(self) -> torch.nn.Linear:
        """The lm_head module, checked to be what the kernels can use in place of TRL's head."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        cfg = model.config.get_text_config()
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling"):
            if getattr(cfg, name, None) not in (None, 1.0):
                raise ValueError(
                    f"cepo_kernel_logprobs: the model's logits are not lm_head(hidden) ({name}="
                    f"{getattr(cfg, name)!r}); set cepo_kernel_logprobs=False to use TRL's LM head"
                )
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"cepo_kernel_logprobs: expected the lm_head to be a torch.nn.Linear, got "
                             f"{type(head).__name__} (an adapter on it?); set cepo_kernel_logprobs=False")
        shape = getattr(head.weight, "ds_shape", None) or head.weight.shape
        if len(shape) != 2:
            raise ValueError(f"cepo_kernel_logprobs: expected a 2-D lm_head weight, got shape "
                             f"{tuple(shape)}; set cepo_kernel_logprobs=False")
        return head

    def _cepo_apply(self, fn, hidden):
        """fn(weight, bias, hidden) on the lm_head (`head_apply`: FSDP2 gathered, ZeRO-3 via the module)."""
        return head_apply(self._cepo_head(), fn, hidden, fp32=self.args.cast_lm_head_to_fp32)

    def _cepo_policy_logprobs(self, targets, weight, bias, hidden):
        """The policy's (logp, entropy) of `targets` from hidden states on the head (under `_cepo_apply`)."""
        return linear_logprobs(hidden.to(weight.dtype), weight, targets, bias=bias,
                               temperature=self.temperature, return_entropy=True)

    def _cepo_hidden(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        """Last hidden states [B, logits_to_keep, H] that predict the last logits_to_keep tokens."""
        with self.accelerator.autocast():
            # logits_to_keep=1: the forward's own head runs on one position only; the kernels do the rest
            res = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                             logits_to_keep=1, use_cache=False, **kwargs)
        return res.hidden_states[-1][:, -logits_to_keep - 1 : -1]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **multimodal):
        from cepo_kernels.integrations.trl.vision import multimodal_chunk

        fields = multimodal_chunk(multimodal, 0, 0)  # None: a field the kernel path does not slice
        if (not self.args.cepo_kernel_logprobs or compute_aux_loss or model is self.ref_model
                or fields is None):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for s in range(0, input_ids.size(0), batch_size):
            ids, attn = input_ids[s : s + batch_size], attention_mask[s : s + batch_size]
            hidden = self._cepo_hidden(model, ids, attn, logits_to_keep,
                                       **multimodal_chunk(multimodal, s, s + batch_size))
            targets = ids[:, -logits_to_keep:]
            # after the forward: FSDP2 may hold the root unsharded then
            lp, ent = self._cepo_apply(partial(self._cepo_policy_logprobs, targets), hidden)
            valid = attn[:, -logits_to_keep:].bool()  # as TRL's head: 0 at padding
            logps.append(lp.masked_fill(~valid, 0.0))
            entropies.append(ent.masked_fill(~valid, 0.0))
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _cepo_kernel_teachers(self, hidden, target, mask, n):
        """Both teachers' log-probs [n, R] from the lists of chunks hidden [*, R, H], target, mask (rows :n
        after r+, rows n: after r-); (None, None) for n = 0, the head gathered all the same."""
        if not n:  # still gather the head, as the ranks with rows do (the gather is collective)
            self._cepo_apply(lambda w, b, h: None, torch.zeros(0, device=self.accelerator.device))
            return None, None
        hidden, target, mask = torch.cat(hidden), torch.cat(target), torch.cat(mask)

        def teachers(w, b, h):
            h = h.to(w.dtype)
            return linear_teacher_logprobs(h[:n], h[n:], w, target[:n], bias=b, temperature=self.temperature,
                                           rows=mask[:n])

        return self._cepo_apply(teachers, hidden)
