"""Without a GPU: switches Triton's interpreter on, and runs the kernel tests on both CPU paths.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of the conftest. On a CPU the
operators run their native PyTorch kernels by default and the Triton kernels through the interpreter with
CEPO_KERNELS_CPU=interpreter: a kernel test module that uses the `kernel_backend` fixture
(`pytestmark = pytest.mark.usefixtures("kernel_backend")`) runs each test once per path ([native] and
[interpreter]); a test marked `triton_only` runs on the interpreter only.
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
    config.addinivalue_line("markers", "triton_only: a property of the Triton kernels; not run on the native "
                                       "CPU kernels")


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


@pytest.fixture(params=["cuda"] if ON_GPU else ["native", "interpreter"])
def kernel_backend(request, monkeypatch):
    """The kernels the operators run: "cuda" on a GPU; on a CPU "native" (the PyTorch kernels) or
    "interpreter" (the Triton kernels through Triton's interpreter), set through CEPO_KERNELS_CPU."""
    if request.param == "native" and request.node.get_closest_marker("triton_only"):
        pytest.skip("a property of the Triton kernels (checked on the interpreter)")
    if request.param != "cuda":
        monkeypatch.setenv("CEPO_KERNELS_CPU", request.param)
    return request.param
