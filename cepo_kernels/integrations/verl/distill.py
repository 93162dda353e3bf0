"""OPSD and SDPO inside verl (>= 0.9, < 0.10): `algorithm.adv_estimator=opsd` (or `sdpo`) with
`trainer.v1.trainer_mode=cepo` (docs/verl.md, "OPSD and SDPO").

The teacher is the policy itself reading a privileged context (step.distill.distill_contexts: OPSD the
reference solution, SDPO a successful peer of the same group, never the sample itself). verl 0.9.1's actor
loss sees per token only the sampled token's log-probs (its policy losses get old_log_prob, log_prob,
advantages, response_mask, rollout_is_weights), and its worker group's `compute_log_prob` returns only the
sampled tokens' log-probs; so what runs here is the sampled-token variant of the distillation,
`sampled_token_kl_loss`: L_t = w_t sg(logp_S - logp_T) logp_S, w_t = 1 (OPSD) or SDPO's importance weight
min(exp(sg(logp_S - logp_old)), sdpo_is_clip), token-mean over the rows with a teacher; SDPO optionally
blended with verl's own PPO loss, (1 - w) PPO + w distillation (distillation_weight).

    driver (the advantage stage of the CEPO trainer, after verl's GRPO estimator):
        distill_signal: contexts -> teacher rows as a verl batch -> compute_log_prob -> logp_T [B, R], mask
        -> TransferQueue fields `teacher_log_probs`, `distill_mask`
    actor (every rank, per micro-batch): distill_ppo_loss (installed with the worker group's `set_loss_fn`)
        -> verl's `ppo_loss` (entropy bonus, KL loss, metrics, global token normalisation unchanged)
        -> the registered policy loss `opsd` / `sdpo` (`core_algos.register_policy_loss`)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import NamedTuple

import torch

from cepo_kernels.integrations.verl.advantages import CEPOSettings, _pad_id, rollout_batch, teacher_batch
from cepo_kernels.ops.divergence import sampled_token_kl_loss
from cepo_kernels.step import ALGORITHMS, get_algorithm
from cepo_kernels.step.distill import distill_contexts

__all__ = ["DISTILL_ALGOS", "TEACHER_FIELDS", "TeacherSignal", "teacher_signal", "register_policy_losses",
           "distill_ppo_loss", "actor_loss_fn", "DistillSignal", "distill_signal", "check_distill_settings",
           "use_distill_loss_mode"]

DISTILL_ALGOS = tuple(name for name, a in ALGORITHMS.items() if a.distills)
TEACHER_FIELDS = ("teacher_log_probs", "distill_mask")  # the TransferQueue fields the driver writes
# options of algorithm.cepo for the full-vocabulary JSD, which verl 0.9.1's actor cannot run (docs/verl.md)
JSD_ONLY = ("distill_beta", "sdpo_topk")
TEACHERS = ("live", "initial")  # ema needs a second weight copy that verl's workers do not keep

_SIGNAL: contextvars.ContextVar = contextvars.ContextVar("cepo_verl_teacher_signal", default=None)


class TeacherSignal(NamedTuple):
    """One micro-batch's teacher signal, padded as verl's policy losses get their inputs.

    logp: [b, R] the teacher's log-probs of the sampled tokens; mask: [b, R] bool, the tokens with a
    teacher; is_clip: SDPO's importance-weight cap; weight: SDPO's share w of (1 - w) PPO + w distillation.
    """

    logp: torch.Tensor
    mask: torch.Tensor
    is_clip: float = 2.0
    weight: float = 1.0


@contextlib.contextmanager
def teacher_signal(signal: TeacherSignal):
    """The teacher signal the registered `opsd` / `sdpo` policy losses read (set by distill_ppo_loss)."""
    token = _SIGNAL.set(signal)
    try:
        yield
    finally:
        _SIGNAL.reset(token)


def _policy_loss(name: str):
    algo = get_algorithm(name)

    def loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
             rollout_is_weights=None):
        from verl.trainer.ppo import core_algos

        signal = _SIGNAL.get()
        if signal is None:
            raise ValueError(
                f"actor.policy_loss.loss_mode={name}: needs the teacher log-probs of the CEPO trainer; set "
                f"algorithm.adv_estimator={name}, trainer.v1.trainer_mode=cepo and "
                "VERL_USE_EXTERNAL_MODULES=cepo_kernels.integrations.verl.trainer")
        if signal.logp.shape != log_prob.shape or signal.mask.shape != log_prob.shape:
            raise ValueError(f"teacher signal: expected [b, R] = {tuple(log_prob.shape)} as log_prob, got "
                             f"logp {tuple(signal.logp.shape)}, mask {tuple(signal.mask.shape)}")
        peer = algo.context == "peer"
        mask = response_mask.bool() & signal.mask.bool()
        kw = dict(old_logp=old_log_prob, is_clip=signal.is_clip) if peer else {}
        out = sampled_token_kl_loss(log_prob, signal.logp, mask, reduction="none", **kw)
        info = dict(getattr(config, "global_batch_info", None) or {})
        distill = core_algos.agg_loss(loss_mat=out.loss, loss_mask=mask, loss_agg_mode=loss_agg_mode, **info)
        metrics = {f"distill/{k}": float(v) for k, v in out.metrics.items()}
        w = signal.weight if peer else 1.0
        if w >= 1.0:
            return distill, metrics
        pg, pg_metrics = core_algos.compute_policy_loss_vanilla(
            old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages, response_mask=response_mask,
            loss_agg_mode=loss_agg_mode, config=config, rollout_is_weights=rollout_is_weights)
        return (1.0 - w) * pg + w * distill, {**pg_metrics, **metrics}

    loss.__name__ = f"compute_policy_loss_{name}"
    loss.__doc__ = (f"verl policy loss `{name}` (registered): the sampled-token distillation of "
                    "cepo_kernels.sampled_token_kl_loss on the tokens with a teacher (module docstring).")
    return loss


_REGISTERED: dict = {}


def register_policy_losses() -> None:
    """Registers `opsd` and `sdpo` in verl's policy-loss registry once (idempotent)."""
    from verl.trainer.ppo import core_algos

    for name in DISTILL_ALGOS:
        fn = _REGISTERED.setdefault(name, _policy_loss(name))
        if core_algos.POLICY_LOSS_REGISTRY.get(name) is not fn:
            core_algos.register_policy_loss(name)(fn)


def distill_ppo_loss(config, model_output, data, dp_group=None, *, is_clip: float = 2.0, weight: float = 1.0):
    """The actor's loss function (verl's `ppo_loss` signature, run per micro-batch on every rank): the
    micro-batch's `teacher_log_probs` and `distill_mask` (padded as verl pads `advantages`) as the teacher
    signal, then verl's own `ppo_loss`, whose policy loss (`actor.policy_loss.loss_mode=opsd|sdpo`) reads
    it."""
    from verl.workers.utils.losses import ppo_loss

    missing = [k for k in TEACHER_FIELDS if k not in data.keys()]
    if missing:
        raise KeyError(f"data: expected the teacher fields {missing} (written by the CEPO trainer's "
                       "advantage stage for opsd / sdpo)")
    fields = data.select(*TEACHER_FIELDS).to_padded_tensor()
    signal = TeacherSignal(fields["teacher_log_probs"].float(), fields["distill_mask"].bool(), is_clip,
                           weight)
    with teacher_signal(signal):
        return ppo_loss(config, model_output, data, dp_group)


def actor_loss_fn(actor_config, settings: CEPOSettings):
    """The loss function the CEPO trainer installs on the actor worker group (`set_loss_fn`, as verl's own
    trainer does for the critic): distill_ppo_loss with verl's ActorConfig and the SDPO options."""
    return functools.partial(distill_ppo_loss, config=actor_config, is_clip=settings.sdpo_is_clip,
                             weight=settings.distillation_weight)


class DistillSignal(NamedTuple):
    """The driver's result: teacher_logp [B, R] fp32 (0 where no teacher), mask [B, R] bool (the response
    tokens of the rows with a teacher), rows (the rows with a teacher) and the stage's metrics."""

    teacher_logp: torch.Tensor
    mask: torch.Tensor
    rows: list[int]
    metrics: dict[str, float]


def _question_and_system(raw_prompts, n: int, template: str):
    """Each row's question (the last user message of verl's `raw_prompt`) and the batch's system message."""
    if "{question}" not in template:
        return None, None
    if raw_prompts is None:
        raise KeyError("data: expected non_tensor_batch['raw_prompt'] (verl's chat messages) for a teacher "
                       "template with {question}")
    questions, systems = [], set()
    for i in range(n):
        messages = list(raw_prompts[i])
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise ValueError(f"data: raw_prompt[{i}]: expected a user message with text content, got "
                             f"{messages!r}")
        questions.append(users[-1])
        systems.add(next((m["content"] for m in messages if m.get("role") == "system"), None))
    if len(systems) > 1:
        raise ValueError(f"data: expected one system message for the whole batch, got "
                         f"{sorted(map(str, systems))}")
    return questions, systems.pop()


@torch.no_grad()
def distill_signal(data, tokenizer, scorer, settings: CEPOSettings, algo: str) -> DistillSignal:
    """The teacher's log-probs of every sampled token of `data` (verl's DataProto after its advantage stage).

    The batch as a RolloutBatch (`rollout_batch`, the questions from `raw_prompt` when the template reads
    {question}), the contexts of `step.distill.distill_contexts` (OPSD: every row with a token; SDPO: the rows
    with a successful peer), then one verl batch of the teacher rows (`teacher_batch`) through `scorer`
    (`worker_group_scorer`: no gradient, the rollout temperature)."""
    if algo not in DISTILL_ALGOS:
        raise ValueError(f"algo: expected one of {DISTILL_ALGOS}, got {algo!r}")
    options = dataclasses.replace(settings, algo=algo)
    batch = rollout_batch(data, tokenizer, settings, algo)
    template = options.opsd_template if options.algorithm.context == "reference" else options.sdpo_template
    questions, system = _question_and_system(data.non_tensor_batch.get("raw_prompt"), len(data), template)
    batch = dataclasses.replace(batch, questions=questions, system_prompt=system)
    ctx = distill_contexts(batch, options, tokenizer)
    mask = batch.mask
    teacher = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    keep = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    if ctx.rows:
        responses = [batch.responses[r] for r in ctx.rows]
        logp = scorer(teacher_batch(ctx.prefixes, responses, _pad_id(tokenizer), mask.shape[1], mask.device))
        rows = torch.tensor(ctx.rows, device=mask.device)
        teacher[rows] = logp.to(mask.device).float()
        keep[rows] = True
    valid = int(mask.any(dim=1).sum())
    metrics = {"distill/teacher_rows": float(len(ctx.rows)),
               "distill/rows_without_teacher": float(valid - len(ctx.rows))}
    dmask = mask & keep[:, None]
    teacher = torch.where(dmask, teacher, torch.zeros_like(teacher))
    return DistillSignal(teacher, dmask, list(ctx.rows), metrics)


def check_distill_settings(algorithm, settings: CEPOSettings) -> None:
    """What verl's front end cannot run, refused before any work: an EMA teacher (a second weight copy verl's
    workers do not keep) and the options of the full-vocabulary JSD (docs/verl.md)."""
    getter = getattr(algorithm, "get", None)
    raw = (getter("cepo", None) if getter is not None else getattr(algorithm, "cepo", None)) or {}
    given = sorted(k for k in JSD_ONLY if k in raw)
    if given:
        raise ValueError(f"algorithm.cepo.{given[0]}: not used in verl, which runs the sampled-token "
                         "distillation (sampled_token_kl_loss), not the full-vocabulary JSD (docs/verl.md)")
    if settings.distill_teacher not in TEACHERS:
        raise ValueError(f"algorithm.cepo.distill_teacher: expected one of {TEACHERS} in verl, got "
                         f"{settings.distill_teacher!r}")


def use_distill_loss_mode(config) -> None:
    """Sets `actor_rollout_ref.actor.policy_loss.loss_mode` to the algorithm (opsd / sdpo) when it is verl's
    default (`vanilla`); another loss mode is refused naming both keys."""
    from omegaconf import open_dict

    algo = str(getattr(config.algorithm.adv_estimator, "value", config.algorithm.adv_estimator))
    if algo not in DISTILL_ALGOS:
        return
    policy_loss = config.actor_rollout_ref.actor.policy_loss
    mode = policy_loss.get("loss_mode", "vanilla")
    if mode not in ("vanilla", algo):
        raise ValueError(f"actor_rollout_ref.actor.policy_loss.loss_mode: expected {algo!r} (or vanilla) "
                         f"with algorithm.adv_estimator={algo}, got {mode!r}")
    with open_dict(policy_loss):
        policy_loss.loss_mode = algo


class _RefScorerGroup:
    """A worker group whose `compute_log_prob` is the reference policy's (the initial weights): the
    reference worker group's `compute_ref_log_prob`, or the actor's with its LoRA adapter disabled (verl's
    ref-in-actor)."""

    def __init__(self, worker_group, in_actor: bool):
        self.worker_group, self.in_actor = worker_group, in_actor
        self.world_size = getattr(worker_group, "world_size", 1)

    def compute_log_prob(self, td):
        if self.in_actor:
            from verl.utils import tensordict_utils as tu

            tu.assign_non_tensor(td, no_lora_adapter=True)
            return self.worker_group.compute_log_prob(td)
        return self.worker_group.compute_ref_log_prob(td)


def teacher_worker_group(trainer, settings: CEPOSettings):
    """The worker group that scores the teacher contexts, and the config section of its micro-batch size:
    `live` the actor (the weights that sampled this batch), `initial` verl's reference policy."""
    cfg = trainer.config.actor_rollout_ref
    if settings.distill_teacher == "live":
        return trainer.actor_rollout_wg, cfg.rollout
    ref = getattr(trainer, "ref_policy_wg", None)
    if ref is None or not getattr(trainer, "use_reference_policy", True):
        raise ValueError("algorithm.cepo.distill_teacher=initial: needs verl's reference policy "
                         "(actor_rollout_ref.actor.use_kl_loss=true or algorithm.use_kl_in_reward=true) or a "
                         "LoRA actor")
    in_actor = bool(getattr(trainer, "ref_in_actor", False))
    return _RefScorerGroup(ref, in_actor), (cfg.rollout if in_actor else cfg.ref)


def distill_stage(trainer, batch, keys: list[str], metrics: dict, algo: str, settings: CEPOSettings):
    """The CEPO trainer's advantage stage for opsd / sdpo, after verl's estimator: the rows `keys` (verl's
    padding rows excluded) read back from TransferQueue, `distill_signal` scored by the teacher's worker
    group, and `teacher_log_probs` / `distill_mask` written for every row of the batch (padding rows: no
    teacher); returns TransferQueue's meta of the batch, which lists the new fields."""
    import transfer_queue as tq
    from tensordict import TensorDict
    from verl.workers.utils.padding import response_to_nested

    from cepo_kernels.integrations.verl.advantages import worker_group_scorer
    from cepo_kernels.integrations.verl.trainer import _log_prob_micro_batch

    data, response_mask = trainer._driver_batch(keys, batch.partition_id, extra=("raw_prompt",))
    group, section = teacher_worker_group(trainer, settings)
    scorer = worker_group_scorer(group, trainer.config.actor_rollout_ref.rollout.temperature,
                                 _log_prob_micro_batch(section))
    signal = distill_signal(data, trainer.tokenizer, scorer, settings, algo)
    metrics.update(signal.metrics)
    # one write for every row of the batch, so that the returned meta lists the fields for the actor update
    mask = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                           select_fields=["response_mask"])["response_mask"]
    width = int(mask.offsets().diff().max())
    out = {f: torch.zeros(len(batch.keys), width) for f in TEACHER_FIELDS}
    at = {k: i for i, k in enumerate(batch.keys)}
    where = torch.tensor([at[k] for k in keys])
    R = signal.mask.shape[1]
    out["teacher_log_probs"][where, :R] = signal.teacher_logp
    out["distill_mask"][where, :R] = signal.mask.float()
    fields = TensorDict({f: response_to_nested(v, mask) for f, v in out.items()}, batch_size=len(batch.keys))
    return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
