"""Sweeps the logits kernels' candidate configs on this GPU; writes the fastest per card to the config table.

    python bench/tune_logits.py [--table PATH] [--out results.json] [--rows N]

For each kernel key of cepo_kernels.ops.configs (logprobs_fwd, cepo_fwd_x1/x2/x3, logits_bwd) every
candidate of configs.SWEEP runs at the real shape (bf16, N = 8192 rows, V = 151936) under
configs.override; a candidate whose outputs differ from the default config's is rejected. The fastest
(median of triton.testing.do_bench) is written for `torch.cuda.get_device_name()` into the JSON table
(default: the one the launchers read, configs.table_path()); other cards' entries are kept.
Run by bench/run_device.sh; `sweep()` takes any timing function, so the table writing is tested on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cepo_kernels.ops import configs  # noqa: E402


def sweep(keys, measure, card, table=None):
    """measure(key, cfg) -> milliseconds, or None for a rejected candidate. Returns {key: {"best", "ms"}}
    and writes each key's fastest config for `card` into the table as soon as that key is done (so a run
    cut short keeps what it measured; nothing for a key with no survivor)."""
    results = {}
    for key in keys:
        timings = {}
        for cfg in configs.SWEEP[key]:
            ms = measure(key, cfg)
            if ms is not None:
                timings[(cfg["BLOCK_V"], cfg["num_warps"])] = ms
        best = None
        if timings:
            (bv, nw), _ = min(timings.items(), key=lambda kv: kv[1])
            best = {"BLOCK_V": bv, "num_warps": nw}
            configs.write_table(card, {key: best}, table)
        results[key] = {"best": best, "ms": {f"BLOCK_V={bv},num_warps={nw}": round(ms, 4)
                                             for (bv, nw), ms in timings.items()}}
    return results


def gpu_measure(rows, V):
    """A measure(key, cfg) for the current CUDA device: inputs built once per key, outputs checked against
    the default config's."""
    import torch
    from triton.testing import do_bench

    from cepo_kernels._params import LossParams
    from cepo_kernels.ops import _logits_launch as lg

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x, p, n = ((torch.randn(rows, 1, V, device=dev, generator=g) * 2).to(torch.bfloat16) for _ in range(3))
    tg = torch.randint(0, V, (rows,), device=dev, generator=g)
    adv = torch.randn(rows, device=dev, generator=g)
    mask = (torch.rand(rows, device=dev, generator=g) > 0.125).to(torch.uint8)
    old = torch.randn(rows, device=dev, generator=g) - 12.0
    neg_logp = old + 0.1
    params = LossParams()

    def run(key):
        if key == "logprobs_fwd":
            return lg.logprobs_fwd(x, tg, with_entropy=True)
        if key == "logits_bwd":
            return (lg.logprobs_bwd(x, tg, lse, lse, grad),)
        teachers = {"cepo_fwd_x1": {}, "cepo_fwd_x2": dict(pos_logits=p, neg_logp=neg_logp),
                    "cepo_fwd_x3": dict(pos_logits=p, neg_logits=n)}[key]
        return lg.cepo_fwd(x, tg, adv, mask, params, old_logp=old, **teachers)

    _, lse, _ = lg.logprobs_fwd(x, tg, with_entropy=False)
    grad = torch.randn(rows, device=dev, generator=g) * (mask > 0)
    reference = {}

    def measure(key, cfg):
        if key not in reference:
            with configs.override({key: configs.DEFAULTS[key]}):
                reference[key] = [None if t is None else t.clone() for t in run(key)]
        with configs.override({key: cfg}):
            try:
                out = run(key)
            except Exception as e:  # e.g. out of shared memory or registers on this card
                print(f"tune_logits: {key} {cfg} rejected: {type(e).__name__}: {e}", file=sys.stderr)
                return None
            for a, b in zip(out, reference[key], strict=True):
                if a is not None and not torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-5,
                                                        equal_nan=True):
                    print(f"tune_logits: {key} {cfg} rejected: outputs differ from the default's",
                          file=sys.stderr)
                    return None
            return do_bench(lambda: run(key), warmup=10, rep=60, return_mode="median")

    return measure


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", default=None, help="the JSON config table (default: the launchers' table)")
    ap.add_argument("--out", default=None, help="also write every timing here (JSON)")
    ap.add_argument("--rows", type=int, default=8192, help="token rows (default 8192 = 4 x 2048)")
    ap.add_argument("--vocab", type=int, default=151936)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the table is per card)")
    card = torch.cuda.get_device_name()
    results = sweep(configs.KEYS, gpu_measure(args.rows, args.vocab), card, args.table)
    record = {"card": card, "rows": args.rows, "vocab": args.vocab, "torch": torch.__version__,
              "triton": __import__("triton").__version__, "results": results}
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
