"""CEPOTrainer across processes (torchrun, gloo, CPU): DDP and FSDP2 against one process, a rank that dies,
the FSDP2 kernel head. Each test launches tests/trl_helpers.py as a script."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed (pip install -e '.[trl]')")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

from helpers import assert_within_order_noise, ulps32  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out_dir, env, timeout, script_args=("4",), nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "trl_helpers.py"), *script_args]
    if script_args == ("4",):
        cmd.insert(-1, str(out_dir))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"), **env)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_rank_that_dies_ends_the_other_within_bounded_time(tmp_path):
    """Rank 1 raises at its first generation while rank 0 goes on into the gathers: the run ends (torchrun
    stops the survivor; failing that, the 60 s ddp_timeout of the collective) with rank 1's error, instead of
    hanging: a hang ends in subprocess.TimeoutExpired at 4 x that timeout (no wall-clock assertion beyond it,
    which load could move)."""
    proc = _torchrun(tmp_path, {"CEPO_TEST_DIE_RANK": "1"}, timeout=240)
    assert proc.returncode != 0
    assert "rank 1 dies (test)" in proc.stderr
    assert not list(tmp_path.glob("rank*.json"))


# one process's results by (settings, per-device batch): the FSDP2 and ZeRO-3 tests share these runs
_ONE_PROCESS = {}
KEYS = ("step", "lam", "neg_answers", "neg_how", "neg_index", "teacher_rows")


def one_process(out_dir, env, per_device):
    """1 process with the global batch: rank0.json of `trl_helpers.main` (run once per setting, then reused).
    The sharding switches are dropped: they do nothing in one process."""
    env = {k: v for k, v in env.items() if k not in ("CEPO_TEST_FSDP2", "CEPO_TEST_ZERO3")}
    key = (tuple(sorted(env.items())), per_device)
    if key not in _ONE_PROCESS:
        out_dir.mkdir(parents=True)
        proc = _torchrun(out_dir, env, timeout=600, script_args=(str(out_dir), str(per_device)), nproc=1)
        assert proc.returncode == 0, proc.stderr[-4000:]
        _ONE_PROCESS[key] = json.loads((out_dir / "rank0.json").read_text())
    return _ONE_PROCESS[key]


def reference_runs(tmp_path, env, per_device):
    """The one-process run that a sharded run must equal, and the same run with only its reduction order
    changed: half the per-device batch over twice the gradient accumulation (the same 16 completions, the
    same loss - TRL's default "dapo" loss divides by the generation batch's token count - summed over 4
    micro-batches instead of 2, of other padded widths). The second's distance from the first is what
    reordering this arithmetic makes; it also holds the float32 rounding of each SGD step's parameters,
    which dominates an update's error (|p| ~ 0.05 against updates ~ 1e-4)."""
    ga = int(env.get("CEPO_TEST_GA", "1"))
    single = one_process(tmp_path / "one", env, per_device)
    split = one_process(tmp_path / "split", {**env, "CEPO_TEST_GA": str(2 * ga)}, per_device // 2)
    choices = [[{k: h[k] for k in KEYS} for h in run["history"]] for run in (single, split)]
    assert choices[0] == choices[1]
    return single, split


def assert_same_training(got, single, split, name=""):
    """Losses and SGD updates of `got` within factor 2 of the reordered run's distance from `single`, plus the
    values' own float32 resolution: an ulp of the loss; per step, an ulp of the parameter an update is the
    difference of."""
    steps = len(single["losses"])
    assert_within_order_noise(got["losses"], single["losses"], split["losses"],
                              floor=ulps32(single["losses"]), name=f"{name} losses")
    assert any(max(map(abs, u)) > 0 for u in single["updates"].values())
    for n, u in single["updates"].items():
        floor = ulps32(single["param_absmax"][n], steps)
        assert_within_order_noise(got["updates"][n], u, split["updates"][n], floor=floor,
                                  name=f"{name} update of {n}")


def test_two_processes_match_one(tmp_path):
    """2 processes (gloo) x 4 completions vs 1 process x 8, each completion sampled with the seed of its
    global row: the same r- on both ranks and in the single run, the same A_hat, losses and SGD updates.
    Tolerance: see reference_runs and assert_same_training."""
    two = tmp_path / "two"
    two.mkdir()
    proc = _torchrun(two, {}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single, split = reference_runs(tmp_path, {}, 8)
    r0, r1 = (json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1))
    assert single["world_size"] == 1 and r0["world_size"] == r1["world_size"] == 2
    assert len(single["losses"]) == 2
    assert r0["history"] == r1["history"]  # both ranks made the same r- choices (and saw all 8 teacher rows)
    choices = [[{k: h[k] for k in KEYS} for h in run["history"]] for run in (r0, single)]
    assert choices[0] == choices[1]
    for rank, r in enumerate((r0, r1)):
        assert_same_training(r, single, split, name=f"rank {rank}")
    # A from the rewards at every step; A_hat at the first step, where both runs score the teachers with the
    # same parameters (later, A_hat also carries the parameters' rounding differences, which the updates'
    # comparison bounds; measured: 3 ulps of |A_hat| at step 1 while the reordered run's was 0)
    for s in range(2):
        assert_within_order_noise(r0["adv"][s] + r1["adv"][s], single["adv"][s], split["adv"][s],
                                  floor=ulps32(single["adv"][s]), name=f"A of step {s}")
    assert_within_order_noise(r0["a_hat"][0] + r1["a_hat"][0], single["a_hat"][0], split["a_hat"][0],
                              floor=ulps32(single["a_hat"][0]), name="A_hat of the first step")


def sharded_run_matches_one_process(tmp_path, env, sharded_key):
    """2 processes with `env` (a sharding mode of trl_helpers.main) against 1 process with the same global
    batch: `sharded_key` true on both ranks only, the same r-, losses and SGD updates (tolerance as the DDP
    test above)."""
    two = tmp_path / "two"
    two.mkdir()
    proc = _torchrun(two, env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single, split = reference_runs(tmp_path, env, 8)
    r0, r1 = (json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0[sharded_key] and r1[sharded_key] and not single[sharded_key]
    choices = [[{k: h[k] for k in KEYS} for h in run["history"]] for run in (r0, r1, single)]
    assert choices[0] == choices[1] == choices[2]
    assert_same_training(r0, single, split)


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_cepo_trainer_under_fsdp2_matches_one_process(tmp_path, kernels):
    """CEPOTrainer under FSDP2 for real (2 processes, gloo, every parameter a DTensor: see
    trl_helpers.force_fsdp2_on_cpu), gradient accumulation 2, the kernel head off and on, against 1 process
    with the same global batch: the same r-, losses and SGD updates."""
    env = {"CEPO_TEST_FSDP2": "1", "CEPO_TEST_KERNELS": kernels, "CEPO_TEST_GA": "2"}
    sharded_run_matches_one_process(tmp_path, env, "dtensors")


def test_fsdp2_kernel_head_matches_one_process(tmp_path):
    """FSDP2 for real: 2 processes (gloo), the tiny model `fully_shard`-ed (every parameter a DTensor), the
    policy's log-prob loss over gradient accumulation 2 with one micro-batch whose rows are all masked (a
    zero loss, still tied to the weights: no rank hangs), with HF's logits, with the kernel head on the
    unsharded root's weight, and with it all-gathered from its DTensor shard by `full_weight`: the full
    gradients equal 1 process's average over the same micro-batches. Tolerance: within factor 2 of what
    summing the same micro-batch gradients in reverse order makes in one process, plus 3 ulps of the largest
    gradient (the 3 roundings of a 4-term sum, exact by construction)."""
    for nproc in (2, 1):
        proc = _torchrun(tmp_path, {}, timeout=300, script_args=("--fsdp-head", str(tmp_path)), nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-4000:]
    two, one = (json.loads((tmp_path / f"fsdp{w}.json").read_text()) for w in (2, 1))
    assert two["dtensors"] and not one["dtensors"] and two["sharded_head"] > 0
    for mode in ("hf", "kernels", "kernels_gathered_first"):
        for name, ref in one[mode].items():
            assert_within_order_noise(two[mode][name], ref, one[mode + "_reordered"][name],
                                      floor=ulps32(ref, 3), name=f"{mode} {name}")
        assert max(map(abs, one[mode]["lm_head.weight"])) > 0


def test_full_weight_gathers_a_dtensor_and_passes_a_tensor_through():
    from cepo_kernels.integrations.trl.head import full_weight

    t = torch.randn(3, 4)
    assert full_weight(t) is t
