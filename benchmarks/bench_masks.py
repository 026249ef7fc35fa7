"""Benchmark of gradient masks and of DropGrad(AdamW) steps (issue 4's table).

Run from the repository root::

    python benchmarks/bench_masks.py            # the full table (a few minutes on 2 cores)
    python benchmarks/bench_masks.py --quick    # fewer repetitions, for a smoke run
    python benchmarks/bench_masks.py --device cuda   # the same rows on a GPU (Triton kernel)
    python benchmarks/bench_masks.py --sets transformer-161 --skip-reference --rates 0.1
                                                 # the wrapper's per-step overhead on 161 tensors

Prints one markdown table: for each parameter set, drop rate and thread count,
the median time per step (ms) of

* floor: one in-place pass over all gradients, ``g.mul_(c)`` (the memory floor);
* obvious: ``g.mul_(torch.bernoulli(torch.full_like(g, 1-p))).div_(1-p)`` per tensor;
* reference / fast: ``dropgrad.functional.apply_masks_`` with ``impl="reference"``
  and ``impl="fused"`` (thresholds and factors precomputed: the dispatcher and kernel alone);
* bare AdamW steps (default, foreach, fused) and ``DropGrad(AdamW)`` steps
  (everything the wrapper does per step: keys, rates, masks, the step);

with the ratios fast/floor, obvious/fast and DropGrad(AdamW)/AdamW, the
wrapper's overhead per step over the bare fused step (DG(fused) - fused, in
microseconds; it includes the mask pass) and what is left of it per tensor
once the mask pass (the fast row) is taken off (the wrapper's bookkeeping), and, in the last two columns, the same ratios
from the fastest run of each row, which is what a quiet machine shows when
other processes share the cores. Every
figure is a median over repeated runs after warm-up, in this one process,
with the runs of all rows interleaved (so load from other processes hits
every row alike); gradients are restored from a pristine copy before each timed run (untimed),
so repeated masking never drives values to zero or infinity. Below the table:
peak extra memory per step (from torch's CPU allocator, via the profiler's
memory events) and the C kernel's one-time build/load cost (built in the
background from ``DropGrad()``: the construction time is printed too).

With ``--device cuda`` every row runs on the GPU (the fast path is the Triton
kernel of ``dropgrad/kernels/cuda.py``), each timed run ends with
``torch.cuda.synchronize()`` (so launch overhead counts, as it does in
training), the thread column reads ``gpu``, the memory figures come from
``torch.cuda.max_memory_allocated`` and the one-time cost is Triton's compile
of the kernel into an empty cache.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dropgrad import masks  # noqa: E402
from dropgrad.functional import apply_masks_  # noqa: E402
from dropgrad.kernels import cpu as c_kernel  # noqa: E402
from dropgrad.kernels import cuda as triton_kernel  # noqa: E402

try:
    from dropgrad import DropGrad  # noqa: E402
except ImportError:  # the wrapper is optional for the kernel rows
    DropGrad = None


# ------------------------------------------------------------ parameter sets


def flat_set() -> list[tuple[int, ...]]:
    return [(10_000_000,)]


def transformer_set(d: int = 320, layers: int = 8, vocab: int = 500, context: int = 256) -> list[tuple[int, ...]]:
    """A GPT-like stack: embeddings, then per layer LN, fused QKV, projection, LN, MLP (weights and biases)."""
    shapes = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def resnet50_set() -> list[tuple[int, ...]]:
    """torchvision's resnet50 parameter shapes: 161 tensors, 25,557,032 elements."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
            inplanes = 4 * width
    shapes += [(1000, 2048), (1000,)]
    return shapes


def transformer_161_set() -> list[tuple[int, ...]]:
    """The GPT-like stack with 13 layers and an untied output head: 161 tensors (the wrapper-overhead set)."""
    d, vocab = 320, 500
    return transformer_set(d=d, layers=13, vocab=vocab) + [(vocab, d)]


SETS = {
    "flat 10M": flat_set, "transformer-like": transformer_set, "ResNet-50-like": resnet50_set,
    "transformer-161": transformer_161_set,
}


# ------------------------------------------------------------------ timing


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


DEVICE = torch.device("cpu")


def interleaved_medians(rows: dict, restore, reps: int, warmup: int) -> dict[str, float]:
    """Median ms of each row's callable, the timed runs interleaved row by row.

    Interleaving spreads any load from other processes over all rows alike, so
    the ratios stay meaningful on a shared machine.
    """
    for fn in rows.values():
        for _ in range(warmup):
            restore()
            fn()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(reps):
        for name, fn in rows.items():
            restore()
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t0)
    out = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    out.update({f"min {name}": min(t) * 1e3 for name, t in times.items()})
    return out


@contextlib.contextmanager
def _quiet_stderr():
    # the profiler prints start/stop lines on fd 2
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_extra_bytes(fn) -> int:
    """Peak bytes held by torch's allocator (CPU, or CUDA's) during ``fn()``, above what was held before."""
    if DEVICE.type == "cuda":
        _sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        fn()
        _sync()
        return max(0, torch.cuda.max_memory_allocated(DEVICE) - before)
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        finally:
            os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not mem:
        return 0
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in mem) - start)


# ------------------------------------------------------------------- rows


def make_grads(shapes) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    pristine = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    return pristine, [g.clone() for g in pristine]


def bench_config(shapes, p: float, reps: int, warmup: int, reference: bool = True) -> dict[str, float]:
    pristine, grads = make_grads(shapes)
    n = len(grads)

    def restore():
        for g, src in zip(grads, pristine):
            g.copy_(src)

    indices = list(range(n))
    prefix = masks.step_prefix(0, 1)
    thr = [masks.keep_threshold(p)] * n
    scales = [masks.survivor_scale(thr[0])] * n
    offsets = [0] * n

    def floor():
        for g in grads:
            g.mul_(-1.0)

    def obvious():
        for g in grads:
            g.mul_(torch.bernoulli(torch.full_like(g, 1 - p))).div_(1 - p)

    # the slow rows (seconds per call for the reference on 10M+ elements) get fewer runs
    slow_rows = {"obvious": obvious}
    if reference:
        slow_rows["reference"] = lambda: apply_masks_(grads, indices, thr, scales, offsets, prefix=prefix, impl="reference")
    row = interleaved_medians(slow_rows, restore, min(reps, 3), 1)
    fast_rows = {
        "floor": floor,
        "fast": lambda: apply_masks_(grads, indices, thr, scales, offsets, prefix=prefix, impl="fused"),
    }
    for variant, kwargs in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        params = [torch.zeros(s, device=DEVICE, requires_grad=True) for s in shapes]
        for prm, g in zip(params, grads):
            prm.grad = g
        fast_rows[f"adamw {variant}"] = torch.optim.AdamW(params, lr=1e-3, **kwargs).step
        if DropGrad is not None:
            fast_rows[f"dropgrad {variant}"] = DropGrad(torch.optim.AdamW(params, lr=1e-3, **kwargs), drop_rate=p, seed=0).step
    row.update(interleaved_medians(fast_rows, restore, reps, warmup))
    return row


def memory_rows(shapes, p: float) -> dict[str, int]:
    pristine, grads = make_grads(shapes)
    n = len(grads)
    thr = masks.keep_threshold(p)
    args = (list(range(n)), [thr] * n, [masks.survivor_scale(thr)] * n, [0] * n)
    prefix = masks.step_prefix(0, 1)
    out = {
        "floor": peak_extra_bytes(lambda: [g.mul_(-1.0) for g in grads]),
        "obvious": peak_extra_bytes(lambda: [g.mul_(torch.bernoulli(torch.full_like(g, 1 - p))).div_(1 - p) for g in grads]),
        "reference": peak_extra_bytes(lambda: apply_masks_(grads, *args, prefix=prefix, impl="reference")),
        "fast": peak_extra_bytes(lambda: apply_masks_(grads, *args, prefix=prefix, impl="fused")),
    }
    if DropGrad is not None:
        params = [torch.zeros(s, device=DEVICE, requires_grad=True) for s in shapes]
        for prm, g in zip(params, grads):
            prm.grad = g
        bare = torch.optim.AdamW(params, lr=1e-3, fused=True)
        bare.step()  # state allocated before measuring
        wrapped = DropGrad(torch.optim.AdamW(params, lr=1e-3, fused=True), drop_rate=p, seed=0)
        wrapped.step()
        out["adamw fused"] = peak_extra_bytes(bare.step)
        out["dropgrad fused"] = peak_extra_bytes(wrapped.step)
    return out


def warmup_costs_cuda() -> dict[str, float]:
    """The Triton kernel's one-time cost: its first call compiles it (into an empty Triton cache)."""
    if not triton_kernel.available():
        return {}
    out = {}
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRITON_CACHE_DIR"] = tmp  # read when the kernel is first compiled
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.randn(1000, device=DEVICE).to(dtype)
            for what in ("first call, compile", "second call"):
                _sync()
                t0 = time.perf_counter()
                apply_masks_([g], [0], [1 << 31], [2.0], [0], prefix=1, impl="fused")
                _sync()
                out[f"{what} {str(dtype)[6:]} (s)"] = time.perf_counter() - t0
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved
    return out


def warmup_costs() -> dict[str, float]:
    """The C kernel's one-time costs: DropGrad() with an empty cache (the build starts in the background),
    a cold build into an empty cache, a load from the cache, a first call."""
    if DEVICE.type == "cuda":
        return warmup_costs_cuda()
    saved = os.environ.get("DROPGRAD_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DROPGRAD_CACHE_DIR"] = tmp
        try:
            c_kernel.reset()
            inner = torch.optim.SGD([torch.zeros(10, requires_grad=True)], lr=0.1)  # (torch's first-use imports)
            t0 = time.perf_counter()
            if DropGrad is not None:
                DropGrad(inner, drop_rate=0.1, seed=0)  # starts the build in the background and returns
            construct = time.perf_counter() - t0
            ok = c_kernel.available()  # waits for it
            background = time.perf_counter() - t0
            c_kernel.reset()
            os.environ["DROPGRAD_CACHE_DIR"] = os.path.join(tmp, "cold")
            t0 = time.perf_counter()
            c_kernel.available()
            cold = time.perf_counter() - t0
            c_kernel.reset()
            t0 = time.perf_counter()
            c_kernel.available()
            cached = time.perf_counter() - t0
            g = torch.randn(1000)
            t0 = time.perf_counter()
            apply_masks_([g], [0], [1 << 31], [2.0], [0], prefix=1, impl="fused" if ok else None)
            first = time.perf_counter() - t0
        finally:
            if saved is None:
                os.environ.pop("DROPGRAD_CACHE_DIR", None)
            else:
                os.environ["DROPGRAD_CACHE_DIR"] = saved
            c_kernel.reset()
            c_kernel.available()
    return {
        "DropGrad() returns after (s)": construct, "background build ready after (s)": background,
        "cold build + load (s)": cold, "load from cache (s)": cached, "first call after load (s)": first,
    }


# ------------------------------------------------------------------- main


def _fmt(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def _load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 timed runs after 1 warm-up instead of 9 after 2")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default: 1 2)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.5], help="drop rates (default: 0.1 0.5)")
    ap.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS), help="parameter sets (default: all)")
    ap.add_argument("--skip-reference", action="store_true", help="leave out the (slow) reference-path row")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the gradients live")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    gpu = DEVICE.type == "cuda"
    reps, warmup = (3, 1) if args.quick else (9, 2)
    if gpu:  # steps take a millisecond or less: many more runs cost nothing
        reps, warmup = (10, 3) if args.quick else (50, 10)
        args.threads = [torch.get_num_threads()]

    if gpu:
        if not triton_kernel.available():
            print(f"WARNING: Triton kernel unavailable ({triton_kernel.unavailable_reason()}); 'fast' is the reference path")
    elif not c_kernel.available():
        print(f"WARNING: C kernel unavailable ({c_kernel.unavailable_reason()}); 'fast' is the reference path")
    costs = warmup_costs()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# dropgrad mask benchmark, {datetime.datetime.now().isoformat(timespec='minutes')}")
    if gpu:
        import triton  # noqa: PLC0415

        print(f"# {torch.cuda.get_device_name(DEVICE)}; host {cpu}; torch {torch.__version__}; triton {triton.__version__}; "
              f"python {platform.python_version()}")
    else:
        print(
            f"# {cpu}, {os.cpu_count()} logical CPUs; torch {torch.__version__}; python {platform.python_version()}; "
            f"{c_kernel.build_info().get('compiler', 'no compiler')} {c_kernel.build_info().get('flags', '')}"
        )
    print(
        f"# ms per step: medians of {reps} runs after {warmup} warm-up (obvious and reference: 3 after 1), "
        f"runs interleaved across rows; {_load()} at start"
    )
    print()
    head = [
        "set", "tensors", "elements", "p", "thr", "floor", "obvious", "reference", "fast",
        "fast/floor", "obvious/fast",
        "AdamW", "DG(AdamW)", "ratio", "AdamW foreach", "DG(foreach)", "ratio", "AdamW fused", "DG(fused)", "ratio",
        "DG(fused)-fused (us)", "beyond fast, per tensor (us)", "best-of: fast/floor", "best-of: DG(fused)/fused",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    saved_threads = torch.get_num_threads()
    for name in args.sets:
        shapes = SETS[name]()
        numel = sum(torch.Size(s).numel() for s in shapes)
        for p in args.rates:
            for nt in args.threads:
                torch.set_num_threads(nt)
                r = bench_config(shapes, p, reps, warmup, reference=not args.skip_reference)
                cells = [
                    name, str(len(shapes)), f"{numel / 1e6:.1f}M", f"{p:g}", "gpu" if gpu else str(nt),
                    _fmt(r["floor"]), _fmt(r["obvious"]), _fmt(r["reference"]) if "reference" in r else "-", _fmt(r["fast"]),
                    f"{r['fast'] / r['floor']:.2f}x", f"{r['obvious'] / r['fast']:.0f}x",
                ]
                for variant in ("default", "foreach", "fused"):
                    bare = r[f"adamw {variant}"]
                    dg = r.get(f"dropgrad {variant}")
                    cells += [_fmt(bare), _fmt(dg) if dg else "-", f"{dg / bare:.2f}x" if dg else "-"]
                over = r.get("dropgrad fused")
                if over is None:
                    cells += ["-", "-"]
                else:
                    over = (over - r["adamw fused"]) * 1e3
                    # the wrapper's cost beyond the mask pass itself (the 'fast' row), per tensor
                    cells += [f"{over:.0f}", f"{(over - r['fast'] * 1e3) / len(shapes):.2f}"]
                cells.append(f"{r['min fast'] / r['min floor']:.2f}x")
                dgf = r.get("min dropgrad fused")
                cells.append(f"{dgf / r['min adamw fused']:.2f}x" if dgf else "-")
                print("| " + " | ".join(cells) + " |", flush=True)
    torch.set_num_threads(saved_threads)

    print()
    print(f"# {_load()} at end")
    print(f"# peak extra memory per step (MB, torch {'CUDA' if gpu else 'CPU'} allocator; p=0.5{'' if gpu else ', 2 threads'}):")
    torch.set_num_threads(min(2, saved_threads))
    for name in args.sets:
        shapes = SETS[name]()
        numel = sum(torch.Size(s).numel() for s in shapes)
        m = memory_rows(shapes, 0.5)
        parts = [f"{k} {v / 1e6:.1f} ({v / numel:.1f} B/elem)" for k, v in m.items()]
        print(f"#   {name}: " + ", ".join(parts))
    torch.set_num_threads(saved_threads)
    print(f"# {'Triton' if gpu else 'C'} kernel one-time cost: " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()))


if __name__ == "__main__":
    main()
