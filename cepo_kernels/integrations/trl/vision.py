"""CEPOTrainer with a vision-language policy (Qwen2.5-VL, Qwen3-VL): the teachers' contexts carry the image.

TRL 1.16's generate-and-score output holds, for a Qwen-VL processor, `pixel_values` and `image_grid_thw` (the
local rows' images, in row order), `num_images` (per row) and `mm_token_type_ids` over prompt + completion.
The prompt columns of these are split into one `step.vision.VisionPrompt` per row (`split_prompts`), the
teacher contexts are `step.vision.vision_contexts` of them ([prompt | template(r+ or r-)], the image-token run
kept), and each chunk of teacher rows is laid out by `step.vision.vision_pack`:

- `teacher_sees_image=True` (default): input_ids with the image-token run, the student's pixel_values /
  image_grid_thw unchanged, mm_token_type_ids (1 over the image run, 0 over the rest of the prompt, the answer
  and the completion), from which the model computes its 3-D M-RoPE positions itself; input_ids and
  pixel_values reach the model (Qwen3-VL's DeepStack features with them).
- `teacher_sees_image=False` (the authors' CEPO teachers): placeholder ids -> pad id, no pixel_values, a plain
  position count on the three axes.

The chunk goes through TRL's model as the text teachers do (TRL's fused head with `labels`, or this
package's kernels on the language model's lm_head with `cepo_kernel_logprobs`). The policy's own pass is
TRL's (with its multimodal fields); with `cepo_kernel_logprobs` its Qwen-VL fields are sliced per chunk here.
"""

from __future__ import annotations

import torch
from trl.models.utils import disable_gradient_checkpointing

from cepo_kernels.step.vision import VisionContext, split_prompts, vision_contexts, vision_pack

__all__ = ["VisionTeachers", "QWEN_VL_FIELDS", "multimodal_chunk"]

# the multimodal fields of TRL's output that the Qwen-VL path reads; any other one is refused
QWEN_VL_FIELDS = ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids")
_OTHER_FIELDS = ("pixel_attention_mask", "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                 "image_position_ids")


class VisionTeachers:
    """Mixin of CEPOTrainer: the teachers' contexts and passes with a processor (GRPOTrainer's `_is_vlm`)."""

    def _cepo_image_ids(self) -> tuple[int, ...]:
        """The placeholder ids the image-blind teacher overwrites (TRL resolves them at construction)."""
        return tuple(t for t in (self._image_pad_token_id, self._video_pad_token_id) if t is not None)

    def _cepo_vision_prompts(self, output) -> list:
        """One VisionPrompt per local row: the prompt columns of TRL's output with the row's images."""
        given = sorted(k for k in (*QWEN_VL_FIELDS, *_OTHER_FIELDS) if output.get(k) is not None)
        if set(given) & set(_OTHER_FIELDS) or ("pixel_values" in given and "image_grid_thw" not in given):
            raise ValueError(f"processing_class: CEPOTrainer's teachers support Qwen-VL models (pixel_values "
                             f"with image_grid_thw and mm_token_type_ids); the batch holds {given}")
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        P = prompt_ids.shape[1]
        mm = output.get("mm_token_type_ids")
        if mm is not None and bool(mm[:, P:].any()):
            raise ValueError("CEPOTrainer: images inside the completions (tools returning images) are not "
                             "supported by the teachers; the teachers read the prompts' images only")
        mm = torch.zeros_like(prompt_ids) if mm is None else mm[:, :P]
        pv, grid = output.get("pixel_values"), output.get("image_grid_thw")
        return split_prompts(prompt_ids.cpu(), prompt_mask.cpu(), mm_token_type_ids=mm.cpu(),
                             pixel_values=None if pv is None else pv.detach(),
                             image_grid_thw=None if grid is None else grid.cpu())

    def _cepo_vision_contexts(self, output):
        """reweight's `contexts` hook: `vision_contexts` of the rows' VisionPrompts (None for a tokenizer)."""
        if not getattr(self, "_is_vlm", False):
            return None
        prompts = self._cepo_vision_prompts(output)

        def contexts(batch, rows, pos_answers, neg_answers, options):
            return vision_contexts(self._tokenizer, rows, prompts=prompts, pos_answers=pos_answers,
                                   neg_answers=neg_answers, template=options.teacher_template)

        return contexts

    def _cepo_idle_forward(self, **inputs):
        """A teacher forward whose result is discarded, run by a rank with fewer teacher chunks than another,
        through the same head as the real ones: TRL's fused head all-gathers an FSDP2-sharded lm_head weight
        (`full_tensor`), a collective the other ranks' teacher forwards make too (the kernels gather the head
        once, after the chunks)."""
        if self.args.cepo_kernel_logprobs:
            head = {"logits_to_keep": 1}
        else:
            head = {"labels": torch.full_like(inputs["input_ids"], -100), "fused_lm_head": True}
        with self.accelerator.autocast():
            self.model(**inputs, **head, use_cache=False)

    def _cepo_vision_teacher_logprobs(self, output, ctx, n_chunks):
        """`_cepo_teacher_logprobs` for VisionContext prefixes: both teachers' log-probs [len(ctx.rows), R] in
        n_chunks forwards (a rank with fewer rows repeats a one-token pass over its first prompt, with its
        image when the teachers see it, so that every rank runs the same modules)."""
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        R, device = completion_ids.shape[1], completion_ids.device
        host_ids, host_lengths = completion_ids.cpu(), completion_mask.sum(1).tolist()
        rows = ctx.rows
        prefixes = ctx.pos_prefixes + ctx.neg_prefixes
        responses = [host_ids[i, : host_lengths[i]].tolist() for i in rows] * 2
        chunk = self.args.teacher_batch_size or 2 * self.args.per_device_train_batch_size
        kernels, sees = self.args.cepo_kernel_logprobs, self.args.teacher_sees_image
        pad = self._tokenizer.pad_token_id
        out, targets, masks = [], [], []
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for s in range(0, n_chunks * chunk, chunk):
                if s >= len(prefixes):  # keep in step with the other ranks' forwards
                    first = self._cepo_vision_prompts(output)[0]
                    batch = vision_pack([VisionContext(first)], [[pad]], pad_id=pad,
                                        image_token_ids=self._cepo_image_ids(), teacher_sees_image=sees,
                                        device=device)
                    self._cepo_idle_forward(**batch.inputs)
                    continue
                batch = vision_pack(prefixes[s : s + chunk], responses[s : s + chunk], pad_id=pad,
                                    image_token_ids=self._cepo_image_ids(), teacher_sees_image=sees,
                                    device=device, resp_len=R)
                inputs = dict(batch.inputs)
                ids, attn = inputs.pop("input_ids"), inputs.pop("attention_mask")
                if kernels:  # hidden states only; both teachers are scored together below
                    out.append(self._cepo_hidden(self.model, ids, attn, R, **inputs))
                    targets.append(batch.targets)
                    masks.append(batch.mask)
                    continue
                labels = torch.full_like(ids, -100)
                labels[:, batch.start :] = batch.targets.masked_fill(~batch.mask, -100)
                with self.accelerator.autocast():
                    res = self.model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True,
                                     use_cache=False, **inputs)
                out.append(res.log_probs[:, -R:].float())
        n = len(rows)
        if kernels:
            return self._cepo_kernel_teachers(out, targets, masks, n)
        if not n:
            return None, None
        logp = torch.cat(out, dim=0)
        return logp[:n], logp[n:]


def multimodal_chunk(fields: dict, start: int, end: int) -> dict | None:
    """The Qwen-VL fields of TRL's policy forward for rows [start, end) (pixel_values by image_grid_thw and
    num_images, mm_token_type_ids by row), as GRPOTrainer slices them; None when another field is present (the
    caller then keeps TRL's own head)."""
    given = {k: v for k, v in fields.items() if v is not None}
    if any(k not in QWEN_VL_FIELDS for k in given):
        return None
    out = {}
    if "mm_token_type_ids" in given:
        out["mm_token_type_ids"] = given["mm_token_type_ids"][start:end]
    if "pixel_values" in given:
        if "image_grid_thw" not in given or "num_images" not in given:
            return None
        num = given["num_images"]
        first, last = sum(num[:start]), sum(num[:end])
        grid = given["image_grid_thw"]
        rows = grid.prod(dim=-1).tolist()
        out["pixel_values"] = given["pixel_values"][sum(rows[:first]) : sum(rows[:last])]
        out["image_grid_thw"] = grid[first:last]
    return out
