"""Seed agreement and consistency checks across the ranks of a process group.

A leaf module (torch only; it works on any :class:`~dropgrad.DropGrad` through
its public attributes): :meth:`DropGrad.step <dropgrad.DropGrad.step>` calls
:func:`agree_seed_if_distributed` at its first step when no ``seed=`` was
given, and :mod:`dropgrad.distributed` re-exports :func:`agree_seed` and
:func:`check_consistency` for users.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

__all__ = ["agree_seed", "check_consistency", "agree_seed_if_distributed", "process_group_size"]


# ---------------------------------------------------------------------- process group
def _dist():
    """``torch.distributed`` if this build has it, else None."""
    try:
        import torch.distributed as dist  # noqa: PLC0415 - not every torch build has it
    except ImportError:  # pragma: no cover
        return None
    return dist if dist.is_available() else None


def process_group_size(group: Any = None) -> int:
    """World size of ``group`` (1 when no process group is initialized)."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _fingerprint(optimizer: Any) -> dict[str, Any]:
    """What must be equal on every rank for the masks to be equal (small, picklable)."""
    shapes = [tuple(p.shape) for group in optimizer.param_groups for p in group["params"]]  # a DTensor: global shape
    rates = optimizer.current_drop_rates()
    digest = hashlib.sha256(repr((shapes, rates)).encode()).hexdigest()[:16]
    fud = optimizer.full_update_drop
    fud = "drop_rate" if fud is True else fud
    return {
        "seed": optimizer.seed,
        "step": optimizer.step_count,
        "parameters": len(shapes),
        "elements": sum(math.prod(s) for s in shapes),
        "shapes_and_rates": digest,
        "rescale": optimizer.rescale,
        "full_update_drop": fud if isinstance(fud, (float, str)) else type(fud).__name__,
    }


def _synchronize(optimizer: Any, group: Any, adopt_seed: bool) -> None:
    dist = _dist()
    if process_group_size(group) == 1:
        return
    mine = _fingerprint(optimizer)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if adopt_seed:
        for fp in everyone:
            fp["seed"] = everyone[0]["seed"]
    reference = everyone[0]
    diffs = [
        f"rank {r}: {key}={fp[key]!r} (rank 0: {reference[key]!r})"
        for r, fp in enumerate(everyone)
        for key in reference
        if fp[key] != reference[key]
    ]
    if diffs:
        # every rank sees the same gathered list, so every rank raises here: no rank
        # is left waiting in a collective
        raise RuntimeError(
            "DropGrad is configured differently across ranks, so the ranks would draw different masks "
            "and the replicas would drift apart: " + "; ".join(diffs[:8])
            + (f"; ... ({len(diffs)} differences)" if len(diffs) > 8 else "")
            + ". Build DropGrad identically on every rank (same parameters in the same order, rates, "
            "step count; an explicit seed= must be the same number on every rank, not seed + rank). If the "
            "ranks hold different models on purpose (pipeline stages), agree within each data-parallel group "
            "instead: dropgrad.distributed.agree_seed(opt, group=dp_group) before the first step."
        )
    optimizer.set_seed(int(reference["seed"]))


def agree_seed(optimizer: Any, group: Any = None) -> None:
    """Adopt rank 0's seed on every rank and check that the rest of DropGrad's setup agrees.

    A collective over ``group`` (default: the world): every rank must call it.
    :meth:`DropGrad.step` calls it by itself at its first step inside an
    initialized process group when no ``seed=`` was given, so users rarely need
    it; call it yourself to agree on a sub-group.

    Raises:
        RuntimeError: on every rank, when the number or shapes of parameters,
            their rates, the step count, ``rescale`` or ``full_update_drop``
            differ between ranks.
    """
    _synchronize(optimizer, group, adopt_seed=True)


def check_consistency(optimizer: Any, group: Any = None) -> None:
    """Check (one collective) that every rank would draw the same masks; raise if not.

    Like :func:`agree_seed`, but the seeds must already be equal: use it once
    after building ``DropGrad(..., seed=s)`` to catch a rank-dependent seed or
    parameter list, which DropGrad cannot detect without communicating.
    """
    _synchronize(optimizer, group, adopt_seed=False)


def agree_seed_if_distributed(optimizer: Any) -> None:
    """Called by ``DropGrad.step`` while the seed is not agreed: agree when it matters."""
    dist = _dist()
    if dist is not None and dist.is_initialized() and dist.get_world_size() > 1:
        agree_seed(optimizer)
