"""Run by tests/test_integrations_trl_zero3.py under torchrun (2 processes, gloo, CPU): a tiny model under
DeepSpeed ZeRO-3 whose lm_head is used through `head_apply`, the CEPOTrainer kernel head's path. Rank 0
writes the updated head parameters to OUT/zero3.json."""

import json
import os
import sys

import deepspeed
import torch

from cepo_kernels import linear_logprobs, linear_teacher_logprobs
from cepo_kernels.integrations.trl.head import head_apply, zero3_partitioned


def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 12))


def batch(rank):
    g = torch.Generator().manual_seed(1 + rank)
    return torch.randn(2, 3, 8, generator=g), torch.randint(0, 12, (2, 3), generator=g)


def main(out_dir):
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True}
    model = tiny()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    head = engine.module[1]
    assert zero3_partitioned(head) and head.weight.numel() == 0  # partitioned outside a forward
    x, t = batch(rank)
    lp = head_apply(head, lambda w, b, h: linear_logprobs(h, w, t, bias=b), engine.module[0](x))
    with torch.no_grad():  # the teachers: rank 1 has no rows, yet it gathers as rank 0 does (no hang)
        h = engine.module[0](x)
        rows = 2 if rank == 0 else 0
        scored = head_apply(head, lambda w, b, hh: linear_teacher_logprobs(hh[:rows], hh[:rows], w, t[:rows],
                                                                           bias=b), h)
    engine.backward(-lp.mean())
    engine.step()
    with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
        new = {n: p.detach().clone().flatten().tolist() for n, p in head.named_parameters()}
    if rank == 0:
        with open(os.path.join(out_dir, "zero3.json"), "w") as f:
            json.dump({"head": new, "teacher_shape": list(scored[0].shape)}, f)


if __name__ == "__main__":
    main(sys.argv[1])
    # the results are written: leave the process group together, then skip the interpreter's teardown,
    # where DeepSpeed's and gloo's background threads can abort a rank ("terminate called without an
    # active exception", seen in CI)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
