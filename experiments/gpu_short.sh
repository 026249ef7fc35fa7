#!/usr/bin/env bash
# The GPU suite for a short loan: `python -m experiments suite gpu-short`, in processes sharing
# one GPU (each run is small: one ResNet-20 process per seed, one LSTM process per seed and
# setting), then the last lines of their logs. Sized for 10 minutes on one H200-class GPU (the first
# loan, 2026-12-04, without MPS, finished 11 of its 34 runs in 510 s); LIMIT (seconds,
# default 540) stops every process by then, so a slower GPU still leaves its finished runs
# (appended one by one; only the runs in flight are lost, and a rerun resumes). The LSTM runs
# are lm-full's (the device is not part of a run id): they fill those rows of lm-full too.
#   bash experiments/gpu_short.sh                      # the real thing (device=cuda), results in experiments/results
#   bash experiments/gpu_short.sh RESULTS_DIR KEY=VAL  # e.g. a CPU smoke test:
#   bash experiments/gpu_short.sh /tmp/gs device=cpu epochs=1 train_subset=2000 eval_tokens=2000 val_size=500 width=4
# Extra KEY=VALUE arguments override every run's config (--set). Needs the data of experiments/get_data.sh.
# A copy of the tree without git metadata (a device machine's) records no commit; there, SOURCE_MANIFEST
# names the file-hash manifest `experiments/gpu_loan.sh prepare` writes (.devdata/M, with the commit
# in M.commit), and the runs record that commit only if every file of the copy matches it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! git rev-parse HEAD > /dev/null 2>&1 && [ -n "${SOURCE_MANIFEST:-}" ]; then
  if sha256sum --quiet -c "$SOURCE_MANIFEST"; then
    EXPERIMENTS_SOURCE_COMMIT=$(cat "$SOURCE_MANIFEST.commit"); export EXPERIMENTS_SOURCE_COMMIT
    echo "copy matches commit $EXPERIMENTS_SOURCE_COMMIT"
  else
    echo "copy does not match $SOURCE_MANIFEST: its runs record no commit" >&2
  fi
fi
PY="${PYTHON:-python}"
RESULTS="${1:-experiments/results}"; shift || true
LIMIT="${LIMIT:-540}"
mkdir -p "$RESULTS"
# MPS lets the processes' kernels run side by side: without it the GPU time-slices them, and on
# an H200 (2026-12-04) 14 such processes ran about as fast as one. MPS=0 turns it off; a daemon
# that does not serve a probe within 60 s is stopped again and the runs go on time-sliced.
if [ "${MPS:-auto}" != 0 ] && command -v nvidia-cuda-mps-control > /dev/null && [[ " $* " != *" device=cpu "* ]]; then
  export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/dropgrad-mps/pipe}" CUDA_MPS_LOG_DIRECTORY="${CUDA_MPS_LOG_DIRECTORY:-/tmp/dropgrad-mps/log}"
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && timeout 60 "$PY" -c "import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()"; then
    echo "MPS: on (pipe $CUDA_MPS_PIPE_DIRECTORY)"
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
  else
    echo quit | nvidia-cuda-mps-control 2> /dev/null || true
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "MPS: not available; the processes share the GPU time-sliced"
  fi
else
  echo "MPS: off"
fi
pids=()
launch() {  # launch GROUP SEEDS [SETTING_REGEX]: one process per seed (and per setting, if given)
  local group=$1 seeds=$2 setting=${3:-} k tag
  for ((k = 0; k < seeds; k++)); do
    tag="${group##* }-seed$k"; sel=()
    if [ -n "$setting" ]; then sel=(--setting "$setting"); tag="$tag-$(printf '%s' "$setting" | tr -c 'a-zA-Z0-9.' '_' | tr -s '_')"; fi
    OMP_NUM_THREADS=1 timeout "$LIMIT" "$PY" -m experiments suite gpu-short --group "$group" --seed-only "$k" "${sel[@]}" \
      --results-dir "$RESULTS" --no-progress "${set_args[@]}" > "$RESULTS/gpu-short-$tag.log" 2>&1 &
    pids+=($!)
  done
}
set_args=(); [ $# -gt 0 ] && set_args=(--set "$@")
# ResNet-20: one process per seed (5 runs each); LSTM: one per seed and setting, since its runs are
# longer (early stopping) and lm-full's CPU runs may have finished some already (those exit at once)
launch "gpu fmnist-full resnet20" "${IMAGE_SEEDS:-5}"
lstm="gpu brown-full zaremba-small lstm"
while IFS= read -r setting; do launch "$lstm" "${LM_SEEDS:-3}" "$setting"; done < <(
  "$PY" -c "import re, sys; from experiments.suites import get_suite; g = sys.argv[1]
for n in sorted({c.name for c in get_suite('gpu-short') if c.group == g}): print('^' + re.escape(n) + '\$')" "$lstm")
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
tail -n 3 "$RESULTS"/gpu-short-*.log
exit $status
