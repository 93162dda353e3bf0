"""Long runs: resident memory, live objects and tensors stay flat, and no file descriptor or temporary
directory is left behind per step. The CI-sized run (60 steps) is in the normal suite; `pytest -m soak`
runs 400. No time at all, wall clock or CPU: another process's load moves both (a 400-step soak once read
1.70x on a shared machine while everything else stayed flat); step times are a benchmark's output."""

import gc
import os
import resource
import statistics
import tempfile
import warnings

import pytest
import torch
from test_rl_runs import FAST

from cepo_kernels.rl.config import TrainConfig
from cepo_kernels.rl.trainer import Trainer

PAGE = resource.getpagesize()
WARMUP = 3  # first steps: lazy imports and the interpreter's first launches


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def soak(tmp_path, monkeypatch, steps: int) -> list[dict]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # everything the run puts in a temp dir lands here
    cfg = TrainConfig(**{**FAST, "out_dir": str(tmp_path / "run"), "steps": steps, "save_every": 10,
                         "keep_last": 2, "credit_every": 10, "eval_every": 20, "eval_size": 4})
    tr = Trainer(cfg)
    samples, step = [], tr.step

    def measured():
        rec = step()
        gc.collect()
        objects = gc.get_objects()
        with warnings.catch_warnings():  # isinstance on torch's deprecated module objects warns
            warnings.simplefilter("ignore")
            tensors = sum(1 for o in objects if isinstance(o, torch.Tensor))
        samples.append({"rss": rss_mb(), "objects": len(objects), "tensors": tensors,
                        "fds": len(os.listdir("/proc/self/fd")), "tmp": len(os.listdir(tmp))})
        return rec

    tr.step = measured
    tr.train()
    tr.close()
    return samples[WARMUP:]


def check_flat(samples: list[dict]):
    q = len(samples) // 4
    first, last = samples[:q], samples[-q:]
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    # memory: the last quarter within 5% (+ 16 MB of allocator slack) of the first; a leak of a few kB per
    # step over hundreds of steps, or anything kept per step, breaks it
    assert med(last, "rss") <= 1.05 * med(first, "rss") + 16, (med(first, "rss"), med(last, "rss"))
    # what a step keeps: live tensors flat (the model, optimizer state and caches all exist by the end of the
    # first quarter); live Python objects from the second quarter on (after the first checkpoint, evaluation
    # and credit map have made their one-time objects: measured +172 at the first checkpoint) within 2 per
    # step (a list or dict that grows per step breaks it)
    tensors = [r["tensors"] for r in samples]
    assert max(tensors[-q:]) <= max(tensors[:q]), tensors
    second = samples[q:2 * q]
    assert med(last, "objects") <= med(second, "objects") + 2 * (len(samples) - 2 * q), (
        med(second, "objects"), med(last, "objects"))
    # (no timing here, CPU or wall: load makes it flaky; per-step cost belongs in bench/. A per-step cost that
    # grows with the run keeps something per step, which the object and tensor counts above catch)
    assert max(r["fds"] for r in last) <= max(r["fds"] for r in first)
    assert all(r["tmp"] == samples[0]["tmp"] for r in samples)  # (torch's compile cache dir, once)


def test_short_soak_is_flat(tmp_path, monkeypatch):
    samples = soak(tmp_path, monkeypatch, 60)
    check_flat(samples)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_000050", "step_000060"]  # keep_last=2, nothing temporary left


@pytest.mark.soak
def test_long_soak_is_flat(tmp_path, monkeypatch):
    check_flat(soak(tmp_path, monkeypatch, 400))
