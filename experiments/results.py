"""Append-only JSONL results files and the suite runner that resumes from them.

Each line is one record:

* ``{"type": "start", "run": id, "attempt": uuid, "config": {...}, "env": {...}}``
* ``{"type": "epoch", "run": id, "attempt": uuid, "metrics": {...}}``
* ``{"type": "end", "run": id, "attempt": uuid, "summary": {...}, "wall_s": ...}``
  (with ``"resumed_after_epoch": k`` when the attempt continued an epoch checkpoint)
* ``{"type": "error", "run": id, "attempt": uuid, "error": "..."}``

A run counts as finished once an ``end`` record exists for its id; a restarted
suite skips finished runs and starts unfinished ones again under a new
attempt id, so a half-written run never mixes with a complete one. Lines are
flushed and fsynced one by one: a killed process loses at most its current run,
and a language-model run not even that: it continues from the checkpoint of its
last finished epoch (:mod:`experiments.checkpoints`), and the new attempt's
records repeat the epochs found there, so it holds the whole run.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import time
import traceback
import uuid
from collections.abc import Iterable

from .config import RunConfig, run_id
from .progress import bar

__all__ = ["environment", "ResultsFile", "run_suite", "load_runs", "Run", "finished_ids", "results_path", "expected_wall_s"]

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


_SIMD = re.compile(r"^(sse4_1|sse4_2|avx|avx2|fma|f16c|avx512\w*|amx\w*|avx_vnni|neon|asimd\w*|sve\w*)$")


def _cpu_flags() -> list[str]:
    """The SIMD flags of the CPU (the ones that change what torch's kernels do), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return sorted(x for x in line.split(":", 1)[1].split() if _SIMD.match(x))
    except OSError:
        pass
    return []


def tree_is_dirty() -> bool:
    """Uncommitted changes to the code that computes results (dropgrad/ or experiments/, results files aside)."""
    status = _git("status", "--porcelain", "--", "dropgrad", "experiments", ":(exclude)experiments/results", ":(exclude)experiments/runs")
    return bool(status)


def _code_version() -> dict:
    """The commit the code is at and whether it has uncommitted changes.

    A copy of the tree without git metadata (what a device machine runs on) has no commit to
    ask; there the caller may vouch for it in ``EXPERIMENTS_SOURCE_COMMIT`` after checking the
    copy against that commit's file hashes (``experiments/gpu_short.sh`` does), and the run
    records that the commit came from there.
    """
    commit = _git("rev-parse", "HEAD")
    if commit:
        return {"git_commit": commit, "git_dirty": tree_is_dirty()}
    vouched = os.environ.get("EXPERIMENTS_SOURCE_COMMIT", "").strip()
    if vouched:
        return {"git_commit": vouched, "git_dirty": False, "git_source": "EXPERIMENTS_SOURCE_COMMIT (copy checked against the commit's file hashes)"}
    return {"git_commit": None, "git_dirty": None}


def environment() -> dict:
    """Code version, library versions and machine, recorded with every run."""
    import numpy
    import torch

    try:
        import dropgrad

        dg_version = getattr(dropgrad, "__version__", "?")
    except ImportError:  # pragma: no cover
        dg_version = None
    return {
        **_code_version(),
        "dropgrad": dg_version,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "host": socket.gethostname(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class ResultsFile:
    """One append-only JSONL file."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True, default=_jsonable)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill: that run is unfinished anyway
        return out

    def finished(self) -> set[str]:
        """Ids of runs that ended, or failed deterministically (a divergence is a result too)."""
        return {r["run"] for r in self.records() if r.get("type") in ("end", "error")}


def _jsonable(x):
    if isinstance(x, tuple):
        return list(x)
    return str(x)


@dataclasses.dataclass
class Run:
    """A finished run as read back from a results file."""

    id: str
    config: dict
    env: dict
    epochs: list[dict]
    summary: dict
    wall_s: float


def load_runs(paths: Iterable[str]) -> list[Run]:
    """Every finished run in ``paths`` (the last finished attempt of each run id)."""
    runs: dict[str, Run] = {}
    for path in paths:
        starts: dict[str, dict] = {}
        epochs: dict[str, list[dict]] = {}
        for r in ResultsFile(path).records():
            a = r.get("attempt")
            if r["type"] == "start":
                starts[a] = r
                epochs[a] = []
            elif r["type"] == "epoch" and a in epochs:
                epochs[a].append(r["metrics"])
            elif r["type"] == "end" and a in starts:
                s = starts[a]
                runs[r["run"]] = Run(r["run"], s["config"], s["env"], epochs[a], r["summary"], r.get("wall_s", 0.0))
    return list(runs.values())


def results_path(results_dir: str, cfg: RunConfig) -> str:
    return os.path.join(results_dir, f"{cfg.suite}.jsonl")


def finished_ids(results_dir: str) -> set[str]:
    """Runs finished in any results file of ``results_dir`` (suites share identical runs)."""
    done: set[str] = set()
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        done |= ResultsFile(path).finished()
    return done


def run_suite(
    configs: list[RunConfig],
    results_dir: str,
    progress: bool = True,
    stop_after_s: float | None = None,
    log=print,
    finish_by_s: float | None = None,
) -> dict:
    """Run every config not yet finished in ``results_dir``; return counts.

    Each run is appended to ``<results_dir>/<its suite>.jsonl``.

    Args:
        configs: the runs, in the order to run them.
        results_dir: folder of the JSONL results files (read for finished runs, appended to).
        progress: show progress bars.
        stop_after_s: start no new run after this many seconds (a time budget).
        finish_by_s: start only runs expected to end within this many seconds of
            the call, by :func:`expected_wall_s`; a run that would not is left
            for a later invocation and the next one in order is tried instead
            (a run with no estimate yet is started while time is left). For a
            session of fixed length: no run is cut off at its end half done.
    """
    from .checkpoints import EpochCheckpoint, checkpoint_path, saved_wall_s
    from .train import load_data, run_to_end

    done = finished_ids(results_dir)
    todo, seen = [], set(done)
    for c in configs:
        rid = run_id(c)
        if rid not in seen:
            seen.add(rid)
            todo.append(c)
    unique = len({run_id(c) for c in configs})
    counts = {"total": unique, "skipped": unique - len(todo), "ran": 0, "failed": 0, "left": 0}
    if counts["skipped"]:
        log(f"{counts['skipped']} of {unique} runs already finished in {results_dir}; skipping them")
    env = environment()
    t_start = time.time()
    estimates = _WallEstimates(results_dir, todo) if finish_by_s is not None else None
    for i, cfg in enumerate(bar(todo, progress, desc="runs")):
        elapsed = time.time() - t_start
        if stop_after_s is not None and elapsed > stop_after_s:
            counts["left"] += len(todo) - i
            log(f"time budget of {stop_after_s:.0f}s used; {counts['left']} runs left for a later invocation")
            break
        if estimates is not None:
            need = estimates.of(cfg)
            if need is not None:  # a run resuming from an epoch checkpoint needs only the rest
                need = max(need - saved_wall_s(checkpoint_path(results_dir, cfg)), 0.0)
            if elapsed >= finish_by_s or (need is not None and elapsed + need > finish_by_s):
                counts["left"] += 1
                log(f"run {cfg.group}/{cfg.name} seed {cfg.seed} left for later: expected {need or 0:.0f}s, "
                    f"{max(finish_by_s - elapsed, 0):.0f}s left of --finish-by {finish_by_s:.0f}s")
                continue
        load_data(cfg)  # a missing data set stops the suite here, before a start record is written
        rf = ResultsFile(results_path(results_dir, cfg))
        rid, attempt = run_id(cfg), uuid.uuid4().hex[:12]
        import torch

        torch.set_num_threads(cfg.threads)  # (train() sets it too); recorded as actually in effect
        run_env = {**env, "torch_threads": torch.get_num_threads(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rf.append({"type": "start", "run": rid, "attempt": attempt, "config": dataclasses.asdict(cfg), "env": run_env})
        t0 = time.time()
        ckpt = EpochCheckpoint(checkpoint_path(results_dir, cfg), cfg, log)  # a killed LM run resumes from it
        try:
            summary = run_to_end(cfg, lambda m, rf=rf, rid=rid, attempt=attempt: rf.append({"type": "epoch", "run": rid, "attempt": attempt, "metrics": m}), progress, ckpt)
        except (FloatingPointError, RuntimeError, ValueError) as exc:
            from .data import DatasetMissing

            if isinstance(exc, DatasetMissing):
                raise
            rf.append({"type": "error", "run": rid, "attempt": attempt, "error": "".join(traceback.format_exception_only(exc)).strip()})
            ckpt.remove()
            counts["failed"] += 1
            log(f"run {cfg.group}/{cfg.name} seed {cfg.seed} failed (recorded, not retried): {exc}")
            continue
        end = {"type": "end", "run": rid, "attempt": attempt, "summary": summary, "wall_s": ckpt.earlier_wall_s + time.time() - t0}
        if ckpt.resumed_from_epoch:
            end["resumed_after_epoch"] = ckpt.resumed_from_epoch  # wall_s includes the earlier attempts'
        rf.append(end)
        ckpt.remove()
        counts["ran"] += 1
        if estimates is not None:
            estimates.add(cfg, end["wall_s"])  # the whole run's time, as later invocations read it
    return counts


class _WallEstimates:
    """Wall times of finished runs, by (suite, group, setting) and by (suite, group)."""

    def __init__(self, results_dir: str, configs: list[RunConfig]) -> None:
        self._by: dict[tuple, list[float]] = {}
        for r in load_runs(sorted({results_path(results_dir, c) for c in configs})):
            if r.wall_s > 0:
                self._add(r.config.get("suite"), r.config.get("group"), r.config.get("name"), r.wall_s)

    def _add(self, suite, group, name, wall_s: float) -> None:
        self._by.setdefault((suite, group, name), []).append(wall_s)
        self._by.setdefault((suite, group), []).append(wall_s)

    def add(self, cfg: RunConfig, wall_s: float) -> None:
        self._add(cfg.suite, cfg.group, cfg.name, wall_s)

    def of(self, cfg: RunConfig) -> float | None:
        """:func:`expected_wall_s` of ``cfg``."""
        for key in ((cfg.suite, cfg.group, cfg.name), (cfg.suite, cfg.group)):
            if key in self._by:
                return statistics.median(self._by[key])
        return None


def expected_wall_s(results_dir: str, cfg: RunConfig) -> float | None:
    """The median wall time of the finished runs of ``cfg``'s setting, else of its group, else None."""
    return _WallEstimates(results_dir, [cfg]).of(cfg)
