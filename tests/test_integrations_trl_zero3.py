"""The CEPOTrainer kernel head under DeepSpeed ZeRO-3 for real: 2 processes (torchrun, gloo, CPU), the head
run through `head_apply` (DeepSpeed's own module hooks gather its partitioned parameters for the forward
and again for the backward), one SGD update equal to the same update without sharding."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (see .ci/run for a CPU install)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import assert_close, err, ulps32  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unsharded_update(dtype, ranks):
    """The head's parameters after the SGD step ZeRO-3 takes, computed without sharding in `dtype`, the two
    ranks' losses summed in the order `ranks` (ZeRO-3 averages the two ranks' gradients)."""
    from zero3_helpers import batch, tiny

    ref = tiny().to(dtype)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss = 0.0
    for rank in ranks:
        x, t = batch(rank)
        lp = torch.log_softmax(ref(x.to(dtype)), -1).gather(-1, t[..., None])[..., 0]
        loss = loss - lp.mean() / 2
    loss.backward()
    opt.step()
    return {n: p.detach() for n, p in ref[1].named_parameters()}


def test_zero3_kernel_head_update_equals_unsharded(tmp_path):
    """Tolerance (the house rule): the ZeRO-3 update's error against the float64 update within factor 2 of
    float32 torch's own (the worse of the two rank orders), plus an ulp of the parameter (the fp32 rounding of
    the stored parameter, exact by construction)."""
    from zero3_helpers import tiny

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "zero3_helpers.py"), str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "zero3.json").read_text())
    assert got["teacher_shape"] == [2, 3]  # rank 0's teacher rows, scored while rank 1 had none

    before = dict(tiny()[1].named_parameters())
    ref64 = unsharded_update(torch.float64, (0, 1))
    ref32 = [unsharded_update(torch.float32, order) for order in ((0, 1), (1, 0))]
    for n, p in ref64.items():
        new = torch.tensor(got["head"][n]).view_as(p)
        assert not torch.equal(new, before[n])  # the update happened
        worst = max(ref32, key=lambda r: err(r[n], p))[n]
        assert_close(new, p, worst, atol=ulps32(p), name=n)


def test_cepo_trainer_under_zero3_matches_one_process(tmp_path):
    """CEPOTrainer under DeepSpeed ZeRO-3 through accelerate for real (2 processes, gloo, every parameter
    partitioned), the kernel head on, gradient accumulation 2, against 1 process without DeepSpeed with the
    same global batch: the same r-, losses and SGD updates (tests/test_integrations_trl_distributed.py's
    comparison and tolerance)."""
    from test_integrations_trl_distributed import sharded_run_matches_one_process

    env = {"CEPO_TEST_ZERO3": "1", "CEPO_TEST_KERNELS": "1", "CEPO_TEST_GA": "2"}
    sharded_run_matches_one_process(tmp_path, env, "zero3_partitioned")
