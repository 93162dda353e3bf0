"""Compiles the linear-path kernels for sm_90 on any machine (no GPU) and reports what ptxas made of them.

For each kernel, flag combination and dtype (`compile_cases` of linear.py and linear_bwd.py) it compiles the
kernel at the launcher's own config (block sizes, num_warps, num_stages) with the divisibility the anchor
shape gives (pointers, strides, H, V and N divisible by 16, as the launchers' runtime specialisation sees
them), then reads the cubin with cuobjdump: registers, spill bytes (stack frame), shared memory, the spill
instructions (STL/LDL) in the SASS, and the MMA instruction shapes in the PTX.

    python bench/linear_compile_check.py [--dtypes bf16,fp16,fp32] [--json out.jsonl]
    python bench/linear_compile_check.py --table after.jsonl [before.jsonl]   # markdown from recorded runs

Prints one JSON line per kernel and config. Run without TRITON_INTERPRET (it is cleared here).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from cepo_kernels.ops import linear, linear_bwd  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"inv_temp", "lam", "eps_w", "eps_low", "eps_high", "clip_dual", "filter_eps"}
WIDE = set()  # integer arguments passed as i64 (none: the kernels cast to int64 themselves)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # through triton.heuristics / autotune wrappers
    return kernel


def compile_kernel(kernel, pointers, constants, cfg):
    """Compiles with the launch config cfg (block constexprs + num_warps/num_stages); returns the artifact.

    Pointers and integer arguments named stride*, H, V, N, M are marked divisible by 16, as the runtime
    specialisation marks them at the anchor shape (every dimension and row stride a multiple of 16).
    """
    fn = jit_function(kernel)
    consts = dict(constants)
    consts.update({k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")})
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name in WIDE else "i32"
            if name.startswith("stride") or name in ("H", "V", "N", "M"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, consts, attrs)
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return triton.compile(src, target=TARGET, options=opts)


def inspect_cubin(compiled):
    """regs, local (spill) bytes, shared bytes, spill instructions and MMA shapes of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", str(path)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(path)],
                              capture_output=True, text=True, check=True).stdout
    field = dict(re.findall(r"(\w+):(\d+)", usage.split("Resource usage:")[-1]))
    ptx = compiled.asm["ptx"]
    shapes = r"(wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+|mma\.sync\.aligned\.m\d+n\d+k\d+)"
    mma = sorted(set(re.findall(shapes, ptx)))
    return dict(
        regs=int(field.get("REG", -1)),
        # ptxas puts spills in the stack frame (no local arrays in these kernels): bytes per thread
        spill_bytes=max(int(field.get("STACK", 0)), int(field.get("LOCAL", 0))),
        shared_bytes=int(compiled.metadata.shared),
        spill_instructions=len(re.findall(r"\b(?:STL|LDL)\b", sass)),
        sass_instructions=len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M)),
        mma=[m.replace(".sync.aligned", "") for m in mma] or ["none (FMA)"],
    )


def cases(dtypes):
    """(name, kernel, pointers, constants, launch config) for every config the launchers can pick."""
    for d in dtypes:
        prec = "ieee" if d == "fp32" else "tf32"
        for name, *rest in (*linear.compile_cases(PTR[d], prec), *linear_bwd.compile_cases(PTR[d], prec)):
            yield (f"{name} {d}", *rest)


def table(paths):
    """Markdown tables of recorded runs (one per file), with the machine, versions and date of each."""
    for path in paths:
        lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        m = lines[0]
        print(f"### {Path(path).name}: triton {m['triton']}, target {m.get('target', 'sm_90')}, "
              f"compiled on {m['machine']} (no GPU), {m['date']}\n")
        print("| kernel | config | warps | regs | spill bytes | spill instr. | shared KiB | MMA |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for d in lines:
            cfg = "x".join(str(v) for v in d["config"].values()) + f" s{d['num_stages']}"
            if "error" in d:
                print(f"| {d['kernel']} | {cfg} | {d['num_warps']} | error: {d['error'][:80]} | | | | |")
                continue
            print(f"| {d['kernel']} | {cfg} | {d['num_warps']} | {d['regs']} | {d['spill_bytes']} | "
                  f"{d['spill_instructions']} | {d['shared_bytes'] / 1024:.0f} | {', '.join(d['mma'])} |")
        print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--json", help="also append the lines to this file")
    ap.add_argument("--table", nargs="+", metavar="JSONL", help="print markdown tables of recorded runs")
    args = ap.parse_args()
    if args.table:
        return table(args.table)
    meta = dict(triton=triton.__version__, python=platform.python_version(), machine=platform.processor()
                or platform.machine(), date=datetime.date.today().isoformat(), target="sm_90")
    out = open(args.json, "a") if args.json else None  # noqa: SIM115
    for name, kernel, pointers, constants, cfg in cases(args.dtypes.split(",")):
        t0 = time.time()
        try:
            info = inspect_cubin(compile_kernel(kernel, pointers, constants, cfg))
        except Exception as e:  # reported, not fatal: the next config still compiles
            info = dict(error=f"{type(e).__name__}: {str(e)[-500:]}")
        line = dict(kernel=name, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    config={k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")},
                    **info, compile_s=round(time.time() - t0, 1), **meta)
        print(json.dumps(line), flush=True)
        if out:
            out.write(json.dumps(line) + "\n")
    if out:
        out.close()


if __name__ == "__main__":
    main()
