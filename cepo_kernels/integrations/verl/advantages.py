"""The CEPO / RLSD advantage stage of one verl training batch, on verl's `DataProto`
(docs/method.md §1-4, §7).

verl's batch layout, which `step.pack` also produces: `prompts` [B, P] left-padded, `responses` [B, R]
right-padded, `input_ids` = [prompts | responses], `attention_mask`, `position_ids` (0.. over the non-pad
tokens), `response_mask` [B, R] (the tokens the loss sees), `advantages` [B, R] from verl's estimator, and
per row `uid` (the group) and `reward_model["ground_truth"]` (r+) in `non_tensor_batch`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch

from cepo_kernels._params import check_temperature
from cepo_kernels.integrations.verl import vision
from cepo_kernels.step import (
    ALGORITHMS,
    CEPOOptions,
    RolloutBatch,
    choose_negatives,
    extract_boxed,
    get_algorithm,
    pack,
    reweight,
)

__all__ = ["ALGOS", "CEPOSettings", "cepo_active", "sequence_advantage", "uid_groups", "negatives_by_uid",
           "teacher_batch", "rollout_batch", "dataproto_scorer", "worker_group_scorer", "cepo_reweight"]

ALGOS = tuple(name for name, a in ALGORITHMS.items() if a.weighted)  # verl runs its own GRPO
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("cepo_verl_active", default=False)


@contextlib.contextmanager
def cepo_active():
    """Marks the advantage stage of the CEPO trainer: the registered estimators run only inside it."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def is_active() -> bool:
    return _ACTIVE.get()


# options of CEPOOptions that algorithm.cepo does not take: the algorithm is algorithm.adv_estimator, and
# the chain-of-thought teacher needs the whole batch in one process (cepo-train's)
NOT_SETTABLE = {"algo", "cot_teacher", "cot_prefix_len", "cot_suffix"}


@dataclasses.dataclass(frozen=True)
class CEPOSettings(CEPOOptions):
    """`algorithm.cepo` of verl's configuration (every key optional): the CEPO options of
    step.options.CEPOOptions (lam0, t_warm, eps_w, teacher_template, r_minus, teacher_sees_image; checked
    there, named "algorithm.cepo.NAME" in messages), plus answer_key, the key of `reward_model`
    (non_tensor_batch) holding r+. lambda counts rollout batches (0-based). The algorithm comes from
    `algorithm.adv_estimator` (`cepo_reweight`'s algo), not from here.
    """

    where: ClassVar[str] = "algorithm.cepo."
    answer_key: str = "ground_truth"

    def __post_init__(self):
        super().__post_init__()
        if "{question}" in self.teacher_template:
            raise ValueError("algorithm.cepo.teacher_template: expected a string containing {answer} "
                             "(inserted after verl's rendered prompt; no {question}), got "
                             f"{self.teacher_template!r}")
        if not isinstance(self.answer_key, str) or not self.answer_key:
            raise ValueError(f"algorithm.cepo.answer_key: expected a non-empty key, got {self.answer_key!r}")

    @classmethod
    def from_config(cls, algorithm) -> CEPOSettings:
        """From verl's `algorithm` config (a DictConfig, dict or AlgoConfig): its `cepo` entry, if any."""
        getter = getattr(algorithm, "get", None)
        raw = getter("cepo", None) if getter is not None else getattr(algorithm, "cepo", None)
        if raw is None:
            return cls()
        if hasattr(raw, "items"):
            raw = dict(raw.items())
        else:
            raise TypeError(f"algorithm.cepo: expected a mapping of CEPO options, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - NOT_SETTABLE
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"algorithm.cepo: unknown option(s) {unknown}; expected some of {sorted(names)}")
        return cls(**raw)


def sequence_advantage(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A [B] from verl's outcome advantages [B, R] (constant along each response): the value at each row's
    first valid token, 0 for a row without one."""
    mask = response_mask.bool()
    first = mask.to(torch.int8).argmax(dim=1, keepdim=True)
    zero = torch.zeros_like(advantages[:, 0])
    return torch.where(mask.any(dim=1), advantages.gather(1, first).squeeze(1), zero)


def uid_groups(uids) -> list[list[int]]:
    """The rows of each group (rows sharing a uid), groups in order of first appearance."""
    groups: dict = {}
    for i, u in enumerate(uids):
        groups.setdefault(u, []).append(i)
    return list(groups.values())


def negatives_by_uid(texts, rewards, uids, references, extract=extract_boxed) -> dict:
    """r- of every group (`step.choose_negatives` on the rows sharing a uid, in batch order): uid -> Negative.
    A group is whole in verl's driver batch, whatever order and data-parallel split its rows have."""
    return {uids[idx[0]]: choose_negatives([texts[i] for i in idx], [rewards[i] for i in idx],
                                           [references[idx[0]]], len(idx), extract)[0]
            for idx in uid_groups(uids)}


def teacher_batch(prefixes: list[list[int]], responses: list[list[int]], pad_id: int, resp_len: int, device):
    """The teacher rows as a verl DataProto, laid out as verl's rollout batches (`step.pack`)."""
    from verl import DataProto

    packed = pack(prefixes, responses, pad_id, device=device, resp_len=resp_len)
    L = packed.start
    return DataProto.from_dict(tensors={
        "prompts": packed.input_ids[:, :L], "responses": packed.input_ids[:, L:],
        "input_ids": packed.input_ids,
        "attention_mask": packed.attention_mask, "position_ids": packed.position_ids,
        "response_mask": packed.mask.to(torch.int64)})


def worker_group_scorer(worker_group, temperature: float, micro_batch_size: int = 1) -> Callable:
    """scorer(DataProto) -> log-probs [n, R] of its responses from the worker group's `compute_log_prob` (no
    gradient, no entropy, at `temperature`), in verl's own no-padding layout; the batch is padded to a
    multiple of world size x `micro_batch_size` (verl's engine splits each rank's rows into micro-batches of
    `rollout.log_prob_micro_batch_size_per_gpu` and refuses a remainder) and the padding dropped."""
    from verl.protocol import pad_dataproto_to_divisor
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    check_temperature(temperature)
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size: expected an int >= 1, got {micro_batch_size!r}")
    divisor = max(1, int(getattr(worker_group, "world_size", 1))) * micro_batch_size

    def score(batch) -> torch.Tensor:
        n = len(batch)
        batch, _ = pad_dataproto_to_divisor(batch, divisor)
        td = left_right_2_no_padding(batch.to_tensordict())
        tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False, temperature=float(temperature))
        output = worker_group.compute_log_prob(td)
        logp = no_padding_2_padding(tu.get(output, "log_probs"), td)
        return logp[:n].float()

    return score


def _response_lengths(data) -> torch.Tensor:
    P = data.batch["prompts"].shape[1]
    return data.batch["attention_mask"][:, P:].sum(dim=1)


def rollout_batch(data, tokenizer, settings: CEPOSettings, algo: str) -> RolloutBatch:
    """verl's DataProto as a RolloutBatch: A from verl's advantages, r+ from reward_model[answer_key], the
    groups by uid (in batch order), rewards from token_level_rewards, old_log_probs when present."""
    b, nt = data.batch, data.non_tensor_batch
    for key in ("prompts", "responses", "attention_mask", "response_mask", "advantages",
                "token_level_rewards"):
        if key not in b.keys():
            raise KeyError(f"data: expected a batch field {key!r} (verl's rollout batch), "
                           f"got {sorted(b.keys())}")
    if "uid" not in nt:
        raise KeyError("data: expected non_tensor_batch['uid'] (verl's group ids)")
    if get_algorithm(algo).baseline == "old" and "old_log_probs" not in b.keys():
        raise KeyError(f"data: {algo.upper()} needs the batch field 'old_log_probs' (verl's recomputed old "
                       "log-probs)")
    mask = b["response_mask"].bool()
    lengths = _response_lengths(data).tolist()
    host_responses = b["responses"].cpu()  # one device-to-host copy, then per-row lists
    responses = [host_responses[i, : int(n)].tolist() for i, n in enumerate(lengths)]
    P = b["prompts"].shape[1]
    prompt_valid, prompts = b["attention_mask"][:, :P].bool().cpu(), b["prompts"].cpu()
    return RolloutBatch(
        [prompts[i][prompt_valid[i]].tolist() for i in range(len(data))], responses,
        sequence_advantage(b["advantages"], mask).float(), mask, None,
        texts=[tokenizer.decode(r, skip_special_tokens=True) for r in responses],
        rewards=b["token_level_rewards"].sum(dim=-1).tolist(),
        references=[_reference(nt, i, settings.answer_key) for i in range(len(data))],
        groups=uid_groups(list(nt["uid"])),
        old_logp=b["old_log_probs"].float() if "old_log_probs" in b.keys() else None)


def dataproto_scorer(scorer: Callable, tokenizer, responses: list[list[int]], resp_len: int,
                     device) -> Callable:
    """The reweight phase's scorer from a DataProto scorer (`worker_group_scorer`): every teacher's rows in
    one verl batch (`teacher_batch`), one call."""

    def score(ctx, teachers):
        if not ctx.rows:
            return {}
        prefixes = [p for name in teachers for p in getattr(ctx, f"{name}_prefixes")]
        resp = [responses[r] for _ in teachers for r in ctx.rows]
        logp = scorer(teacher_batch(prefixes, resp, _pad_id(tokenizer), resp_len, device)).to(device)
        n = len(ctx.rows)
        return {name: logp[k * n : (k + 1) * n] for k, name in enumerate(teachers)}

    return score


@torch.no_grad()
def cepo_reweight(data, tokenizer, scorer: Callable, settings: CEPOSettings, step: int, algo: str = "cepo",
                  extract=extract_boxed) -> dict[str, float]:
    """Replaces `data.batch["advantages"]` (verl's A, [B, R]) by A_hat [B, R] and returns the CEPO metrics.

    The batch as a RolloutBatch (`rollout_batch`), then the reweight phase (`step.reweight`) with the
    scorer of verl batches `scorer` (CEPO: r+ and r- rows in one batch; RLSD: r+ only, against
    `old_log_probs`). At lambda = 0 the advantages are left exactly as verl computed them.
    """
    if algo not in ALGOS:
        raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected the 0-based number of rollout batches so far, got {step!r}")
    options = dataclasses.replace(settings, algo=algo)
    lam = options.lam(step)
    metrics = {"cepo/lambda": lam, "cepo/teacher_rows": 0.0}
    if lam <= 0.0:
        return metrics
    batch = rollout_batch(data, tokenizer, settings, algo)
    b, mask = data.batch, batch.mask
    if vision.is_multimodal(data):  # a vision-language policy: the teachers take the rows' images
        score = vision.vision_dataproto_scorer(
            scorer, _pad_id(tokenizer), batch.responses, vision.row_images(data), mask.shape[1], mask.device,
            sees_image=settings.teacher_sees_image, image_token_ids=vision.placeholder_ids(tokenizer))
    else:
        score = dataproto_scorer(scorer, tokenizer, batch.responses, mask.shape[1], mask.device)
    result = reweight(batch, score, options, step, tokenizer=tokenizer, extract=extract)
    metrics["cepo/teacher_rows"] = float(len(result.rows))
    metrics["cepo/r_minus_fallbacks"] = float(sum(n.how == "fallback" for n in result.negatives))
    b["advantages"] = result.a_hat.to(b["advantages"].dtype)
    if "returns" in b.keys():
        b["returns"] = b["advantages"].clone()  # as verl's outcome estimators: returns = advantages
    if result.rows:
        metrics.update({f"cepo/{k}": v for k, v in result.delta_metrics.items()})
    return metrics


def _reference(non_tensor_batch, i: int, key: str) -> str:
    rm = non_tensor_batch.get("reward_model")
    if rm is None or not hasattr(rm[i], "get") or rm[i].get(key) is None:
        raise KeyError(f"data: expected non_tensor_batch['reward_model'][{i}][{key!r}] (r+, "
                       f"algorithm.cepo.answer_key), got {None if rm is None else rm[i]!r}")
    return str(rm[i][key])


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("tokenizer: expected a pad_token_id or an eos_token_id for the teacher batches")
    return int(pad)
