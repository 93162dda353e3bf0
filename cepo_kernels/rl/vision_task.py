"""Multimodal problems: an embedded task whose answer is only in the image, and a JSONL reader for rows with
an `images` list (geometry3k's layout).

The embedded task `count` draws its images in code: a canvas of grid x grid cells (one cell per language-model
token of a Qwen-VL vision tower: 2 x 2 patches), k of them holding a filled shape (square or disc, random
colour, size and offset). Every prompt is the same text ("<image>how many shapes?"), so the text alone
cannot tell the answer str(k).

JSONL rows (geometry3k, as the authors' verl runs read it): {"problem": "<image>Find x.", "images":
["images/0.png"], "answer": "3"}; each "<image>" in the problem marks where an image goes, in order
(with none, the images come before the text); image paths are relative to the JSONL file's folder. A
missing file, an unreadable image or a placeholder count that does not match the images is one ValueError
naming the file and line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from cepo_kernels.rl.task import boxed, jsonl_rows, row_problem

__all__ = ["IMAGE_PLACEHOLDER", "ImageProblem", "draw_shapes", "count_problems", "image_messages",
           "render_image_prompts", "load_image_jsonl"]

IMAGE_PLACEHOLDER = "<image>"
COUNT_QUESTION = IMAGE_PLACEHOLDER + "how many shapes?"


@dataclass(frozen=True, eq=False)
class ImageProblem:
    prompt: str  # the question; each IMAGE_PLACEHOLDER marks where an image goes (none: images first)
    answer: str  # the reference answer (r+)
    images: tuple = ()  # PIL RGB images, in the order of the placeholders
    solution: tuple[str, ...] = ()  # the canonical response, step by step; () -> unknown


def draw_shapes(k: int, rng: random.Random, grid: int = 2, cell: int = 32):
    """A (grid * cell)^2 RGB image on a white ground with a filled shape in k distinct random cells."""
    from PIL import Image, ImageDraw

    if not 0 <= k <= grid * grid:
        raise ValueError(f"k: expected 0..{grid * grid} shapes for a {grid} x {grid} grid, got {k}")
    image = Image.new("RGB", (grid * cell, grid * cell), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for c in rng.sample(range(grid * grid), k):
        size = rng.randint(cell // 2, cell - 4)
        x0 = (c % grid) * cell + rng.randint(2, cell - size - 2)
        y0 = (c // grid) * cell + rng.randint(2, cell - size - 2)
        colour = tuple(rng.randint(0, 160) for _ in range(3))  # darker than the ground in every channel
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x0, y0, x0 + size - 1, y0 + size - 1), fill=colour)
    return image


def count_problems(n: int = 512, seed: int = 0, grid: int = 2, cell: int = 32) -> list[ImageProblem]:
    """n problems of the `count` task: k uniform in 1..grid^2 shapes, answer str(k), demonstration
    \\boxed{k}."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        k = rng.randint(1, grid * grid)
        problems.append(ImageProblem(COUNT_QUESTION, str(k), (draw_shapes(k, rng, grid, cell),), (boxed(k),)))
    return problems


def image_messages(problem: ImageProblem, system_prompt: str | None = None) -> list[dict]:
    """The chat messages of a problem: the user turn's content is text and {"type": "image"} items, one at
    each placeholder (all before the text when it has none), as Qwen-VL chat templates take them."""
    parts = problem.prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) == 1:
        content = [{"type": "image"} for _ in problem.images] + [{"type": "text", "text": parts[0]}]
    else:
        content = [{"type": "text", "text": parts[0]}] if parts[0] else []
        for text in parts[1:]:
            content.append({"type": "image"})
            if text:
                content.append({"type": "text", "text": text})
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": content}]


def render_image_prompts(processor, problems, system_prompt: str | None = None):
    """The processor's model inputs of the problems' prompts (chat template, generation prompt added):
    input_ids, attention_mask (left-padded), pixel_values, image_grid_thw, mm_token_type_ids."""
    texts = [processor.apply_chat_template(image_messages(p, system_prompt), add_generation_prompt=True,
                                           tokenize=False) for p in problems]
    images = [list(p.images) for p in problems]
    return processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt")


def _open_image(path: Path, where: str, name: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"{where}: image {name!r} not found (looked for {str(path)!r})")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        reason = f"{type(e).__name__}: {e}"
        raise ValueError(f"{where}: image {name!r} is not a readable image ({reason})") from None


def load_image_jsonl(path: str | Path, prompt_key: str = "problem", answer_key: str = "answer",
                     image_key: str = "images", arg: str = "data") -> list[ImageProblem]:
    """ImageProblems from a JSONL file (module docstring for the layout); errors name the file and line."""
    path = Path(path)
    problems = []
    for lineno, row in jsonl_rows(path, arg):
        where = f"{arg}: {path}:{lineno}"
        prompt, answer = row_problem(row, where, prompt_key, answer_key)
        names = row.get(image_key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}: {image_key!r} must be a list of image paths, got {names!r}")
        holes = prompt.count(IMAGE_PLACEHOLDER)
        if holes > len(names):
            raise ValueError(f"{where}: the problem has {holes} {IMAGE_PLACEHOLDER} placeholder(s) but "
                             f"{len(names)} image(s) in {image_key!r}")
        if 0 < holes < len(names):
            raise ValueError(f"{where}: the problem has {holes} {IMAGE_PLACEHOLDER} placeholder(s) for "
                             f"{len(names)} images; expected one per image (or none: the images go first)")
        images = tuple(_open_image(path.parent / n, where, n) for n in names)
        problems.append(ImageProblem(prompt, answer, images))
    if not problems:
        raise ValueError(f"{arg}: {path}: no problems found (the file is empty)")
    return problems
