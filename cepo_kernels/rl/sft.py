"""A short supervised warm-up of the embedded model on the task's answer format, so RL starts from a
policy whose reward is above zero (a random-weight model would never emit a \\boxed{} answer)."""

from __future__ import annotations

import random

import torch

from cepo_kernels.rl.task import sft_texts
from cepo_kernels.step.contexts import pack, teacher_prefix


def supervised_warmup(model, tokenizer, problems, cfg, device) -> list[float]:
    """cfg.sft_steps AdamW steps of next-token cross-entropy on "\\boxed{answer}" + eos; returns the losses.

    Each demonstration is fixed once (cfg.sft_noise of them wrong, see task.sft_texts). With cfg.sft_hints,
    every demonstration also appears in the teachers' context (prompt + teacher_template with the answer
    the demonstration gives), so that, like a pretrained LLM, the model learns to use an answer placed in
    its context and the teachers' evidence Delta carries signal. Plain PyTorch (the logits of a ~60-token
    vocabulary are tiny); batches drawn with a seeded generator.
    """
    demos = sft_texts(tokenizer, problems, cfg.system_prompt, cfg.prompt_suffix, cfg.sft_noise, cfg.seed)
    data = [(prompt, target) for prompt, target, _ in demos]
    if cfg.sft_hints:
        for p, (prompt, target, shown) in zip(problems, demos, strict=True):
            question = p.prompt + cfg.prompt_suffix
            template, system = cfg.teacher_template, cfg.system_prompt
            data.append((teacher_prefix(tokenizer, question, prompt, shown, template, system), target))
    rng = random.Random(cfg.seed + 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.sft_lr)
    model.train()
    losses = []
    for step in range(cfg.sft_steps):
        batch = rng.sample(data, min(cfg.sft_batch_size, len(data)))
        packed = pack([b[0] for b in batch], [b[1] for b in batch], tokenizer.pad_token_id, device)
        labels = torch.full_like(packed.input_ids, -100)
        labels[:, packed.start :] = torch.where(
            packed.mask, packed.targets, torch.full_like(packed.targets, -100)
        )
        for g in opt.param_groups:  # linear decay to 0 so the warm-up ends on a settled policy
            g["lr"] = cfg.sft_lr * (1.0 - step / cfg.sft_steps)
        out = model(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
            labels=labels,
            use_cache=False,
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses
