#!/usr/bin/env bash
# The GPU suite for a short loan: `python -m experiments suite gpu-short`, one process per
# (group, seed) sharing one GPU (each run is small: 5 ResNet-20 + 3 LSTM processes), then the
# last lines of their logs. Meant to end within 10 minutes on one H200-class GPU; LIMIT (seconds,
# default 540) stops every process by then, so a slower GPU still leaves its finished runs
# (appended one by one; only the runs in flight are lost, and a rerun resumes). The LSTM runs
# are lm-full's (the device is not part of a run id): they fill those rows of lm-full too.
#   bash experiments/gpu_short.sh                      # the real thing (device=cuda), results in experiments/results
#   bash experiments/gpu_short.sh RESULTS_DIR KEY=VAL  # e.g. a CPU smoke test:
#   bash experiments/gpu_short.sh /tmp/gs device=cpu epochs=1 train_subset=2000 eval_tokens=2000 val_size=500 width=4
# Extra KEY=VALUE arguments override every run's config (--set). Needs the data of experiments/get_data.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
RESULTS="${1:-experiments/results}"; shift || true
LIMIT="${LIMIT:-540}"
mkdir -p "$RESULTS"
pids=()
launch() {  # launch GROUP SEEDS
  local group=$1 seeds=$2 k
  for ((k = 0; k < seeds; k++)); do
    OMP_NUM_THREADS=1 timeout "$LIMIT" "$PY" -m experiments suite gpu-short --group "$group" --seed-only "$k" \
      --results-dir "$RESULTS" --no-progress "${@:3}" > "$RESULTS/gpu-short-${group##* }-seed$k.log" 2>&1 &
    pids+=($!)
  done
}
set_args=(); [ $# -gt 0 ] && set_args=(--set "$@")
launch "gpu fmnist-full resnet20" "${IMAGE_SEEDS:-5}" "${set_args[@]}"
launch "gpu brown-full zaremba-small lstm" "${LM_SEEDS:-3}" "${set_args[@]}"
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
tail -n 3 "$RESULTS"/gpu-short-*.log
exit $status
