"""Helpers of tests/test_verl_distill.py: a verl driver batch after the advantage stage of `sdpo`, with
verl's `raw_prompt`, and a recorder of the real trainer's distillation stage (tests/verl_real_harness.py)."""

from __future__ import annotations

import numpy as np
from verl.trainer.ppo import core_algos
from verl_helpers import GROUPS, make_batch

from cepo_kernels.integrations import verl as cv
from cepo_kernels.integrations.verl import distill as D

__all__ = ["driver_batch", "record_distill_stage"]


def driver_batch(tok):
    data = make_batch(tok)
    b = data.batch
    with cv.cepo_active():
        b["advantages"], b["returns"] = core_algos.get_adv_estimator_fn("sdpo")(
            token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"],
            index=data.non_tensor_batch["uid"], config={"norm_adv_by_std_in_grpo": True})
    raw = np.empty(len(data), dtype=object)
    for i, group in enumerate(g for g in GROUPS for _ in g[2]):
        raw[i] = [{"role": "user", "content": group[0]}]
    data.non_tensor_batch["raw_prompt"] = raw
    return data


def record_distill_stage(monkeypatch, log: list) -> None:
    """Records, per advantage stage, the driver batch, the teacher rows the scorer was given and what it
    returned, the signal, and the scorer run on the rollout rows themselves (at step 2 also on step 1's)."""
    original = D.distill_signal

    def recording(data, tokenizer, scorer, settings, algo):
        b = data.batch
        P = b["prompts"].shape[1]
        mask = b["response_mask"].bool()
        prompts = [b["prompts"][i][b["attention_mask"][i, :P].bool()].tolist() for i in range(len(data))]
        responses = [b["responses"][i][mask[i]].tolist() for i in range(len(data))]
        pad = cv.advantages._pad_id(tokenizer)
        own = scorer(cv.teacher_batch(prompts, responses, pad, mask.shape[1], "cpu"))
        first = log[0] if log else None
        again = first and scorer(cv.teacher_batch(first["prompts"], first["responses"], pad,
                                                  first["mask"].shape[1], "cpu"))
        calls = []

        def rec(batch):
            out = scorer(batch)
            calls.append((batch.batch["input_ids"].clone(), batch.batch["attention_mask"].clone(),
                          batch.batch["response_mask"].clone(), out.clone()))
            return out

        signal = original(data, tokenizer, rec, settings, algo)
        log.append({"algo": algo, "settings": settings, "prompts": prompts, "responses": responses,
                    "mask": mask, "old_log_probs": b["old_log_probs"].clone(), "own": own, "again": again,
                    "calls": calls, "signal": signal, "rewards": b["token_level_rewards"].sum(-1).tolist(),
                    "uids": list(data.non_tensor_batch["uid"]), "raw_prompt": list(data.non_tensor_batch[
                        "raw_prompt"]), "references": [r["ground_truth"] for r in data.non_tensor_batch[
                        "reward_model"]]})
        return signal

    monkeypatch.setattr(D, "distill_signal", recording)
