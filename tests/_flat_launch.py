"""Launch a multi-process worker and collect its per-scenario outcomes (not collected by pytest).

The launcher of ``test_distributed.py``, with the worker script and extra
environment as arguments; used by ``test_tensor_parallel.py`` and
``test_deepspeed.py``. A worker is run as ``python WORKER RANK WORLD PORT
OUTDIR SCENARIO[,SCENARIO...]`` and writes ``OUTDIR/rank<RANK>.json``
(``{scenario: "ok" | traceback}``) after each scenario. A launch is bounded in
time; a rank that fails ends it, and its peers are killed, never left behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: Path, world: int, scenarios: list[str], outdir: Path, timeout_s: float,
           extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Run the scenarios on ``world`` fresh processes; ``{scenario: "ok" | what went wrong}``."""
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
    timed_out = False
    try:
        for r in range(world):
            cmd = [sys.executable, str(worker), str(r), str(world), str(port), str(outdir), ",".join(scenarios)]
            procs.append(subprocess.Popen(cmd, stdout=logs[r], stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + timeout_s
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
    per_rank = []
    for r in range(world):
        path = outdir / f"rank{r}.json"
        per_rank.append(json.loads(path.read_text()) if path.exists() else {})
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
            failures = [f"not finished on every rank ({why}); exit codes {[p.returncode for p in procs]}\n{tail}"]
        results[name] = "\n".join(failures)
    return results
