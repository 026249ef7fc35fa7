"""Where a gradient's elements sit in the full parameter, and which parameters this rank steps.

A leaf module (torch only): :class:`~dropgrad.DropGrad` asks it, per step, for the
pieces of a sharded gradient (a DTensor from FSDP2 or tensor parallelism) with
their element offsets, so that a shard computes exactly its part of the
single-process mask, and for the parameters a ZeroRedundancyOptimizer rank owns.
"""

from __future__ import annotations

import itertools
import sys

import torch

__all__ = ["local_shards", "zero_owned_param_ids", "dtensor_types"]


# ---------------------------------------------------------------------- shards
# DTensor's public home since torch 2.5; torch 2.4 has it in torch.distributed._tensor
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def dtensor_types():
    """``(DTensor, Shard, Replicate)`` if the DTensor module is loaded, else None.

    Nobody holds a DTensor gradient before importing the module, so an
    unloaded module (the common single-process case) costs nothing here.
    """
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DTensor"):
            return module.DTensor, module.Shard, module.Replicate
    return None


def local_shards(grad: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """The pieces of ``grad`` this rank holds, each with its element offset in the full tensor.

    A plain tensor is one piece at offset 0. A DTensor (FSDP2's gradients,
    tensor parallelism) yields views of its local tensor, each covering a
    contiguous range of the full tensor's row-major elements: one piece for
    ``Shard(0)`` (FSDP2's layout, also when uneven: torch.chunk sizes, possibly
    empty), one per leading index for ``Shard(d)`` with ``d > 0``, the whole
    local tensor for ``Replicate``. Masking piece ``t`` with ``offsets=off``
    gives exactly the matching slice of the single-process mask.

    Raises:
        ValueError: a placement whose local data is not a box of the full
            tensor (``Partial``: not yet reduced; strided shards) or a local
            tensor that does not have the shape its placements imply.
    """
    types = dtensor_types()
    if types is None or not isinstance(grad, types[0]):
        return [(grad, 0)]
    _, shard_type, replicate_type = types
    for placement in grad.placements:
        # exact types: _StridedShard subclasses Shard but its local data is interleaved
        if type(placement) is not shard_type and type(placement) is not replicate_type:
            raise ValueError(
                f"DropGrad can mask a DTensor gradient only with Shard/Replicate placements, got "
                f"{grad.placements} ({placement!r} does not map to a contiguous range of the full tensor). "
                "Redistribute the gradient (e.g. to Shard(0)) before the optimizer step."
            )
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: PLC0415
    except ImportError:  # torch 2.4
        from torch.distributed._tensor._utils import (  # type: ignore[import-not-found,no-redef,unused-ignore]  # noqa: PLC0415
            compute_local_shape_and_global_offset,
        )

    local = grad._local_tensor
    full_shape = tuple(grad.shape)
    local_shape, offset = compute_local_shape_and_global_offset(full_shape, grad.device_mesh, grad.placements)
    if tuple(local.shape) != tuple(local_shape):
        raise ValueError(
            f"DTensor gradient has a local tensor of shape {tuple(local.shape)}, but its placements "
            f"{grad.placements} on mesh {grad.device_mesh} imply {tuple(local_shape)}; DropGrad cannot map "
            "its elements to the full tensor"
        )
    if local.numel() == 0:
        return []
    # Element strides of the full tensor (row-major) and the innermost dim that is
    # only partly held: from it on, the held elements of one leading index are a
    # contiguous range of the full tensor.
    strides = [1] * len(full_shape)
    for d in range(len(full_shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * full_shape[d + 1]
    partial = [d for d in range(len(full_shape)) if local_shape[d] != full_shape[d]]
    if not partial:
        return [(local, 0)]
    k = partial[-1]
    base = offset[k] * strides[k]
    if k == 0:
        return [(local, base)]
    pieces = []
    for lead in itertools.product(*(range(n) for n in local_shape[:k])):
        start = base + sum((offset[d] + i) * strides[d] for d, i in enumerate(lead))
        pieces.append((local[lead], start))
    return pieces


# ---------------------------------------------------------------------- ZeRO
def zero_owned_param_ids(optimizer: torch.optim.Optimizer) -> set[int] | None:
    """Ids of the parameters this rank steps, when ``optimizer`` is a ZeroRedundancyOptimizer.

    ``None`` means "every parameter" (not ZeRO).

    Raises:
        ValueError: ZeRO with ``overlap_with_ddp=True``, which steps inside DDP's
            backward, before ``DropGrad.step`` could mask anything.
    """
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if module is None or not isinstance(optimizer, module.ZeroRedundancyOptimizer):
        return None
    if getattr(optimizer, "_overlap_with_ddp", False):
        raise ValueError(
            "DropGrad cannot wrap ZeroRedundancyOptimizer(overlap_with_ddp=True): its parameter update runs "
            "inside DDP's backward, before DropGrad.step() could mask the gradients; use overlap_with_ddp=False"
        )
    return {id(p) for group in optimizer.optim.param_groups for p in group["params"]}
