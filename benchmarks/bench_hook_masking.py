"""Would masking in post-accumulate-grad hooks pay? The mask pass at the step against masking each gradient as it is written.

Issue 11 suggests masking each gradient in ``register_post_accumulate_grad_hook``
as soon as backward has written it, while it may still be in cache, instead
of in one pass over every gradient at ``step()``. Before building that (it
needs the step's rates and keys in advance, and a signal for the last
micro-batch of an accumulation), this measures the most it could save, on
the benchmark's parameter sets:

* ``write``: backward's part, modelled as writing every gradient from a
  source tensor in reverse parameter order (what accumulate-grad does last);
* ``write, then mask at step``: the same, then one ``apply_masks_`` call over
  every gradient (today's path: the C kernel, one pass);
* ``write and mask each``: each gradient masked right after it is written, one
  ``apply_masks_`` call per tensor (what a hook would do);
* ``kernel alone in hooks``: the same with the C kernel called directly, without
  the dispatcher's checks: the floor of any hook implementation.

The mask's cost is each row minus ``write``, in the same process, the rows
interleaved. The masks are the same either way (counters, not order).

    python benchmarks/bench_hook_masking.py [--sets ...] [--rates ...] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_masks import SETS, interleaved_medians, make_grads  # noqa: E402

from dropgrad import masks  # noqa: E402
from dropgrad.functional import apply_masks_  # noqa: E402
from dropgrad.kernels import cpu  # noqa: E402


def bench(shapes, p: float, reps: int, warmup: int) -> dict[str, float]:
    pristine, grads = make_grads(shapes)
    n = len(grads)
    order = list(reversed(range(n)))  # backward reaches the last layers first
    thr = masks.keep_threshold(p)
    scale = masks.survivor_scale(thr)
    prefix = masks.step_prefix(0, 1)

    def write():
        for j in order:
            grads[j].copy_(pristine[j])

    def write_then_mask():
        write()
        apply_masks_(grads, range(n), [thr] * n, [scale] * n, prefix=prefix, impl="fused")

    def write_and_mask_each():
        for j in order:
            grads[j].copy_(pristine[j])
            apply_masks_([grads[j]], [j], [thr], [scale], prefix=prefix, impl="fused")

    def write_and_kernel_each():  # the floor of a hook: the C kernel alone, no dispatcher checks
        for j in order:
            grads[j].copy_(pristine[j])
            cpu.mask_([grads[j]], [j], [thr], [scale], [0], prefix, 0)

    rows = {"write": write, "at step": write_then_mask, "in hooks": write_and_mask_each,
            "kernel in hooks": write_and_kernel_each}
    out = interleaved_medians(rows, lambda: None, reps, warmup)
    # the same bits either way
    write_then_mask()
    a = [g.clone() for g in grads]
    write_and_mask_each()
    assert all(torch.equal(x, y) for x, y in zip(a, grads)), "the two orders gave different masks"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", choices=list(SETS), default=["transformer-161", "ResNet-50-like", "flat 10M"])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.1])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit(f"the C kernel is unavailable: {cpu.unavailable_reason()}")
    print(f"# mask at step vs in hooks; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); ms, medians of {args.reps} interleaved runs; load {os.getloadavg()[0]:.2f}")
    print("| set | tensors | elements | p | write | mask at step | mask in hooks | hooks / step | kernel alone in hooks "
          "| kernel-in-hooks / step | best-of: hooks / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.sets:
        shapes = SETS[name]()
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        for p in args.rates:
            r = bench(shapes, p, args.reps, 2)
            step, hooks = r["at step"] - r["write"], r["in hooks"] - r["write"]
            kernel = r["kernel in hooks"] - r["write"]
            best = (r["min in hooks"] - r["min write"]) / max(r["min at step"] - r["min write"], 1e-9)
            print(f"| {name} | {len(shapes)} | {numel / 1e6:.1f}M | {p:g} | {r['write']:.2f} | {step:.2f} | {hooks:.2f} | "
                  f"{hooks / step:.2f}x | {kernel:.2f} | {kernel / step:.2f}x | {best:.2f}x |")
    print(f"# load {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
