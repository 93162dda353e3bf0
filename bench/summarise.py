"""Turns a pytest-benchmark JSON file into a markdown table with the card, versions and date."""

import json
import sys


def main(path):
    with open(path) as f:
        data = json.load(f)
    info = data.get("machine_info", {})
    print(f"# Benchmarks, {data.get('datetime', '?')}")
    print()
    print(f"card: {info.get('gpu', '?')}; torch {info.get('torch', '?')}; triton {info.get('triton', '?')}")
    print()
    print("| benchmark | median ms | min ms | peak extra GiB |")
    print("|---|---:|---:|---:|")
    for bench in data.get("benchmarks", []):
        stats, extra = bench["stats"], bench.get("extra_info", {})
        peak = extra.get("peak_extra_gib")
        peak_s = f"{peak:.2f}" if isinstance(peak, (int, float)) else ""
        name = bench["fullname"].split("::")[-1]
        print(f"| {name} | {stats['median'] * 1e3:.2f} | {stats['min'] * 1e3:.2f} | {peak_s} |")


if __name__ == "__main__":
    main(sys.argv[1])
