"""The embedded multimodal task and the image JSONL reader (rl/vision_task.py)."""

import json
import random

import numpy as np
import pytest
import torch

from cepo_kernels.rl.vision_model import (
    VisionProcessor,
    build_image_processor,
    build_tiny_vl_model,
    build_vl_tokenizer,
)
from cepo_kernels.rl.vision_task import (
    ImageProblem,
    count_problems,
    draw_shapes,
    image_messages,
    load_image_jsonl,
    render_image_prompts,
)
from cepo_kernels.step.vision import split_prompts


def filled_cells(image, grid=2, cell=32):
    px = np.asarray(image)
    return sum(int((px[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] < 255).any())
               for r in range(grid) for c in range(grid))


def test_count_task_answer_is_only_in_the_image():
    probs = count_problems(64, seed=3)
    assert len({p.prompt for p in probs}) == 1  # one text for every problem
    assert {p.answer for p in probs} == {"1", "2", "3", "4"}
    for p in probs:
        assert filled_cells(p.images[0]) == int(p.answer)
        assert p.solution == ("\\boxed{" + p.answer + "}",)
    again = count_problems(64, seed=3)
    assert all(np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0])) for a, b in zip(probs, again,
                                                                                                  strict=True))
    with pytest.raises(ValueError, match="k: expected 0..4 shapes"):
        draw_shapes(5, random.Random(0))


def test_image_messages_put_images_at_their_placeholders():
    img = draw_shapes(1, random.Random(0))
    two = image_messages(ImageProblem("see <image> and <image>?", "1", (img, img)), system_prompt="s")
    assert two == [{"role": "system", "content": "s"},
                   {"role": "user", "content": [{"type": "text", "text": "see "}, {"type": "image"},
                                                {"type": "text", "text": " and "}, {"type": "image"},
                                                {"type": "text", "text": "?"}]}]
    first = image_messages(ImageProblem("what?", "1", (img,)))
    assert first[0]["content"] == [{"type": "image"}, {"type": "text", "text": "what?"}]


def test_count_prompts_reach_the_tiny_model():
    tok = build_vl_tokenizer()
    proc = VisionProcessor(tok, build_image_processor("qwen3_vl"))
    probs = count_problems(3, seed=0)
    inputs = render_image_prompts(proc, probs)
    prompts = split_prompts(inputs["input_ids"], inputs["attention_mask"],
                            mm_token_type_ids=inputs["mm_token_type_ids"],
                            pixel_values=inputs["pixel_values"],
                            image_grid_thw=inputs["image_grid_thw"])
    # 64 x 64 px: 4 x 4 patches, 4 tokens
    assert [p.image_grid_thw.tolist() for p in prompts] == [[[1, 4, 4]]] * 3
    assert all(sum(p.mm_token_type_ids) == 4 for p in prompts)
    assert tok.unk_token_id not in inputs["input_ids"][inputs["attention_mask"].bool()].tolist()
    model = build_tiny_vl_model(tok, "qwen3_vl")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=True)
    assert out.shape[0] == 3 and torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def write_rows(tmp_path, rows, images=()):
    (tmp_path / "images").mkdir()
    for name, image in images:
        image.save(tmp_path / "images" / name)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_image_jsonl_reads_geometry3k_rows(tmp_path):
    a, b = draw_shapes(2, random.Random(1)), draw_shapes(3, random.Random(2))
    path = write_rows(tmp_path, [{"problem": "<image>Find x.", "images": ["images/a.png"], "answer": 3},
                                 {"problem": "Which?", "images": ["images/a.png", "images/b.png"],
                                  "answer": "B"}],
                      [("a.png", a), ("b.png", b)])
    probs = load_image_jsonl(path)
    assert [(p.prompt, p.answer, len(p.images)) for p in probs] == [("<image>Find x.", "3", 1),
                                                                     ("Which?", "B", 2)]
    assert np.array_equal(np.asarray(probs[1].images[1]), np.asarray(b))


@pytest.mark.parametrize("row, files, message", [
    ({"problem": "<image>x", "images": ["images/none.png"], "answer": 1}, [],
     r"data: .*train.jsonl:2: image 'images/none.png' not found \(looked for '.*images/none.png'\)"),
    ({"problem": "<image>x", "images": ["images/bad.png"], "answer": 1}, ["bad.png"],
     r"data: .*train.jsonl:2: image 'images/bad.png' is not a readable image \(UnidentifiedImageError"),
    ({"problem": "<image> and <image>", "images": ["images/a.png"], "answer": 1}, [],
     r"data: .*train.jsonl:2: the problem has 2 <image> placeholder\(s\) but 1 image\(s\) in 'images'"),
    ({"problem": "<image>", "images": ["images/a.png", "images/a.png"], "answer": 1}, [],
     r"data: .*train.jsonl:2: the problem has 1 <image> placeholder\(s\) for 2 images"),
    ({"problem": "<image>x", "images": "images/a.png", "answer": 1}, [],
     r"data: .*train.jsonl:2: 'images' must be a list of image paths"),
], ids=["missing-file", "unreadable", "more-placeholders", "fewer-placeholders", "not-a-list"])
def test_image_jsonl_bad_rows_are_one_line_naming_the_row(tmp_path, row, files, message):
    good = {"problem": "<image>ok", "images": ["images/a.png"], "answer": 1}
    path = write_rows(tmp_path, [good, row], [("a.png", draw_shapes(1, random.Random(0)))])
    for name in files:
        (tmp_path / "images" / name).write_bytes(b"not an image")
    with pytest.raises(ValueError, match=message) as err:
        load_image_jsonl(path)
    assert "\n" not in str(err.value)
