#!/usr/bin/env bash
# One prepared GPU run: the large-shape correctness tests, then the benchmarks, recorded with the card,
# versions and date. Usage on a GPU machine: bash bench/run_device.sh [OUTDIR]  (default bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
stamp=$(date -u +%Y-%m-%d)
python -m pytest -q -m gpu tests 2>&1 | tee "$out/$stamp-gpu-tests.txt"
python -m pytest -q bench --benchmark-json="$out/$stamp-bench.json" --benchmark-min-rounds=5 2>&1 \
  | tee "$out/$stamp-bench.txt"
python bench/summarise.py "$out/$stamp-bench.json" > "$out/$stamp-bench.md"
cat "$out/$stamp-bench.md"
