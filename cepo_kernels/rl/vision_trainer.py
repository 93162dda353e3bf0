"""cepo-train with a vision-language policy (Qwen2.5-VL, Qwen3-VL): `VisionTrainer` is the Trainer with its
hooks for prompts that hold images (docs/vision.md).

- prompts: each problem's chat prompt through the processor once (`VisionContext` of its `VisionPrompt`:
  expanded image tokens, pixel_values, image_grid_thw), kept for the run;
- rollouts: Hugging Face `generate` with the images (`vision_generate`);
- old log-probs, updates: `vision_forward` (the policy always sees the image), the vision tower run once per
  step over the step's distinct prompts (`encode_images`) and its outputs reused by every pass; the tower is
  frozen (as the authors' `.*visual.*` exclusion), so the reuse is exact;
- teachers: `vision_contexts` and `vision_forward(sees_image=cfg.teacher_sees_image)`;
- shared prefixes (--share-prefix, on by default): each group's [prompt | answer] runs once and its key/value
  cache serves the group's responses (`vision_forward(share=True)`), as the text path's context_hidden;
- the embedded default (`--task count`): a tiny Qwen3-VL built from a config, the count task on a 3 x 3 grid
  (1 to 9 shapes), and a supervised warm-up on \\boxed{k} (tower trained with the rest; 400 steps by
  default, options.TASK_DEFAULTS), frozen tower after it.

Not done here: truncation of long prompts (an image cannot be cut).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from cepo_kernels.rl.errors import NaNLossError
from cepo_kernels.rl.model import prepare_model
from cepo_kernels.rl.rollout import NonFiniteModelError, cut_at_eos
from cepo_kernels.rl.task import sft_target
from cepo_kernels.rl.trainer import Trainer
from cepo_kernels.rl.vision_model import (
    VisionProcessor,
    build_image_processor,
    build_tiny_vl_model,
    build_vl_tokenizer,
    load_processor,
    load_vision_model,
)
from cepo_kernels.rl.vision_task import count_problems, load_image_jsonl, render_image_prompts
from cepo_kernels.step.contexts import encode, response_targets
from cepo_kernels.step.forward import SharedPrefixUnsupported, lm_head
from cepo_kernels.step.vision import (
    VisionContext,
    encode_images,
    multimodal_model,
    split_prompts,
    vision_contexts,
    vision_forward,
    vision_hidden,
    vision_pack,
)

__all__ = ["is_vision_run", "VisionTrainer", "vision_generate", "make_trainer"]

log = logging.getLogger("cepo_kernels.rl")

COUNT_EVAL = 64  # held-out problems of the count task
COUNT_GRID = 3  # the count task's images: 3 x 3 cells (9 language-model tokens), 1 to 9 shapes


def is_vision_run(cfg) -> bool:
    """--task count, or --model a checkpoint whose config has a vision tower (vision_config)."""
    if cfg.model is None:
        return cfg.data is None and cfg.task == "count"
    path = Path(cfg.model) / "config.json"
    if not path.is_file():
        return False  # the text loader reports the missing directory
    try:
        return "vision_config" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def make_trainer(cfg, **kwargs):
    """The Trainer for cfg's policy: VisionTrainer for a vision-language one, else the text Trainer."""
    vision = is_vision_run(cfg)
    if cfg.task == "count" and cfg.data is None and not vision:
        raise ValueError(f"task: --task count needs a vision-language policy (the embedded one, or --model a "
                         f"Qwen-VL directory), got --model {cfg.model!r} without a vision_config")
    if vision and cfg.algo in ("opsd", "sdpo"):
        raise ValueError(f"algo: --algo {cfg.algo} is text-only in cepo-train (its teacher contexts carry no "
                         f"image); a vision-language policy takes cepo, rlsd or grpo")
    return (VisionTrainer if vision else Trainer)(cfg, **kwargs)


def _freeze_tower(model, frozen: bool = True):
    for p in multimodal_model(model).visual.parameters():
        p.requires_grad_(not frozen)


class VisionTrainer(Trainer):
    """Trainer for a vision-language policy (module docstring); metrics add `vision_encoder_calls`."""

    def load_problems(self):
        cfg = self.cfg
        if cfg.data is None:
            probs = count_problems(512 + COUNT_EVAL, seed=cfg.seed, grid=COUNT_GRID)
            return probs[:-COUNT_EVAL], probs[-COUNT_EVAL:]
        probs = load_image_jsonl(cfg.data, cfg.prompt_key, cfg.answer_key)
        if cfg.eval_data is not None:
            return probs, load_image_jsonl(cfg.eval_data, cfg.prompt_key, cfg.answer_key, arg="eval_data")
        n = min(cfg.eval_size, len(probs) // 2)
        return probs[: len(probs) - n], probs[len(probs) - n :]

    def load_model(self):
        cfg = self.cfg
        if cfg.filter_long_prompts:
            raise ValueError("filter_long_prompts: not supported for a vision-language policy")
        if cfg.model is None:
            tok = build_vl_tokenizer()
            model = build_tiny_vl_model(tok, "qwen3_vl", seed=cfg.seed)
            self.processor = VisionProcessor(tok, build_image_processor("qwen3_vl", side=COUNT_GRID))
        else:
            self.processor = load_processor(cfg.model)
            model = load_vision_model(Path(cfg.model).resolve(), dtype=self.dtype, device=self.device)
        tok = self.processor.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = prepare_model(model, cfg, self.device, self.dtype)
        _freeze_tower(model)  # the warm-up of the embedded model trains it, then freezes it again
        self.image_ids = (self.processor.image_token_id, self.processor.video_token_id)
        self._prompts: dict = {}  # id(problem) -> (problem, VisionContext): processed once per run
        self._features: dict = {}  # this step's vision-tower outputs by id(prompt)
        self._tower_calls = 0
        multimodal_model(model).visual.register_forward_hook(self._count_tower)
        return model, tok

    def _count_tower(self, *_):
        self._tower_calls += 1

    def prompt_ids(self, problem) -> VisionContext:
        """The problem's prompt with its image (a VisionContext with no answer), processed once."""
        key = id(problem)
        if key not in self._prompts:
            inputs = render_image_prompts(self.processor, [problem], self.cfg.system_prompt)
            prompt = split_prompts(inputs["input_ids"], inputs["attention_mask"],
                                   mm_token_type_ids=inputs["mm_token_type_ids"],
                                   pixel_values=inputs.get("pixel_values"),
                                   image_grid_thw=inputs.get("image_grid_thw"))[0]
            self._prompts[key] = (problem, VisionContext(prompt))
        return self._prompts[key][1]

    def question(self, problem) -> str:
        return problem.prompt

    def _forward(self, sees_image: bool):
        pad = self.tok.pad_token_id
        kw = dict(pad_id=pad, image_token_ids=self.image_ids, device=self.device)

        def forward(contexts, responses):
            if sees_image:
                self._encode([c.prompt for c in contexts])
            features = {id(c.prompt): self._features[id(c.prompt)] for c in contexts
                        if id(c.prompt) in self._features} if sees_image else None
            # a group's [prompt | answer] once, its key/value cache shared (as Trainer.forward's text path)
            share = self.share_prefix and not (torch.is_grad_enabled() and self.cfg.gradient_checkpointing)
            if share:
                try:
                    return vision_forward(self.model, sees_image=sees_image, features=features or None,
                                          share=True, **kw)(contexts, responses)
                except SharedPrefixUnsupported as e:
                    self.share_prefix = False
                    log.warning("shared prefixes are not supported for this model (%s): running every "
                                "context in full", e)
            return vision_forward(self.model, sees_image=sees_image, features=features or None,
                                  **kw)(contexts, responses)

        return forward

    def forward(self, contexts, responses):
        return self._forward(True)(contexts, responses)

    def teacher_forward(self, contexts, responses):
        return self._forward(self.cfg.teacher_sees_image)(contexts, responses)

    def build_contexts(self, batch, rows, pos_answers, neg_answers, options):
        return vision_contexts(self.tok, rows, prompts=[c.prompt for c in batch.prompt_ids],
                               pos_answers=pos_answers, neg_answers=neg_answers,
                               template=options.teacher_template)

    def _generate(self, prompts, **kw):
        cfg = self.cfg
        self._features = {}  # a new step (or evaluation): the features are computed again
        try:
            return vision_generate(self.model, prompts, pad_id=self.tok.pad_token_id, eos_id=self.eos_ids,
                                   max_new_tokens=cfg.max_new_tokens, chunk=cfg.micro_batch_size,
                                   device=self.device, suppress=self.image_ids, **kw)
        except NonFiniteModelError as e:
            raise NaNLossError(f"step {self.step_idx + 1}: {e}; the weights diverged in an earlier update "
                               f"(lr={cfg.lr:g}): lower --lr or clip the gradient") from None

    def rollout(self, prompts):
        self._tower_calls = 0
        cfg = self.cfg
        rows = [p for p in prompts for _ in range(cfg.group_size)]
        responses = self._generate(rows, temperature=cfg.temperature, top_p=cfg.top_p)
        self._encode([p.prompt for p in prompts])  # once for every later pass of the step
        return responses

    def _encode(self, prompts):
        """The vision tower over the prompts (with images) not yet encoded this step, in one call."""
        missing = list({id(p): p for p in prompts if p.pixel_values is not None
                        and id(p) not in self._features}.values())
        if missing:
            with torch.no_grad():
                features, _ = encode_images(self.model, missing)
            self._features.update(features)

    def evaluate(self, problems=None):
        from cepo_kernels.step.rewards import safe_rewards

        problems = self.eval_set if problems is None else problems
        if not problems:
            return None
        resp = self._generate([self.prompt_ids(p) for p in problems], greedy=True)
        texts = self.tok.batch_decode(resp, skip_special_tokens=True)
        scores, _ = safe_rewards(self.grade, texts, [p.answer for p in problems])
        return float(sum(r >= 0.5 for r in scores) / len(scores))

    def step_metrics(self) -> dict:
        return {"vision_encoder_calls": self._tower_calls}

    def warmup(self):
        vision_warmup(self)

    def train(self, stop_after: int | None = None) -> dict:
        """Trainer.train; final_model/ also gets the image processor (load it with load_processor)."""
        summary = super().train(stop_after)
        final = self.out / "final_model"
        if final.is_dir():
            saver = self.processor.image_processor if isinstance(self.processor, VisionProcessor) else (
                self.processor)
            saver.save_pretrained(final)
        return summary


def vision_warmup(trainer) -> list[float]:
    """The embedded model's supervised warm-up (rl/sft.py's, with the images): cfg.sft_steps AdamW steps of
    cross-entropy on "\\boxed{k}" + eos (cfg.sft_noise of them wrong), the vision tower trained too and frozen
    after; with cfg.sft_hints each demonstration also follows prompt + teacher_template(answer shown)."""
    cfg, tok, model = trainer.cfg, trainer.tok, trainer.model
    rng = random.Random(cfg.seed)
    data = []
    for p in trainer.train_set:
        ctx = trainer.prompt_ids(p)
        target, shown = sft_target(tok, p, rng, cfg.sft_noise)
        data.append((ctx, target))
        if cfg.sft_hints:
            answer = tuple(encode(tok, cfg.teacher_template.replace("{answer}", shown)))
            data.append((VisionContext(ctx.prompt, answer), target))
    _freeze_tower(model, False)
    weight, bias = lm_head(model)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.sft_lr)
    draw = random.Random(cfg.seed + 1)
    model.train()
    losses = []
    for step in range(cfg.sft_steps):
        batch = draw.sample(data, min(cfg.sft_batch_size, len(data)))
        packed = vision_pack([b[0] for b in batch], [b[1] for b in batch], pad_id=tok.pad_token_id,
                             image_token_ids=trainer.image_ids, device=trainer.device)
        h = vision_hidden(model, packed)
        logits = torch.nn.functional.linear(h, weight, bias).float()
        targets, mask = response_targets([b[1] for b in batch], h.shape[1], tok.pad_token_id, trainer.device)
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
        for g in opt.param_groups:  # linear decay to 0, as rl/sft.py
            g["lr"] = cfg.sft_lr * (1.0 - step / cfg.sft_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    _freeze_tower(model)
    return losses


@torch.no_grad()
def vision_generate(model, prompts: list[VisionContext], *, pad_id: int, eos_id, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, chunk: int = 64,
                    device="cpu", suppress: tuple[int, ...] = ()) -> list[list[int]]:
    """Response token ids of each prompt (a VisionContext; repeat one for a group) from Hugging Face
    `generate` with the images (pixel_values, image_grid_thw, mm_token_type_ids); each response ends at its
    first eos (kept) or at max_new_tokens, as rl/rollout.generate's. suppress: token ids never sampled (the
    image placeholders: a response holding one would not match the images in a later pass)."""
    if chunk < 1:
        raise ValueError(f"chunk: expected at least 1 prompt per chunk, got {chunk}")
    was_training = model.training
    model.eval()
    eos_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    sample = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p,
                                                       top_k=0)
    out = []
    try:
        for lo in range(0, len(prompts), chunk):
            part = prompts[lo : lo + chunk]
            packed = vision_pack(part, [[] for _ in part], pad_id=pad_id, image_token_ids=(), device=device)
            L = packed.start  # the prompts only (pack adds one response column)
            inputs = {k: v[:, :L] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                      for k, v in packed.inputs.items() if k != "position_ids"}
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=sorted(eos_ids), suppress_tokens=list(suppress) or None,
                                 **sample)
            out += cut_at_eos(ids[:, L:].tolist(), eos_ids)
    except RuntimeError as e:
        if "inf" in str(e) or "nan" in str(e):
            raise NonFiniteModelError(str(e)) from None
        raise
    finally:
        model.train(was_training)
    return out

