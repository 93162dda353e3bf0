#!/usr/bin/env bash
# One prepared GPU run, time-boxed to finish within ~8.5 minutes (a device call may run 10; triton >= 3.6).
# Phases in order of value, each with its own cap; a phase that would start past the deadline is skipped:
#   1. the large-shape correctness tests (-m gpu)
#   2. the kernel benchmarks with the peers and their floors timed in the same run (bench/test_logits_loss.py,
#      bench/test_linear_loss.py: Liger, cut-cross-entropy, TRL's chunked log-prob head; a logits copy, a matmul)
#   3. the logits kernels' config sweep (the fastest config per card written to the launchers' table)
#   4. the one-step benchmark of a Qwen3-4B-shaped model (bench/test_train_step.py, without the search)
#   5. the longest response that fits (the doubling search of bench/test_train_step.py)
# Writes at most 7 files (what a device call brings back: 8): a log, the bench JSONs, the sweep's results,
# the config table and a markdown summary with the card, versions and date.
# Usage on a GPU machine: bash bench/run_device.sh [OUTDIR]  (default $OUT, else bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
stamp=$(date -u +%Y-%m-%d)
log="$out/$stamp-log.txt"
table=cepo_kernels/ops/configs.json
deadline=$(( $(date +%s) + ${RUN_DEVICE_SECONDS:-510} ))

phase() {  # phase NAME CAP_SECONDS COMMAND...: runs the command under min(cap, time left), logged
    local name=$1 cap=$2 left
    shift 2
    left=$(( deadline - $(date +%s) ))
    if (( left < 30 )); then
        echo "== $name: skipped ($left s left)" | tee -a "$log"
        return
    fi
    (( cap > left )) && cap=$left
    echo "== $name (at most $cap s)" | tee -a "$log"
    timeout "$cap" "$@" 2>&1 | tee -a "$log" | tail -n 30
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}

python - <<'PY' | tee "$log"
import datetime, torch, triton
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"card: {card}; torch {torch.__version__}; triton {triton.__version__}; "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
PY
phase "gpu tests" 90 python -m pytest -q -m gpu tests
phase "kernel benchmarks" 150 python -m pytest -q bench/test_logits_loss.py bench/test_linear_loss.py \
  --benchmark-json="$out/$stamp-bench-kernels.json"
phase "logits config sweep" 120 python bench/tune_logits.py --table "$table" --out "$out/$stamp-tune-logits.json"
cp "$table" "$out/$stamp-configs.json" 2>/dev/null || echo "run_device: no config table written" | tee -a "$log"
phase "train step" 150 python -m pytest -q bench/test_train_step.py -k "test_step" \
  --benchmark-json="$out/$stamp-bench-step.json"
phase "longest response" 200 python -m pytest -q bench/test_train_step.py -k "test_max_response_len" \
  --benchmark-json="$out/$stamp-bench-maxlen.json"
python bench/summarise.py "$out"/"$stamp"-bench-*.json > "$out/$stamp-bench.md" 2>>"$log"
cat "$out/$stamp-bench.md"
