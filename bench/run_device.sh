#!/usr/bin/env bash
# The one prepared GPU call: every number docs/peers.md's targets need, most valuable first, time-boxed to
# ~7.5 minutes (RUN_DEVICE_SECONDS, default 440: the phase caps sum to 420), each test's result written to
# a JSON-lines file as soon as it finishes, so a phase stopped at its cap keeps what it measured.
# docs/device-runs.md says how a session with a GPU runs it (the one `run` call, its carry list, its timeout).
#
#   bash bench/run_device.sh [--only P1,P2] [OUTDIR]      on the GPU machine (OUTDIR: $OUT, else bench/results)
#   bash bench/run_device.sh --fetch-wheels              here, with a network: the peers' wheels, bench/wheels
#   bash bench/run_device.sh --rehearse [--quick] [OUTDIR]   on a CPU: the whole script, the GPU parts stubbed
#   bash bench/run_device.sh --list                      the phases, their caps and what each measures
#
# Before the phases: the peers' pure-Python wheels (bench/wheels, carried) are installed offline into a
# scratch folder put first on PYTHONPATH, and the card, versions and peers are recorded (each peer imported
# as the benchmarks import it; a missing one is reported at the top of the log and of the summary).
# Each phase runs under `timeout -s INT` (pytest stops cleanly: its per-test lines are already written,
# pytest-benchmark still writes its JSON); a phase that would start with under 30 s left is skipped.
# Brings back at most 6 files (a device call returns 8): DATE-log.txt, DATE-results.jsonl (every test, the
# environment, each phase's outcome), DATE-summary.md (bench/summarise.py, rewritten after every phase),
# DATE-bench-json.tgz (pytest-benchmark's JSON per phase), DATE-tune-logits.json and DATE-configs.json.
# --rehearse: every phase invoked, its pytest command collected (--collect-only: paths, options, -k and the
# plugin checked) and its results stubbed (bench/rehearsal.jsonl, marked stub), the wheels installed offline
# into a scratch folder, the summariser run; --quick skips the collection and the torch-importing probe.
set -uo pipefail
cd "$(dirname "$0")/.."
PEERS="liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0"
DEADLINE=440  # seconds from the start: the phase caps (420) + installing the peers and the probe
WHEELS=${RUN_DEVICE_WHEELS:-bench/wheels}  # the carried peers' wheels
# name|cap seconds|what it measures; in order of value (the default run: every phase with a cap > 0)
PHASES=(
  "logits|70|loss on logits: cepo_loss, grpo_loss vs the byte floor, torch eager and Liger"
  "linear|110|loss from hidden states: linear_cepo_loss vs the matmul floor, cut-cross-entropy, TRL, torch, Liger"
  "step|70|the 4B step (full parameters, 4x1): GRPO, CEPO and CEPO with half the groups at A = 0, time and peak"
  "gpu-tests|80|correctness at large shapes: pytest -m gpu (tests/test_large_shapes.py first)"
  "step-rest|40|the other 4B steps: naive CEPO, 1x8, LoRA"
  "sweep|50|the logits kernels' config sweep into the per-card table (cepo_kernels/ops/configs.json)"
  "maxlen|0|the longest response that fits in 80 GB (~200 s; only with --only maxlen)"
)
PY=${PYTHON:-python3}
mode=run only="" quick=0 out=""
while (($#)); do
  case $1 in
    --rehearse) mode=rehearse ;;
    --quick) quick=1 ;;
    --fetch-wheels) mode=fetch ;;
    --list) mode=list ;;
    --only) only=$2; shift ;;
    --only=*) only=${1#--only=} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
    -*) echo "run_device: unknown option $1" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done

if [[ $mode == list ]]; then
  total=0
  for p in "${PHASES[@]}"; do
    IFS='|' read -r name cap what <<<"$p"
    printf '%-10s %4s s  %s\n' "$name" "$cap" "$what"
    total=$((total + cap))
  done
  echo "default run: the phases with a cap, $total s of caps within a deadline of ${RUN_DEVICE_SECONDS:-$DEADLINE} s"
  exit 0
fi
if [[ $mode == fetch ]]; then  # pure-Python wheels: any platform; the image runs Python 3.12
  # shellcheck disable=SC2086
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d "$WHEELS" $PEERS
fi

selected=()
for p in "${PHASES[@]}"; do
  IFS='|' read -r name cap _ <<<"$p"
  if [[ -n $only ]]; then [[ ",$only," == *",$name,"* ]] && selected+=("$name") ; elif ((cap > 0)); then selected+=("$name"); fi
done
for name in ${only//,/ }; do
  printf '%s\n' "${PHASES[@]}" | grep -q "^$name|" || { echo "run_device: no phase $name (see --list)" >&2; exit 2; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/run_device.XXXXXX")
if [[ -z $out ]]; then
  if [[ $mode == rehearse ]]; then out=$(mktemp -d "${TMPDIR:-/tmp}/run_device-rehearsal.XXXXXX"); else
    out=${OUT:-bench/results}; fi
fi
mkdir -p "$out" "$work/bench"
stamp=$(date -u +%Y-%m-%d)
log=$out/$stamp-log.txt results=$out/$stamp-results.jsonl summary=$out/$stamp-summary.md
table=cepo_kernels/ops/configs.json
deadline=$(( $(date +%s) + ${RUN_DEVICE_SECONDS:-$DEADLINE} ))
failures=0
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Triton 3.9 warns that FP fusion (fused multiply-add) will default to off in 3.10: the kernels were
# compiled and timed with it on (docs/compile_report.md), so every run here says so explicitly.
export TRITON_DEFAULT_FP_FUSION=1
say() { echo "$*" | tee -a "$log"; }

# ---------------------------------------------------------------- the peers, installed offline
site=$work/site
missing=()
for spec in $PEERS; do
  dist=${spec%%==*} ver=${spec#*==}
  compgen -G "$WHEELS/${dist//-/_}-$ver-*.whl" >/dev/null || missing+=("$spec")
done
if ((${#missing[@]})); then
  say "run_device: MISSING peer wheels in $WHEELS: ${missing[*]} -- their benchmarks will skip and their ratios"
  say "  will be missing. Fetch them where pip has a network (bash bench/run_device.sh --fetch-wheels) and name"
  say "  $WHEELS in the run call's carry list (docs/device-runs.md)."
fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$WHEELS"/*.whl 2>&1 | tee -a "$log"; then
    say "run_device: installed offline into $site: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
  else
    say "run_device: pip install of the carried wheels FAILED (see above): the peers' benchmarks will skip"
    failures=$((failures + 1))
  fi
fi
export PYTHONPATH="$site:$PWD/bench:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------- phases

summarise() {
  "$PY" bench/summarise.py "$out" >"$summary" 2>>"$log" || say "run_device: summarise.py failed"
}

phase() {  # phase NAME: runs the phase under min(its cap, time left), SIGINT at the cap; records the outcome
  local name=$1 cap left start rc status
  cap=$(printf '%s\n' "${PHASES[@]}" | grep "^$name|" | cut -d'|' -f2)
  ((cap > 0)) || cap=240  # an opt-in phase (--only): bounded by the time left
  left=$(( deadline - $(date +%s) ))
  start=$(date +%s)
  if ((left < 30)); then
    status="skipped ($left s left)" rc=0
    say "== $name: $status"
  else
    ((cap > left)) && cap=$left
    say "== $name (at most $cap s)"
    CAP=$cap CEPO_RESULTS_PHASE=$name run_phase "$name" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
      0) status=ok ;;
      124|137) status="cut at its cap ($cap s)" ;;
      *) status="exit $rc" ;;
    esac
    say "== $name: $status after $(( $(date +%s) - start )) s"
  fi
  printf '{"kind": "phase", "phase": "%s", "cap": %d, "seconds": %d, "exit": %d, "status": "%s"}\n' \
    "$name" "$cap" "$(( $(date +%s) - start ))" "$rc" "$status" >>"$results"
  [[ $mode == rehearse && $rc != 0 ]] && failures=$((failures + 1))
  tar czf "$out/$stamp-bench-json.tgz" -C "$work/bench" . 2>/dev/null
  summarise
  return 0
}

bench_pytest() {  # bench_pytest PHASE ORDER PYTEST-ARGS...: one pytest session of a phase
  local name=$1 order=$2
  shift 2
  if [[ $mode == rehearse ]]; then
    if ((!quick)); then  # the same command, collected only: paths, options, -k / -m and the plugin checked
      local rc text
      text=$(CEPO_RESULTS_ORDER=$order timeout "$CAP" "$PY" -m pytest --collect-only -q -p device_results \
        -p no:cacheprovider "$@" 2>&1)
      rc=$?
      grep -v '^$' <<<"$text" | tail -n 25
      # 5 = nothing collected: a file that skips itself without a GPU (bench/test_linear_loss.py) is fine,
      # a -k or -m that deselected every test is a typo
      if ((rc == 5)) && ! grep -q deselected <<<"$text"; then
        echo "rehearsal: $* collects nothing on a CPU (skipped at import without a GPU): not checked further"
      elif ((rc != 0)); then
        return "$rc"
      fi
    fi
    "$PY" bench/device_results.py stub "$results" "$name"
    return
  fi
  CEPO_RESULTS_JSONL=$results CEPO_RESULTS_ORDER=$order capped "$PY" -m pytest -q -rs -p device_results \
    -p no:cacheprovider "$@"
}

capped() {  # SIGINT at the phase's cap (pytest then stops cleanly), SIGKILL 20 s later
  timeout -s INT -k 20 "$CAP" "$@"
}

run_phase() {
  local name=$1 bj="--benchmark-json=$work/bench/$1.json"
  local step_targets="test_step and full and 4x1 and not naive"
  case $name in
    logits) bench_pytest logits "floor,[cepo],[cepo-inplace],[torch-cepo],[liger-grpo],[grpo-inplace],[grpo]" \
      bench/test_logits_loss.py "$bj" ;;
    linear) bench_pytest linear \
      "floor,[cepo-cepo-dense],[cce-cepo-dense],[cepo-cepo-half-zero],[cepo-grpo-,[cce-,[trl-,[torch-,[liger-" \
      bench/test_linear_loss.py "$bj" ;;
    step) bench_pytest step "[full-4x1-grpo],[full-4x1-cepo-half-zero],[full-4x1-cepo]" \
      bench/test_train_step.py -k "$step_targets" "$bj" ;;
    gpu-tests) bench_pytest gpu-tests "test_large_shapes" -m gpu \
      $(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ') ;;
    step-rest) bench_pytest step-rest "[full-,[lora-4x1" bench/test_train_step.py \
      -k "test_step and not ($step_targets)" "$bj" ;;
    maxlen) bench_pytest maxlen "[cepo]" bench/test_train_step.py -k test_max_response_len "$bj" ;;
    sweep)
      if [[ $mode == rehearse ]]; then
        ((quick)) || "$PY" bench/tune_logits.py --help >/dev/null || return 1
        "$PY" bench/device_results.py stub "$results" sweep
        return
      fi
      capped "$PY" bench/tune_logits.py --table "$table" --out "$out/$stamp-tune-logits.json"
      local rc=$?
      cp "$table" "$out/$stamp-configs.json" 2>/dev/null || echo "run_device: no config table written"
      return $rc ;;
  esac
}

say "run_device: $mode; phases: ${selected[*]}; out: $out; deadline in ${RUN_DEVICE_SECONDS:-$DEADLINE} s"
if [[ $mode == rehearse ]] && ((quick)); then
  printf '{"kind": "env", "card": "rehearsal (--quick: not probed)", "fp_fusion": "%s"}\n' \
    "$TRITON_DEFAULT_FP_FUSION" >>"$results"
else
  # shellcheck disable=SC2086
  timeout 120 "$PY" bench/device_results.py env "$results" $PEERS 2>&1 | tee -a "$log"
  probe=${PIPESTATUS[0]}
  # a rehearsal with the wheels at hand must import every peer from them
  if [[ $mode == rehearse && $probe != 0 ]] && ((${#missing[@]} == 0)); then failures=$((failures + 1)); fi
fi
for name in "${selected[@]}"; do
  phase "$name"
done
summarise
cat "$summary"
rm -rf "$work"
if [[ $mode == rehearse ]]; then
  echo "run_device: rehearsal done, $failures problem(s); results in $out"
  exit $((failures > 0))
fi
