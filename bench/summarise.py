"""Turns pytest-benchmark JSON files into markdown tables with the card, versions and date.

    python bench/summarise.py RESULT.json [RESULT.json ...]   (missing or empty files are noted, not fatal)
"""

import json
import sys


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
        cells = [_num(extra.get("peak_extra_gib")), _num(extra.get("peak_gib")), _fit(extra)]
        name = bench["fullname"].split("::")[-1]
        times = f"{stats['median'] * 1e3:.2f} | {stats['min'] * 1e3:.2f}"
        print(f"| {name} | {times} | " + " | ".join(cells) + " |")


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
