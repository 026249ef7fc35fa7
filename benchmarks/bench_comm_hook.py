"""Bytes on the wire and step time: DropGrad's masked all-reduce hook vs DDP's default all-reduce.

Launches 2 processes itself (gloo over 127.0.0.1 only) and prints one Markdown
table from rank 0. For each drop rate p, the same model and data are trained
with ``DropGrad(SGD)`` twice, alternating step by step between two DDP
replicas of the model: one with DDP's default all-reduce, one with
``dropgrad.distributed.masked_allreduce_hook``. Per step and rank it records
the bytes the process wrote to its sockets (``wchar`` of ``/proc/self/io``:
the real traffic, gloo's framing included), the bytes the hook handed to
``all_reduce``, and the wall time of forward + backward + step. Medians over
the measured steps, after warm-up.

The last column estimates the link speed below which the hook's saved bytes
outweigh its extra CPU time (bytes saved per step / extra median step time):
loopback moves bytes at memory speed, so there the hook can only cost time.

Run: python benchmarks/bench_comm_hook.py [--hidden 1024] [--layers 4] [--steps 15]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _written() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dropgrad
    from dropgrad import DropGrad
    from dropgrad.distributed import register_masked_allreduce_hook
    from dropgrad.kernels import cpu as c_kernel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))

    def build(p: float, hook: bool):
        torch.manual_seed(0)
        layers = []
        for _ in range(args.layers):
            layers += [torch.nn.Linear(args.hidden, args.hidden), torch.nn.Tanh()]
        model = DDP(torch.nn.Sequential(*layers))
        opt = DropGrad(torch.optim.SGD(model.parameters(), lr=1e-3), drop_rate=p, seed=0)
        state = register_masked_allreduce_hook(model, opt) if hook else None
        return model, opt, state

    def one_step(model, opt, x):
        dist.barrier()
        w0, t0 = _written(), time.perf_counter()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0, _written() - w0

    n_params = args.layers * (args.hidden * args.hidden + args.hidden)
    gen = torch.Generator().manual_seed(rank)
    rows = []
    for p in (0.1, 0.5, 0.9):
        runs = {"default": build(p, False), "hook": build(p, True)}
        times = {k: [] for k in runs}
        wire = {k: [] for k in runs}
        for step in range(args.warmup + args.steps):
            x = torch.randn(args.batch, args.hidden, generator=gen)
            for name, (model, opt, _) in runs.items():
                dt, nbytes = one_step(model, opt, x)
                if step >= args.warmup:
                    times[name].append(dt)
                    wire[name].append(nbytes)
        state = runs["hook"][2]
        handed = state.bytes_sent / (args.warmup + args.steps)
        for name in runs:
            rows.append((p, name, statistics.median(wire[name]), handed if name == "hook" else None,
                         statistics.median(times[name]), min(times[name])))
    dist.barrier()
    if rank == 0:
        print(f"## Masked all-reduce hook vs default all-reduce ({world} processes, gloo on 127.0.0.1)\n")
        print(f"model: {args.layers} x Linear({args.hidden}, {args.hidden}), {n_params / 1e6:.2f}M float32 parameters "
              f"({4 * n_params / 1e6:.1f} MB of gradients), batch {args.batch} per rank, DropGrad(SGD), "
              f"{args.steps} measured steps after {args.warmup} warm-up; 1 thread per process\n")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores shared by both processes; python "
              f"{platform.python_version()}, torch {torch.__version__}, dropgrad {dropgrad.__version__}, "
              f"fused mask kernel: {'yes' if c_kernel.available() else 'no (reference)'}\n")
        print("| p | all-reduce | socket bytes / step / rank | vs default | hook payload / step | step ms (median) "
              "| step ms (min) | vs default (median) | break-even link |")
        print("|---|---|---|---|---|---|---|---|---|")
        base = {}
        for p, name, nbytes, handed, med, low in rows:
            if name == "default":
                base[p] = (nbytes, med)
            b_bytes, b_med = base[p]
            # the link speed below which the bytes saved pay for the hook's extra CPU time
            extra = med - b_med
            even = "-" if name == "default" else (
                "always" if extra <= 0 else f"{8 * (b_bytes - nbytes) / extra / 1e9:.2f} Gbit/s")
            print(f"| {p} | {name} | {nbytes / 1e6:.2f} MB | {nbytes / b_bytes:.3f} | "
                  f"{'-' if handed is None else f'{handed / 1e6:.2f} MB'} | {1e3 * med:.1f} | {1e3 * low:.1f} | "
                  f"{med / b_med:.2f} | {even} |")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._rank is not None:
        worker(args._rank, 2, args._port, args)
        return
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    port = _free_port()
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--_port", str(port)]
    procs = [subprocess.Popen([*cmd, "--_rank", str(r)], env=env) for r in range(2)]
    try:
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                raise SystemExit("a benchmark process failed or timed out")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if any(p.returncode for p in procs):
        raise SystemExit("a benchmark process failed")


if __name__ == "__main__":
    main()
