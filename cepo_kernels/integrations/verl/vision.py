"""The CEPO / RLSD teacher batches of a vision-language policy (Qwen2.5-VL, Qwen3-VL) in verl's layout.

verl 0.9's rollout of a Qwen-VL policy gives each row `multi_modal_inputs` (non_tensor_batch: the processor's
`pixel_values` and `image_grid_thw`, plus verl's `images_seqlens`) and position ids [B, 4, L] over
[prompt | response]: row 0 the text count 0, 1, ... over the attended tokens (verl's engine uses it to find
the packed sequences' boundaries), rows 1-3 the model's M-RoPE index (`get_rope_index`: the image-token run
on its (t, h, w) grid, every text token after it at the previous maximum + 1 on the three axes).

A teacher row reads [prompt | answer (r+ or r-) | response]. `algorithm.cepo.teacher_sees_image`
(step.options.CEPOOptions) says what it sees of the image (docs/vision.md):

- True (default, image-aware): the prompt's tokens unchanged (its image-token run included), the student's
  `multi_modal_inputs` unchanged, and position ids that are the student's prompt positions followed by
  last + 1, last + 2, ... on each of the four rows for the answer and the response
  (`step.vision.continue_positions`): what verl's own construction gives for that sequence, since only the
  prompt holds images (tests/test_verl_vision.py checks it against verl's `_compute_position_ids`).
- False (the authors' image-blind CEPO teachers): every `<|image_pad|>` / `<|video_pad|>` id overwritten
  by the pad id (still attended), no `multi_modal_inputs`, and all four position rows the plain count over
  the attended tokens.

Each row's prompt starts at its first attended token (left padding found from the attention mask).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from cepo_kernels.step import pack
from cepo_kernels.step.vision import continue_positions

__all__ = ["PLACEHOLDERS", "VISION_FIELDS", "RowImages", "is_multimodal", "placeholder_ids", "row_images",
           "attach_images", "vision_teacher_batch", "vision_dataproto_scorer"]

PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>")  # Qwen-VL's image and video placeholder tokens
# what verl's agent loop writes to the TransferQueue for each row of a vision-language policy besides the
# text fields: position ids [4, prompt + response] (no padding) and the processor's tensors
VISION_FIELDS = ["position_ids", "multi_modal_inputs"]


class RowImages(NamedTuple):
    """What a rollout row's teachers take from the student's batch besides the prompt's tokens."""

    positions: torch.Tensor  # [C, n]: the prompt's position ids over its n attended tokens (C = 4, or 1)
    inputs: dict | None  # the row's multi_modal_inputs (None or {} for a row without images)


def is_multimodal(data) -> bool:
    """True for a vision-language rollout batch: `multi_modal_inputs` present or position ids [B, C, L]."""
    return "multi_modal_inputs" in data.non_tensor_batch or data.batch["position_ids"].dim() == 3


def placeholder_ids(tokenizer) -> tuple[int, ...]:
    """The ids of Qwen-VL's image / video placeholders that the tokenizer knows (its unknown id excluded)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = []
    for token in PLACEHOLDERS:
        i = tokenizer.convert_tokens_to_ids(token)
        if isinstance(i, int) and i != unk:
            ids.append(i)
    return tuple(ids)


def row_images(data) -> list[RowImages]:
    """Per row of verl's rollout batch: the prompt's position ids (the prompt columns' attended tokens of
    `position_ids`, [B, C, L] or [B, L]) and its `multi_modal_inputs` (None where absent)."""
    b = data.batch
    P = b["prompts"].shape[1]
    pos = b["position_ids"]
    if pos.dim() == 2:
        pos = pos[:, None]
    if pos.dim() != 3 or pos.shape[0] != len(data) or pos.shape[2] != b["attention_mask"].shape[1]:
        raise ValueError(f"data: position_ids: expected [B, C, L] or [B, L] with B = {len(data)}, L = "
                         f"{b['attention_mask'].shape[1]}, got {tuple(b['position_ids'].shape)}")
    valid = b["attention_mask"][:, :P].bool().cpu()
    pos = pos[:, :, :P].cpu()
    mm = data.non_tensor_batch.get("multi_modal_inputs")
    rows = []
    for i in range(len(data)):
        if not valid[i].any():
            raise ValueError(f"data: row {i} has an empty prompt (attention_mask all 0 over the prompt "
                             "columns)")
        inputs = None if mm is None else mm[i]
        if inputs is not None and not hasattr(inputs, "keys"):
            raise TypeError(f"data: multi_modal_inputs[{i}]: expected a dict of the processor's tensors, got "
                            f"{type(inputs).__name__}")
        rows.append(RowImages(pos[i][:, valid[i]], inputs))
    return rows


def attach_images(data, positions, inputs) -> None:
    """Adds to `data` (verl's padded rollout layout of TransferQueue rows: prompts left-padded, responses
    right-padded) each row's position ids (positions[i] [C, prompt + response] over its attended tokens, as
    the agent loop stores them) as `position_ids` [B, C, L] (0 at the padding) and its multi_modal_inputs."""
    b = data.batch
    attn = b["attention_mask"].bool()
    positions = [torch.as_tensor(p) for p in positions]
    if len(positions) != len(data) or len(inputs) != len(data):
        raise ValueError(f"positions and inputs: expected one per row ({len(data)}), got {len(positions)} "
                         f"and {len(inputs)}")
    C = positions[0].shape[0] if positions[0].dim() == 2 else 1
    pos = torch.zeros(len(data), C, attn.shape[1], dtype=torch.long, device=attn.device)
    for i, p in enumerate(positions):
        p = p.reshape(C, -1) if p.dim() == 1 else p
        if p.shape != (C, int(attn[i].sum())):
            raise ValueError(f"positions[{i}]: expected [{C}, {int(attn[i].sum())}] (the row's attended "
                             f"tokens), got {tuple(p.shape)}")
        pos[i][:, attn[i]] = p.to(pos)
    b["position_ids"] = pos.squeeze(1) if C == 1 else pos
    rows = np.empty(len(data), dtype=object)
    rows[:] = list(inputs)
    data.non_tensor_batch["multi_modal_inputs"] = rows


def vision_teacher_batch(prefixes: list[list[int]], responses: list[list[int]], images: list[RowImages],
                         pad_id: int, resp_len: int, device, *, sees_image: bool = True,
                         image_token_ids: tuple[int, ...] = ()):
    """The teacher rows as a verl DataProto (verl's rollout layout, `advantages.teacher_batch`, plus the
    images). prefixes[k] = [row's prompt | answer] (the prompt's tokens first, unchanged), images[k] that
    row's `RowImages`; sees_image False: the image-blind batch, image_token_ids overwritten by pad_id."""
    from verl import DataProto

    if not len(prefixes) == len(responses) == len(images):
        raise ValueError(f"prefixes, responses and images: expected one per row, got {len(prefixes)}, "
                         f"{len(responses)} and {len(images)}")
    packed = pack(prefixes, responses, pad_id, device=device, resp_len=resp_len)
    ids, attn, L = packed.input_ids, packed.attention_mask, packed.start
    C = max(img.positions.shape[0] for img in images) if images else 1
    non_tensors = {}
    if sees_image:
        pos = torch.zeros(len(prefixes), C, ids.shape[1], dtype=torch.long)
        for k, (p, img) in enumerate(zip(prefixes, images, strict=True)):
            n = img.positions.shape[1]
            if img.positions.shape[0] != C or n > len(p):
                raise ValueError(f"images[{k}].positions: expected [{C}, n] with n <= the prefix's {len(p)} "
                                 f"tokens, got {tuple(img.positions.shape)}")
            count = len(p) - n + int(attn[k, L:].sum())
            pos[k, :, L - len(p) : L - len(p) + n + count] = continue_positions(img.positions.long(), count)
        pos = pos.to(ids.device)
        rows = np.empty(len(images), dtype=object)  # a dict (or None) per row, as verl's rollout stores them
        rows[:] = [img.inputs for img in images]
        non_tensors["multi_modal_inputs"] = rows
    else:
        ids = ids.clone()
        for t in image_token_ids:
            ids[ids == t] = pad_id
        pos = packed.position_ids[:, None].expand(-1, C, -1).contiguous()
    return DataProto.from_dict(tensors={
        "prompts": ids[:, :L], "responses": ids[:, L:], "input_ids": ids, "attention_mask": attn,
        "position_ids": pos.squeeze(1) if C == 1 else pos, "response_mask": packed.mask.to(torch.int64)},
        non_tensors=non_tensors)


def vision_dataproto_scorer(scorer: Callable, pad_id: int, responses: list[list[int]],
                            images: list[RowImages], resp_len: int, device, *, sees_image: bool = True,
                            image_token_ids: tuple[int, ...] = ()) -> Callable:
    """`advantages.dataproto_scorer` for a vision-language policy: every teacher's rows in one verl batch
    (`vision_teacher_batch`, each row with its rollout row's images), one call of the DataProto scorer."""

    def score(ctx, teachers):
        if not ctx.rows:
            return {}
        prefixes = [p for name in teachers for p in getattr(ctx, f"{name}_prefixes")]
        rows = [r for _ in teachers for r in ctx.rows]
        batch = vision_teacher_batch(prefixes, [responses[r] for r in rows], [images[r] for r in rows],
                                     pad_id, resp_len, device, sees_image=sees_image,
                                     image_token_ids=image_token_ids)
        logp = scorer(batch).to(device)
        n = len(ctx.rows)
        return {name: logp[k * n : (k + 1) * n] for k, name in enumerate(teachers)}

    return score
