"""Every kernel compiles for a Hopper GPU (sm_90, through ptxas) at the configs the launchers use.

The interpreter runs the kernels' arithmetic on the CPU but skips the GPU compiler, where some errors only
show (layouts, dot shapes, loop-carried types). tests/compile_sm90.py compiles ahead of time, without a
GPU, each kernel for every flag combination the launchers can pick, with bf16/fp16/fp32 pointer types; it
runs once, in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_sm90.py")
# The fp32 linear kernels (IEEE dots) take ~3 minutes to compile: run them with CEPO_COMPILE_ALL=1
# (`python tests/compile_sm90.py` compiles every case).
CASE_IDS = [
    *(f"logits-loss-{t}-{d}" for d in ("bf16", "fp16", "fp32") for t in ("none", "logits", "logp", "mixed")),
    *(f"logprobs-{d}" for d in ("bf16", "fp16", "fp32")),
    *(f"linear-fwd-src{n}-bf16" for n in (1, 2, 3)),
    "linear-fwd-src1-fp16",
    "linear-token",
    "linear-bwd-bf16",
]
if os.environ.get("CEPO_COMPILE_ALL") == "1":
    CASE_IDS += [f"linear-fwd-src{n}-{d}" for n in (1, 2, 3) for d in ("fp16", "fp32")
                 if (n, d) != (1, "fp16")]
    CASE_IDS += ["linear-bwd-fp16", "linear-bwd-fp32"]


@pytest.fixture(scope="module")
def compiled():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton does not expose ASTSource/GPUTarget for ahead-of-time compilation")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(SCRIPT.parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(SCRIPT), *CASE_IDS], capture_output=True, text=True, env=env,
                          timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", CASE_IDS)
def test_compiles_for_sm90(compiled, case):
    assert case in compiled, f"{case}: not run by {SCRIPT.name} (cases: {sorted(compiled)})"
    assert compiled[case] is None, compiled[case]
