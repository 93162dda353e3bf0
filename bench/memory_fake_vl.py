"""Peak memory of one CEPO step of a Qwen3-VL-4B-shaped model beside the text Qwen3-4B step, fake tensors.

Same method, step and shapes as bench/memory_fake.py (its `trace`, head `linear`: this package's kernels):
4 sequences x (768 prompt + 2048 response) tokens, two teacher forwards without gradient, the policy's
forward and backward, gradient checkpointing, bf16. The vision-language model is transformers' own
Qwen3VLForConditionalGeneration built from a Qwen3VLConfig whose language model has the text anchor's
shape (hidden 2560, 36 layers, 32 / 8 heads, head_dim 128, vocab 151936, tied head; M-RoPE sections
24/20/20) and whose vision tower is 24 blocks of hidden 1024 (patch 16, DeepStack taps 5, 11, 17).

What the trace covers and what it cannot: its weights (vision tower included) and the decoder passes
through the multimodal model (`model.model`), the image tokens counted as prompt tokens. transformers 5.25's
Qwen3-VL vision tower, its M-RoPE index and DeepStack have data-dependent shapes (`repeat_interleave` on
image_grid_thw, `.tolist()` of the token types, boolean-mask indexing), which fake tensors refuse, so the
tower's own forward and the DeepStack adds (3 x image tokens x 2560 values) are not traced: the tower runs
once per step under no_grad when it is frozen (`encode_images`), its activations transient.

    python bench/memory_fake_vl.py                  # full fine-tuning of the language model, both models
    python bench/memory_fake_vl.py --mode lora      # LoRA rank 16 (vision tower excluded), AdamW state
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch
from memory_fake import ANCHOR, QWEN3_4B, GiB, build, on_meta, trace, with_lora

VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=QWEN3_4B["hidden_size"],
              num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])


def build_vl(mode, dtype, lora_rank=16):
    """The Qwen3-VL-4B-shaped model on the meta device; under LoRA the vision tower gets no adapter and is
    frozen (as `cepo_kernels.rl.model.apply_lora` does)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = {k: v for k, v in QWEN3_4B.items() if k != "tie_word_embeddings"}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                               "mrope_interleaved": True}
    cfg = Qwen3VLConfig(text_config=text, vision_config=VISION, tie_word_embeddings=True)
    model = on_meta(Qwen3VLForConditionalGeneration, cfg, dtype)
    if mode == "full":  # the tower's forward is not traced: its parameters take no gradient
        model.model.visual.requires_grad_(False)
    return with_lora(model, lora_rank, exclude_modules=r".*visual.*") if mode == "lora" else model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("full", "lora"), default="full")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args(argv)
    results = []
    for name, fn in (("text Qwen3-4B", build), ("Qwen3-VL-4B", build_vl)):
        t0 = time.time()
        r = trace("linear", a.mode, torch.bfloat16, optimizer=a.mode != "full", build_fn=fn)
        r.update(model=name, mode=a.mode, seconds=round(time.time() - t0, 1))
        results.append(r)
        print(f"{a.mode:5s} {name:14s} peak {r['peak'] / GiB:6.2f} GiB  "
              f"weights {r['weights'] / GiB:5.2f} GiB  ({r['seconds']} s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            out = dict(results=results, torch=torch.__version__, shape=ANCHOR, vision=VISION)
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
