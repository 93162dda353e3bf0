"""Runs the Triton kernels through Triton's interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of the conftest.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # the tests' tensors are tiny: one thread avoids oversubscribing a small CI machine (several times faster)
    torch.set_num_threads(1)

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (large shapes); skipped on CPU")
    config.addinivalue_line("markers", "soak: a long run (minutes); only with `-m soak`")


def pytest_collection_modifyitems(config, items):
    if "soak" not in (config.getoption("markexpr") or ""):
        long = pytest.mark.skip(reason="a soak test: run it with `pytest -m soak`")
        for item in items:
            if "soak" in item.keywords:
                item.add_marker(long)
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (the CPU run covers the same code at small shapes)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
