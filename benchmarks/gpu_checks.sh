#!/usr/bin/env bash
# The GPU checks of the mask kernels, in one go, for a machine with CUDA:
# the CUDA tests (Triton kernel against the reference on the same GPU and
# against the CPU kernels, dispatch, wrapper, AMP, torch.compile, the comm hook's
# device path, CUDA-graph capture with capturable=True), the GPU benchmark table, and the distributed checks
# (benchmarks/gpu_distributed_checks.py). Run from the repository root; results go to OUTDIR.
#
#     bash benchmarks/gpu_checks.sh [OUTDIR]      # default: gpu-results
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch, triton, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'python', platform.python_version())"
  # a kernel that cannot load makes the CUDA parity tests skip: say so up front
  $py -c "from dropgrad.kernels import cpu, cuda; print('triton kernel:', cuda.available(), cuda.unavailable_reason()); print('C kernel:', cpu.available(), cpu.unavailable_reason())"
} 2>&1 | tee "$out/machine.txt"
$py -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_kernels.py tests/test_masks.py \
  tests/test_comm_hook_device.py 2>&1 | tee "$out/pytest.txt"
tests_rc=${PIPESTATUS[0]}
$py benchmarks/bench_masks.py --device cuda 2>&1 | tee "$out/bench_cuda.md"
bench_rc=${PIPESTATUS[0]}
# DDP, the masked all-reduce hook, FSDP2 and seed agreement on NCCL (one process per GPU;
# one GPU: 2 processes over gloo, then 1 NCCL process); the table says which ran where
timeout 600 $py benchmarks/gpu_distributed_checks.py --json "$out/distributed.json" 2>&1 | tee "$out/distributed.md"
dist_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc distributed rc=$dist_rc" | tee -a "$out/machine.txt"
exit $((tests_rc || bench_rc || dist_rc))
