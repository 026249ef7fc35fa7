#!/usr/bin/env bash
# The GPU checks of the mask kernels, in one go, for a machine with CUDA: the CUDA tests, the
# GPU benchmark table and the distributed checks (benchmarks/gpu_distributed_checks.py); the
# steps shared with experiments/gpu_loan.sh are in benchmarks/gpu_common.sh. Run from the
# repository root; results go to OUTDIR.
#
#     bash benchmarks/gpu_checks.sh [OUTDIR]      # default: gpu-results
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
source benchmarks/gpu_common.sh
gpu_machine_info 2>&1 | tee "$out/machine.txt"
gpu_tests 0 2>&1 | tee "$out/pytest.txt"
tests_rc=${PIPESTATUS[0]}
$PYTHON benchmarks/bench_masks.py --device cuda 2>&1 | tee "$out/bench_cuda.md"
bench_rc=${PIPESTATUS[0]}
gpu_distributed_checks 600 "$out/distributed.json" 2>&1 | tee "$out/distributed.md"
dist_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc distributed rc=$dist_rc" | tee -a "$out/machine.txt"
exit $((tests_rc || bench_rc || dist_rc))
