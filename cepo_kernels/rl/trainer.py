"""The RLVR loop: rollouts -> rewards -> group advantages -> old and teacher log-probs -> PPO-clip updates.

One `Trainer.step` is one rollout batch (prompts_per_step x group_size responses) followed by one
optimizer update per mini-batch (x ppo_epochs); lambda and the learning rate are functions of the step.
"""

from __future__ import annotations

import json
import logging
import math
import random
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
    response_hidden,
    trainable_parameters,
)
from cepo_kernels.rl.reward import (
    answers_match,
    extract_boxed,
    load_reward_fn,
    safe_rewards,
    with_format_bonus,
)
from cepo_kernels.rl.rollout import generate
from cepo_kernels.rl.sft import supervised_warmup
from cepo_kernels.rl.task import encode, load_problems, render_prompt
from cepo_kernels.rl.teacher import pack, plan_teachers

log = logging.getLogger("cepo_kernels.rl")
LOSS_METRICS = ("clip_frac", "adv_abs_mean", "adv_hat_abs_mean", "approx_kl", "ratio_mean")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NaNLossError(RuntimeError):
    pass


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
        if cfg.format_bonus > 0:  # issue 12: the authors' 0.9 x accuracy + 0.1 x format
            self.reward_fn = with_format_bonus(self.reward_fn, cfg.format_bonus, self.extract)
        self.model, self.tok = load_model_and_tokenizer(cfg, self.device, self.dtype)
        self.eos_ids = self._eos_ids()
        self.resume_from = ckpt.resolve_checkpoint(cfg.resume) if cfg.resume else None
        self.out = Path(
            cfg.out_dir
            or (
                self.resume_from.parent.parent
                if self.resume_from
                else Path("runs") / f"{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
            )
        )
        self.out.mkdir(parents=True, exist_ok=True)
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
        if self.resume_from is not None:
            state = ckpt.load_checkpoint(
                self.resume_from, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
            )
            self.step_idx, self.nan_streak = state["step"], state.get("nan_streak", 0)
            ckpt.set_rng_state(ckpt.load_rng(self.resume_from))
        self._truncate_metrics(self.step_idx)

    def _eos_ids(self) -> list[int]:
        ids = {self.tok.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return sorted(i for i in ids if i is not None)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _truncate_metrics(self, step: int):
        """Drops metric lines past the resumed step (written after the checkpoint, before a crash)."""
        if self.metrics_path.is_file():
            keep = [
                ln
                for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= step
            ]
            self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

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
            return float("nan")
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

    def _micro(self, n: int):
        return [
            slice(i, min(i + self.cfg.micro_batch_size, n)) for i in range(0, n, self.cfg.micro_batch_size)
        ]

    @torch.no_grad()
    def _old_logprobs(self, packed, weight, bias):
        """Old log-probs [B, R] and entropy [B, R] of every response under the current (rollout) weights."""
        logps, ents = [], []
        for sl in self._micro(packed.targets.shape[0]):
            rows = torch.arange(sl.start, sl.stop, device=self.device)
            h = response_hidden(self.model, packed, rows)
            lp, ent = linear_logprobs(
                h,
                weight,
                packed.targets[sl],
                bias=bias,
                temperature=self.cfg.temperature,
                return_entropy=True,
            )
            logps.append(lp.float())
            ents.append(ent.float())
        return torch.cat(logps), torch.cat(ents)

    @torch.no_grad()
    def _teacher_logprobs(self, plan, responses, old_logp, weight, bias):
        """pos_logp, neg_logp [B, R]; rows skipped by the plan (A = 0) keep pos = neg = old (Delta = 0)."""
        pos, neg = old_logp.clone(), old_logp.clone()
        if not plan.rows:
            return pos, neg
        R = old_logp.shape[1]
        resp = [responses[i] for i in plan.rows]
        pos_packed = pack(plan.pos_prefixes, resp, self.tok.pad_token_id, self.device, resp_len=R)
        neg_packed = pack(plan.neg_prefixes, resp, self.tok.pad_token_id, self.device, resp_len=R)
        for sl in self._micro(len(plan.rows)):
            rows = torch.arange(sl.start, sl.stop, device=self.device)
            dst = torch.tensor(plan.rows[sl], device=self.device)
            h_pos = response_hidden(self.model, pos_packed, rows)
            targets = pos_packed.targets[sl]
            if self.cfg.algo == "cepo":
                h_neg = response_hidden(self.model, neg_packed, rows)
                p, n = linear_teacher_logprobs(
                    h_pos, h_neg, weight, targets, bias=bias, temperature=self.cfg.temperature
                )
                neg[dst] = n.float()
            else:  # rlsd: the negative teacher is the old student
                p = linear_logprobs(h_pos, weight, targets, bias=bias, temperature=self.cfg.temperature)
            pos[dst] = p.float()
        return pos, neg

    def _update(self, packed, adv, old_logp, pos_logp, neg_logp, lam):
        """PPO updates over mini-batches (whole groups) with gradient accumulation over micro-batches."""
        cfg, G = self.cfg, self.cfg.group_size
        B = adv.shape[0]
        mini = min(cfg.mini_batch_prompts or cfg.prompts_per_step, cfg.prompts_per_step) * G
        weight, bias = lm_head(self.model)
        teachers = {} if cfg.algo == "grpo" else {"pos_logp": pos_logp, "neg_logp": neg_logp}
        clip_dual = cfg.clip_dual if cfg.clip_dual > 0 else None
        opts = dict(bias=bias, lam=lam, eps_w=cfg.eps_w, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                    clip_dual=clip_dual, temperature=cfg.temperature, reduction=cfg.reduction)
        sums, tokens, losses, grad_norms, n_nan = {}, 0.0, [], [], 0
        seq_tokens = np.asarray(packed.mask.sum(dim=1).tolist(), dtype=np.float64)  # [B], one sync per step
        self.model.train()
        for _ in range(cfg.ppo_epochs):
            for lo in range(0, B, mini):
                hi = min(lo + mini, B)
                num_tokens = packed.mask[lo:hi].sum()
                self.optimizer.zero_grad(set_to_none=True)
                loss_total, bad = 0.0, False
                for sl in self._micro(hi - lo):
                    sl = slice(lo + sl.start, lo + sl.stop)
                    rows = torch.arange(sl.start, sl.stop, device=self.device)
                    h = response_hidden(self.model, packed, rows)
                    out = linear_cepo_loss(
                        h, weight, packed.targets[sl], adv[sl], packed.mask[sl], old_logp=old_logp[sl],
                        num_tokens=num_tokens if cfg.reduction == "token-mean" else None,
                        **opts, **{k: v[sl] for k, v in teachers.items()},
                    )  # fmt: skip
                    loss_value = float(out.loss.detach())  # the one host sync of the micro-batch
                    if not math.isfinite(loss_value):
                        bad = True
                        break
                    out.loss.backward()
                    loss_total += loss_value
                    n_tok = seq_tokens[sl.start:sl.stop].sum()
                    tokens += n_tok
                    for k in LOSS_METRICS:
                        sums[k] = sums.get(k, 0.0) + n_tok * float(out.metrics.get(k, 0.0))
                grad_norm = None
                if not bad:
                    grad_norm = float(
                        torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), cfg.max_grad_norm)
                    )
                    bad = not math.isfinite(grad_norm)
                if bad:
                    n_nan += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.optimizer.step()
                losses.append(loss_total)
                grad_norms.append(grad_norm)
        metrics = {k: v / max(tokens, 1.0) for k, v in sums.items()}
        metrics.update(
            loss=float(np.mean(losses)) if losses else None,  # None: every update was skipped
            grad_norm=float(np.mean(grad_norms)) if grad_norms else None,
            nan_updates=n_nan,
        )
        return metrics

    def step(self) -> dict:
        """One rollout batch and its updates; returns the metrics record (also appended to metrics.jsonl)."""
        cfg, s, G = self.cfg, self.step_idx, self.cfg.group_size
        lam = lam_at(s, cfg.lam0, cfg.t_warm) if cfg.algo != "grpo" else 0.0
        t0 = time.perf_counter()
        problems = self.batch_problems(s)
        prompts = [self.prompt_ids(p) for p in problems]
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
        texts = self.tok.batch_decode(responses, skip_special_tokens=True)
        refs = [p.answer for p in problems]
        rewards, reward_errors = safe_rewards(self.reward_fn, texts, [r for r in refs for _ in range(G)])
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float32), G, scale=cfg.adv_scale)
        adv = adv.to(self.device)
        t1 = time.perf_counter()

        packed = pack([p for p in prompts for _ in range(G)], responses, self.tok.pad_token_id, self.device)
        weight, bias = lm_head(self.model)
        self.model.eval()
        old_logp, entropy = self._old_logprobs(packed, weight, bias)
        plan = None
        pos_logp = neg_logp = old_logp
        if cfg.algo != "grpo":
            questions = [self.question(p) for p in problems]
            plan = plan_teachers(self.tok, questions, prompts, refs, texts, rewards, adv, G,
                                 cfg.teacher_template, cfg.system_prompt, self.extract)
            pos_logp, neg_logp = self._teacher_logprobs(plan, responses, old_logp, weight, bias)
        t2 = time.perf_counter()
        # issue 12: credit maps (cepo-viz), before the update changes the weights
        save_credit(self, step=s + 1, problems=problems, responses=responses, texts=texts, rewards=rewards,
                    adv=adv, pos_logp=pos_logp, neg_logp=neg_logp, mask=packed.mask, lam=lam, plan=plan)

        upd = self._update(packed, adv, old_logp, pos_logp, neg_logp, lam)
        with warnings.catch_warnings():  # when every update was skipped (NaN), the schedule still advances
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        t3 = time.perf_counter()

        mask = packed.mask
        n_tok = float(mask.sum())
        rec = {
            "step": s + 1,
            "lambda": lam,
            "lr": self.optimizer.param_groups[0]["lr"],
            "reward_mean": float(np.mean(rewards)),
            "accuracy": float(np.mean([r >= 0.5 for r in rewards])),
            "reward_errors": reward_errors,
            **delta_stats(pos_logp - neg_logp, adv, mask),
            "entropy": float(entropy[mask].mean()) if n_tok else 0.0,
            "response_len_mean": n_tok / mask.shape[0],
            "teacher_rows": len(plan.rows) if plan else 0,
            "r_minus_fallbacks": plan.neg_how.count("fallback") if plan else 0,
            **upd,
            "tokens_per_s": n_tok / max(t3 - t0, 1e-9),
            "peak_mem_mb": peak_memory_mb(self.device),
            "time_rollout": t1 - t0,
            "time_teachers": t2 - t1,
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
            extra={"nan_streak": self.nan_streak},
        )  # fmt: skip

    def train(self, stop_after: int | None = None) -> dict:
        """Runs the remaining steps (or stop_after of them), then writes the final checkpoint, the exported
        model (final_model/, when all steps are done) and summary.json. Returns the summary."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step_idx + stop_after)
        t_start = time.perf_counter()
        eval_start = self.evaluate() if self.step_idx == 0 and cfg.eval_every else None
        first = last = None
        bar = tqdm(total=cfg.steps, initial=self.step_idx, disable=not cfg.progress,
                   desc=f"cepo-train {cfg.algo}", dynamic_ncols=True)
        with bar:
            while self.step_idx < end:
                rec = self.step()
                if cfg.eval_every and (self.step_idx % cfg.eval_every == 0 or self.step_idx == cfg.steps):
                    rec["eval_accuracy"] = self.evaluate()
                with self.metrics_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                first, last = first or rec, rec
                bar.set_postfix(
                    reward=f"{rec['reward_mean']:.3f}",
                    lam=f"{rec['lambda']:.3f}",
                    **({"eval": f"{rec['eval_accuracy']:.3f}"} if "eval_accuracy" in rec else {}),
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
        summary = {"out_dir": str(self.out), "steps_done": self.step_idx,
                   "wall_s": time.perf_counter() - t_start, "eval_accuracy_start": eval_start,
                   "eval_accuracy_end": last.get("eval_accuracy") if last else None,
                   "reward_first": first["reward_mean"] if first else None,
                   "reward_last": last["reward_mean"] if last else None}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
