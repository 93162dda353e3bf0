"""Teacher and policy inputs of a vision-language policy (Qwen2.5-VL, Qwen3-VL): the prompt keeps its image.

A vision-language prompt is token ids with one run of `<|image_pad|>` tokens per image (the processor
expands each placeholder into one token per merged patch), plus the images' `pixel_values` and
`image_grid_thw`. A teacher reads [prompt | answer (r+ or r-) | response]; the knob `teacher_sees_image`
says what it sees of the image:

- True (default, image-aware): the prompt's image-token run stays, the student's `pixel_values` /
  `image_grid_thw` are passed unchanged, and `mm_token_type_ids` (1 over the image run, 0 over the rest of the
  prompt, the answer and the response) lets the model compute its 3-D M-RoPE positions itself: image tokens
  on the (t, h, w) grid, text after the image continuing from the prompt's last position + 1 on every axis
  (the authors' RLSD teacher's rule). The model gets input_ids and pixel_values, so Qwen3-VL's DeepStack
  features reach the decoder (inputs_embeds alone would lose them).
- False (the authors' CEPO teachers, image-blind): every `<|image_pad|>` / `<|video_pad|>` id is overwritten
  by the pad id (attention mask unchanged), no pixel_values, and the position ids are a plain count over
  the attended tokens, copied into the three M-RoPE axes.

The policy's own inputs are the same with an empty answer and the image always seen.

Use with the scoring phase: `scoring.policy_logprobs` and `scoring.teacher_logprobs` take a
`forward(contexts, responses)`; `vision_forward(model, ...)` is that forward for `VisionContext` contexts
(built per row by `vision_contexts`), and the log-probs come from the language model's lm_head
(`forward.lm_head`) through the fused kernels, as for a text policy.

Shared prefixes (`vision_shared_hidden`, `vision_forward(share=True)`): each distinct [prompt | answer] (one
per group for the policy, one per group and answer for a teacher) runs once with its image, its key/value
cache is repeated for the rows that continue it, and only the response tokens run on top, at the prefix's
last M-RoPE position + 1, + 2, ... on every axis (the continuation rule above; no image token follows the
prefix, so DeepStack adds nothing to the response pass).

The vision tower once per step: `encode_images(model, prompts)` runs it once over the distinct prompt objects
(one per group) and `vision_forward(..., features=...)` passes its outputs to every later pass as
`mm_encoder_outputs` instead of `pixel_values` (exact while the tower is frozen, as under LoRA).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from cepo_kernels.step.contexts import TeacherContexts, check_template, encode, pack, response_targets
from cepo_kernels.step.forward import SharedPrefixUnsupported, base_model

__all__ = ["VisionPrompt", "split_prompts", "VisionContext", "vision_contexts", "VisionBatch", "vision_pack",
           "EncoderOutput", "encode_images", "continue_positions", "multimodal_model", "vision_hidden",
           "vision_shared_hidden", "vision_forward"]


class VisionPrompt(NamedTuple):
    """One row's prompt: its tokens without padding (the image-token runs expanded) and its images."""

    input_ids: tuple[int, ...]
    mm_token_type_ids: tuple[int, ...]  # per token: 0 text, 1 image
    pixel_values: torch.Tensor | None  # [this row's patches, D] or None (no image)
    image_grid_thw: torch.Tensor | None  # [this row's images, 3] or None


def _runs(types: list[int], kind: int) -> int:
    return sum(1 for i, t in enumerate(types) if t == kind and (i == 0 or types[i - 1] != kind))


def split_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mm_token_type_ids: torch.Tensor,
                  pixel_values: torch.Tensor | None = None,
                  image_grid_thw: torch.Tensor | None = None) -> list[VisionPrompt]:
    """A processor's left-padded prompt batch split into rows, each with its own images.

    input_ids, attention_mask, mm_token_type_ids [B, L]; pixel_values [patches, D] (the images' patches in
    order, image i taking prod(image_grid_thw[i]) rows); image_grid_thw [images, 3]. Each row starts at its
    first attended token (left padding found from the first valid token); image i goes to the row holding
    the i-th run of image tokens.
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != mm_token_type_ids.shape:
        raise ValueError("input_ids, attention_mask and mm_token_type_ids: expected the same [B, L] shape, "
                         f"got {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, "
                         f"{tuple(mm_token_type_ids.shape)}")
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw: expected both or neither")
    ids, attn, types = input_ids.tolist(), attention_mask.tolist(), mm_token_type_ids.tolist()
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    sizes = [t * h * w for t, h, w in grids]
    if pixel_values is not None and sum(sizes) != pixel_values.shape[0]:
        raise ValueError(f"pixel_values: expected {sum(sizes)} patch rows (image_grid_thw {grids}), "
                         f"got {pixel_values.shape[0]}")
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    prompts, image = [], 0
    for b, (row, mask, ty) in enumerate(zip(ids, attn, types, strict=True)):
        first = mask.index(1) if 1 in mask else len(mask)
        if first == len(mask) or 0 in mask[first:]:
            raise ValueError(f"attention_mask: row {b}: expected a left-padded prompt (zeros, then ones), "
                             f"got {mask}")
        ty = ty[first:]
        if 2 in ty:
            raise ValueError(f"mm_token_type_ids: row {b} holds video tokens (2); only images are supported")
        n = _runs(ty, 1)
        if image + n > len(grids):
            raise ValueError(f"image_grid_thw: row {b} has {n} image-token run(s) but only "
                             f"{len(grids) - image} image(s) are left of {len(grids)}")
        pv = None if n == 0 else pixel_values[starts[image] : starts[image + n]]
        grid = None if n == 0 else image_grid_thw[image : image + n]
        prompts.append(VisionPrompt(tuple(row[first:]), tuple(ty), pv, grid))
        image += n
    if image != len(grids):
        raise ValueError(f"image_grid_thw: {len(grids)} images for {image} image-token runs in input_ids")
    return prompts


class VisionContext(NamedTuple):
    """What precedes a response: a row's prompt (with its image) and the answer tokens a teacher inserts
    (empty for the policy itself)."""

    prompt: VisionPrompt
    answer: tuple[int, ...] = ()

    @property
    def n_tokens(self) -> int:
        """Tokens before the response: the prompt's (image tokens included) and the answer's."""
        return len(self.prompt.input_ids) + len(self.answer)


def vision_contexts(tokenizer, rows: list[int], *, prompts, pos_answers, neg_answers,
                    template: str = " {answer}") -> TeacherContexts:
    """`contexts.teacher_contexts` for a vision-language policy: prefixes are `VisionContext`s (prompt of the
    row + the template with {answer} filled in, as token ids; an answer given as token ids follows the
    prompt as it is). prompts, pos_answers, neg_answers are indexed by row. A template holding {question}
    (re-rendering the user message) is not supported: the message holds the image."""
    if "{question}" in template:
        raise ValueError(f"teacher_template: {{question}} is not supported for a vision-language policy, got "
                         f"{template!r}")
    check_template(template)
    memo: dict = {}

    def prefix(r, answer):  # rows holding the same prompt object and answer share one context
        tokens = isinstance(answer, (list, tuple))
        key = (id(prompts[r]), tuple(answer) if tokens else answer)
        if key not in memo:
            ids = answer if tokens else encode(tokenizer, template.replace("{answer}", answer))
            memo[key] = VisionContext(prompts[r], tuple(ids))
        return memo[key]

    rows = list(rows)
    return TeacherContexts(rows, [prefix(r, pos_answers[r]) for r in rows],
                           [prefix(r, neg_answers[r]) for r in rows])


class VisionBatch(NamedTuple):
    """Model inputs laid out as [left-padded prompt + answer | right-padded response] (contexts.pack)."""

    inputs: dict  # keyword inputs of the multimodal model
    start: int  # the column of the first response token
    targets: torch.Tensor  # [b, R] int64
    mask: torch.Tensor  # [b, R] bool
    tokens: int  # attended tokens (prompt + answer + response, summed over rows)


def vision_pack(contexts: list[VisionContext], responses: list[list[int]], *, pad_id: int,
                image_token_ids: tuple[int, ...], teacher_sees_image: bool = True, device="cpu",
                features: dict | None = None, resp_len: int | None = None) -> VisionBatch:
    """The inputs of one forward over [prompt | answer | response] per row (module docstring for the two
    modes). image_token_ids: the placeholder ids overwritten when teacher_sees_image is False (Qwen-VL:
    <|image_pad|> and <|video_pad|>). features (from `encode_images`, holding every image prompt of the
    rows): the vision tower's outputs go to the model as `mm_encoder_outputs` instead of pixel_values.
    resp_len: the responses' columns (default: the longest response), as `contexts.pack`."""
    if len(contexts) != len(responses):
        raise ValueError(f"contexts and responses: expected the same number of rows, got {len(contexts)} and "
                         f"{len(responses)}")
    prefixes = [list(c.prompt.input_ids) + list(c.answer) for c in contexts]
    packed = pack(prefixes, responses, pad_id, device, resp_len=resp_len)
    ids, attn, L = packed.input_ids, packed.attention_mask, packed.start
    tokens = int(sum(len(p) + min(len(r), packed.targets.shape[1]) for p, r in zip(prefixes, responses,
                                                                                    strict=True)))
    with_images = [c.prompt for c in contexts if c.prompt.pixel_values is not None]
    if not teacher_sees_image:
        blind = ids.clone()
        for t in image_token_ids:
            blind[blind == t] = pad_id
        pos = packed.position_ids[None].expand(3, -1, -1)  # [3, b, L + R]: a plain count on every axis
        inputs = {"input_ids": blind, "attention_mask": attn, "position_ids": pos}
    elif not with_images:  # text only: the plain count (the model would not skip the left padding itself)
        inputs = {"input_ids": ids, "attention_mask": attn, "position_ids": packed.position_ids}
    else:
        mm = torch.zeros_like(ids)
        for i, (c, p) in enumerate(zip(contexts, prefixes, strict=True)):
            n = len(c.prompt.mm_token_type_ids)
            mm[i, L - len(p) : L - len(p) + n] = torch.tensor(c.prompt.mm_token_type_ids, device=ids.device)
        inputs = {"input_ids": ids, "attention_mask": attn, "mm_token_type_ids": mm,
                  "image_grid_thw": torch.cat([p.image_grid_thw for p in with_images]).to(device)}
        if features is None:
            inputs["pixel_values"] = torch.cat([p.pixel_values for p in with_images]).to(device)
        else:
            inputs["mm_encoder_outputs"] = {"image": _gather(features, with_images)}
    return VisionBatch(inputs, L, packed.targets, packed.mask, tokens)


class EncoderOutput(NamedTuple):
    """The vision tower's output in the form Qwen-VL models take as mm_encoder_outputs["image"]."""

    pooler_output: tuple  # one [tokens of image i, H] per image
    deepstack_features: list | None  # Qwen3-VL: per DeepStack layer, one [tokens of image i, H] per image


def encode_images(model, prompts: list[VisionPrompt]) -> tuple[dict, int]:
    """({id(prompt): EncoderOutput of its images}, images encoded): the vision tower runs once, over the
    distinct prompt objects' images, for every later pass to reuse (`vision_forward(features=...)`). Reuse
    across passes is exact while the vision tower is frozen (the LoRA default); with gradients enabled the
    features carry the tower's graph, to be backpropagated once."""
    inner = multimodal_model(model)
    if "mm_encoder_outputs" not in inspect.signature(inner.forward).parameters:
        raise TypeError(f"model: {type(inner).__name__}.forward takes no mm_encoder_outputs (transformers "
                        f">= 5.2x); run without features")
    distinct = list({id(p): p for p in prompts if p.pixel_values is not None}.values())
    if not distinct:
        return {}, 0
    pv = torch.cat([p.pixel_values for p in distinct])
    grid = torch.cat([p.image_grid_thw for p in distinct])
    device = next(inner.parameters()).device
    out = inner.get_image_features(pv.to(device), grid.to(device), return_dict=True)
    pooled, deep = list(out.pooler_output), getattr(out, "deepstack_features", None)
    features, first = {}, 0
    for p in distinct:
        n = p.image_grid_thw.shape[0]
        layers = None if deep is None else [list(layer[first : first + n]) for layer in deep]
        features[id(p)] = EncoderOutput(tuple(pooled[first : first + n]), layers)
        first += n
    return features, len(pooled)


def _gather(features: dict, prompts: list[VisionPrompt]) -> EncoderOutput:
    """The rows' image features in row order, as one mm_encoder_outputs["image"]."""
    try:
        parts = [features[id(p)] for p in prompts]
    except KeyError:
        raise ValueError("features: a row's prompt was not among those given to encode_images") from None
    pooled = tuple(t for f in parts for t in f.pooler_output)
    if parts[0].deepstack_features is None:
        return EncoderOutput(pooled, None)
    layers = range(len(parts[0].deepstack_features))
    return EncoderOutput(pooled, [tuple(t for f in parts for t in f.deepstack_features[k]) for k in layers])


def continue_positions(prompt_positions: torch.Tensor, count: int) -> torch.Tensor:
    """[C, n + count]: a prompt's position ids [C, n] (C axes: 3 M-RoPE axes, or verl's 4 rows with the text
    count first; no padding) followed by `count` text tokens at last + 1, last + 2, ... on every axis: the
    positions of [prompt | answer | response] when only the prompt holds images (the authors' RLSD rule,
    equal to the model's own get_rope_index; tests/test_step_vision.py)."""
    if prompt_positions.ndim != 2 or prompt_positions.shape[1] == 0:
        raise ValueError(f"prompt_positions: expected [axes, n >= 1], got {tuple(prompt_positions.shape)}")
    last = prompt_positions[:, -1:]
    steps = torch.arange(1, count + 1, device=prompt_positions.device, dtype=prompt_positions.dtype)
    return torch.cat([prompt_positions, last + steps[None]], dim=1)


def multimodal_model(model):
    """The multimodal decoder (vision tower + language model, no lm_head) of a Qwen-VL model, under a peft
    wrapper too: `Qwen2_5_VLModel` / `Qwen3VLModel`."""
    inner = getattr(base_model(model), "model", None)
    if inner is None or not hasattr(inner, "get_image_features"):
        raise TypeError("model: expected a vision-language model with a `.model` that has "
                        f"get_image_features (Qwen2.5-VL, Qwen3-VL), got {type(base_model(model)).__name__}")
    return inner


def vision_hidden(model, batch: VisionBatch) -> torch.Tensor:
    """Last hidden states [b, R, H] at the positions that predict the response tokens (column start - 1 + t
    predicts token t); the lm_head is not run. Gradients flow when enabled (the policy's update)."""
    out = multimodal_model(model)(**batch.inputs, use_cache=False)
    R = batch.targets.shape[1]
    return out.last_hidden_state[:, batch.start - 1 : batch.start - 1 + R]


def _prefix_positions(inner, inputs: dict) -> torch.Tensor:
    """[3, b, L] M-RoPE positions of a left-padded prefix batch: the packed ones (text only, image-blind) or
    the model's own get_rope_index over the image runs (what its forward computes without position_ids)."""
    pos = inputs.get("position_ids")
    if pos is not None:
        return pos if pos.ndim == 3 else pos[None].expand(3, -1, -1)
    pos, _ = inner.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                  image_grid_thw=inputs["image_grid_thw"],
                                  attention_mask=inputs["attention_mask"])
    return pos


def vision_shared_hidden(model, contexts: list[VisionContext], responses: list[list[int]], *, pad_id: int,
                         image_token_ids: tuple[int, ...], device, sees_image: bool = True,
                         features: dict | None = None) -> tuple[torch.Tensor, int, int]:
    """(hidden [n, R, H], tokens run, tokens of the plain path) as `vision_forward`'s, each distinct context
    (same prompt object, same answer) run once with its image and its key/value cache reused by its rows'
    responses (module docstring). Raises SharedPrefixUnsupported where the cache cannot be repeated."""
    if len(contexts) != len(responses):
        raise ValueError(f"contexts and responses: expected the same number of rows, got {len(contexts)} and "
                         f"{len(responses)}")
    naive = sum(c.n_tokens + len(r) for c, r in zip(contexts, responses, strict=True))
    distinct: dict = {}
    for c in contexts:
        distinct.setdefault((id(c.prompt), c.answer), (len(distinct), c))
    prefixes = [c for _, c in distinct.values()]
    owner = [distinct[(id(c.prompt), c.answer)][0] for c in contexts]
    tokens = sum(c.n_tokens for c in prefixes) + sum(map(len, responses))
    inner = multimodal_model(model)
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=inner.config.get_text_config())
    except (ImportError, TypeError) as e:
        raise SharedPrefixUnsupported(f"no DynamicCache for this model ({e})") from None
    if not hasattr(cache, "reorder_cache"):
        raise SharedPrefixUnsupported(f"{type(cache).__name__} cannot be repeated per response")
    batch = vision_pack(prefixes, [[] for _ in prefixes], pad_id=pad_id, image_token_ids=image_token_ids,
                        teacher_sees_image=sees_image, device=device, features=features)
    L = batch.start  # the prefixes only (pack adds one response column)
    cut = ("input_ids", "attention_mask", "mm_token_type_ids", "position_ids")
    inputs = {k: v[..., :L] if k in cut else v for k, v in batch.inputs.items()}
    pos = _prefix_positions(inner, inputs)
    inputs["position_ids"] = pos
    arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    out = inner(**inputs, use_cache=True, **{arg: cache})
    rows = torch.tensor(owner, dtype=torch.long, device=pos.device)
    first = out.last_hidden_state[:, -1][rows]  # [n, H]: the state that predicts response token 0
    R = max([len(r) for r in responses] + [1])
    if R == 1:
        return first[:, None], tokens, naive
    cache.reorder_cache(rows)  # [g, ...] -> [n, ...]
    rids, rmask = response_targets(responses, R - 1, pad_id, device)
    attn = torch.cat([inputs["attention_mask"][rows], rmask.long()], dim=1)
    steps = torch.arange(1, R, device=pos.device, dtype=pos.dtype)
    rpos = pos[:, rows, -1:] + steps  # [3, n, R - 1]: last prefix position + 1, + 2, ... on every axis
    out = inner(input_ids=rids, attention_mask=attn, position_ids=rpos, use_cache=True, **{arg: cache})
    return torch.cat([first[:, None], out.last_hidden_state], dim=1), tokens, naive


def vision_forward(model, *, pad_id: int, image_token_ids: tuple[int, ...], device, sees_image: bool = True,
                   features: dict | None = None, share: bool = False):
    """The `forward(contexts, responses) -> (hidden [n, R, H], tokens run, tokens of the plain path)` of
    `scoring.policy_logprobs` / `scoring.teacher_logprobs` for `VisionContext` contexts. The policy's forward
    always sees the image (sees_image=True); the teachers' takes sees_image=teacher_sees_image. features
    (`encode_images`): the vision tower's outputs computed once, reused here instead of running it again.
    share: each distinct context runs once, its key/value cache reused (`vision_shared_hidden`)."""
    kw = dict(pad_id=pad_id, image_token_ids=image_token_ids, device=device, features=features)

    def forward(contexts, responses):
        if share:
            return vision_shared_hidden(model, contexts, responses, sees_image=sees_image, **kw)
        batch = vision_pack(contexts, responses, teacher_sees_image=sees_image, **kw)
        return vision_hidden(model, batch), batch.tokens, batch.tokens

    return forward
