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

import torch

from cepo_kernels._params import check_number, check_temperature
from cepo_kernels.step import (
    choose_negatives,
    evidence_stats,
    extract_boxed,
    lam_at,
    pack,
    teacher_contexts,
    teacher_rows,
    token_advantages,
)

__all__ = ["ALGOS", "CEPOSettings", "cepo_active", "sequence_advantage", "negatives_by_uid", "teacher_batch",
           "worker_group_scorer", "cepo_reweight"]

ALGOS = ("cepo", "rlsd")
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


@dataclasses.dataclass(frozen=True)
class CEPOSettings:
    """`algorithm.cepo` of verl's configuration (every key optional).

    lam0, t_warm: lambda(step) = max(0, lam0 (1 - step / t_warm)), step = rollout batches so far (0-based).
    eps_w: clip of the token weight to [1 - eps_w, 1 + eps_w].
    teacher_template: inserted after the prompt in the teachers' context, "{answer}" = r+ or r-.
    answer_key: the key of `reward_model` (non_tensor_batch) holding r+.
    """

    lam0: float = 0.5
    t_warm: int = 25
    eps_w: float = 0.2
    teacher_template: str = " {answer}"
    answer_key: str = "ground_truth"

    def __post_init__(self):
        check_number("algorithm.cepo.lam0", self.lam0, lo=0.0, hi=1.0)
        check_number("algorithm.cepo.eps_w", self.eps_w, lo=0.0, hi=1.0, hi_open=True)
        if isinstance(self.t_warm, bool) or not isinstance(self.t_warm, int) or self.t_warm < 0:
            raise ValueError(f"algorithm.cepo.t_warm: expected an int >= 0, got {self.t_warm!r}")
        if not isinstance(self.teacher_template, str) or "{answer}" not in self.teacher_template \
                or "{question}" in self.teacher_template:
            raise ValueError("algorithm.cepo.teacher_template: expected a string containing {answer} "
                             "(inserted "
                             f"after verl's rendered prompt; no {{question}}), got {self.teacher_template!r}")
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
        names = {f.name for f in dataclasses.fields(cls)}
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


def negatives_by_uid(texts, rewards, uids, references, extract=extract_boxed) -> dict:
    """r- of every group (`step.choose_negatives` on the rows sharing a uid, in batch order): uid -> Negative.
    A group is whole in verl's driver batch, whatever order and data-parallel split its rows have."""
    groups: dict = {}
    for i, u in enumerate(uids):
        groups.setdefault(u, []).append(i)
    out = {}
    for u, idx in groups.items():
        out[u] = choose_negatives([texts[i] for i in idx], [rewards[i] for i in idx], [references[idx[0]]],
                                  len(idx), extract)[0]
    return out


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


@torch.no_grad()
def cepo_reweight(data, tokenizer, scorer: Callable, settings: CEPOSettings, step: int, algo: str = "cepo",
                  extract=extract_boxed) -> dict[str, float]:
    """Replaces `data.batch["advantages"]` (verl's A, [B, R]) by A_hat [B, R] and returns the CEPO metrics.

    r- per uid group from the decoded responses and `token_level_rewards`; for the rows with A != 0, while
    lambda(step) > 0, the teachers' contexts through `scorer` (CEPO: r+ and r- rows in one batch; RLSD: r+
    only, against `old_log_probs`). At lambda = 0 the advantages are left exactly as verl computed them.
    """
    if algo not in ALGOS:
        raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected the 0-based number of rollout batches so far, got {step!r}")
    lam = lam_at(step, settings.lam0, settings.t_warm)
    metrics = {"cepo/lambda": lam, "cepo/teacher_rows": 0.0}
    if lam <= 0.0:
        return metrics
    b, nt = data.batch, data.non_tensor_batch
    for key in ("prompts", "responses", "attention_mask", "response_mask", "advantages",
                "token_level_rewards"):
        if key not in b.keys():
            raise KeyError(f"data: expected a batch field {key!r} (verl's rollout batch), "
                           f"got {sorted(b.keys())}")
    if "uid" not in nt:
        raise KeyError("data: expected non_tensor_batch['uid'] (verl's group ids)")
    if b["position_ids"].dim() != 2:
        raise ValueError("data: multimodal (3-D) position ids are not supported by the CEPO teachers")
    if algo == "rlsd" and "old_log_probs" not in b.keys():
        raise KeyError("data: RLSD needs the batch field 'old_log_probs' (verl's recomputed old log-probs)")
    mask = b["response_mask"].bool()
    adv = sequence_advantage(b["advantages"], mask).float()
    lengths = _response_lengths(data).tolist()
    host_responses = b["responses"].cpu()  # one device-to-host copy, then per-row lists
    responses = [host_responses[i, : int(n)].tolist() for i, n in enumerate(lengths)]
    P = b["prompts"].shape[1]
    references = [_reference(nt, i, settings.answer_key) for i in range(len(data))]
    uids = list(nt["uid"])
    rewards = b["token_level_rewards"].sum(dim=-1).tolist()
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    negatives = negatives_by_uid(texts, rewards, uids, references, extract)
    rows = teacher_rows(adv, mask)
    metrics["cepo/teacher_rows"] = float(len(rows))
    metrics["cepo/r_minus_fallbacks"] = float(sum(n.how == "fallback" for n in negatives.values()))
    B, R = mask.shape
    pos = torch.zeros(B, R, dtype=torch.float32, device=mask.device)
    neg = b["old_log_probs"].float().clone() if algo == "rlsd" else torch.zeros_like(pos)
    if rows:
        prompt_valid, prompts = b["attention_mask"][:, :P].bool().cpu(), b["prompts"].cpu()
        ctx = teacher_contexts(
            tokenizer, rows, prompt_ids={i: prompts[i][prompt_valid[i]].tolist() for i in rows},
            pos_answers={i: references[i] for i in rows},
            neg_answers={i: negatives[uids[i]].answer for i in rows}, template=settings.teacher_template)
        prefixes = ctx.pos_prefixes + (ctx.neg_prefixes if algo == "cepo" else [])
        resp = [responses[i] for i in rows] * (2 if algo == "cepo" else 1)
        logp = scorer(teacher_batch(prefixes, resp, _pad_id(tokenizer), R, mask.device)).to(mask.device)
        pos[rows] = logp[: len(rows)]
        if algo == "cepo":
            neg[rows] = logp[len(rows):]
    a_hat = token_advantages(adv, pos, neg, mask, lam=lam, eps_w=settings.eps_w)
    b["advantages"] = a_hat.to(b["advantages"].dtype)
    if "returns" in b.keys():
        b["returns"] = b["advantages"].clone()  # as verl's outcome estimators: returns = advantages
    if rows:
        delta = (pos - neg).masked_fill(~mask, 0.0)
        scored = set(rows)
        delta[[i for i in range(B) if i not in scored]] = 0.0
        metrics.update({f"cepo/{k}": v for k, v in evidence_stats(delta, adv, mask).items()})
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
