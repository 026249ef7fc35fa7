"""Run the Triton mask kernel under Triton's CPU interpreter and compare it with the reference.

Started by ``tests/test_cuda.py::test_triton_kernel_in_the_interpreter`` with
``TRITON_INTERPRET=1`` set (the variable must be set before Triton is imported,
hence a separate process); :func:`dropgrad.kernels.cuda.mask_` then serves CPU
tensors (``cuda.device_type() == "cpu"``). Every call goes through the kernel
contract of :mod:`dropgrad.kernels.common` against
:func:`dropgrad.kernels.reference.mask_`, with the dispatcher's part done here
(servability checked, idle entries left out). Exits non-zero with a message on
the first mismatch.
"""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from test_kernels import FLOATS, _assert_same_bits, _grad

from dropgrad import masks
from dropgrad.kernels import cuda, reference
from dropgrad.kernels.common import is_idle, servable, unservable_reason

TWO32 = 1 << 32


def check(grads, indices, thresholds, scales, offsets, prefix, stream, what):
    """cuda.mask_ on the active entries of copies of ``grads`` against reference.mask_ on all of them."""
    ref = [g.clone() for g in grads]
    fast = [g.clone() for g in grads]
    reference.mask_(ref, indices, thresholds, scales, offsets, prefix, stream)
    active = [j for j, g in enumerate(fast) if not is_idle(g.numel(), thresholds[j], scales[j])]
    for j in active:
        why = unservable_reason(fast[j], cuda.device_type())
        assert why is None, f"{what}: kernel refuses tensor {j}: {why}"
    if active:
        picked = [fast[j] for j in active]
        assert servable(picked, cuda.device_type()), what
        cuda.mask_(picked, *([xs[j] for j in active] for xs in (indices, thresholds, scales, offsets)), prefix, stream)
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
    assert cuda.available(), cuda.unavailable_reason()
    assert cuda.device_type() == "cpu"
    count = 0
    from dropgrad.kernels.triton_source import CHUNK

    sizes = [1, 7, CHUNK - 1, CHUNK + 1, 20_000]
    prefix = masks.step_prefix(123, 4)
    for dtype in FLOATS:
        for p in (0.0, 0.05, 0.5, 1.0):
            for off in (0, TWO32 - 9_000, 3 * TWO32 + 17):
                grads = [_grad(n, dtype, seed=n) for n in sizes]
                n = len(grads)
                thr = masks.keep_threshold(p)
                for scale in {0.0 if p == 1 else 1 / (1 - p), masks.survivor_scale(thr)}:
                    check(grads, list(range(n)), [thr] * n, [scale] * n, [off] * n, prefix, 0,
                          f"{dtype} p={p} scale={scale!r} offset={off}")
                    count += n
    # every float16 / bfloat16 bit pattern, and a mixed-dtype call with per-tensor parameters
    for dtype in (torch.float16, torch.bfloat16):
        g = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        for scale in (1 / 0.9, 3e4):
            check([g], [3], [masks.keep_threshold(0.4)], [scale], [0], masks.step_prefix(1, 2), 0,
                  f"all {dtype} patterns x {scale}")
            count += 1
    mixed = [_grad(3000, d, seed=i) for i, d in enumerate(FLOATS)]
    check(
        mixed, [0, 1, 2, 3], [masks.keep_threshold(q) for q in (0.1, 0.3, 0.6, 0.9)],
        [1.0, 1 / 0.7, 2.5, 10.0], [0, 5, TWO32 - 1000, 2**40], masks.step_prefix(5, 6), 0, "mixed dtypes",
    )
    count += 4
    # keys derived by the kernel from (prefix, index, stream) equal masks.key_from_prefix for any index
    for prefix, stream in ((0, 0), (2**64 - 1, 1), (masks.step_prefix(2**63 + 5, 77), 3), (12345, masks.FULL_UPDATE_STREAM)):
        indices = [0, 1, 2, 161, 2**31 + 7, 2**63 + 1, 2**64 - 1]
        grads = [_grad(700 + 13 * j, torch.float32, seed=j) for j in range(len(indices))]
        n = len(grads)
        check(grads, indices, [masks.keep_threshold(0.3)] * n, [1 / 0.7] * n, [0] * n, prefix, stream,
              f"derived keys prefix={prefix} stream={stream}")
        count += n
    # a DropGrad-like sequence of steps: device tables cached across steps (cuda._tables), per-step
    # values (prefix, stream, and a rate shared by every tensor) as kernel arguments
    shapes = ((5000, torch.float32), (300, torch.bfloat16), (9000, torch.float16), (10, torch.float64), (64, torch.float32))
    indices = [0, 1, 2, 2**40, 4]
    for rates in ((0.3,) * 5, (0.1, 0.5, 0.9, 0.3, 0.2), (0.5,) * 5):
        grads = None
        for step, realloc in ((0, False), (1, False), (2, True), (3, False)):
            fresh = [_grad(n, d, seed=10 * step + j) for j, (n, d) in enumerate(shapes)]
            if grads is None or realloc:
                grads = fresh
            else:
                for g, f in zip(grads, fresh):
                    g.copy_(f)  # same addresses: the cached table is reused
            prefix, stream = masks.step_prefix(99, step), step % 2
            thr = [masks.keep_threshold(r) for r in rates]
            scales = [masks.survivor_scale(t) for t in thr]
            expect = [g.clone() for g in grads]
            reference.mask_(expect, indices, thr, scales, [0] * 5, prefix, stream)
            tables_before = dict(cuda._tables)
            cuda.mask_(grads, indices, thr, scales, [0] * 5, prefix, stream)
            if step in (1, 3) and (cuda._tables.keys() != tables_before.keys()
                                   or any(cuda._tables[k] is not v for k, v in tables_before.items())):
                sys.exit(f"rates={rates}: the table was rebuilt at step {step} although no gradient moved")
            if step == 2 and cuda._tables.keys() == tables_before.keys():
                sys.exit(f"rates={rates}: moved gradients reused a stale table at step 2")
            for j, (g, e) in enumerate(zip(grads, expect)):
                same(g, e, f"steps rates={rates} step={step} tensor {j}")
            count += len(grads)
    count += check_clocked()
    print(f"checked {count} tensors: bitwise equal to the reference")


def check_clocked() -> int:
    """The capturable kernel (cuda.mask_clocked_: keys from a device clock) against the reference."""
    count = 0
    from dropgrad.kernels.triton_source import CHUNK

    # clock words at the edges of uint64 (stored as int64 bit patterns), any index, offset, stream, dtype
    for seed, step in ((0, 0), (123, 4), (2**64 - 1, 2**63 + 5), (2**63, 2**64 - 1)):
        clock = masks.clock_tensor(seed, step)
        prefix = masks.step_prefix(seed, step)
        for stream in (0, 3, masks.FULL_UPDATE_STREAM):
            indices = [0, 7, 2**31 + 7, 2**63 + 1]
            grads = [_grad(n, d, seed=j) for j, (n, d) in
                     enumerate(((1, torch.float32), (CHUNK + 3, torch.bfloat16), (5000, torch.float16), (777, torch.float64)))]
            thr = [masks.keep_threshold(q) for q in (0.0, 0.3, 0.6, 1.0)]
            scales = [masks.survivor_scale(t) for t in thr]
            offsets = [0, TWO32 - 100, 2**40, 3]
            ref = [g.clone() for g in grads]
            reference.mask_(ref, indices, thr, scales, offsets, prefix, stream)
            cuda.mask_clocked_(grads, indices, thr, scales, offsets, clock, stream)
            for j, (a, b) in enumerate(zip(ref, grads)):
                same(a, b, f"clocked seed={seed} step={step} stream={stream} tensor {j}")
            count += len(grads)
    # the clock advanced on the "device" (no host value changes): the next step's masks
    clock = masks.clock_tensor(42, 0)
    g0 = _grad(9000, torch.float32, seed=1)
    for step in range(3):
        g, ref = g0.clone(), g0.clone()
        cuda.mask_clocked_([g], [5], [masks.keep_threshold(0.5)], [2.0], [0], clock, 0)
        reference.mask_([ref], [5], [masks.keep_threshold(0.5)], [2.0], [0], masks.step_prefix(42, step), 0)
        same(g, ref, f"clock advanced to step {step}")
        clock[1:].add_(1)
        count += 1
    # DropGrad(capturable=True) on tensors this kernel serves (CPU under the interpreter) equals capturable=False
    from dropgrad import DropGrad

    def train(capturable: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
        opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.4, seed=11, capturable=capturable)
        x = torch.randn(20, 16)
        for _ in range(4):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()], opt

    plain, _ = train(False)
    captured, opt = train(True)
    if opt.step_count != 4 or opt.state_dict()["dropgrad"]["step"] != 4:
        sys.exit(f"capturable wrapper: step_count {opt.step_count}")
    for j, (a, b) in enumerate(zip(plain, captured)):
        same(a, b, f"DropGrad(capturable=True) parameter {j}")
    return count + len(plain)


if __name__ == "__main__":
    main()
