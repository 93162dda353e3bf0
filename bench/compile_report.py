"""What every kernel compiles to on a Hopper GPU (sm_90), measured on any machine, GPU or not.

    python bench/compile_report.py [--only logits|linear] [--dtypes bf16,fp16,fp32] [--sweep]

Runs the real launchers (ops/_logits_launch.py cepo_fwd, logprobs_bwd, ..., ops/_linear_launch.py
linear_scores, ...) on meta tensors at the real shapes (B=4, T=2048, V=151936, H=2560), with a stand-in Triton
driver that targets sm_90 and only compiles: every `kernel[grid](...)` becomes a warm-up compile with exactly
the arguments, constexprs, num_warps and divisibility specialisation the launcher gives on a GPU (meta tensors
report address 0, i.e. aligned, as the caching allocator's blocks are). Triton's bundled ptxas, cuobjdump and
nvdisasm then give registers, spills and the SASS. One JSON line per compiled kernel and config:

  kernel, case, config (constexprs, num_warps), regs, spill_bytes (local memory per thread: Triton kernels
  have no local arrays, so this is spills), spill_instrs (STL/LDL in the SASS), shared_bytes (Triton's
  dynamic shared memory), num_warps, load_bits / store_bits (widest global load / store in the SASS),
  loop_load_bits (the narrowest global load in the hot loop), mma (PTX mma/wgmma shapes, e.g. wgmma
  m64n128k16), sass_instrs (static count), and for the hot loop (the innermost SASS loop loading the most
  global bytes): loop_instrs, loop_load_bytes (per thread per iteration), instr_per_kb = SASS
  warp-instructions issued per KB of global input read in that loop (lower is better: ~177 is Liger's
  GRPO forward, docs/peers.md), loop_bars, loop_mufu.

tests/test_compile.py runs this script (a subset) and asserts on its output; `--sweep` also compiles the
candidate configs that bench/tune_logits.py may write to the config table (cepo_kernels/ops/configs.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be compilable objects, not interpreted
# FP fusion (a * b + c as one FMA) on, as the recorded reports (docs/compile_report.md) were compiled and as
# bench/run_device.sh runs the kernels: Triton 3.9 warns the default becomes off in 3.10. Set it to 0 to see
# the kernels without fusion (the markdown header says which).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton.runtime.jit as triton_jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

B, T, V, H = 4, 2048, 151936, 2560
SM90 = GPUTarget("cuda", 90, 32)  # (backend, arch, warp size)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _StandInDriver:
    """Just enough of a Triton driver for JITFunction.run to compile for sm_90 without a GPU."""

    def get_current_target(self):
        return SM90

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


@contextlib.contextmanager
def compile_only(record):
    """Every launch inside compiles for sm_90 instead of running; appends (jit fn, kwargs, kernel)."""
    run = triton_jit.JITFunction.run

    def compile_run(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        record.append((self, dict(kwargs), kernel))
        return kernel

    previous = getattr(driver, "_active", None)  # not `driver.active`: with no GPU that raises
    driver.set_active(_StandInDriver())
    triton_jit.JITFunction.run = compile_run
    try:
        import torch.fx.experimental._config as fx_config
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True):  # nonzero() on meta: every row kept
            yield record
    finally:
        triton_jit.JITFunction.run = run
        driver._active = previous


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


# ---- the cases: each a callable that runs real launchers on meta tensors ----------------------------

def logits_cases(dtypes=("bf16",), sweep=False):
    """name -> callable, for every logits kernel and flag combination the launchers can pick."""
    from cepo_kernels._params import LossParams
    from cepo_kernels.ops import _logits_launch as lg
    from cepo_kernels.ops import configs

    N = B * T
    tg, mask = _meta(N, dtype=torch.long), _meta(N, dtype=torch.uint8)
    cases = {}
    for dname in dtypes:
        # RL code's logits[:, :-1]: rows (T + 1) * V apart
        x = _meta(B, T + 1, V, dtype=DTYPES[dname])[:, :-1]
        for teachers, kw in (("none", {}), ("logits", dict(pos_logits=x, neg_logits=x)),
                             ("logp", dict(pos_logp=_meta(N), neg_logp=_meta(N))),
                             ("mixed", dict(pos_logits=x, neg_logp=_meta(N)))):
            cases[f"cepo_fwd-{teachers}-{dname}"] = partial(lg.cepo_fwd, x, tg, _meta(N), mask, LossParams(),
                                                            old_logp=_meta(N), **kw)
        for ent in (False, True):
            tag = f"{'ent-' if ent else ''}{dname}"
            cases[f"logprobs_fwd-{tag}"] = partial(lg.logprobs_fwd, x, tg, with_entropy=ent)
            cases[f"logprobs_bwd-{tag}"] = partial(lg.logprobs_bwd, x, tg, _meta(N), _meta(N), _meta(N),
                                                   _meta(N) if ent else None)
    cases["cepo_advantages"] = partial(lg.cepo_advantages_fwd, _meta(N), _meta(N), _meta(N), mask, 0.5, 0.2)
    if sweep:  # every candidate config of the tuning sweep, bf16, the heaviest flag combination
        for key, candidates in configs.SWEEP.items():
            for cfg in candidates:
                name = f"sweep-{key}-BLOCK_V{cfg['BLOCK_V']}-w{cfg['num_warps']}"
                cases[name] = partial(_run_config, key, cfg)
    return cases


def _run_config(key, cfg):
    from cepo_kernels._params import LossParams
    from cepo_kernels.ops import _logits_launch as lg
    from cepo_kernels.ops import configs

    N = B * T
    x = _meta(B, T, V, dtype=torch.bfloat16)
    tg = _meta(N, dtype=torch.long)
    with configs.override({key: cfg}):
        if key == "logits_bwd":
            lg.logprobs_bwd(x, tg, _meta(N), _meta(N), _meta(N))
        elif key == "logprobs_fwd":
            lg.logprobs_fwd(x, tg, with_entropy=True)
        else:
            n = int(key[-1])  # cepo_fwd_x1 / _x2 / _x3: logits tensors read per token
            kw = {1: {}, 2: dict(pos_logits=x, neg_logp=_meta(N)), 3: dict(pos_logits=x, neg_logits=x)}[n]
            lg.cepo_fwd(x, tg, _meta(N), _meta(N, dtype=torch.uint8), LossParams(), old_logp=_meta(N), **kw)


def linear_cases(dtypes=("bf16",)):
    """name -> callable for the linear kernels at their launchers' current configs (ops/_linear_launch.py)."""
    from cepo_kernels._params import LossParams
    from cepo_kernels.ops import _linear_launch as ln

    N = B * T
    tg, rows = _meta(N, dtype=torch.long), _meta(N // 2, dtype=torch.long)
    cases = {}
    for dname in dtypes:
        dt = DTYPES[dname]
        h, w, bias = _meta(N, H, dtype=dt), _meta(V, H, dtype=dt), _meta(V, dtype=dt)
        count = _meta(1, dtype=torch.int32)
        cases[f"linear_fwd-src1-{dname}"] = partial(ln.linear_scores, [h], w, None, tg)
        cases[f"linear_fwd-src1-bias-rows-{dname}"] = partial(ln.linear_scores, [h], w, bias, tg, rows, count)
        cases[f"linear_fwd-src2-{dname}"] = partial(ln.linear_scores, [h, h], w, None, tg, rows, count,
                                                    rows_from=1)
        cases[f"linear_fwd-src3-{dname}"] = partial(ln.linear_scores, [h, h, h], w, None, tg, rows, count,
                                                    rows_from=1)
        cases[f"linear_bwd-{dname}"] = partial(ln.linear_bwd, h, w, None, tg, _meta(N), _meta(N))
        cases[f"linear_bwd-bias-ent-{dname}"] = partial(ln.linear_bwd, h, w, bias, tg, _meta(N), _meta(N),
                                                        _meta(N), _meta(N))
    for old in (False, True):
        for teachers in (False, True):
            cases[f"linear_token{'-old' if old else ''}{'-teachers' if teachers else ''}"] = partial(
                ln.token_fwd, _meta(N), _meta(N) if old else None, _meta(N), _meta(N) if teachers else None,
                _meta(N) if teachers else None, _meta(N, dtype=torch.bool), LossParams())
    return cases


# ---- what a compiled kernel says -------------------------------------------------------------------

def _tool(name):
    import triton.backends.nvidia as nv
    return os.environ.get(f"TRITON_{name.upper()}_PATH") or str(Path(nv.__file__).parent / "bin" / name)


# the longest mnemonic first, and a word end after it: "LDGSTS.E.BYPASS.128" is a 128-bit cp.async load,
# not an "LDG" with no width suffix (32 bits)
_LDST = re.compile(r"\b(LDGSTS|LDG|STG|LDL|STL|RED|ATOMG|ATOM)(?![A-Z0-9_])(\.[A-Z0-9_]+)*")
_GLOBAL_LOADS = ("LDG", "LDGSTS")
_MMA_SASS = re.compile(r"\b(HGMMA|WGMMA|HMMA|IMMA|QGMMA)\b")
# sm_90 per SM: 65536 registers (allocated per warp in units of 256), 228 KB of shared memory (1 KB of it
# reserved per CTA; at most 227 KB per CTA), 64 warps, 32 CTAs
SM90_LIMITS = dict(regs=65536, reg_unit=256, smem=228 * 1024, smem_cta_reserved=1024, smem_max=227 * 1024,
                   warps=64, ctas=32)
_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}
_PTX_MMA = re.compile(r"\b(wgmma\.mma_async|mma)(?:\.sync)?\.aligned\.(m\d+n\d+k\d+)")


def _access_bits(op):
    """Width in bits of a SASS global access such as LDG.E.128, STG.E.U16 (plain LDG.E: 32)."""
    bits = 32
    for part in op.split(".")[1:]:
        bits = _WIDTH.get(part, bits)
    return bits


def _sass(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return sass, usage


def _parse_sass(sass):
    """[(address, instruction text)] and label -> address."""
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append((addr, m.group(2)))
    return instrs, labels


def ctas_per_sm(regs, shared_bytes, num_warps, sm=SM90_LIMITS):
    """Resident CTAs per SM: the least of the register, shared-memory, warp and CTA limits (0: no fit)."""
    per_warp = -(-regs * 32 // sm["reg_unit"]) * sm["reg_unit"]
    by_regs = (sm["regs"] // per_warp) // num_warps if per_warp else sm["ctas"]
    if shared_bytes > sm["smem_max"]:
        return 0
    by_smem = sm["smem"] // (shared_bytes + sm["smem_cta_reserved"])
    return min(by_regs, by_smem, sm["warps"] // num_warps, sm["ctas"])


def _hot_loop(instrs, labels):
    """The innermost backward-branch loop that issues MMAs (the mainloop of a matmul kernel), else the one
    that loads the most global bytes per thread per iteration."""
    loops = []
    for i, (addr, text) in enumerate(instrs):
        m = re.search(r"\bBRA\s+`?\(?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), addr + 1) <= addr:
            start = next(j for j, (a, _) in enumerate(instrs) if a >= labels[m.group(1)])
            loops.append((start, i))
    inner = [(s, e) for s, e in loops
             if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    best = None
    for s, e in inner:
        body = [t for _, t in instrs[s:e + 1]]
        loads = [_access_bits(m.group(0)) for t in body for m in [_LDST.search(t)]
                 if m and m.group(1) in _GLOBAL_LOADS]
        nbytes = sum(loads) // 8
        key = (any(_MMA_SASS.search(t) for t in body), nbytes)
        if nbytes and (best is None or key > best[0]):
            best = (key, body, nbytes, loads)
    return None if best is None else best[1:]


def analyse(fn, kwargs, kernel):
    sass, usage = _sass(kernel.asm["cubin"])
    usage_line = next(ln for ln in usage.splitlines() if "REG:" in ln)
    res = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", usage_line)}
    instrs, labels = _parse_sass(sass)
    widths = {"LDG": [], "STG": []}
    spill_instrs = 0
    for _, text in instrs:
        m = _LDST.search(text)
        if m and m.group(1) in _GLOBAL_LOADS:
            widths["LDG"].append(_access_bits(m.group(0)))
        elif m and m.group(1) == "STG":
            widths["STG"].append(_access_bits(m.group(0)))
        elif m and m.group(1) in ("LDL", "STL"):
            spill_instrs += 1
    constexprs = {k: v for k, v in kwargs.items() if k not in ("debug", "instrumentation_mode",
                                                                "fpsan_homomorphic_casts", "grid", "warmup")}
    row = dict(
        kernel=fn.__name__, config=constexprs, regs=res["REG"], spill_bytes=res["LOCAL"] + res["STACK"],
        spill_instrs=spill_instrs, shared_bytes=kernel.metadata.shared, num_warps=kernel.metadata.num_warps,
        load_bits=max(widths["LDG"], default=0), store_bits=max(widths["STG"], default=0),
        mma=sorted({f"{m.group(1).split('.')[0]} {m.group(2)}"
                    for m in _PTX_MMA.finditer(kernel.asm["ptx"])}),
        sass_instrs=len(instrs),
        ctas_per_sm=ctas_per_sm(res["REG"], kernel.metadata.shared, kernel.metadata.num_warps),
    )
    hot = _hot_loop(instrs, labels)
    if hot is not None:
        body, nbytes, loads = hot
        row.update(loop_instrs=len(body), loop_load_bytes=nbytes, loop_load_bits=min(loads),
                   instr_per_kb=round(len(body) * 1024 / (32 * nbytes), 1),
                   loop_bars=sum(bool(re.search(r"\bBAR\.", t)) for t in body),
                   loop_mufu=sum(bool(re.search(r"\bMUFU\.", t)) for t in body),
                   loop_mma=sum(bool(_MMA_SASS.search(t)) for t in body))
    return row


def report(cases, out=sys.stdout):
    """Compiles every case; prints and returns one dict per distinct compiled kernel (the first case that
    compiled it), or per failed case."""
    rows, seen = [], set()
    for case, launch in cases.items():
        record = []
        try:
            with compile_only(record):
                launch()
        except Exception:  # reported as a row: the test shows it
            record = None
            rows.append(dict(case=case, kernel=None, error=traceback.format_exc(limit=4)[-3000:]))
            print(json.dumps(rows[-1]), file=out, flush=True)
        for fn, kwargs, kernel in record or []:
            if kernel.hash not in seen:
                seen.add(kernel.hash)
                rows.append(dict(case=case, **analyse(fn, kwargs, kernel)))
                print(json.dumps(rows[-1]), file=out, flush=True)
    return rows


def markdown(rows, before=None):
    """A markdown table of the rows (with the saved `before` rows of the same cases beside them)."""
    import platform
    from datetime import datetime, timezone

    import triton

    cols = ("regs", "spill_bytes", "shared_bytes", "ctas_per_sm", "loop_load_bits", "store_bits",
            "instr_per_kb", "loop_mma", "loop_bars", "mma")
    old = {r["case"]: r for r in before or []}
    lines = [f"Generated by `python bench/compile_report.py --markdown` on {platform.node() or '?'} "
             f"({platform.machine()}, {os.cpu_count()} CPUs, no GPU needed), triton {triton.__version__}, "
             f"torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; target sm_90, "
             f"shapes B={B}, T={T}, V={V}, H={H}; "
             f"TRITON_DEFAULT_FP_FUSION={os.environ['TRITON_DEFAULT_FP_FUSION']}."
             + (" Cells: before -> after." if old else ""), "",
             "| case | kernel | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error | " + " | ".join("" for _ in cols) + " |")
            continue
        prev = old.get(r["case"], {})
        def cell(v):
            return ", ".join(v) if isinstance(v, list) else "" if v is None else str(v)

        cells = [f"{cell(prev[c])} -> {cell(r.get(c))}" if c in prev and prev[c] != r.get(c)
                 else cell(r.get(c)) for c in cols]
        lines.append(f"| {r['case']} | {r['kernel']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("logits", "linear"), help="one family of kernels (default: both)")
    ap.add_argument("--dtypes", default="bf16", help="comma-separated of bf16,fp16,fp32 (default bf16)")
    ap.add_argument("--linear-dtypes", help="the linear kernels' dtypes (default: --dtypes)")
    ap.add_argument("--sweep", action="store_true", help="also the tuning sweep's candidate logits configs")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table instead of JSON lines")
    ap.add_argument("--before", help="with --markdown: a saved JSON-lines report to show beside this one")
    args = ap.parse_args(argv)
    dtypes = tuple(args.dtypes.split(","))
    cases = {}
    if args.only in (None, "logits"):
        cases.update(logits_cases(dtypes, sweep=args.sweep))
    if args.only in (None, "linear"):
        cases.update(linear_cases(tuple((args.linear_dtypes or args.dtypes).split(","))))
    if args.cases:
        wanted = args.cases.split(",")
        unknown = sorted(set(wanted) - set(cases))
        if unknown:
            ap.error(f"unknown cases {unknown}; known: {sorted(cases)}")
        cases = {k: cases[k] for k in wanted}
    rows = report(cases, out=open(os.devnull, "w") if args.markdown else sys.stdout)
    if args.markdown:
        before = None
        if args.before:
            before = [json.loads(ln) for ln in Path(args.before).read_text().splitlines() if ln.strip()]
        print(markdown(rows, before))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
