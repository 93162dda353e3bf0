"""The operators' native CPU kernels against eager PyTorch (cepo_ref) and TRL's chunked head, on a CPU.

    python bench/cpu_operators.py [--reps 5] [--threads 1] [--cases token_logprobs,...] [--json out.json]

Each case runs forward + backward of every implementation in one process, interleaved (impl A, B, C, A, B,
C, ...) after one warm-up each, so that a shared machine's load hits them alike; it prints the min and
median time and the per-round ratio to cepo_ref eager (min / median). Peak memory: each (case, impl) runs
once more in a fresh subprocess and reports its resident-set high-water mark (VmHWM, reset just before the
call) above the resident set after the inputs were built (torch's CPU allocator keeps no statistics;
tracemalloc does not see torch's allocations). Not a test: no timing is asserted anywhere.
Results: docs/cpu-operators.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cepo_kernels as ck  # noqa: E402
import cepo_ref  # noqa: E402

# name -> (shape description, dims); every case fp32
CASES = {
    "token_logprobs": ("N 2048 x V 32768, entropy", dict(N=2048, V=32768)),
    "cepo_loss": ("N 1024 x V 32768, 2 teacher logits", dict(N=1024, V=32768)),
    "linear_logprobs": ("N 2048 x V 32768 x H 1024, entropy", dict(N=2048, V=32768, H=1024)),
    "linear_cepo_loss": ("N 1024 x V 32768 x H 1024, 2 teacher hidden", dict(N=1024, V=32768, H=1024)),
    "token_logprobs-small": ("N 256 x V 4096, entropy", dict(N=256, V=4096)),
    "cepo_loss-small": ("N 256 x V 4096, 2 teacher logits", dict(N=256, V=4096)),
    "linear_logprobs-small": ("N 256 x V 32768 x H 256, entropy", dict(N=256, V=32768, H=256)),
    "linear_cepo_loss-small": ("N 256 x V 4096 x H 256, 2 teacher hidden", dict(N=256, V=4096, H=256)),
}


def inputs(case, seed=0):
    d = CASES[case][1]
    g = torch.Generator().manual_seed(seed)
    N, V = d["N"], d["V"]
    x = dict(targets=torch.randint(0, V, (N,), generator=g), adv=torch.randn(N, generator=g),
             mask=torch.rand(N, generator=g) > 0.1, old=torch.randn(N, generator=g) * 0.05 - 8.0)
    if "H" in d:
        H = d["H"]
        x.update(hidden=torch.randn(N, H, generator=g), weight=torch.randn(V, H, generator=g) / H ** 0.5,
                 pos=torch.randn(N, H, generator=g), neg=torch.randn(N, H, generator=g))
    else:
        x.update(logits=torch.randn(N, V, generator=g) * 2,
                 **({"pos": torch.randn(N, V, generator=g) * 2, "neg": torch.randn(N, V, generator=g) * 2}
                    if case.startswith("cepo_loss") else {}))
    return x


def impls(case):
    """name -> fn(inputs) running forward + backward (a fresh leaf each call)."""
    base = case.split("-")[0]
    if base == "token_logprobs":
        def run(mod):
            def f(x):
                leaf = x["logits"].requires_grad_()
                lp, ent = mod.token_logprobs(leaf, x["targets"], return_entropy=True)
                (lp.sum() + 0.1 * ent.sum()).backward()
                leaf.grad = None
            return f
        out = {"cepo_kernels": run(ck), "cepo_ref": run(cepo_ref)}
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        def trl(x):
            leaf = x["logits"].requires_grad_()
            lp = selective_log_softmax(leaf, x["targets"])
            (lp.sum() + 0.1 * entropy_from_logits(leaf).sum()).backward()
            leaf.grad = None
        out["trl_eager"] = trl
        return out
    if base == "cepo_loss":
        def run(mod):
            def f(x):
                leaf = x["logits"].requires_grad_()
                mod.cepo_loss(leaf, x["targets"], x["adv"], x["mask"], old_logp=x["old"], pos_logits=x["pos"],
                              neg_logits=x["neg"], lam=0.5).loss.backward()
                leaf.grad = None
            return f
        return {"cepo_kernels": run(ck), "cepo_ref": run(cepo_ref)}
    if base == "linear_logprobs":
        def run(mod):
            def f(x):
                h, w = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
                lp, ent = mod.linear_logprobs(h, w, x["targets"], return_entropy=True)
                (lp.sum() + 0.1 * ent.sum()).backward()
                h.grad = w.grad = None
            return f
        from trl.kernels import ChunkedLogProbFunction

        def trl(x):
            h, w = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
            lp, ent, *_ = ChunkedLogProbFunction.apply(h, w, None, x["targets"], 1.0, 32768, None, 1.0,
                                                       ("entropy",))
            (lp.sum() + 0.1 * ent.sum()).backward()
            h.grad = w.grad = None
        return {"cepo_kernels": run(ck), "cepo_ref": run(cepo_ref), "trl_chunked": trl}
    if base == "linear_cepo_loss":
        def run(mod):
            def f(x):
                h, w = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
                mod.linear_cepo_loss(h, w, x["targets"], x["adv"], x["mask"], old_logp=x["old"],
                                     pos_hidden=x["pos"], neg_hidden=x["neg"], lam=0.5).loss.backward()
                h.grad = w.grad = None
            return f
        return {"cepo_kernels": run(ck), "cepo_ref": run(cepo_ref)}
    raise ValueError(f"case: expected one of {sorted(CASES)}, got {case!r}")


_PEAK_CODE = """
import sys, torch
sys.path.insert(0, {root!r})
import bench.cpu_operators as b

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

torch.set_num_threads(1)
x = b.inputs({case!r})
f = b.impls({case!r})[{impl!r}]
f(x)  # warm-up: lazy imports and first-call caches are not the operator's memory
open("/proc/self/clear_refs", "w").write("5")  # resets the high-water mark VmHWM to the current RSS
base = rss("VmRSS:")
f(x)
print(rss("VmHWM:") - base)
"""


def peak_mib(case, impl):
    """Resident-set high-water mark (MiB) of one forward + backward above the process's RSS before it, in a
    fresh process (Linux: /proc/self/clear_refs resets the mark), after one warm-up call."""
    code = _PEAK_CODE.format(root=str(ROOT), case=case, impl=impl)
    # a fixed mmap threshold: every large buffer is mapped on allocation and unmapped when freed, so the
    # warm-up's freed memory is not reused unseen
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench(case, reps):
    x = inputs(case)
    fns = impls(case)
    for f in fns.values():  # warm-up
        f(x)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f(x)
            times[k].append(time.perf_counter() - t)
    row = {"case": case, "shape": CASES[case][0], "impls": {}}
    for k, ts in times.items():
        ratio = [a / b for a, b in zip(ts, times["cepo_ref"], strict=True)]
        row["impls"][k] = dict(min_s=min(ts), median_s=statistics.median(ts), ratio_min=min(ratio),
                               ratio_median=statistics.median(ratio), peak_mib=peak_mib(case, k))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import platform

    import triton
    import trl

    meta = dict(date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()), cpu=platform.processor() or "",
                cores=os.cpu_count(), threads=args.threads, torch=torch.__version__,
                triton=triton.__version__,
                trl=trl.__version__, reps=args.reps, dtype="fp32",
                cpu_kernels=os.environ.get("CEPO_KERNELS_CPU", "native"))
    print(json.dumps(meta))
    rows = []
    for case in args.cases.split(","):
        row = bench(case, args.reps)
        rows.append(row)
        for k, v in row["impls"].items():
            print(f"{case:24s} {k:13s} min {v['min_s']:8.3f} s  median {v['median_s']:8.3f} s  "
                  f"/ cepo_ref {v['ratio_min']:5.2f} / {v['ratio_median']:5.2f}  "
                  f"peak +{v['peak_mib']:7.1f} MiB",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
