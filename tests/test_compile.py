"""Every kernel compiles for a Hopper GPU (sm_90) through its real launcher, and the logits kernels compile to
what a bandwidth-bound kernel needs: no spills, 128-bit global loads and stores in the hot loop.

The interpreter runs the kernels' arithmetic on the CPU but skips the GPU compiler, where some errors only
show (layouts, dot shapes, loop-carried types) and where the performance is decided. bench/compile_report.py
(the same code as `python bench/compile_report.py`) runs the launchers on meta tensors at the real shapes
(B=4, T=2048, V=151936, H=2560) with a compile-only stand-in driver; it runs once per family, in a
subprocess without TRITON_INTERPRET. Compiled kernels land in Triton's cache, so a rerun takes seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "compile_report.py"


def run_report(*args):
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton does not expose ASTSource/GPUTarget for ahead-of-time compilation")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=1500, cwd=ROOT)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, proc.stderr[-3000:]
    return rows


@pytest.fixture(scope="module")
def rows():
    """The whole report, once (one subprocess): logits kernels in three dtypes, linear kernels in bf16;
    with CEPO_COMPILE_ALL=1 also every candidate config of the GPU sweep (~2 more minutes)."""
    sweep = ["--sweep"] if os.environ.get("CEPO_COMPILE_ALL") == "1" else []
    return run_report("--dtypes", "bf16,fp16,fp32", "--linear-dtypes", "bf16", *sweep)


@pytest.fixture(scope="module")
def logits_rows(rows):
    return [r for r in rows if not r["case"].startswith("linear")]


@pytest.fixture(scope="module")
def linear_rows(rows):
    return [r for r in rows if r["case"].startswith("linear")]


def test_every_logits_kernel_compiles(logits_rows):
    errors = {r["case"]: r["error"] for r in logits_rows if "error" in r}
    assert not errors, errors
    kernels = {r["kernel"] for r in logits_rows}
    assert kernels == {"_cepo_fwd_kernel", "_logprobs_fwd_kernel", "_logprobs_bwd_kernel",
                       "_cepo_advantages_fwd_kernel"}


def test_logits_kernels_do_not_spill(logits_rows):
    spills = {r["case"]: (r["spill_bytes"], r["spill_instrs"]) for r in logits_rows
              if r.get("spill_bytes") or r.get("spill_instrs")}
    assert not spills, spills


def test_logits_hot_loops_use_128_bit_global_access(logits_rows):
    """Every global load in each row-streaming loop is 128 bits wide (8 bf16, 4 fp32 values); the backward
    also stores 128 bits (the aligned rows of the real shapes: V = 151936 is a multiple of 16)."""
    for r in logits_rows:
        if r["kernel"] == "_cepo_advantages_fwd_kernel":
            continue
        assert r.get("loop_load_bits") == 128, r
        if r["kernel"] == "_logprobs_bwd_kernel":
            assert r["store_bits"] == 128, r


def test_every_linear_kernel_compiles(linear_rows):
    errors = {r["case"]: r["error"] for r in linear_rows if "error" in r}
    assert not errors, errors


def test_linear_kernels_do_not_spill_and_use_wide_wgmma(linear_rows):
    spills = {r["case"]: r["spill_bytes"] for r in linear_rows if r.get("spill_bytes")}
    assert not spills, spills
    for r in linear_rows:
        if r["kernel"] == "_linear_fwd_kernel":
            shapes = [m for m in r["mma"] if m.startswith("wgmma")]
            assert shapes and all(int(m.split("n")[1].split("k")[0]) >= 128 for m in shapes), r


def test_sass_access_widths_and_occupancy(monkeypatch):
    """The report's SASS parsing (no compile): cp.async loads are read at their width, and the CTAs per SM
    follow sm_90's register (per-warp units of 256) and shared-memory limits."""
    import importlib.util

    # importing the report drops TRITON_INTERPRET and extends sys.path: both restored after the test
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("compile_report", SCRIPT)
    cr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cr)
    for text, op, bits in (("LDGSTS.E.BYPASS.LTC128B.128 [R1+0x100], desc[UR4][R2.64]", "LDGSTS", 128),
                           ("LDG.E.128 R4, desc[UR4][R2.64]", "LDG", 128),
                           ("LDG.E R4, desc[UR4][R2.64]", "LDG", 32),
                           ("STG.E.U16 desc[UR4][R2.64], R5", "STG", 16)):
        m = cr._LDST.search(text)
        assert (m.group(1), cr._access_bits(m.group(0))) == (op, bits), text
    assert cr.ctas_per_sm(128, 96 * 1024, 8) == 2  # 16 warps' registers, two 97 KB CTAs
    assert cr.ctas_per_sm(168, 96 * 1024, 8) == 1  # 168 x 32 -> 5376 per warp: 12 warps
    assert cr.ctas_per_sm(40, 0, 8) == 6  # 1280 per warp -> 51 warps: 6 CTAs of 8
    assert cr.ctas_per_sm(32, 228 * 1024, 4) == 0  # over the 227 KB a CTA may have
