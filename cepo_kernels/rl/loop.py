"""The run around the steps: evaluation, metrics.jsonl, checkpoints, the exported model and the summary.
`self` is the Trainer (cepo_kernels.rl.trainer)."""

from __future__ import annotations

import logging
import time

import numpy as np

from cepo_kernels.rl.errors import NaNLossError
from cepo_kernels.rl.model import export_model
from cepo_kernels.rl.rollout import generate
from cepo_kernels.rl.signals import graceful_stop
from cepo_kernels.runfiles import append_jsonl, read_metrics, write_json, writing
from cepo_kernels.step.rewards import safe_rewards

log = logging.getLogger("cepo_kernels.rl")


def run_steps(self, stop_after: int | None) -> dict:
    """Trainer.train's loop: the remaining steps (or stop_after of them), evaluations, metrics.jsonl,
    checkpoints, then the final checkpoint, final_model/ (when all steps are done) and summary.json."""
    from tqdm.auto import tqdm

    cfg = self.cfg
    write_json(self.out / "config.json", cfg.to_dict())
    end = cfg.steps if stop_after is None else min(cfg.steps, self.step_idx + stop_after)
    if self.step_idx == 0 and cfg.eval_every:
        self.eval_start = self.evaluate()
    evaluated = lambda rec: rec.get("eval_accuracy") is not None  # noqa: E731
    bar = tqdm(total=cfg.steps, initial=self.step_idx, disable=not cfg.progress,
               desc=f"cepo-train {cfg.algo}", dynamic_ncols=True)
    self.stop_requested = False
    warned_cut = False  # the truncation warning is given once
    with bar, graceful_stop(self):
        while self.step_idx < end and not self.stop_requested:
            cut = self.prompts_cut
            rec = self.step()
            rec["prompts_truncated"] = self.prompts_cut - cut
            if rec["prompts_truncated"] and not warned_cut:
                warned_cut = True
                log.warning("step %d: %d of %d prompts are longer than max_prompt_tokens=%d and were cut to "
                            "their last %d tokens (metrics field prompts_truncated counts them every step)",
                            rec["step"], rec["prompts_truncated"], cfg.prompts_per_step,
                            cfg.max_prompt_tokens, cfg.max_prompt_tokens)
            if cfg.eval_every and (self.step_idx % cfg.eval_every == 0 or self.step_idx == cfg.steps):
                rec["eval_accuracy"] = self.evaluate()
            self.unsaved_metrics.append(rec)
            append_jsonl(self.metrics_path, rec)
            bar.set_postfix(
                reward=f"{rec['reward_mean']:.3f}",
                lam=f"{rec['lambda']:.3f}",
                **({"eval": f"{rec['eval_accuracy']:.3f}"} if evaluated(rec) else {}),
            )
            bar.update(1)
            if self.nan_streak >= cfg.max_nan_steps:
                raise NaNLossError(
                    f"{self.nan_streak} steps in a row had a non-finite loss (max_nan_steps="
                    f"{cfg.max_nan_steps}); see {self.metrics_path}"
                )
            if cfg.save_every and self.step_idx % cfg.save_every == 0 and self.step_idx < end:
                self.save()
    self.save()
    if self.step_idx >= cfg.steps:
        with writing(self.out / "final_model"):
            export_model(self.model, self.tok, self.out / "final_model")
    summary = run_summary(self)
    write_json(self.out / "summary.json", summary)
    return summary

def run_summary(self) -> dict:
    """The whole run so far (every session of a resumed run), from metrics.jsonl."""
    rows = read_metrics(self.metrics_path)
    evals = [r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None]
    return {
        "out_dir": str(self.out),
        "steps_done": self.step_idx,
        "steps": self.cfg.steps,
        "interrupted": self.stop_requested and self.step_idx < self.cfg.steps,
        "wall_s": self.wall_before + time.perf_counter() - self._t_start,
        "eval_accuracy_start": self.eval_start,
        "eval_accuracy_end": evals[-1] if evals else None,
        "reward_first": rows[0]["reward_mean"] if rows else None,
        "reward_last": rows[-1]["reward_mean"] if rows else None,
        # what the shared prefixes and the lambda = 0 skip saved, over the whole run
        "teacher_tokens": sum(r.get("teacher_tokens", 0) for r in rows),
        "teacher_tokens_naive": sum(r.get("teacher_tokens_naive", 0) for r in rows),
        "policy_tokens": sum(r.get("policy_tokens", 0) for r in rows),
        "policy_tokens_naive": sum(r.get("policy_tokens_naive", 0) for r in rows),
        "prompts_truncated": sum(r.get("prompts_truncated", 0) for r in rows),
    }


def evaluate(self, problems=None) -> float | None:
    """Greedy accuracy on held-out problems: the fraction answered correctly, as the built-in grader
    says, or with a user reward function, reward >= 0.5 (the rule of `accuracy` and of r-'s rejection)."""
    problems = self.eval_set if problems is None else problems
    if not problems:
        return None
    resp = generate(
        self.model,
        [self.prompt_ids(p) for p in problems],
        pad_id=self.tok.pad_token_id,
        eos_id=self.eos_ids,
        max_new_tokens=self.cfg.max_new_tokens,
        greedy=True,
        chunk=self.cfg.micro_batch_size,
        device=self.device,
    )
    texts = self.tok.batch_decode(resp, skip_special_tokens=True)
    scores, _ = safe_rewards(self.grade, texts, [p.answer for p in problems])
    return float(np.mean([r >= 0.5 for r in scores]))
