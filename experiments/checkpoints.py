"""Epoch checkpoints: a language-model run killed mid-way resumes from its last finished epoch.

The harness resumes a suite by run id, but a run without an ``end`` record starts
afresh, so without these a run longer than a working session (the PTB-scale
transformer's can take hours on one CPU core) would never finish on that machine. After
every epoch but the last, the LM loop saves what the rest of the run depends on: model
and optimizer state (DropGrad's seed, step count and schedule positions included), the
LR schedule, the global and gradient-noise RNG states, and the epochs so far with the
early-stopping state. A restarted run loads it and continues bitwise as if never stopped
(``tests/test_experiments.py`` checks this).

A checkpoint is used only by the same run (run id), on the same device and under the
same training code (a hash of ``dropgrad/`` and the experiments' files that compute a
run, :data:`TRAINING_SOURCES`; the report, the suites' lists and the harness may change
in between); any other is set aside with a message and the run starts afresh. The
harness keeps checkpoints in ``<results dir>/checkpoints/<run id>.pt`` and deletes one
when its run ends or fails. They are ignored by git (about 100 MB for the transformer),
so they resume a run only on a machine whose disk outlives the session: on a fresh
machine the run starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, run_id

__all__ = ["EpochCheckpoint", "source_fingerprint", "checkpoint_path", "saved_wall_s", "TRAINING_SOURCES"]

#: the files of ``experiments/`` a run's numbers (and its resumption) depend on
TRAINING_SOURCES = ("checkpoints.py", "config.py", "data.py", "generative.py", "models.py", "rl.py", "train.py")

#: how a mismatch of each part of a checkpoint's key is named in the message
_KEY_WORDS = {"run": "run", "device": "device", "source": "training code (dropgrad/ or TRAINING_SOURCES changed)"}


def source_fingerprint() -> str:
    """sha256 over the files a run's numbers depend on: ``dropgrad/`` (Python and C) and :data:`TRAINING_SOURCES`."""
    import dropgrad

    h = hashlib.sha256()
    package = Path(dropgrad.__file__).parent
    files = sorted(p for p in package.rglob("*") if p.suffix in (".py", ".c"))
    files += [Path(__file__).parent / name for name in TRAINING_SOURCES]
    for f in files:
        h.update(f"{f.parent.name}/{f.name}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def checkpoint_path(results_dir: str, cfg: RunConfig) -> str:
    """Where the harness keeps ``cfg``'s epoch checkpoint."""
    return os.path.join(results_dir, "checkpoints", f"{run_id(cfg)}.pt")


def saved_wall_s(path: str) -> float:
    """Wall time the epochs in the checkpoint at ``path`` took (0 without one), from its small sidecar file."""
    try:
        with open(path + ".json") as f:
            return float(json.load(f)["wall_s"])
    except (OSError, ValueError, KeyError):
        return 0.0


class EpochCheckpoint:
    """One run's checkpoint file: :meth:`load` what a killed attempt left, :meth:`save` after an epoch.

    After a resumed run, :attr:`resumed_from_epoch` is the number of epochs it found done and
    :attr:`earlier_wall_s` the wall time the earlier attempts spent on them.
    """

    def __init__(self, path: str, cfg: RunConfig, log=print) -> None:
        self.path = path
        self.key = {"run": run_id(cfg), "device": cfg.device, "source": source_fingerprint()}
        self.log = log
        self.resumed_from_epoch = 0
        self.earlier_wall_s = 0.0

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None (no file, or one of another run, device or code: set aside)."""
        if not os.path.exists(self.path):
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)  # our own file
        found = state.get("key", {})
        if found != self.key:
            why = ", ".join(_KEY_WORDS[k] for k in self.key if found.get(k) != self.key[k]) or "format"
            os.replace(self.path, self.path + ".stale")
            self.log(f"checkpoint {self.path} is of another {why}: set aside (.stale); the run starts afresh")
            return None
        self.resumed_from_epoch = len(state["history"])
        self.earlier_wall_s = float(state["wall_s"])
        self.log(f"resuming from {self.path} after epoch {self.resumed_from_epoch}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (with this run's key) atomically: a kill mid-write leaves the previous file."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        torch.save({**state, "key": self.key}, tmp)
        os.replace(tmp, self.path)
        with open(tmp, "w") as f:  # for --finish-by's estimates, without loading the checkpoint
            json.dump({"epochs": len(state["history"]), "wall_s": state["wall_s"]}, f)
        os.replace(tmp, self.path + ".json")

    def remove(self) -> None:
        for p in (self.path, self.path + ".json", self.path + ".stale"):
            if os.path.exists(p):
                os.remove(p)
