"""Eager torch ops (aten calls) around the logits kernels: one cepo_loss forward and backward, on a CPU.

    python bench/count_ops.py

The Triton launches are stubbed out (they are not eager ops), so the count is what runs in PyTorch around
them; each op costs a kernel launch (~5-10 us) on a GPU. Prints one JSON object per metrics option.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["CEPO_KERNELS_CPU"] = "interpreter"  # the Triton launchers (stubbed below), not the native ones

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import cepo_kernels  # noqa: E402
from cepo_kernels.ops import _logits_launch as launch  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def main():
    launch._launch = lambda *args, **kwargs: None
    B, T, V = 4, 6, 50
    x = torch.randn(B, T, V, requires_grad=True)
    tg, adv, old = torch.randint(0, V, (B, T)), torch.randn(B), torch.randn(B, T)
    mask = torch.rand(B, T) > 0.2
    options = {"default": {}}
    if "metrics" in cepo_kernels.cepo_loss.__kwdefaults__:
        options.update({"tensor": {"metrics": "tensor"}, "none": {"metrics": False}})
    for name, extra in options.items():
        with CountOps() as fwd:
            out = cepo_kernels.cepo_loss(x, tg, adv, mask, old_logp=old, pos_logits=x.detach(),
                                         neg_logits=x.detach(), **extra)
        with CountOps() as bwd:
            out.loss.backward()
        print(json.dumps(dict(metrics=name, forward_ops=fwd.n, backward_ops=bwd.n)))


if __name__ == "__main__":
    main()
