#!/usr/bin/env bash
# One prepared GPU run (well under 10 minutes; triton >= 3.6): the large-shape correctness tests, the logits
# kernels' config sweep (the fastest config per card written to the launchers' table), the GPU tests again
# under that table, then the benchmarks, recorded with the card, versions and date.
# Usage on a GPU machine: bash bench/run_device.sh [OUTDIR]  (default $OUT, else bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
stamp=$(date -u +%Y-%m-%d)
table=cepo_kernels/ops/configs.json
python - <<'PY' | tee "$out/$stamp-env.txt"
import torch, triton
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"card: {card}; torch {torch.__version__}; triton {triton.__version__}")
PY
python -m pytest -q -m gpu tests 2>&1 | tee "$out/$stamp-gpu-tests.txt"
# the sweep: ~30 configs x (compile + a few hundred ms of timing); the table then serves every launch below
timeout 300 python bench/tune_logits.py --table "$table" --out "$out/$stamp-tune-logits.json" \
  2> "$out/$stamp-tune-logits.err" | tail -n 40
cp "$table" "$out/configs.json" 2>/dev/null || echo "run_device: no config table written" >&2
python -m pytest -q -m gpu tests/test_logits.py 2>&1 | tee "$out/$stamp-gpu-tests-tuned.txt"
python -m pytest -q bench --benchmark-json="$out/$stamp-bench.json" --benchmark-min-rounds=5 2>&1 \
  | tee "$out/$stamp-bench.txt"
python bench/summarise.py "$out/$stamp-bench.json" > "$out/$stamp-bench.md"
cat "$out/$stamp-bench.md"
