"""cepo_kernel_logprobs=True: the policy's, old policy's and teachers' log-probs from the fused linear kernels
(`linear_logprobs`, `linear_teacher_logprobs`) on the decoder's last hidden states and the lm_head weight."""

from __future__ import annotations

import torch

from cepo_kernels import linear_logprobs, linear_teacher_logprobs

__all__ = ["KernelHead", "full_weight"]


def full_weight(param: torch.Tensor) -> torch.Tensor:
    """A parameter whole, for the kernels: an FSDP2 (`fully_shard`) DTensor shard is all-gathered, and its
    gradient reduce-scattered back averaged over the mesh, as FSDP2 averages every other gradient; a plain
    tensor (unsharded, or FSDP2's root between its forward and its reshard) is returned as it is."""
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(param, DTensor):
        return param.full_tensor(grad_placements=[Partial("avg")] * param.device_mesh.ndim)
    return param


class KernelHead:
    """Mixin of CEPOTrainer (a GRPOTrainer): the kernel head in place of TRL's chunked LM head."""

    def _cepo_head(self):
        """The lm_head's weight and bias, checked to be what the kernels can use in place of TRL's head."""
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
        if getattr(head.weight, "ds_id", None) is not None:
            raise ValueError("cepo_kernel_logprobs: a DeepSpeed ZeRO-3-partitioned lm_head is not supported "
                             "(its gather is not implemented: DeepSpeed is not in this package's tests); "
                             "use FSDP2, ZeRO-1/2, or set cepo_kernel_logprobs=False")
        weight, bias = full_weight(head.weight), None if head.bias is None else full_weight(head.bias)
        if weight.dim() != 2:
            raise ValueError(f"cepo_kernel_logprobs: expected a 2-D lm_head weight, got shape "
                             f"{tuple(weight.shape)}; set cepo_kernel_logprobs=False")
        if self.args.cast_lm_head_to_fp32:
            weight, bias = weight.float(), None if bias is None else bias.float()
        return weight, bias

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
        if (not self.args.cepo_kernel_logprobs or compute_aux_loss or model is self.ref_model
                or any(v is not None for v in multimodal.values())):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for s in range(0, input_ids.size(0), batch_size):
            ids, attn = input_ids[s : s + batch_size], attention_mask[s : s + batch_size]
            hidden = self._cepo_hidden(model, ids, attn, logits_to_keep)
            weight, bias = self._cepo_head()  # after the forward: FSDP2 may hold the root unsharded then
            hidden = hidden.to(weight.dtype)
            lp, ent = linear_logprobs(hidden, weight, ids[:, -logits_to_keep:], bias=bias,
                                      temperature=self.temperature, return_entropy=True)
            valid = attn[:, -logits_to_keep:].bool()  # as TRL's head: 0 at padding
            logps.append(lp.masked_fill(~valid, 0.0))
            entropies.append(ent.masked_fill(~valid, 0.0))
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _cepo_kernel_teachers(self, hidden, target, mask, n):
        """Both teachers' log-probs [n, R] from the lists of chunks hidden [*, R, H], target, mask (rows :n
        after r+, rows n: after r-); (None, None) for n = 0, the head gathered all the same."""
        weight, bias = self._cepo_head()
        if not n:
            return None, None
        hidden, target, mask = torch.cat(hidden).to(weight.dtype), torch.cat(target), torch.cat(mask)
        return linear_teacher_logprobs(hidden[:n], hidden[n:], weight, target[:n], bias=bias,
                                       temperature=self.temperature, rows=mask[:n])
