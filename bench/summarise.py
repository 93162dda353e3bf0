"""Turns pytest-benchmark JSON files into markdown tables with the card, versions and date, and the kernels'
ratios to their floors and to each peer timed in the same run (docs/peers.md's targets).

    python bench/summarise.py RESULT.json [RESULT.json ...]   (missing or empty files are noted, not fatal)

Floors (timed in the same run, so the card's bandwidth and FLOP rate cancel): on logits, a bf16 copy of the
logits (2 passes over their bytes) x 2 for CEPO (read 3 logits tensors, write dlogits) and x 1.5 for GRPO
(read logits, read + write dlogits); from hidden states, one [N, H] x [H, V] matmul x 6 for CEPO (3 forward
passes, recompute, 2 gradient matmuls) and x 4 for GRPO.
"""

import json
import sys

# provider of the logits benchmarks -> (family, loss); the floor rows have provider "floor-*"
_LOGITS = {"grpo": "grpo", "grpo-inplace": "grpo", "cepo": "cepo", "cepo-inplace": "cepo",
           "torch-grpo": "grpo", "torch-cepo": "cepo", "liger-grpo": "grpo"}
_OURS = {"grpo", "grpo-inplace", "cepo", "cepo-inplace"}
FLOOR_FACTOR = {("logits", "cepo"): 2.0, ("logits", "grpo"): 1.5, ("linear", "cepo"): 6.0,
                ("linear", "grpo"): 4.0}


def main(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"# {path}: no results ({e})\n")
        return
    info = data.get("machine_info", {})
    print(f"# Benchmarks, {data.get('datetime', '?')} ({path})")
    print()
    print(f"card: {info.get('gpu', '?')}; torch {info.get('torch', '?')}; triton {info.get('triton', '?')}")
    print()
    print("| benchmark | median ms | min ms | peak extra GiB | peak GiB | longest response fitting |")
    print("|---|---:|---:|---:|---:|---:|")
    for bench in data.get("benchmarks", []):
        stats, extra = bench["stats"], bench.get("extra_info", {})
        cells = [_num(extra.get("peak_extra_gib", extra.get("extra_GiB"))), _num(extra.get("peak_gib")),
                 _fit(extra)]
        name = bench["fullname"].split("::")[-1]
        times = f"{stats['median'] * 1e3:.2f} | {stats['min'] * 1e3:.2f}"
        print(f"| {name} | {times} | " + " | ".join(cells) + " |")
    rows = ratios(data.get("benchmarks", []))
    if rows:
        print()
        print("Ratios (median / median; < 1 is faster than the floor or the peer):")
        print()
        print("| kernel | vs floor | vs peers |")
        print("|---|---:|---|")
        for name, floor, peers in rows:
            peer_cells = ", ".join(f"{p} {r:.2f}" for p, r in peers) or "-"
            print(f"| {name} | {'' if floor is None else f'{floor:.2f}'} | {peer_cells} |")


def _key(bench):
    """(family, provider, loss, case) of a kernel benchmark, or None for another benchmark."""
    extra = bench.get("extra_info", {})
    provider = extra.get("provider")
    name = bench.get("name", bench.get("fullname", ""))
    if provider is None:
        return None
    if "logits" in name:
        return "logits", provider, _LOGITS.get(provider), ""
    if "linear" in name:
        return "linear", provider, extra.get("loss"), extra.get("case", "")
    return None


def ratios(benchmarks):
    """[(kernel name, ratio to its floor or None, [(peer, ratio)])] for this package's kernels."""
    med, floors = {}, {}
    for b in benchmarks:
        k = _key(b)
        if k is None:
            continue
        family, provider, loss, case = k
        if provider.startswith("floor"):
            floors[family] = b["stats"]["median"]
        else:
            med[(family, provider, loss, case)] = b["stats"]["median"]
    rows = []
    for (family, provider, loss, case), t in sorted(med.items()):
        ours = provider in _OURS if family == "logits" else provider == "cepo"
        if not ours:
            continue
        floor = None
        if family in floors and (family, loss) in FLOOR_FACTOR:
            floor = t / (FLOOR_FACTOR[(family, loss)] * floors[family])
        peers = [(p, t / tp) for (f, p, lo, c), tp in sorted(med.items())
                 if f == family and lo == loss and c == case and p != provider
                 and not (p in _OURS if family == "logits" else p == "cepo")]
        label = f"{family} {provider}" + (f" {loss} {case}" if family == "linear" else "")
        rows.append((label, floor, peers))
    return rows


def _num(x):
    return f"{x:.2f}" if isinstance(x, (int, float)) else ""


def _fit(extra):
    """bench/test_train_step.py's max-length search: the longest that ran (< the first that did not)."""
    if "max_fit" not in extra:
        return ""
    oom = extra.get("first_oom")
    return f"{extra['max_fit']} (< {oom})" if oom else f">= {extra['max_fit']} (time out)"


if __name__ == "__main__":
    for p in sys.argv[1:]:
        main(p)
        print()
