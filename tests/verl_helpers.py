"""A verl rollout batch and an in-process stand-in for verl's actor worker group, for the verl adapter tests.

`TinyWorkerGroup.compute_log_prob` takes what verl's actor worker takes (a TensorDict in verl's no-padding
layout: nested `input_ids` / `position_ids`, plus `temperature`) and returns what it returns (`log_probs`, a
nested tensor whose position t is the log-prob of token t + 1), running a tiny Hugging Face model on CPU one
sequence at a time, the rows split into `world_size` contiguous shards as verl's data-parallel dispatch does.
"""

from __future__ import annotations

import numpy as np
import torch
from trl_helpers import tiny_model, tiny_tokenizer

__all__ = ["TinyWorkerGroup", "make_batch", "tiny_model", "tiny_tokenizer", "transformers_verl_accepts",
           "GROUPS"]


def transformers_verl_accepts() -> bool:
    """Whether the installed transformers is in the range the installed verl requires (verl's trainer tests
    skip outside it)."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    for line in requires("verl") or []:
        req = Requirement(line)
        if req.name == "transformers" and req.marker is None:
            return req.specifier.contains(version("transformers"), prereleases=True)
    return True

# (prompt, r+, [(response words, reward)]): every group mixes rewards except the last (all equal: A = 0)
GROUPS = [
    ("what is 1 plus 2 ?", "3", [("\\boxed{3} <eos>", 1.0), ("\\boxed{4} 5 <eos>", 0.0),
                                 ("\\boxed{5} <eos>", 0.1), ("2 plus 1 is 3 <eos>", 0.0)]),
    ("what is 2 plus 2 ?", "4", [("4 <eos>", 0.0), ("\\boxed{4} <eos>", 1.0),
                                 ("\\boxed{6} plus 1", 0.0), ("is \\boxed{4} <eos>", 1.0)]),
    ("what is 3 plus 3 ?", "6", [("\\boxed{6} <eos>", 1.0), ("6 is \\boxed{6} <eos>", 1.0),
                                 ("\\boxed{6} 6 <eos>", 1.0), ("\\boxed{6}", 1.0)]),
]


class TinyWorkerGroup:
    """The actor worker group's `compute_log_prob`, in process (see the module docstring)."""

    def __init__(self, model, world_size: int = 1):
        self.model, self.world_size = model.eval(), world_size
        self.calls = []  # per call: (rows, temperature, grad enabled)

    @torch.no_grad()
    def _row(self, ids, pos, temperature):
        logits = self.model(input_ids=ids[None], position_ids=pos[None]).logits[0].float() / temperature
        lp = torch.log_softmax(logits, dim=-1)[:-1].gather(1, ids[1:, None]).squeeze(1)
        return torch.cat([lp, lp.new_zeros(1)])

    def compute_log_prob(self, td):
        from tensordict import TensorDict
        from verl.utils import tensordict_utils as tu

        temperature = tu.get(td, "temperature")
        ids, pos = td["input_ids"], td["position_ids"]
        n = ids.size(0)
        self.calls.append((n, temperature, torch.is_grad_enabled()))
        if n % self.world_size:
            raise ValueError(f"batch of {n} rows does not split over {self.world_size} ranks")
        per = n // self.world_size
        out = []
        for rank in range(self.world_size):  # each rank its contiguous shard
            out += [self._row(ids[i], pos[i], temperature) for i in range(rank * per, (rank + 1) * per)]
        lengths = torch.tensor([len(o) for o in out])
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        nested = torch.nested.nested_tensor_from_jagged(torch.cat(out), offsets=offsets)
        return TensorDict({"log_probs": nested}, batch_size=[n])


def make_batch(tokenizer, groups=GROUPS, order=None):
    """A verl DataProto of the groups' rollouts (uid = the group's index as a string), in `order` of rows."""
    from verl import DataProto

    prompts, responses, rewards, uids, refs = [], [], [], [], []
    for g, (prompt, ref, rollouts) in enumerate(groups):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for words, reward in rollouts:
            prompts.append(p)
            responses.append(tokenizer(words, add_special_tokens=False)["input_ids"])
            rewards.append(reward)
            uids.append(str(g))
            refs.append(ref)
    order = list(range(len(prompts))) if order is None else list(order)
    P, R = max(len(p) for p in prompts), max(len(r) for r in responses)
    pad = tokenizer.pad_token_id
    B = len(order)
    ids, attn = torch.full((B, P + R), pad), torch.zeros(B, P + R, dtype=torch.long)
    scores = torch.zeros(B, R)
    for k, i in enumerate(order):
        p, r = prompts[i], responses[i]
        ids[k, P - len(p):P], attn[k, P - len(p):P] = torch.tensor(p), 1
        ids[k, P:P + len(r)], attn[k, P:P + len(r)] = torch.tensor(r), 1
        scores[k, len(r) - 1] = rewards[i]
    pos = (attn.cumsum(1) - 1).clamp_min(0)
    return DataProto.from_dict(
        tensors={"prompts": ids[:, :P], "responses": ids[:, P:], "input_ids": ids, "attention_mask": attn,
                 "position_ids": pos, "response_mask": attn[:, P:].clone(), "token_level_rewards": scores},
        non_tensors={"uid": np.array([uids[i] for i in order], dtype=object),
                     "reward_model": np.array([{"ground_truth": refs[i]} for i in order], dtype=object)})


class FakeTransferQueue:
    """verl's TransferQueue client in memory (`kv_batch_get`, `kv_batch_put`): rows stored per key, tensor
    fields returned as jagged nested tensors and the others as NonTensorStacks, as the v1 trainer reads
    them."""

    def __init__(self):
        self.rows: dict = {}

    class Meta:
        def __init__(self, keys, partition_id, tags=None):
            self.keys, self.partition_id = list(keys), partition_id
            self.tags = [{} for _ in self.keys] if tags is None else list(tags)

        def __len__(self):
            return len(self.keys)

    def put_batch(self, data, partition_id="train"):
        """A padded DataProto (make_batch, with old_log_probs) as the rows verl's rollout writes."""
        b, nt = data.batch, data.non_tensor_batch
        P = b["prompts"].shape[1]
        keys = []
        for i in range(len(data)):
            key = f"{nt['uid'][i]}_0_{i}"
            valid_p = b["attention_mask"][i, :P].bool()
            n = int(b["attention_mask"][i, P:].sum())
            self.rows[(partition_id, key)] = {
                "prompts": b["prompts"][i][valid_p], "responses": b["responses"][i, :n],
                "response_mask": b["response_mask"][i, :n], "rm_scores": b["token_level_rewards"][i, :n],
                "old_log_probs": b["old_log_probs"][i, :n], "uid": nt["uid"][i],
                "reward_model": nt["reward_model"][i]}
            keys.append(key)
        return self.Meta(keys, partition_id)

    def kv_batch_get(self, keys, partition_id, select_fields):
        from tensordict import NonTensorStack, TensorDict

        rows = [self.rows[(partition_id, k)] for k in keys]
        out = {}
        for f in select_fields:
            if f not in rows[0]:
                continue
            vals = [r[f] for r in rows]
            tensor = isinstance(vals[0], torch.Tensor)
            out[f] = (torch.nested.as_nested_tensor(vals, layout=torch.jagged) if tensor
                      else NonTensorStack(*vals))
        return TensorDict(out, batch_size=[len(rows)])

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        for f in fields.keys():
            for k, v in zip(keys, fields[f].unbind(), strict=True):
                self.rows[(partition_id, k)][f] = v
        return self.Meta(keys, partition_id)
