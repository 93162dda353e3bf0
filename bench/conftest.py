"""Shared benchmark fixtures (pytest-benchmark): the GPU requirement and the peak-extra-memory probe.

Without a GPU every benchmark is skipped except tests marked `cpu` (tiny shapes under the Triton
interpreter, switched on here before anything imports triton)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # tiny shapes only: one thread avoids oversubscribing a shared CPU (3-4x faster on 2 busy cores)
    torch.set_num_threads(1)

import pytest  # noqa: E402

GIB = 2**30


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu: runs without a GPU too (tiny shapes, correctness checks)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks time CUDA kernels: no GPU on this machine")
    for item in items:
        if "cpu" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def peak_extra_gib():
    """measure(fn) -> GiB allocated at peak during fn() beyond what was live before it (docs/peers.md)."""

    def measure(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / GIB

    return measure


def pytest_benchmark_update_machine_info(config, machine_info):
    """Records the card and the versions with every result file."""
    import triton

    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
