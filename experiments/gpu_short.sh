#!/usr/bin/env bash
# The GPU suite for a short loan: `python -m experiments suite gpu-short`, one process per run,
# PAR of them sharing one GPU, then the last lines of their logs. Sized for 10 minutes on one
# H200-class GPU (the first loan, 2026-12-04, without MPS, finished 11 runs in 510 s); LIMIT
# (seconds, default 540) stops every process by then, so a slower GPU still leaves its finished
# runs (appended one by one; only the runs in flight are lost, and a rerun resumes). The LM runs
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
set_args=(); [ $# -gt 0 ] && set_args=(--set "$@")
# A queue of jobs, one run each (group, seed, setting), in the suite's order (setting by setting,
# p=0.3 and its controls early: a loan cut short leaves complete comparisons), run PAR at a time
# (default: one per CPU core under MPS, 8 time-sliced; the first loan time-sliced 8); runs finished
# in RESULTS (lm-full's CPU runs included) are left out. Each job gets the time left until LIMIT.
if [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ]; then PAR=${PAR:-$(nproc)}; else PAR=${PAR:-8}; fi
deadline=$(($(date +%s) + LIMIT))
shopt -s nullglob
rm -f "$RESULTS"/gpu-short-*.log  # an earlier call's: this call's status is read from its own
run_job() {  # run_job GROUP SEED SETTING_REGEX SECONDS
  local tag rc=0
  tag="${1##* }-seed$2-$(printf '%s' "$3" | tr -c 'a-zA-Z0-9.' '_' | tr -s '_')"
  OMP_NUM_THREADS=1 timeout "$4" "$PY" -m experiments suite gpu-short --group "$1" --seed-only "$2" --setting "$3" \
    --results-dir "$RESULTS" --no-progress "${set_args[@]}" > "$RESULTS/gpu-short-$tag.log" 2>&1 || rc=$?
  echo "job rc=$rc" >> "$RESULTS/gpu-short-$tag.log"
}
queued=0
while IFS=$'\t' read -r group seed setting; do
  while [ "$(jobs -rp | wc -l)" -ge "$PAR" ]; do wait -n || true; done
  left=$((deadline - $(date +%s)))
  [ "$left" -gt 0 ] || break
  run_job "$group" "$seed" "$setting" "$left" &
  queued=$((queued + 1))
done < <("$PY" -c "import re, sys
from experiments.config import run_id
from experiments.results import finished_ids
from experiments.suites import get_suite
done, seen = finished_ids(sys.argv[1]), set()
for c in get_suite('gpu-short'):
    job = (c.group, c.seed, '^' + re.escape(c.name) + '\$')
    if run_id(c) not in done and job not in seen:
        seen.add(job)
        print(*job, sep='\t')" "$RESULTS")
wait
echo "$queued jobs started, PAR $PAR"
logs=("$RESULTS"/gpu-short-*.log)
[ ${#logs[@]} -eq 0 ] || tail -n 3 "${logs[@]}"
# a job stopped by the limit (124) is expected; any other failure is not
failed=$( ((${#logs[@]})) && grep -L -x "job rc=\(0\|124\)" "${logs[@]}" || true)
if [ -n "$failed" ]; then echo "failed: $failed" >&2; exit 1; fi
