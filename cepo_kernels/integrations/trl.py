"""CEPO inside Hugging Face TRL: `CEPOConfig(GRPOConfig)` and `CEPOTrainer(GRPOTrainer)`.

Switching a GRPOTrainer script to CEPO: replace `GRPOTrainer` by `CEPOTrainer`, `GRPOConfig` by `CEPOConfig`
(the same options, plus lam0, t_warm, eps_w, teacher_template, answer_column), and give the dataset a column
`answer` (or `answer_column=...`) holding the reference answer of each prompt.

What changes against GRPO, after TRL has generated and scored a batch (docs/method.md; the phases are those of
`cepo_kernels.step`, the same ones cepo-train calls):
1. r- of every group is chosen from the rewards and completions gathered over all processes
   (`step.choose_negatives`): every rank makes the same choices.
2. For the local rows with a non-zero advantage, and only while lambda > 0, both teachers run without gradient
   on [prompt | template(answer) | completion] (positions renumbered over the non-pad tokens), through the
   same fused log-prob head and temperature TRL uses for the policy.
3. The (B, T) advantages `step.token_advantages(A, pos_logp, neg_logp, mask, lam, eps_w)` replace TRL's (B,)
   ones;
   TRL's loss (every `loss_type`) accepts per-token advantages. lambda = max(0, lam0 (1 - step / t_warm)) with
   step = the trainer's `state.global_step` when the batch was generated.
4. `cepo/lambda`, `cepo/teacher_rows`, `cepo/r_minus_fallbacks` and the Delta statistics of
   `step.evidence_stats` (`cepo/delta_mean`, `cepo/delta_std`, `cepo/delta_mean_pos`, `cepo/delta_mean_neg`,
   `cepo/frac_wrong_dir`, over all processes' tokens with A != 0) go into TRL's metrics.

Supported TRL: >= 1.16, < 1.17 (the hooks used are GRPOTrainer's `_calculate_rewards` and
`_generate_and_score_completions`, which are not a public API). CEPO_TRL_ALLOW_ANY_VERSION=1 tries another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

TRL_MIN, TRL_BELOW = "1.16", "1.17"


def check_trl_version():
    """ImportError with the supported range when TRL is missing or outside it (checked at import)."""
    try:
        import trl
    except ImportError as e:
        raise ImportError(
            "cepo_kernels.integrations.trl needs TRL (>= 1.16, < 1.17): pip install 'cepo_kernels[trl]'"
        ) from e
    from packaging.version import Version

    v = Version(trl.__version__)
    if not Version(TRL_MIN) <= Version(v.base_version) < Version(TRL_BELOW) and os.environ.get(
        "CEPO_TRL_ALLOW_ANY_VERSION"
    ) != "1":
        raise ImportError(
            f"cepo_kernels.integrations.trl supports TRL >= {TRL_MIN}, < {TRL_BELOW}; "
            f"found trl {trl.__version__}. Install a supported version "
            f"(pip install 'trl>={TRL_MIN},<{TRL_BELOW}') or set CEPO_TRL_ALLOW_ANY_VERSION=1 to try it"
            " anyway (CEPOTrainer overrides private GRPOTrainer methods)."
        )


check_trl_version()

from accelerate.utils import gather_object  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402

from cepo_kernels import linear_logprobs, linear_teacher_logprobs  # noqa: E402
from cepo_kernels._params import check_number  # noqa: E402
from cepo_kernels.step import (  # noqa: E402
    choose_negatives,
    evidence_stats,
    extract_boxed,
    lam_at,
    pack,
    teacher_contexts,
    teacher_rows,
    token_advantages,
)

__all__ = ["CEPOConfig", "CEPOTrainer", "check_trl_version"]


@dataclass
class CEPOConfig(GRPOConfig):
    """GRPOConfig plus the CEPO options (docs/method.md). Every GRPOConfig option keeps its meaning.

    lam0, t_warm: lambda(step) = max(0, lam0 * (1 - step / t_warm)), step = trainer.state.global_step
        (0-based) when the batch is generated.
    eps_w: clip of the token weight exp(sign(A) Delta) to [1 - eps_w, 1 + eps_w].
    teacher_template: inserted between the prompt and the completion in the teachers' context, "{answer}"
        replaced by r+ (positive teacher) or r- (negative teacher); tokenised without special tokens.
    answer_column: the dataset column with each prompt's reference answer (r+).
    teacher_batch_size: sequences per teacher forward (both teachers' rows together); None = 2 x
        per_device_train_batch_size.
    cepo_kernel_logprobs: compute the per-token log-probs and entropies (policy with gradient, old policy and
        both teachers without) with `linear_logprobs` / `linear_teacher_logprobs` from the decoder's last
        hidden states and the lm_head weight, logits never materialised, instead of TRL's chunked LM head.
        TRL's loss (every loss_type, KL, entropy terms) is applied to them unchanged. For text-only causal LMs
        whose logits are lm_head(last hidden state) (no soft-capping or scaling), with a plain nn.Linear head
        (no adapter on it, not sharded by FSDP / ZeRO-3). A reference model (beta > 0) keeps TRL's head.
    """

    lam0: float = field(default=0.5, metadata={"help": "CEPO: initial lambda, in [0, 1]."})
    t_warm: int = field(default=25, metadata={"help": "CEPO: steps over which lambda decays linearly to 0."})
    eps_w: float = field(default=0.2, metadata={"help": "CEPO: token weight clip, in [0, 1)."})
    teacher_template: str = field(
        default=" {answer}",
        metadata={"help": "CEPO: inserted after the prompt in the teachers' context; {answer} = r+ or r-."},
    )
    answer_column: str = field(
        default="answer", metadata={"help": "CEPO: dataset column with the reference answer of each prompt."}
    )
    teacher_batch_size: int | None = field(
        default=None, metadata={"help": "CEPO: sequences per teacher forward (default 2 x per-device batch)."}
    )
    cepo_kernel_logprobs: bool = field(
        default=False,
        metadata={"help": "CEPO: per-token log-probs (policy, old policy, teachers) from cepo_kernels' fused "
                          "linear kernels instead of TRL's chunked LM head; TRL's loss is unchanged."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_number("lam0", self.lam0, lo=0.0, hi=1.0)
        check_number("eps_w", self.eps_w, lo=0.0, hi=1.0, hi_open=True)
        if isinstance(self.t_warm, bool) or not isinstance(self.t_warm, int) or self.t_warm < 0:
            raise ValueError(f"t_warm: expected an int >= 0, got {self.t_warm!r}")
        if not isinstance(self.teacher_template, str) or "{answer}" not in self.teacher_template:
            raise ValueError(
                f"teacher_template: expected a string containing {{answer}}, got {self.teacher_template!r}"
            )
        if not isinstance(self.cepo_kernel_logprobs, bool):
            raise TypeError(f"cepo_kernel_logprobs: expected a bool, got {self.cepo_kernel_logprobs!r}")
        if "{question}" in self.teacher_template:
            raise ValueError(
                "teacher_template: {question} templates are not supported by CEPOTrainer (TRL renders the "
                "prompt); use one inserted after the prompt, e.g. ' {answer}'; "
                f"got {self.teacher_template!r}"
            )
        if not isinstance(self.answer_column, str) or not self.answer_column:
            raise ValueError(f"answer_column: expected a non-empty column name, got {self.answer_column!r}")
        if self.teacher_batch_size is not None and (
            isinstance(self.teacher_batch_size, bool)
            or not isinstance(self.teacher_batch_size, int)
            or self.teacher_batch_size < 1
        ):
            raise ValueError(
                f"teacher_batch_size: expected None or an int >= 1, got {self.teacher_batch_size!r}"
            )


def _completion_text(completion) -> str:
    """The text of a TRL completion: a string, or a conversational list of messages (contents joined)."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, list):  # typed content blocks
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        parts.append(content if isinstance(content, str) else "")
    return "".join(parts)


class CEPOTrainer(GRPOTrainer):
    """GRPOTrainer with CEPO's per-token advantages (see the module docstring). Same arguments as GRPOTrainer,
    with `args` a CEPOConfig, plus `answer_extractor`: the function giving a rejected completion's answer
    (default: the content of its last \\boxed{...}, as cepo-train).

    After each generation, `self.cepo_last` holds what was decided for that batch: step, lam, the r- of every
    group of the gathered batch (`neg_answers`, `neg_how`, `neg_index`), the teacher rows (local, global) and
    the number of teacher forwards this process ran. `cepo_observer(record, tensors)`, when given, is called
    with it and the batch's tensors (`advantages` [B] as TRL computed them, `a_hat` [B, T], `mask`, `rows`,
    `pos_logp`, `neg_logp` [B, T]) after every generation.
    """

    def __init__(self, *args, answer_extractor=None, cepo_observer=None, **kwargs):
        super().__init__(*args, **kwargs)
        if cepo_observer is not None and not callable(cepo_observer):
            raise TypeError(f"cepo_observer: expected a callable or None, got {type(cepo_observer).__name__}")
        self.cepo_observer = cepo_observer
        if not isinstance(self.args, CEPOConfig):
            raise TypeError(f"args: expected a CEPOConfig, got {type(self.args).__name__}")
        if answer_extractor is not None and not callable(answer_extractor):
            raise TypeError(
                f"answer_extractor: expected a callable or None, got {type(answer_extractor).__name__}"
            )
        self.answer_extractor = answer_extractor or extract_boxed
        column = self.args.answer_column
        for split, ds in (("train_dataset", self.train_dataset),):
            names = getattr(ds, "column_names", None)
            if isinstance(names, list) and column not in names:
                raise ValueError(
                    f"{split}: expected a column {column!r} (CEPOConfig.answer_column) with the reference "
                    f"answers, got columns {names}"
                )
        self._cepo_scored = None
        self.cepo_last: dict | None = None
        if self.args.cepo_kernel_logprobs:
            self._cepo_head()  # fail at construction, not mid-training, on a model the kernels cannot serve

    def cepo_lambda(self, step: int | None = None) -> float:
        """lambda at a 0-based step (default: the trainer's current global step)."""
        step = self.state.global_step if step is None else step
        return lam_at(step, self.args.lam0, self.args.t_warm)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._cepo_scored = (inputs, completions, rewards_per_func)  # rewards gathered over all processes
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._cepo_scored = None
        output = super()._generate_and_score_completions(inputs)
        scored, self._cepo_scored = self._cepo_scored, None
        if scored is None:
            raise RuntimeError("CEPOTrainer: the batch's rewards were not seen (has GRPOTrainer changed?)")
        output["advantages"] = self._cepo_advantages(output, *scored)
        return output

    @torch.no_grad()
    def _cepo_advantages(self, output, inputs, completions, rewards_per_func):
        """A_hat [B, T] of this process's rows: r- from the gathered batch, both teachers on the local rows
        with A != 0 (while lambda > 0), then step.token_advantages."""
        mode = "train" if self.model.training else "eval"
        args = self.args
        adv = output["advantages"].float()  # [B] this process's rows
        mask = output["completion_mask"].bool()
        if "tool_mask" in output:
            mask = mask & output["tool_mask"].bool()
        step = self.state.global_step
        lam = self.cepo_lambda(step)
        G = self.num_generations if mode == "train" else self.num_generations_eval
        B, R = mask.shape
        pos_logp = torch.zeros(B, R, dtype=torch.float32, device=mask.device)
        neg_logp = torch.zeros_like(pos_logp)
        record = {"step": step, "lam": lam, "neg_answers": [], "neg_how": [], "neg_index": [],
                  "teacher_rows_local": 0, "teacher_rows": 0, "teacher_forwards": 0}
        rows = []
        if lam > 0.0:
            rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
            rewards = rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan")).tolist()
            if any(args.answer_column not in x for x in inputs):
                raise ValueError(f"answer_column: expected every example to have a column "
                                 f"{args.answer_column!r} (reference answers), got keys {sorted(inputs[0])}")
            texts = gather_object([_completion_text(c) for c in completions])
            references = gather_object([str(x[args.answer_column]) for x in inputs])
            if len(texts) != len(rewards) or len(texts) % G:
                raise RuntimeError(
                    f"CEPOTrainer: {len(texts)} gathered completions, {len(rewards)} rewards, group size {G}"
                )
            negatives = choose_negatives(texts, rewards, references[::G], G, self.answer_extractor)
            record.update(neg_answers=[n.answer for n in negatives], neg_how=[n.how for n in negatives],
                          neg_index=[n.index for n in negatives])
            rows = teacher_rows(adv, mask)
            counts = self.accelerator.gather(torch.tensor([len(rows)], device=mask.device))
            record["teacher_rows_local"] = len(rows)
            record["teacher_rows"] = int(counts.sum().item())
            if int(counts.max()) > 0:
                # every rank runs as many teacher forwards as the busiest one: sharded models (FSDP, ZeRO-3)
                # need all ranks in each forward
                chunk = self.args.teacher_batch_size or 2 * self.args.per_device_train_batch_size
                n_chunks = -(-2 * int(counts.max()) // chunk)
                offset = self.accelerator.process_index * B
                prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"].bool()
                ctx = teacher_contexts(
                    self._tokenizer, rows,
                    prompt_ids={i: prompt_ids[i][prompt_mask[i]].tolist() for i in rows},
                    pos_answers={i: references[offset + i] for i in rows},
                    neg_answers={i: negatives[(offset + i) // G].answer for i in rows},
                    template=args.teacher_template)
                pos, neg = self._cepo_teacher_logprobs(output, ctx, n_chunks)
                record["teacher_forwards"] = n_chunks
                if rows:
                    pos_logp[rows], neg_logp[rows] = pos, neg
        a_hat = token_advantages(adv, pos_logp, neg_logp, mask, lam=lam, eps_w=args.eps_w)
        self._cepo_log(mode, record, pos_logp - neg_logp, adv, mask)
        self.cepo_last = record
        if self.cepo_observer is not None:
            self.cepo_observer(dict(record), {"advantages": adv, "a_hat": a_hat, "mask": mask, "rows": rows,
                                              "pos_logp": pos_logp, "neg_logp": neg_logp})
        return a_hat

    def _cepo_teacher_logprobs(self, output, ctx, n_chunks):
        """Both teachers' log-probs [len(ctx.rows), R] of the completions of the local rows ctx.rows, in
        n_chunks forwards (extra ones run on a one-token input and are discarded, to keep in step with the
        other ranks)."""
        tok = self._tokenizer
        prompt_ids = output["prompt_ids"]
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        R = completion_ids.shape[1]
        lengths = completion_mask.sum(1)  # right-padded; rows TRL masked whole (truncated) are not in rows
        rows = ctx.rows
        prefixes = ctx.pos_prefixes + ctx.neg_prefixes
        responses = [completion_ids[i, : int(lengths[i])].tolist() for i in rows] * 2
        chunk = self.args.teacher_batch_size or 2 * self.args.per_device_train_batch_size
        kernels = self.args.cepo_kernel_logprobs
        out, targets, masks = [], [], []
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for s in range(0, n_chunks * chunk, chunk):
                if s >= len(prefixes):  # keep in step with the other ranks' forwards
                    with self.accelerator.autocast():
                        self.model(input_ids=prompt_ids[:1, -1:], use_cache=False)
                    continue
                packed = pack(prefixes[s : s + chunk], responses[s : s + chunk], tok.pad_token_id,
                              device=completion_ids.device, resp_len=R)
                if kernels:  # hidden states only; both teachers are scored together below
                    out.append(self._cepo_hidden(self.model, packed.input_ids, packed.attention_mask, R,
                                                 position_ids=packed.position_ids))
                    targets.append(packed.targets)
                    masks.append(packed.mask)
                    continue
                labels = packed.input_ids.masked_fill(packed.attention_mask == 0, -100)
                labels[:, : packed.start] = -100
                with self.accelerator.autocast():
                    res = self.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                     position_ids=packed.position_ids, labels=labels, fused_lm_head=True)
                out.append(res.log_probs[:, -R:].float())
        n = len(rows)
        if not n:
            return None, None
        if not kernels:
            logp = torch.cat(out, dim=0)
            return logp[:n], logp[n:]
        hidden, target, mask = torch.cat(out), torch.cat(targets), torch.cat(masks)
        weight, bias = self._cepo_head()
        hidden = hidden.to(weight.dtype)
        pos, neg = linear_teacher_logprobs(hidden[:n], hidden[n:], weight, target[:n], bias=bias,
                                           temperature=self.temperature, rows=mask[:n])
        return pos, neg

    # cepo_kernel_logprobs: the policy's log-probs from the fused linear kernel

    def _cepo_head(self):
        """The lm_head's weight and bias, checked to be what the kernels can use in place of TRL's head."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        cfg = model.config.get_text_config()
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling"):
            if getattr(cfg, name, None) not in (None, 1.0):
                raise ValueError(
                    f"cepo_kernel_logprobs: the model's logits are not lm_head(hidden) ({name}="
                    f"{getattr(cfg, name)!r}); set cepo_kernel_logprobs=False to use TRL's LM head"
                )
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"cepo_kernel_logprobs: expected the lm_head to be a torch.nn.Linear, got "
                             f"{type(head).__name__} (an adapter on it?); set cepo_kernel_logprobs=False")
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor") or getattr(weight, "ds_id", None) is not None or weight.dim() != 2:
            raise ValueError("cepo_kernel_logprobs: a sharded lm_head (FSDP / ZeRO-3) is not supported; "
                             "set cepo_kernel_logprobs=False")
        if self.args.cast_lm_head_to_fp32:
            weight, bias = weight.float(), None if bias is None else bias.float()
        return weight, bias

    def _cepo_hidden(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        """Last hidden states [B, logits_to_keep, H] that predict the last logits_to_keep tokens."""
        with self.accelerator.autocast():
            # logits_to_keep=1: the forward's own head runs on one position only; the kernels do the rest
            res = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                             logits_to_keep=1, use_cache=False, **kwargs)
        return res.hidden_states[-1][:, -logits_to_keep - 1 : -1]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **multimodal):
        if (not self.args.cepo_kernel_logprobs or compute_aux_loss or model is self.ref_model
                or any(v is not None for v in multimodal.values())):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        weight, bias = self._cepo_head()
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for s in range(0, input_ids.size(0), batch_size):
            ids, attn = input_ids[s : s + batch_size], attention_mask[s : s + batch_size]
            hidden = self._cepo_hidden(model, ids, attn, logits_to_keep).to(weight.dtype)
            lp, ent = linear_logprobs(hidden, weight, ids[:, -logits_to_keep:], bias=bias,
                                      temperature=self.temperature, return_entropy=True)
            valid = attn[:, -logits_to_keep:].bool()  # as TRL's head: 0 at padding
            logps.append(lp.masked_fill(~valid, 0.0))
            entropies.append(ent.masked_fill(~valid, 0.0))
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _cepo_log(self, mode, record, delta, adv, mask):
        metrics = self._metrics[mode]
        metrics["cepo/lambda"].append(record["lam"])
        metrics["cepo/teacher_rows"].append(float(record["teacher_rows"]))
        if record["lam"] <= 0.0:
            return
        metrics["cepo/r_minus_fallbacks"].append(float(sum(h == "fallback" for h in record["neg_how"])))
        if record["teacher_rows"] == 0:  # no evidence this batch: nothing to average
            return
        # gather every process's tokens, so the statistics are those of the whole batch
        pad = self.accelerator.pad_across_processes
        d = self.accelerator.gather(pad(delta.contiguous(), dim=1))
        m = self.accelerator.gather(pad(mask.to(torch.int32).contiguous(), dim=1)).bool()
        a = self.accelerator.gather(adv.contiguous())
        for name, value in evidence_stats(d, a, m).items():
            metrics[f"cepo/{name}"].append(value)
