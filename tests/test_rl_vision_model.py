"""Tiny vision-language checkpoints (rl/vision_model.py): saved with save_pretrained, loaded back as a user
loads a local checkpoint directory.

Which processor path each run covers: `load_processor` takes `AutoProcessor` where torchvision imports and
composes the tokenizer and the PIL image processor (`VisionProcessor`) where it does not. CI's venv (CPU
torch 2.13, no torchvision) runs the composed path; the same file in a venv with torch 2.14.1 and
torchvision 0.29.1 runs the real `AutoProcessor` path (`Qwen2_5_VLProcessor` / `Qwen3VLProcessor`), and
`test_loaded_processor_matches_the_composed_one` then checks that both give the same model inputs.
"""

import numpy as np
import pytest
import torch
from transformers.utils import is_torchvision_available

from cepo_kernels.rl.vision_model import (
    MERGE,
    PATCH,
    VL_KINDS,
    VisionProcessor,
    build_image_processor,
    build_tiny_vl_model,
    build_vl_tokenizer,
    load_processor,
    load_vision_model,
    save_tiny_vl,
)

PROCESSOR = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def images(kind):
    from PIL import Image

    side = MERGE * PATCH[kind]  # sizes the processor keeps as they are (no resampling to compare)
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in ((2 * side, 2 * side), (side, 2 * side))]


def texts(processor):
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            for q in ("how many?", "a")]
    return [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]


@pytest.fixture(scope="module", params=VL_KINDS)
def saved(request, tmp_path_factory):
    kind = request.param
    return kind, save_tiny_vl(tmp_path_factory.mktemp(kind), kind, seed=1)


def test_checkpoint_loads_back_through_the_auto_classes(saved):
    kind, path = saved
    model = load_vision_model(path)
    assert type(model).__name__ == {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                    "qwen3_vl": "Qwen3VLForConditionalGeneration"}[kind]
    built = build_tiny_vl_model(build_vl_tokenizer(), kind, seed=1)
    loaded = dict(model.named_parameters())
    assert loaded.keys() == dict(built.named_parameters()).keys()
    assert all(torch.equal(p, loaded[n]) for n, p in built.named_parameters())
    proc = load_processor(path)
    assert type(proc).__name__ == (PROCESSOR[kind] if is_torchvision_available() else "VisionProcessor")
    inputs = proc(text=texts(proc), images=images(kind), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs).logits
    assert out.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(out).all()


def test_loaded_processor_matches_the_composed_one(saved):
    kind, path = saved
    loaded = load_processor(path)
    composed = VisionProcessor(build_vl_tokenizer(), build_image_processor(kind))
    a = loaded(text=texts(loaded), images=images(kind), padding=True, return_tensors="pt")
    b = composed(text=texts(composed), images=images(kind))
    for key in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(a[key], b[key]), key
    # each image's run holds prod(grid) / merge^2 tokens
    runs = (b["image_grid_thw"].prod(-1) // MERGE**2).sum()
    assert (b["input_ids"] == composed.image_token_id).sum() == runs
    # rescale and normalise only (no resampling): a few float32 roundings of values of size ~2
    tol = 8 * torch.finfo(torch.float32).eps * b["pixel_values"].abs().max()
    assert (a["pixel_values"] - b["pixel_values"]).abs().max() <= tol


def test_composed_processor_names_a_placeholder_mismatch():
    proc = VisionProcessor(build_vl_tokenizer(), build_image_processor("qwen3_vl"))
    with pytest.raises(ValueError, match=r"the text has 1 <\|image_pad\|> placeholder\(s\) and 2 image"):
        proc(text=texts(proc)[:1], images=images("qwen3_vl"))


def test_composed_processor_gives_image_tensors_for_text_without_placeholders():
    """What verl's agent loop asks of a processor: its decoded text (special tokens skipped, so no
    <|image_pad|>) and the images, for the image tensors alone: those of the images, the text's own tokens."""
    proc = VisionProcessor(build_vl_tokenizer(), build_image_processor("qwen3_vl"))
    full = proc(text=texts(proc), images=images("qwen3_vl"))
    bare = [t.replace("<|image_pad|>", "") for t in texts(proc)]
    out = proc(text=bare, images=images("qwen3_vl"), videos=None, return_tensors="pt")
    assert torch.equal(out["pixel_values"], full["pixel_values"])
    assert torch.equal(out["image_grid_thw"], full["image_grid_thw"])
    assert torch.equal(out["input_ids"], proc.tokenizer(bare, padding=True, return_tensors="pt")["input_ids"])
    assert not out["mm_token_type_ids"].any()
    with pytest.raises(ValueError, match=r"videos: VisionProcessor handles images only; got 1 video"):
        proc(text=bare, videos=[images("qwen3_vl")])


def test_composed_processor_saves_what_load_processor_reads(tmp_path):
    """`save_pretrained` (verl's checkpoint manager saves its processor with the model) then `load_processor`
    on a directory holding the model's config: the same inputs."""
    kind = "qwen3_vl"
    proc = VisionProcessor(build_vl_tokenizer(), build_image_processor(kind))
    build_tiny_vl_model(proc.tokenizer, kind).config.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    back = load_processor(tmp_path)
    a = proc(text=texts(proc), images=images(kind))
    b = back(text=texts(back), images=images(kind), padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(a[key], b[key]), key
    # AutoProcessor where torchvision imports: the same rescale and normalise, a few float32 roundings
    tol = 8 * torch.finfo(torch.float32).eps * a["pixel_values"].abs().max()
    assert (a["pixel_values"] - b["pixel_values"]).abs().max() <= tol


def test_load_refuses_a_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face model directory"):
        load_vision_model(tmp_path)


def test_lora_leaves_the_vision_tower_frozen():
    from types import SimpleNamespace

    from cepo_kernels.rl.model import apply_lora

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # cepo-train's
    cfg = SimpleNamespace(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_targets=targets)
    model = apply_lora(build_tiny_vl_model(build_vl_tokenizer(), "qwen2_5_vl"), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    # the tower's MLPs share the language model's names, and none got an adapter
    assert not [n for n, _ in model.named_modules() if ".visual." in n and "lora_" in n]
    assert any(n.endswith("visual.blocks.0.mlp.gate_proj") for n, _ in model.named_modules())


def test_lora_on_a_text_model_passes_no_vision_exclusion():
    """A text model has no `visual` modules: no exclusion is passed, so peft has nothing to warn about."""
    import warnings
    from types import SimpleNamespace

    from cepo_kernels.rl.model import apply_lora
    from cepo_kernels.rl.task import build_tiny_model, build_tokenizer

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = SimpleNamespace(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_targets=targets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_lora(build_tiny_model(build_tokenizer()), cfg)
    assert not [w for w in caught if "exclude_modules" in str(w.message)]
    assert model.peft_config["default"].exclude_modules is None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_composed_processor_reads_a_processor_chat_template(tmp_path):
    """A released Qwen-VL checkpoint may keep its chat template only in the processor's chat_template.json."""
    import json
    import shutil

    from cepo_kernels.rl.vision_model import VL_CHAT_TEMPLATE

    path = save_tiny_vl(tmp_path / "ck", "qwen3_vl")
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": VL_CHAT_TEMPLATE}))
    proc = load_processor(path)
    assert proc.chat_template == VL_CHAT_TEMPLATE
    assert texts(proc)[1] == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a<|im_end|>\n" \
                             "<|im_start|>assistant\n"
    shutil.rmtree(path)
