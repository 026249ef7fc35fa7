# The steps every GPU run shares, sourced by benchmarks/gpu_checks.sh (the checks and the GPU
# benchmark) and experiments/gpu_loan.sh (the same checks beside the gpu-short runs, on a short
# loan). Run from the repository root, with PYTHON set (default python3).
PYTHON=${PYTHON:-python3}
# the CUDA tests: Triton kernel against the reference on the same GPU and against the CPU
# kernels, dispatch, wrapper, AMP, torch.compile, the comm hook's device path, CUDA-graph
# capture with capturable=True
GPU_TESTS=(tests/test_cuda.py tests/test_kernels.py tests/test_masks.py tests/test_comm_hook_device.py)

gpu_machine_info() {  # the GPU, the versions, and whether each kernel loads
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PYTHON -c "import torch, triton, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'python', platform.python_version())"
  # a kernel that cannot load makes the CUDA parity tests skip: say so up front
  $PYTHON -c "from dropgrad.kernels import cpu, cuda; print('triton kernel:', cuda.available(), cuda.unavailable_reason()); print('C kernel:', cpu.available(), cpu.unavailable_reason())"
}

gpu_tests() {  # SECONDS (0: no limit)
  timeout "$1" $PYTHON -m pytest -q -p no:cacheprovider -rs "${GPU_TESTS[@]}"
}

# DDP, the masked all-reduce hook, FSDP2 and seed agreement on NCCL (one process per GPU;
# one GPU: 2 processes over gloo, then 1 NCCL process); the table says which ran where
gpu_distributed_checks() {  # SECONDS JSON_PATH
  timeout "$1" $PYTHON benchmarks/gpu_distributed_checks.py --json "$2"
}
