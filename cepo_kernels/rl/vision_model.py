"""Vision-language policies: tiny Qwen2.5-VL / Qwen3-VL models built from configs, their tokenizer and image
processor, and the loading code a user runs on a local checkpoint directory.

Processor path (transformers 5.25): Qwen-VL's processor classes (`Qwen2_5_VLProcessor`, `Qwen3VLProcessor`)
hold a video processor, and constructing one needs torchvision. Where torchvision imports, `load_processor`
uses `AutoProcessor`; where it does not (CPU torch 2.13 beside PyPI's torchvision fails to import), it
composes the checkpoint's tokenizer (`AutoTokenizer`) and image processor (`AutoImageProcessor`, which then
falls back to the PIL class `Qwen2VLImageProcessorPil`) into `VisionProcessor`, which does for images what
the Qwen-VL processor does: expand each `<|image_pad|>` into one token per merged patch and return
`input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw` and `mm_token_type_ids`.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import ProcessorMixin

from cepo_kernels.rl.task import CHARS, build_tokenizer, seeded_model

__all__ = ["VL_KINDS", "PATCH", "MERGE", "VL_SPECIALS", "VL_CHAT_TEMPLATE", "build_vl_tokenizer",
           "build_image_processor", "build_tiny_vl_model", "save_tiny_vl", "VisionProcessor",
           "load_processor", "load_vision_model"]

VL_KINDS = ("qwen2_5_vl", "qwen3_vl")
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
VL_SPECIALS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               IMAGE_TOKEN, VIDEO_TOKEN]
# Qwen-VL's layout: an image item of a message becomes <|vision_start|><|image_pad|><|vision_end|>
VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}  # the vision tower's patch size, as in the released checkpoints
MERGE = 2  # spatial merge: one language-model token per 2 x 2 patches


def build_vl_tokenizer():
    """The embedded character tokenizer with Qwen-VL's special tokens and a Qwen-style chat template."""
    return build_tokenizer(VL_SPECIALS, VL_CHAT_TEMPLATE, pad="<|endoftext|>", unk="<unk>", eos="<|im_end|>",
                           chars=CHARS + ["\n", ":", "A", "B", "C", "D"], max_length=512)


def build_image_processor(kind: str = "qwen3_vl", side: int = 2):
    """Qwen-VL's image processor (the PIL class) for images of at most (side * 2 patches)^2 pixels: an image
    becomes a grid of at most (2 side) x (2 side) patches, side^2 language-model tokens."""
    from transformers import Qwen2VLImageProcessorPil

    _check_kind(kind)
    pixels = (side * MERGE * PATCH[kind]) ** 2
    return Qwen2VLImageProcessorPil(patch_size=PATCH[kind], merge_size=MERGE, temporal_patch_size=2,
                                    min_pixels=(MERGE * PATCH[kind]) ** 2, max_pixels=pixels)


def build_tiny_vl_model(tokenizer, kind: str = "qwen3_vl", seed: int = 0):
    """A Qwen2.5-VL or Qwen3-VL with random weights: a 2-layer language model (hidden 64, M-RoPE) and a
    2-block vision tower (hidden 32); Qwen3-VL's DeepStack taps the vision tower's first block."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    _check_kind(kind)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", IMAGE_TOKEN), ("video_token_id", VIDEO_TOKEN),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH[kind],
                  spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=64)
    if kind == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision.update(window_size=56, fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        text["head_dim"] = 16
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen3VLForConditionalGeneration
    return seeded_model(cls, config, tokenizer, seed)


def save_tiny_vl(path, kind: str = "qwen3_vl", seed: int = 0) -> Path:
    """A tiny checkpoint directory (model, tokenizer with its chat template, image processor), as
    `save_pretrained` writes a released one; load it back with `load_vision_model` and `load_processor`."""
    path = Path(path)
    tokenizer = build_vl_tokenizer()
    build_tiny_vl_model(tokenizer, kind, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    build_image_processor(kind).save_pretrained(path)
    return path


def _check_kind(kind):
    if kind not in VL_KINDS:
        raise ValueError(f"kind: expected one of {VL_KINDS}, got {kind!r}")


class VisionProcessor(ProcessorMixin):
    """A tokenizer and a Qwen-VL image processor composed, for machines where the processor class cannot load.

    `processor(text=[...], images=[...])`: one string per row (the chat template already applied, each image
    as one `<|image_pad|>`) and the images in order of appearance (a flat list, or one list per row, None or
    [] for a row without one). Returns what the Qwen-VL processor returns: input_ids and attention_mask
    (left-padded), pixel_values [patches, C * temporal * patch^2], image_grid_thw [images, 3] and
    mm_token_type_ids (1 at image tokens); with return_tensors=None (and no padding) the token fields are one
    unpadded list per row, as a transformers processor gives them. Text with no placeholder at all and images
    gives the text's tokens and the images' tensors (the Qwen-VL processor does the same; verl's agent loop
    relies on it); any other count than one per image is refused. Images only: videos are refused.

    A transformers `ProcessorMixin`, so that TRL's GRPOTrainer (which tells a processor from a tokenizer by
    that class) takes it as `processing_class`: `apply_chat_template(conversations, tokenize=True,
    return_dict=True)` renders the messages, takes the `{"type": "image", "image": <PIL image>}` items in
    order, and calls the processor on both, as the Qwen-VL processor does; `save_pretrained` writes the
    tokenizer and the image processor (what `load_processor` reads back; verl's checkpoint manager saves its
    processor so).
    """

    def __init__(self, tokenizer, image_processor):
        super().__init__(tokenizer, image_processor, chat_template=tokenizer.chat_template)
        self.image_token, self.video_token = IMAGE_TOKEN, VIDEO_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)

    def apply_chat_template(self, conversation=None, chat_template=None, *, tokenize=False, return_dict=False,
                            return_tensors=None, padding=False, **kwargs):
        """The tokenizer's chat template; with tokenize=True, the rendered text and the messages' images
        through the processor (one conversation, or a list of them)."""
        conversation = kwargs.pop("messages", conversation)
        if not tokenize:
            return self.tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                                      tokenize=False, **kwargs)
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        texts = [self.tokenizer.apply_chat_template(c, chat_template=chat_template, tokenize=False, **kwargs)
                 for c in conversations]
        parts = [[p for m in c if isinstance(m.get("content"), list) for p in m["content"]
                  if isinstance(p, dict)] for c in conversations]
        images = [[p["image"] for p in row if p.get("type") == "image" and p.get("image") is not None]
                  for row in parts]
        out = self(text=texts, images=images if any(images) else None, return_tensors=return_tensors,
                   padding=padding)
        return out if return_dict else out["input_ids"]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """The tokenizer and the image processor, as `save_tiny_vl` writes them (`load_processor` reads
        them back)."""
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        return [str(save_directory)]

    def __call__(self, text=None, images=None, videos=None, return_tensors="pt", padding=True, **kwargs):
        from transformers import BatchFeature

        if videos:
            raise ValueError(f"videos: VisionProcessor handles images only; got {len(videos)} video(s)")
        texts = [text] if isinstance(text, str) else list(text)
        flat = [im for item in (images or []) if item is not None
                for im in (item if isinstance(item, (list, tuple)) else [item])]
        data = {}
        if flat:
            data = dict(self.image_processor(images=flat, return_tensors="pt"))
            merge = self.image_processor.merge_size ** 2
            counts = iter((data["image_grid_thw"].prod(dim=-1) // merge).tolist())
        placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
        # no placeholder at all: the image tensors for text that holds none (as the Qwen-VL processor does;
        # verl's agent loop re-runs the processor on its decoded text, special tokens skipped, for them)
        if placeholders not in (0, len(flat)):
            raise ValueError(f"images: the text has {placeholders} {IMAGE_TOKEN} placeholder(s) and "
                             f"{len(flat)} image(s) were given; expected one image per placeholder")
        expanded = []
        for t in texts:
            parts = t.split(IMAGE_TOKEN)
            expanded.append(parts[0] + "".join(IMAGE_TOKEN * next(counts) + p for p in parts[1:]))
        kwargs = {k: v for k, v in kwargs.items() if k in ("add_special_tokens", "truncation", "max_length",
                                                             "padding_side")}
        enc = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **kwargs)
        if return_tensors is None:  # one unpadded list per row
            mm = [[int(i == self.image_token_id) + 2 * int(i == self.video_token_id) for i in row]
                  for row in enc["input_ids"]]
            return BatchFeature({**enc, **data, "mm_token_type_ids": mm})
        ids = enc["input_ids"]
        mm = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
        return BatchFeature({**enc, **data, "mm_token_type_ids": mm}, tensor_type=return_tensors)


def load_processor(path):
    """The processor of a local checkpoint directory: `AutoProcessor` where torchvision imports, else the
    checkpoint's tokenizer and image processor composed (`VisionProcessor`). No downloads."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    path = _local_dir(path)
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.chat_template is None and (path / "chat_template.json").is_file():
        # the processor's own file in released Qwen-VL checkpoints, which AutoTokenizer does not read
        tokenizer.chat_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except ImportError:  # transformers < 5.2x (verl's 5.10): AutoImageProcessor itself needs torchvision
        from transformers import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    return VisionProcessor(tokenizer, image_processor)


def load_vision_model(path, dtype=None, device="cpu"):
    """`AutoModelForImageTextToText` from a local checkpoint directory (no downloads)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(_local_dir(path), dtype=dtype, local_files_only=True)
    return model.to(device)


def _local_dir(path) -> Path:
    path = Path(path).resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: {str(path)!r} is not a local Hugging Face model directory "
                                f"(no config.json there; hub downloads are not used)")
    return path
