"""The multi-process test harness, both sides of it (not collected by pytest).

Parent side (``test_distributed.py``, ``test_tensor_parallel.py``,
``test_deepspeed.py``): :func:`run_ranks` runs a worker script as ``python
WORKER RANK WORLD PORT OUTDIR SCENARIO[,SCENARIO...]`` on ``world`` fresh
processes, bounded in time; a rank that fails ends the launch, and its peers are
killed, never left behind. :func:`summarize` turns the per-rank outcomes into
``{scenario: "ok" | what went wrong}``; :func:`launch` does both.

Worker side (``_distributed_worker.py``, ``_tp_worker.py``,
``_deepspeed_worker.py``, which import this file from their own directory):
:func:`run_scenarios` runs the scenarios in order inside the joined process
group and writes ``OUTDIR/rank<RANK>.json`` (``{scenario: "ok" | traceback}``)
after each one, so the parent sees partial results even if a later scenario
hangs or dies. Standard library only, so that importing it costs the workers nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Path, world: int, scenarios: list[str], outdir: Path, timeout_s: float,
              extra_env: dict[str, str] | None = None) -> tuple[list[dict[str, str]], list[int | None], bool, float]:
    """Run the scenarios on ``world`` fresh processes.

    Returns ``(per-rank {scenario: outcome}, exit codes, timed out, seconds)``;
    the exit code of a rank killed here (because a peer failed or the launch
    timed out) is negative.
    """
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **(extra_env or {}),
    }
    port = free_port()
    logs = [open(outdir / f"rank{r}.log", "w") for r in range(world)]  # noqa: SIM115 (closed in finally)
    procs = []
    start = time.monotonic()
    timed_out = False
    try:
        for r in range(world):
            cmd = [sys.executable, str(worker), str(r), str(world), str(port), str(outdir), ",".join(scenarios)]
            procs.append(subprocess.Popen(cmd, stdout=logs[r], stderr=subprocess.STDOUT, env=env))
        deadline = start + timeout_s
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # a rank failed: its peers may wait in a collective forever
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)
        for f in logs:
            f.close()
    elapsed = time.monotonic() - start
    per_rank = []
    for r in range(world):
        path = outdir / f"rank{r}.json"
        per_rank.append(json.loads(path.read_text()) if path.exists() else {})
    return per_rank, [p.returncode for p in procs], timed_out, elapsed


def summarize(ran: tuple[list[dict[str, str]], list[int | None], bool, float], scenarios: list[str], outdir: Path,
              timeout_s: float) -> dict[str, str]:
    """``{scenario: "ok" | what went wrong}`` from :func:`run_ranks`' result."""
    per_rank, codes, timed_out, _ = ran
    world = len(per_rank)
    results = {}
    for name in scenarios:
        outcomes = [res.get(name) for res in per_rank]
        if all(o == "ok" for o in outcomes):
            results[name] = "ok"
            continue
        failures = [f"rank {r}:\n{o}" for r, o in enumerate(outcomes) if o not in (None, "ok")]
        if not failures:
            tail = "\n".join(f"rank {r} log tail:\n{(outdir / f'rank{r}.log').read_text()[-1500:]}" for r in range(world))
            why = f"timed out after {timeout_s} s" if timed_out else "an earlier scenario failed or a rank died"
            failures = [f"not finished on every rank ({why}); exit codes {codes}\n{tail}"]
        results[name] = "\n".join(failures)
    return results


def launch(worker: Path, world: int, scenarios: list[str], outdir: Path, timeout_s: float,
           extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Run the scenarios on ``world`` fresh processes; ``{scenario: "ok" | what went wrong}``."""
    return summarize(run_ranks(worker, world, scenarios, outdir, timeout_s, extra_env), scenarios, outdir, timeout_s)


def run_scenarios(scenarios: dict[str, Callable[[], Any]], names: str, rank: int, outdir: str,
                  ends_launch: frozenset[str] = frozenset()) -> NoReturn:
    """Worker side: run ``names`` (comma-separated) in the initialized process group, record each, exit.

    After each scenario a barrier; the first failure stops the run (peers may be
    stuck in a collective: the parent ends them) and the process exits with 1.
    A scenario in ``ends_launch`` leaves the group in a state no barrier can
    follow (a rank that skipped a step on purpose): the run stops after it.
    """
    import torch.distributed as dist  # noqa: PLC0415 - the parent side must not import torch

    results: dict[str, str] = {}
    path = os.path.join(outdir, f"rank{rank}.json")
    failed = False
    for name in names.split(","):
        began = time.monotonic()
        try:
            scenarios[name]()
            if name not in ends_launch:
                dist.barrier()
            results[name] = "ok"
            print(f"{name}: ok in {time.monotonic() - began:.1f} s", flush=True)
        except Exception:
            results[name] = traceback.format_exc()
            failed = True
        with open(path, "w") as f:
            json.dump(results, f)
        if failed or name in ends_launch:
            break  # peers may be stuck in a collective: the parent ends them
    if not failed and not ends_launch & set(results):
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(1 if failed else 0)
