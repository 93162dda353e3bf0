"""The RLVR loop: rollouts -> rewards -> group advantages -> old and teacher log-probs -> PPO-clip updates.

One `Trainer.step` is one rollout batch (prompts_per_step x group_size responses) followed by one
optimizer update per mini-batch (x ppo_epochs); lambda and the learning rate are functions of the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from cepo_kernels import group_advantages, linear_cepo_loss, linear_logprobs, linear_teacher_logprobs
from cepo_kernels.rl import checkpoint as ckpt
from cepo_kernels.rl.config import TrainConfig, lam_at, lr_factor
from cepo_kernels.rl.credit import save_credit
from cepo_kernels.rl.metrics import delta_stats, peak_memory_mb
from cepo_kernels.rl.model import (
    export_model,
    lm_head,
    load_model_and_tokenizer,
    resolve_device,
    resolve_dtype,
    trainable_parameters,
)
from cepo_kernels.rl.prefix import SharedPrefixUnsupported, context_hidden, response_targets, to_device
from cepo_kernels.rl.reward import (
    answers_match,
    extract_boxed,
    load_reward_fn,
    safe_rewards,
    with_format_bonus,
)
from cepo_kernels.rl.rollout import NonFiniteModelError, generate
from cepo_kernels.rl.rundir import (
    RunDir,
    append_jsonl,
    clean_partial_checkpoints,
    read_metrics,
    write_json,
    write_jsonl,
)
from cepo_kernels.rl.sft import supervised_warmup
from cepo_kernels.rl.task import encode, load_problems, render_prompt
from cepo_kernels.rl.teacher import plan_teachers

log = logging.getLogger("cepo_kernels.rl")
LOSS_METRICS = ("clip_frac", "adv_abs_mean", "adv_hat_abs_mean", "approx_kl", "ratio_mean")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NaNLossError(RuntimeError):
    """Too many non-finite updates in a row, or a model whose outputs are no longer finite (exit code 3)."""


class RewardFunctionError(RuntimeError):
    """The reward function raised on every response of a step: nothing can be learned from it."""


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
        self.train_set, self.eval_set = load_problems(cfg)
        self.extract = extract_fn or extract_boxed
        if reward_fn is None and cfg.reward_fn is not None:
            reward_fn = load_reward_fn(cfg.reward_fn)
        self.reward_fn = reward_fn or (
            lambda text, ref: 1.0 if answers_match(self.extract(text), ref) else 0.0
        )
        self.resume_from = ckpt.resolve_checkpoint(cfg.resume) if cfg.resume else None
        self.out, in_place = self._resolve_out_dir()
        self.cfg = cfg = dataclasses.replace(cfg, out_dir=str(self.out))
        self.rundir = RunDir(self.out, resuming=in_place)  # held (locked) until close()
        if cfg.format_bonus > 0:  # issue 12: the authors' 0.9 x accuracy + 0.1 x format
            self.reward_fn = with_format_bonus(self.reward_fn, cfg.format_bonus, self.extract)
        self.model, self.tok = load_model_and_tokenizer(cfg, self.device, self.dtype)
        self.eos_ids = self._eos_ids()
        self.share_prefix = cfg.share_prefix
        if cfg.max_grad_norm == 0:
            log.info("max_grad_norm=0: gradient clipping is off (the gradient norm is still logged)")
        if cfg.model is None and cfg.sft_steps and self.resume_from is None:
            supervised_warmup(self.model, self.tok, self.train_set, cfg, self.device)
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
            rows = read_metrics(self.metrics_path if in_place else source, upto_step=self.step_idx)
            write_jsonl(self.metrics_path, rows)  # drops lines written after the checkpoint

    def _resolve_out_dir(self) -> tuple[Path, bool]:
        """(run directory, whether it is the resumed run's own). A resumed run continues where it was
        resumed from; an --out-dir elsewhere branches it into that new directory."""
        cfg = self.cfg
        if self.resume_from is None:
            default = Path("runs") / f"{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
            return Path(cfg.out_dir or default).absolute(), False
        source = ckpt.run_dir_of(self.resume_from)
        if cfg.out_dir is None or (source is not None and Path(cfg.out_dir).resolve() == source.resolve()):
            if source is None:
                raise ValueError(
                    f"out_dir: the checkpoint {str(self.resume_from)!r} is not inside a run directory "
                    "(RUN/checkpoints/step_NNNNNN): give --out-dir for the continued run"
                )
            return source.absolute(), True
        return Path(cfg.out_dir).absolute(), False

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
        return ids[-self.cfg.max_prompt_tokens :]

    def batch_problems(self, step: int):
        """The prompts of a 0-based step: a pure function of (seed, step), reshuffled every epoch."""
        n, per = len(self.train_set), self.cfg.prompts_per_step
        out = []
        for k in range(step * per, (step + 1) * per):
            epoch, i = divmod(k, n)
            order = list(range(n))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            out.append(self.train_set[order[i]])
        return out

    def evaluate(self, problems=None) -> float:
        """Greedy accuracy on held-out problems."""
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
        scores, _ = safe_rewards(self.reward_fn, texts, [p.answer for p in problems])
        return float(np.mean(scores))

    def _chunks(self, rows: list[int], responses) -> list[list[int]]:
        """Micro-batches of rows: whole groups where they fit in micro_batch_size rows, groups of similar
        response length together (so padding follows the real lengths)."""
        G, size = self.cfg.group_size, self.cfg.micro_batch_size
        groups: dict[int, list[int]] = {}
        for r in rows:
            groups.setdefault(r // G, []).append(r)
        ordered = sorted(groups.values(), key=lambda g: -max(len(responses[r]) for r in g))
        chunks, cur = [], []
        for g in ordered:
            for lo in range(0, len(g), size):
                part = g[lo : lo + size]
                if cur and len(cur) + len(part) > size:
                    chunks.append(cur)
                    cur = []
                cur = cur + part
        return chunks + ([cur] if cur else [])

    def _forward_rows(self, rows: list[int], prefix_of, responses) -> tuple[torch.Tensor, int, int]:
        """(hidden [n, R, H] predicting the responses of `rows`; tokens run; tokens of the plain path):
        rl/prefix.context_hidden, sharing contexts unless disabled, unsupported, or under gradient
        checkpointing with gradients on. prefix_of(row) -> the row's context ids."""
        contexts, resp = [prefix_of(r) for r in rows], [responses[r] for r in rows]
        share = self.share_prefix and not (torch.is_grad_enabled() and self.cfg.gradient_checkpointing)
        kw = dict(pad_id=self.tok.pad_token_id, device=self.device)
        if share:
            try:
                return context_hidden(self.model, contexts, resp, share=True, **kw)
            except SharedPrefixUnsupported as e:
                self.share_prefix = False
                log.warning("shared prefixes are not supported for this model (%s): running every context "
                            "in full", e)
        return context_hidden(self.model, contexts, resp, share=False, **kw)

    def _targets(self, rows, responses, R):
        """targets [n, R] (pad id past each response) and mask [n, R] of rows, on the device."""
        return response_targets([responses[r] for r in rows], R, self.tok.pad_token_id, self.device)

    @torch.no_grad()
    def _old_logprobs(self, prompts, responses, weight, bias):
        """Old log-probs [B, R] and entropy [B, R] of every response under the current (rollout) weights,
        and the policy tokens run (with the naive count)."""
        B, R = len(responses), max([len(r) for r in responses] + [1])
        logp = torch.zeros(B, R, device=self.device)
        ent = torch.zeros(B, R, device=self.device)
        tokens = naive = 0
        for rows in self._chunks(list(range(B)), responses):
            h, t, nv = self._forward_rows(rows, lambda r: prompts[r], responses)
            targets, _ = self._targets(rows, responses, h.shape[1])
            lp, en = linear_logprobs(h, weight, targets, bias=bias, temperature=self.cfg.temperature,
                                     return_entropy=True)
            idx = to_device(torch.tensor(rows), self.device)
            logp[idx, : h.shape[1]] = lp.float()
            ent[idx, : h.shape[1]] = en.float()
            tokens, naive = tokens + t, naive + nv
        return logp, ent, tokens, naive

    @torch.no_grad()
    def _teacher_logprobs(self, plan, responses, old_logp, weight, bias):
        """pos_logp, neg_logp [B, R] and the teacher tokens run; rows skipped by the plan (A = 0) keep
        pos = neg = old (Delta = 0)."""
        pos, neg = old_logp.clone(), old_logp.clone()
        tokens = 0
        if not plan.rows:
            return pos, neg, tokens
        where = {r: k for k, r in enumerate(plan.rows)}
        for rows in self._chunks(plan.rows, responses):
            h_pos, t, _ = self._forward_rows(rows, lambda r: plan.pos_prefixes[where[r]], responses)
            tokens += t
            targets, _ = self._targets(rows, responses, h_pos.shape[1])
            dst = to_device(torch.tensor(rows), self.device)
            R = h_pos.shape[1]
            if self.cfg.algo == "cepo":
                h_neg, t, _ = self._forward_rows(rows, lambda r: plan.neg_prefixes[where[r]], responses)
                tokens += t
                p, n = linear_teacher_logprobs(
                    h_pos, h_neg, weight, targets, bias=bias, temperature=self.cfg.temperature
                )
                neg[dst, :R] = n.float()
            else:  # rlsd: the negative teacher is the old student
                p = linear_logprobs(h_pos, weight, targets, bias=bias, temperature=self.cfg.temperature)
            pos[dst, :R] = p.float()
        return pos, neg, tokens

    def _update(self, prompts, responses, mask, adv, old_logp, pos_logp, neg_logp, lam):
        """PPO updates over mini-batches (whole groups) with gradient accumulation over micro-batches.
        Returns the metrics and the policy tokens run."""
        cfg, G = self.cfg, self.cfg.group_size
        B = adv.shape[0]
        mini = min(cfg.mini_batch_prompts or cfg.prompts_per_step, cfg.prompts_per_step) * G
        weight, bias = lm_head(self.model)
        teachers = {} if cfg.algo == "grpo" else {"pos_logp": pos_logp, "neg_logp": neg_logp}
        clip_dual = cfg.clip_dual if cfg.clip_dual > 0 else None
        opts = dict(bias=bias, lam=lam, eps_w=cfg.eps_w, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                    clip_dual=clip_dual, temperature=cfg.temperature, reduction=cfg.reduction)
        if cfg.algo == "grpo" or lam == 0.0:
            teachers, opts["lam"] = {}, 0.0  # A_hat = A exactly: no teacher input at all
        sums, tokens, losses, grad_norms, n_nan, run = {}, 0.0, [], [], 0, 0
        seq_tokens = np.asarray([len(r) for r in responses], dtype=np.float64)
        self.model.train()
        for _ in range(cfg.ppo_epochs):
            for lo in range(0, B, mini):
                hi = min(lo + mini, B)
                num_tokens = mask[lo:hi].sum()
                self.optimizer.zero_grad(set_to_none=True)
                loss_total = torch.zeros((), device=self.device)
                for rows in self._chunks(list(range(lo, hi)), responses):
                    h, t, _ = self._forward_rows(rows, lambda r: prompts[r], responses)
                    run += t
                    R = h.shape[1]
                    idx = to_device(torch.tensor(rows), self.device)
                    targets, m = self._targets(rows, responses, R)
                    out = linear_cepo_loss(
                        h, weight, targets, adv[idx], m, old_logp=old_logp[idx, :R],
                        num_tokens=num_tokens if cfg.reduction == "token-mean" else None, metrics="tensor",
                        **opts, **{k: v[idx, :R] for k, v in teachers.items()},
                    )  # fmt: skip
                    out.loss.backward()
                    loss_total = loss_total + out.loss.detach().float()
                    n_tok = float(seq_tokens[rows].sum())
                    tokens += n_tok
                    for k in LOSS_METRICS:
                        sums[k] = sums.get(k, 0.0) + n_tok * out.metrics[k]
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf  # 0: no clipping
                norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), max_norm)
                # the one host sync of an update: a non-finite loss or gradient skips it
                loss_value, grad_norm = torch.stack([loss_total, norm.float().to(loss_total.device)]).tolist()
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    n_nan += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.optimizer.step()
                losses.append(loss_value)
                grad_norms.append(grad_norm)
        self.optimizer.zero_grad(set_to_none=True)  # no gradients held through the next rollouts
        names = list(sums)
        values = torch.stack([sums[k].float() for k in names]).tolist() if names else []
        metrics = {k: v / max(tokens, 1.0) for k, v in zip(names, values, strict=True)}
        metrics.update(
            loss=float(np.mean(losses)) if losses else None,  # None: every update was skipped
            grad_norm=float(np.mean(grad_norms)) if grad_norms else None,
            nan_updates=n_nan,
        )
        return metrics, run

    def step(self) -> dict:
        """One rollout batch and its updates; returns the metrics record (also appended to metrics.jsonl)."""
        cfg, s, G = self.cfg, self.step_idx, self.cfg.group_size
        lam = lam_at(s, cfg.lam0, cfg.t_warm) if cfg.algo != "grpo" else 0.0
        t0 = time.perf_counter()
        problems = self.batch_problems(s)
        prompts = [self.prompt_ids(p) for p in problems]
        try:
            responses = generate(
                self.model,
                [p for p in prompts for _ in range(G)],
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
                f"step {s + 1}: {e}; the weights diverged in an earlier update (lr={cfg.lr:g}, "
                f"max_grad_norm={cfg.max_grad_norm:g}): lower --lr or clip the gradient"
            ) from None
        texts = self.tok.batch_decode(responses, skip_special_tokens=True)
        refs = [p.answer for p in problems]
        failures = []
        rewards, reward_errors = safe_rewards(self.reward_fn, texts, [r for r in refs for _ in range(G)],
                                              failures=failures)
        if reward_errors == len(texts):
            raise RewardFunctionError(
                f"step {s + 1}: the reward function raised on every one of the {len(texts)} responses; "
                f"first error: {failures[0]}"
            )
        if reward_errors:
            log.warning("step %d: the reward function raised on %d of %d responses (scored 0); "
                        "first error: %s", s + 1, reward_errors, len(texts), failures[0])
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float32), G, scale=cfg.adv_scale)
        adv = adv.to(self.device)
        t1 = time.perf_counter()

        row_prompts = [p for p in prompts for _ in range(G)]
        _, mask = self._targets(range(len(responses)), responses, max([len(r) for r in responses] + [1]))
        weight, bias = lm_head(self.model)
        self.model.eval()
        old_logp, entropy, sweep_tokens, sweep_naive = self._old_logprobs(row_prompts, responses, weight,
                                                                          bias)
        t_old = time.perf_counter()
        plan = None
        pos_logp = neg_logp = old_logp
        teacher_tokens = teacher_naive = 0
        if cfg.algo != "grpo":
            questions = [self.question(p) for p in problems]
            plan = plan_teachers(self.tok, questions, prompts, refs, texts, rewards, adv, G,
                                 cfg.teacher_template, cfg.system_prompt, self.extract)
            # what the plain path ran: every teacher context in full, whatever lambda
            contexts = (plan.pos_prefixes, plan.neg_prefixes) if cfg.algo == "cepo" else (plan.pos_prefixes,)
            for prefixes in contexts:
                teacher_naive += sum(len(prefixes[k]) + len(responses[r]) for k, r in enumerate(plan.rows))
            if lam > 0:  # at lambda = 0, A_hat = A exactly: the teachers cannot change the update
                pos_logp, neg_logp, teacher_tokens = self._teacher_logprobs(plan, responses, old_logp, weight,
                                                                            bias)
        t2 = time.perf_counter()
        # issue 12: credit maps (cepo-viz), before the update changes the weights
        save_credit(self, step=s + 1, problems=problems, responses=responses, texts=texts, rewards=rewards,
                    adv=adv, pos_logp=pos_logp, neg_logp=neg_logp, mask=mask, lam=lam, plan=plan)

        upd, update_tokens = self._update(row_prompts, responses, mask, adv, old_logp, pos_logp, neg_logp,
                                          lam)
        lr_used = self.optimizer.param_groups[0]["lr"]  # this step's rate, read before the schedule moves
        with warnings.catch_warnings():  # when every update was skipped (NaN), the schedule still advances
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        t3 = time.perf_counter()

        n_tok = float(sum(len(r) for r in responses))
        rec = {
            "step": s + 1,
            "lambda": lam,
            "lr": lr_used,
            "reward_mean": float(np.mean(rewards)),
            "accuracy": float(np.mean([r >= 0.5 for r in rewards])),
            "reward_errors": reward_errors,
            **delta_stats(pos_logp - neg_logp, adv, mask),
            "entropy": float(entropy[mask].mean()) if n_tok else 0.0,
            "response_len_mean": n_tok / mask.shape[0],
            "teacher_rows": len(plan.rows) if plan and lam > 0 else 0,
            "teacher_tokens": teacher_tokens,
            "teacher_tokens_naive": teacher_naive,
            "policy_tokens": sweep_tokens + update_tokens,
            "policy_tokens_naive": sweep_naive * (1 + cfg.ppo_epochs),
            "r_minus_fallbacks": plan.neg_how.count("fallback") if plan else 0,
            **upd,
            "tokens_per_s": n_tok / max(t3 - t0, 1e-9),
            "peak_mem_mb": peak_memory_mb(self.device),
            "time_rollout": t1 - t0,
            "time_old_logp": t_old - t1,
            "time_teachers": t2 - t_old,
            "time_update": t3 - t2,
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
        return ckpt.save_checkpoint(
            self.out / "checkpoints", self.step_idx, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, config=self.cfg.to_dict(), keep_last=self.cfg.keep_last,
            trainable_only=self.cfg.lora_rank > 0 and self.cfg.model is not None,
            extra={"nan_streak": self.nan_streak, "eval_accuracy_start": self.eval_start,
                   "wall_s": self.wall_before + time.perf_counter() - self._t_start},
        )  # fmt: skip

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
            return self._train(stop_after)
        finally:
            self.rundir.release()  # another Trainer (a resume in this process) may now take the directory

    def _train(self, stop_after):
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
        with bar, self._graceful_stop():
            while self.step_idx < end and not self.stop_requested:
                rec = self.step()
                if cfg.eval_every and (self.step_idx % cfg.eval_every == 0 or self.step_idx == cfg.steps):
                    rec["eval_accuracy"] = self.evaluate()
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
            export_model(self.model, self.tok, self.out / "final_model")
        summary = self.summary()
        write_json(self.out / "summary.json", summary)
        return summary

    def summary(self) -> dict:
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
        }

    def _graceful_stop(self):
        """While training: the first SIGINT/SIGTERM asks to stop after the current step, a second one
        raises KeyboardInterrupt at once. Only in the main thread (signal handlers live there)."""
        if threading.current_thread() is not threading.main_thread():
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def handlers():
            def on_signal(signum, frame):
                if self.stop_requested:
                    raise KeyboardInterrupt
                self.stop_requested = True
                log.warning("%s: stopping after step %d, with a checkpoint (again to stop at once)",
                            signal.Signals(signum).name, self.step_idx + 1)

            old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

        return handlers()
