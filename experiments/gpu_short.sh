#!/usr/bin/env bash
# The GPU suite for a short loan: `python -m experiments suite gpu-short`, its three seeds as three
# processes sharing one GPU (each run is small), then the report. Under 10 minutes on one H200-class GPU.
#   bash experiments/gpu_short.sh                      # the real thing (device=cuda), results in experiments/results
#   bash experiments/gpu_short.sh RESULTS_DIR KEY=VAL  # e.g. a CPU smoke test:
#   bash experiments/gpu_short.sh /tmp/gs device=cpu epochs=1 train_subset=2000 eval_tokens=2000 val_size=500 width=4
# Extra KEY=VALUE arguments override every run's config (--set). Needs the data of experiments/get_data.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
RESULTS="${1:-experiments/results}"; shift || true
SEEDS="${SEEDS:-5}"
mkdir -p "$RESULTS"
pids=()
for ((k = 0; k < SEEDS; k++)); do
  OMP_NUM_THREADS=1 "$PY" -m experiments suite gpu-short --seed-only "$k" --results-dir "$RESULTS" --no-progress \
    ${@:+--set "$@"} > "$RESULTS/gpu-short-seed$k.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
tail -n 3 "$RESULTS"/gpu-short-seed*.log
exit $status
