"""The cepo-train loop: each step is the CEPO step's phases (cepo_kernels.step) in order,

    rollouts -> rewards -> A -> r- -> teacher contexts -> old and teacher log-probs -> A_hat + loss -> update

then the loop's own work: the credit recorder, metrics.jsonl, checkpoints, the summary. One
`Trainer.step` is one rollout batch (prompts_per_step x group_size responses) followed by one optimizer
update per mini-batch (x ppo_epochs); lambda and the learning rate are functions of the step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from cepo_kernels.analysis.credit import CreditRecorder
from cepo_kernels.rl import checkpoint as ckpt
from cepo_kernels.rl.config import TrainConfig, lr_factor
from cepo_kernels.rl.distill import distill_update, resumed_teacher
from cepo_kernels.rl.errors import NaNLossError
from cepo_kernels.rl.loop import evaluate, run_steps, run_summary
from cepo_kernels.rl.model import (
    load_model_and_tokenizer,
    peak_memory_mb,
    resolve_device,
    resolve_dtype,
    seed_everything,
    trainable_parameters,
)
from cepo_kernels.rl.reward import load_reward_fn, score_responses
from cepo_kernels.rl.rollout import NonFiniteModelError, generate
from cepo_kernels.rl.rundir import RunDir, clean_partial_checkpoints, resolve_out_dir
from cepo_kernels.rl.sft import supervised_warmup
from cepo_kernels.rl.task import (
    drop_long_prompts,
    first_wrong_credit,
    first_wrong_tokens,
    load_problems,
    step_problems,
)
from cepo_kernels.rl.update import ppo_update
from cepo_kernels.runfiles import MetricsError, read_metrics, write_jsonl
from cepo_kernels.step import (
    RolloutBatch,
    SharedPrefixUnsupported,
    context_hidden,
    encode,
    group_advantages,
    lm_head,
    micro_batches,
    policy_logprobs,
    render_prompt,
    response_targets,
    reweight,
    teacher_logprobs,
)
from cepo_kernels.step.distill import Teacher
from cepo_kernels.step.graders import grader
from cepo_kernels.step.rewards import answers_match, extract_boxed, with_format_bonus

log = logging.getLogger("cepo_kernels.rl")


class Trainer:
    """Builds everything from a TrainConfig; `train()` runs (or resumes) the loop and writes the run dir.

    reward_fn(response_text, reference) -> float and extract_fn(response_text) -> str | None may be passed
    as Python callables (they override cfg.reward_fn).
    """

    def __init__(self, cfg: TrainConfig, reward_fn=None, extract_fn=None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        seed_everything(cfg.seed)
        self.train_set, self.eval_set = self.load_problems()
        self.extract = extract_fn or extract_boxed
        if reward_fn is None and cfg.reward_fn is not None:
            reward_fn = load_reward_fn(cfg.reward_fn)
        if reward_fn is None and cfg.reward != "boxed":
            try:
                reward_fn = grader(cfg.reward)  # step/graders.py: mathruler or math-verify
            except ImportError as e:
                raise ValueError(str(e)) from None
        self.reward_fn = reward_fn or (
            lambda text, ref: 1.0 if answers_match(self.extract(text), ref) else 0.0
        )
        self.grade = self.reward_fn  # correctness, for eval_accuracy: without the format bonus
        self.resume_from = ckpt.resolve_checkpoint(cfg.resume) if cfg.resume else None
        self.out, in_place = resolve_out_dir(cfg.out_dir, cfg.algo, self.resume_from)
        self.cfg = cfg = dataclasses.replace(cfg, out_dir=str(self.out))
        self.rundir = RunDir(self.out, resuming=in_place)  # held (locked) until close()
        try:
            self._build(in_place)
        except BaseException:  # the directory is free again for a corrected command in this process
            self.rundir.release()
            raise

    def _build(self, in_place: bool):
        """Everything after the run directory is claimed: model, optimizer, schedule, a resumed state."""
        cfg = self.cfg
        if cfg.format_bonus > 0:  # the authors' 0.9 x accuracy + 0.1 x format
            self.reward_fn = with_format_bonus(self.reward_fn, cfg.format_bonus, self.extract)
        self.model, self.tok = self.load_model()
        self.eos_ids = self._eos_ids()
        self.share_prefix = cfg.share_prefix
        if cfg.max_grad_norm == 0:
            log.info("max_grad_norm=0: gradient clipping is off (the gradient norm is still logged)")
        if cfg.filter_long_prompts:  # verl's filter of overlong prompts (the authors' runs)
            def n_tokens(p):
                return len(encode(self.tok, render_prompt(self.tok, self.question(p), cfg.system_prompt)))
            self.train_set, self.eval_set = drop_long_prompts(self.train_set, self.eval_set, n_tokens,
                                                              cfg.max_prompt_tokens)
        if cfg.model is None and cfg.sft_steps and self.resume_from is None:
            self.warmup()
        self.optimizer = torch.optim.AdamW(
            trainable_parameters(self.model),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.lr_warmup_steps, cfg.steps, cfg.min_lr_ratio)
        )
        self.step_idx = 0  # completed steps
        self.nan_streak = 0
        self.eval_start = None  # held-out accuracy before the first step
        self.wall_before = 0.0  # seconds spent by earlier sessions of a resumed run
        self.stop_requested = False
        self.unsaved_metrics = []  # the records since the last checkpoint (saved in the next one)
        self.prompts_cut = 0  # prompts longer than max_prompt_tokens so far (cut to their last tokens)
        self.options = cfg.options  # the reweight phase's options (step.options.CEPOOptions)
        self.teacher = None  # opsd / sdpo: built at the first step (distill_teacher)
        self.credit = CreditRecorder(self.out, every=cfg.credit_every, samples=cfg.credit_samples,
                                     algo=cfg.algo, tokenizer=self.tok)
        self._t_start = time.perf_counter()
        if self.resume_from is not None:
            state = ckpt.load_checkpoint(
                self.resume_from, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
            )
            self.step_idx, self.nan_streak = state["step"], state.get("nan_streak", 0)
            self.eval_start, self.wall_before = state.get("eval_accuracy_start"), state.get("wall_s", 0.0)
            ckpt.set_rng_state(ckpt.load_rng(self.resume_from))
            clean_partial_checkpoints(self.out / "checkpoints")
            source = self.resume_from.parent.parent / "metrics.jsonl"
            try:
                rows = read_metrics(self.metrics_path if in_place else source, upto_step=self.step_idx)
            except MetricsError as e:
                raise ValueError(f"resume: {e}") from None
            # drops lines written after the checkpoint, restores torn or lost ones from the checkpoints
            write_jsonl(self.metrics_path, ckpt.restore_metrics(rows, self.resume_from))

    # hooks a policy of another kind overrides (rl/vision_trainer.py: a vision-language policy)
    build_contexts = None  # reweight's teacher-context builder; None: the text layout

    def load_problems(self):
        return load_problems(self.cfg)

    def load_model(self):
        return load_model_and_tokenizer(self.cfg, self.device, self.dtype)

    def warmup(self):
        supervised_warmup(self.model, self.tok, self.train_set, self.cfg, self.device)

    def teacher_forward(self, contexts, responses):
        """The teachers' forward (the policy's, for a text policy)."""
        return self.forward(contexts, responses)

    def step_metrics(self) -> dict:
        """Extra metrics of the step just run (none for a text policy)."""
        return {}

    def close(self):
        """Releases the run directory's lock (also released when the process ends)."""
        self.rundir.close()

    def _eos_ids(self) -> list[int]:
        ids = {self.tok.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return sorted(i for i in ids if i is not None)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def question(self, problem) -> str:
        return problem.prompt + self.cfg.prompt_suffix

    def prompt_ids(self, problem) -> list[int]:
        ids = encode(self.tok, render_prompt(self.tok, self.question(problem), self.cfg.system_prompt))
        self.prompts_cut += len(ids) > self.cfg.max_prompt_tokens  # reported by the loop (rl/loop.py)
        return ids[-self.cfg.max_prompt_tokens :]

    def batch_problems(self, step: int):
        """The prompts of a 0-based step (rl/task.step_problems)."""
        return step_problems(self.train_set, self.cfg.seed, self.cfg.prompts_per_step, step)

    def evaluate(self, problems=None) -> float:
        """Greedy held-out accuracy (rl/loop.evaluate)."""
        return evaluate(self, problems)

    def forward(self, contexts: list[list[int]], responses: list[list[int]],
                model=None) -> tuple[torch.Tensor, int, int]:
        """(hidden [n, R, H] predicting each response after its context; tokens run; tokens of the plain
        path) of `model` (default the policy): step.context_hidden, sharing contexts unless disabled,
        unsupported, or under gradient checkpointing with gradients on."""
        model = self.model if model is None else model
        share = self.share_prefix and not (torch.is_grad_enabled() and self.cfg.gradient_checkpointing)
        kw = dict(pad_id=self.tok.pad_token_id, device=self.device)
        if share:
            try:
                return context_hidden(model, contexts, responses, share=True, **kw)
            except SharedPrefixUnsupported as e:
                self.share_prefix = False
                log.warning("shared prefixes are not supported for this model (%s): running every context "
                            "in full", e)
        return context_hidden(model, contexts, responses, share=False, **kw)

    def rollout(self, prompts: list[list[int]]) -> list[list[int]]:
        """group_size sampled responses per prompt (token ids, groups contiguous)."""
        cfg = self.cfg
        try:
            return generate(
                self.model,
                [p for p in prompts for _ in range(cfg.group_size)],
                pad_id=self.tok.pad_token_id,
                eos_id=self.eos_ids,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                chunk=cfg.micro_batch_size,
                device=self.device,
            )
        except NonFiniteModelError as e:
            raise NaNLossError(
                f"step {self.step_idx + 1}: {e}; the weights diverged in an earlier update (lr={cfg.lr:g}, "
                f"max_grad_norm={cfg.max_grad_norm:g}): lower --lr or clip the gradient"
            ) from None

    def rewards(self, texts: list[str], references: list[str]) -> tuple[list[float], int]:
        """The reward of every response and the failures (rl/reward.score_responses)."""
        return score_responses(self.reward_fn, texts, references, self.step_idx + 1)

    def update(self, prompts, responses, mask, adv, old_logp, pos_logp, neg_logp, lam,
               distill=None) -> tuple[dict, int]:
        """The PPO updates of this rollout batch (rl/update.ppo_update); (metrics, policy tokens run)."""
        return ppo_update(self.model, self.optimizer, self.forward, self.cfg, pad_id=self.tok.pad_token_id,
                          prompts=prompts, responses=responses, mask=mask, adv=adv, old_logp=old_logp,
                          pos_logp=pos_logp, neg_logp=neg_logp, lam=lam, distill=distill)

    def distill_teacher(self) -> Teacher:
        """The opsd / sdpo teacher (rl/distill.resumed_teacher)."""
        return resumed_teacher(self.model, self.options, self.resume_from, self.device)

    def distill_update(self, batch: RolloutBatch):
        """opsd / sdpo: the distillation part of this batch's update (rl/distill.distill_update)."""
        if self.options.algorithm.distills and self.teacher is None:  # first step, after warm-up/resume
            self.teacher = self.distill_teacher()
        return distill_update(batch, self.options, self.tok, self.teacher, self.forward, self.device)

    def step(self) -> dict:
        """One rollout batch and its updates; returns the metrics record (also appended to metrics.jsonl)."""
        cfg, s, G = self.cfg, self.step_idx, self.cfg.group_size
        t0 = time.perf_counter()
        problems = self.batch_problems(s)
        prompts = [self.prompt_ids(p) for p in problems]
        responses = self.rollout(prompts)
        texts = self.tok.batch_decode(responses, skip_special_tokens=True)
        refs = [p.answer for p in problems]
        per_row = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731 (one entry per group -> per row)
        rewards, reward_errors = self.rewards(texts, per_row(refs))
        adv = group_advantages(rewards, G, scale=cfg.adv_scale, device=self.device)
        t1 = time.perf_counter()

        lengths = [len(r) for r in responses]
        batches = lambda rows: micro_batches(rows, lengths, G, cfg.micro_batch_size)  # noqa: E731
        pad = self.tok.pad_token_id
        _, mask = response_targets(responses, max(lengths + [1]), pad, self.device)
        weight, bias = lm_head(self.model)
        self.model.eval()
        questions = [self.question(p) for p in problems]
        batch = RolloutBatch(per_row(prompts), responses, adv, mask, G, texts=texts, rewards=rewards,
                             references=per_row(refs), questions=per_row(questions),
                             system_prompt=cfg.system_prompt)
        old = policy_logprobs(self.forward, weight, bias, batch.prompt_ids, responses, batches, pad_id=pad,
                              device=self.device, temperature=cfg.temperature)
        batch.old_logp = old.logp
        t_old = time.perf_counter()
        teacher_tokens = 0

        def scorer(ctx, teachers):  # this loop's model on the teacher contexts (shared prefixes or plain)
            nonlocal teacher_tokens  # (the phase calls it only at lambda > 0: lam=1.0 just means "run")
            out = teacher_logprobs(self.teacher_forward, weight, bias, ctx, responses, batches,
                                   default=old.logp, lam=1.0, pad_id=pad, temperature=cfg.temperature,
                                   negative="teacher" if "neg" in teachers else "old")
            teacher_tokens = out.tokens
            return {"pos": out.pos[ctx.rows], "neg": out.neg[ctx.rows]}

        rw = reweight(batch, scorer, self.options, s, tokenizer=self.tok, extract=self.extract,
                      contexts=self.build_contexts)
        lam = rw.lam
        t2 = time.perf_counter()
        # the credit diagnostic (rl/task.first_wrong_credit): the first wrong step of each wrong response
        first_wrong = [first_wrong_tokens(self.tok, problems[i // G], responses[i], texts[i])
                       if rewards[i] < 0.5 else None for i in range(len(responses))]
        credit = first_wrong_credit(first_wrong, adv, rw.a_hat if lam > 0 else None, mask)
        # the credit maps (cepo-viz), before the update changes the weights
        self.credit.record(step=s + 1, batch=batch, result=rw, questions=questions, first_wrong=first_wrong)

        upd, update_tokens = self.update(batch.prompt_ids, responses, mask, adv, old.logp, rw.pos_logp,
                                         rw.neg_logp, lam, self.distill_update(batch))
        lr_used = self.optimizer.param_groups[0]["lr"]  # this step's rate, read before the schedule moves
        with warnings.catch_warnings():  # when every update was skipped (NaN), the schedule still advances
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        t3 = time.perf_counter()

        n_tok = float(sum(lengths))
        rec = {
            "step": s + 1,
            "lambda": lam,
            "lr": lr_used,
            "reward_mean": float(np.mean(rewards)),
            "accuracy": float(np.mean([r >= 0.5 for r in rewards])),
            "reward_errors": reward_errors,
            **rw.delta_metrics,
            "entropy": float(old.entropy[mask].mean()) if n_tok else 0.0,
            "response_len_mean": n_tok / mask.shape[0],
            "teacher_rows": len(rw.rows) if lam > 0 else 0,
            "teacher_tokens": teacher_tokens,
            "teacher_tokens_naive": rw.teacher_tokens_plain(responses),
            "policy_tokens": old.tokens + update_tokens,
            "policy_tokens_naive": old.tokens_plain * (1 + cfg.ppo_epochs),
            "r_minus_fallbacks": sum(n.how == "fallback" for n in rw.negatives) if rw.negatives else 0,
            **credit,
            **upd,
            "tokens_per_s": n_tok / max(t3 - t0, 1e-9),
            "peak_mem_mb": peak_memory_mb(self.device),
            "time_rollout": t1 - t0,
            "time_old_logp": t_old - t1,
            "time_teachers": t2 - t_old,
            "time_update": t3 - t2,
            **self.step_metrics(),
        }
        self.step_idx += 1
        if upd["nan_updates"]:
            self.nan_streak += 1
            log.warning("step %d: non-finite loss or gradient in %d update(s); skipped them "
                        "(%d step(s) in a row)", s + 1, upd["nan_updates"], self.nan_streak)
        else:
            self.nan_streak = 0
        rec["skipped"] = upd["nan_updates"] > 0
        return rec

    def save(self):
        path = ckpt.save_checkpoint(
            self.out / "checkpoints", self.step_idx, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, config=self.cfg.to_dict(), keep_last=self.cfg.keep_last,
            trainable_only=self.cfg.lora_rank > 0 and self.cfg.model is not None,
            extra={"nan_streak": self.nan_streak, "eval_accuracy_start": self.eval_start,
                   "wall_s": self.wall_before + time.perf_counter() - self._t_start,
                   "metrics": self.unsaved_metrics},
            states=({"distill_teacher": self.teacher.copy.state_dict()}
                    if self.teacher is not None and self.teacher.copy is not None else None),
        )  # fmt: skip
        self.unsaved_metrics = []
        return path

    def train(self, stop_after: int | None = None) -> dict:
        """Runs the remaining steps (or stop_after of them), then writes the final checkpoint, the exported
        model (final_model/, when all steps are done) and summary.json. Returns the summary.

        Ctrl-C (SIGINT) or SIGTERM stops after the current step, with a checkpoint and a summary
        (`summary["interrupted"]` is True); a second one stops at once (KeyboardInterrupt), and the run
        resumes from its last checkpoint.
        """
        self._t_start = time.perf_counter()
        self.rundir.acquire()
        try:
            return run_steps(self, stop_after)
        finally:
            self.rundir.release()  # another Trainer (a resume in this process) may now take the directory

    def summary(self) -> dict:
        """The whole run so far (every session of a resumed run), from metrics.jsonl."""
        return run_summary(self)
