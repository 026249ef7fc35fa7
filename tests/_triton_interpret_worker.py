"""Run the Triton mask kernel under Triton's CPU interpreter and compare it with the reference.

Started by ``tests/test_cuda.py::test_triton_kernel_in_the_interpreter`` with
``TRITON_INTERPRET=1`` set (the variable must be set before Triton is imported,
hence a separate process). Exits non-zero with a message on the first mismatch.
"""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from dropgrad import _triton_kernels as tk, masks  # noqa: E402
from dropgrad.functional import _single_tensor_drop_grad_  # noqa: E402
from test_kernels import FLOATS, _assert_same_bits, _grad  # noqa: E402

TWO32 = 1 << 32


def check(grads, keys, thresholds, scales, offsets, what):
    ref = [g.clone() for g in grads]
    fast = [g.clone() for g in grads]
    _single_tensor_drop_grad_(ref, keys, thresholds, scales, offsets)
    for g, off in zip(fast, offsets):
        why = tk.supported(g, off)
        assert why is None, f"{what}: kernel refuses a tensor: {why}"
    tk.triton_drop_grad_(fast, keys, thresholds, scales, offsets)
    for j, (a, b) in enumerate(zip(ref, fast)):
        same(a, b, f"{what}, tensor {j} ({a.dtype}, {a.numel()} elements)")


def same(a, b, what):
    if a.element_size() == 2:
        # NaN payloads of float16/bfloat16: the interpreter converts with numpy, not with the
        # GPU's instruction (whose payloads tests/test_cuda.py checks on a GPU); NaN stays NaN
        if not torch.equal(a.isnan(), b.isnan()):
            sys.exit(f"MISMATCH {what}: NaN positions differ")
        a, b = a.clone(), b.clone()
        a[a.isnan()] = 0
        b[b.isnan()] = 0
    try:
        _assert_same_bits(a, b)
    except AssertionError as exc:
        sys.exit(f"MISMATCH {what}: {exc}")


def main() -> None:
    assert tk.available(), tk.unavailable_reason()
    count = 0
    from dropgrad._triton_masks import _CHUNK

    sizes = [1, 7, _CHUNK - 1, _CHUNK + 1, 20_000]
    for dtype in FLOATS:
        for p in (0.0, 0.05, 0.5, 1.0):
            for off in (0, TWO32 - 9_000, 3 * TWO32 + 17):
                grads = [_grad(n, dtype, seed=n) for n in sizes]
                n = len(grads)
                keys = [masks.derive_key(123, 4, j) for j in range(n)]
                scale = 0.0 if p == 1 else 1 / (1 - p)
                check(grads, keys, [masks.keep_threshold(p)] * n, [scale] * n, [off] * n, f"{dtype} p={p} offset={off}")
                count += n
    # every float16 / bfloat16 bit pattern, and a mixed-dtype call with per-tensor parameters
    for dtype in (torch.float16, torch.bfloat16):
        g = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        for scale in (1 / 0.9, 3e4):
            check([g], [masks.derive_key(1, 2, 3)], [masks.keep_threshold(0.4)], [scale], [0], f"all {dtype} patterns x {scale}")
            count += 1
    mixed = [_grad(3000, d, seed=i) for i, d in enumerate(FLOATS)]
    check(
        mixed, [masks.derive_key(5, 6, j) for j in range(4)], [masks.keep_threshold(q) for q in (0.1, 0.3, 0.6, 0.9)],
        [1.0, 1 / 0.7, 2.5, 10.0], [0, 5, TWO32 - 1000, 2**40], "mixed dtypes",
    )
    count += 4
    # keys derived by the kernel (the DropGrad plan path) equal masks.key_from_prefix
    for prefix, stream in ((0, 0), (2**64 - 1, 1), (masks.step_prefix(2**63 + 5, 77), 3), (12345, masks.FULL_UPDATE_STREAM)):
        indices = [0, 1, 2, 161, 2**31 + 7, 2**63 + 1, 2**64 - 1]
        grads = [_grad(700 + 13 * j, torch.float32, seed=j) for j in range(len(indices))]
        n = len(grads)
        thr, sc, offs = [masks.keep_threshold(0.3)] * n, [1 / 0.7] * n, [0] * n
        ref = [g.clone() for g in grads]
        _single_tensor_drop_grad_(ref, [masks.key_from_prefix(prefix, i, stream) for i in indices], thr, sc, offs)
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        left = tk.mask_planned_([(i, p, 0.3) for i, p in zip(indices, params)], prefix, stream, True)
        if left != []:
            sys.exit(f"MISMATCH derived keys: plan path left {left}")
        for j, (a, p) in enumerate(zip(ref, params)):
            same(a, p.grad, f"derived keys prefix={prefix} stream={stream} index={indices[j]}")
        count += n
    # the DropGrad plan path: device tables cached across steps, per-step values as arguments
    params = [torch.nn.Parameter(torch.zeros(n, dtype=d)) for n, d in
              ((5000, torch.float32), (300, torch.bfloat16), (9000, torch.float16), (10, torch.float64), (64, torch.float32))]
    for rates in ((0.3,) * 5, (0.1, 0.5, 0.9, 0.3, 0.0)):
        plan = [(j if j != 3 else 2**40, p, r) for j, (p, r) in enumerate(zip(params, rates))]
        for step, realloc in ((0, False), (1, False), (2, True), (3, False)):
            for j, p in enumerate(params):
                fresh = _grad(p.numel(), p.dtype, seed=10 * step + j)
                if p.grad is None or realloc:
                    p.grad = fresh
                else:
                    p.grad.copy_(fresh)  # same addresses: the cached table is reused
            prefix, stream = masks.step_prefix(99, step), step % 2
            expect = [p.grad.clone() for p in params]
            for (index, _, rate), g in zip(plan, expect):
                if rate:
                    _single_tensor_drop_grad_([g], [masks.key_from_prefix(prefix, index, stream)],
                                              [masks.keep_threshold(rate)], [1 / (1 - rate)], [0])
            tables_before = len(tk._plan_tables)
            left = tk.mask_planned_(plan, prefix, stream, True)
            if left != []:
                sys.exit(f"MISMATCH plan path left {left}")
            if step in (1, 3) and len(tk._plan_tables) != tables_before:
                sys.exit(f"plan path rebuilt its table at step {step} although no gradient moved")
            for j, (p, g) in enumerate(zip(params, expect)):
                same(p.grad, g, f"plan path rates={rates} step={step} tensor {j}")
            count += len(params)
    print(f"checked {count} tensors: bitwise equal to the reference")


if __name__ == "__main__":
    main()
