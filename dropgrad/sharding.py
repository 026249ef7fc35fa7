"""Where a gradient's elements sit in the full parameter, and which parameters this rank steps.

A leaf module (torch only): :class:`~dropgrad.DropGrad` asks it, per step, for the
pieces of a sharded gradient (a DTensor from FSDP2 or tensor parallelism) with
their element offsets, so that a shard computes exactly its part of the
single-process mask, and for the parameters a ZeroRedundancyOptimizer rank owns.
"""

from __future__ import annotations

import itertools
import operator
import sys
import weakref
from typing import Any

import torch

__all__ = ["local_shards", "held_indices", "zero_owned_param_ids", "dtensor_types", "refuse_flat_params",
           "ParamRegistry"]


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
    tensor parallelism, both together) yields views of its local tensor, each
    covering a contiguous range of the full tensor's row-major elements: one
    piece for ``Shard(0)`` (FSDP2's layout, also when uneven: torch.chunk
    sizes, possibly empty), one per leading index for ``Shard(d)`` with
    ``d > 0``, the whole local tensor for ``Replicate``, on any mesh. Strided
    shards (``_StridedShard``, what ``fully_shard`` puts on a tensor-parallel
    parameter) are mapped through the placement's own split: per tensor dim,
    the global indices this rank holds, and one piece per run of consecutive
    indices. Masking piece ``t`` with ``offsets=off`` gives exactly the
    matching slice of the single-process mask.

    Raises:
        ValueError: a placement whose local data are not elements of the full
            tensor (``Partial``: not yet reduced) or that this function does not
            know how to split, or a local tensor that does not have the shape
            its placements imply.
    """
    types = dtensor_types()
    if types is None or not isinstance(grad, types[0]):
        return [(grad, 0)]
    _, shard_type, replicate_type = types
    local = grad._local_tensor
    full_shape = tuple(grad.shape)
    if not all(type(p) is shard_type or type(p) is replicate_type for p in grad.placements):
        # _StridedShard (FSDP2 on a tensor-parallel parameter), Partial (refused there) and anything else
        indices = held_indices(full_shape, grad.device_mesh.shape, grad.device_mesh.get_coordinate(),
                               grad.placements)
        _check_local_shape(local, tuple(len(i) for i in indices), grad)
        return _index_pieces(local, full_shape, indices)
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: PLC0415
    except ImportError:  # torch 2.4
        from torch.distributed._tensor._utils import (  # type: ignore[import-not-found,no-redef,unused-ignore]  # noqa: PLC0415
            compute_local_shape_and_global_offset,
        )

    local_shape, offset = compute_local_shape_and_global_offset(full_shape, grad.device_mesh, grad.placements)
    _check_local_shape(local, tuple(local_shape), grad)
    if local.numel() == 0:
        return []
    # Element strides of the full tensor (row-major) and the innermost dim that is
    # only partly held: from it on, the held elements of one leading index are a
    # contiguous range of the full tensor.
    strides = _strides(full_shape)
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


def _strides(shape: tuple[int, ...]) -> list[int]:
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return strides


def _check_local_shape(local: torch.Tensor, expected: tuple[int, ...], grad: Any) -> None:
    if tuple(local.shape) != expected:
        raise ValueError(
            f"DTensor gradient has a local tensor of shape {tuple(local.shape)}, but its placements "
            f"{grad.placements} on mesh {grad.device_mesh} imply {expected}; DropGrad cannot map "
            "its elements to the full tensor"
        )


def held_indices(
    full_shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    coordinate: list[int] | None,
    placements: Any,
) -> list[torch.Tensor]:
    """Per tensor dim, the global indices (int64, in local order) that mesh ``coordinate`` holds.

    The placements are applied left to right over the mesh dims, as
    ``distribute_tensor`` applies them, each through its own split
    (``placement._split_tensor``: ``torch.chunk`` for ``Shard``, the interleaved
    split for ``_StridedShard(dim, split_factor)``) of the indices still held on
    its tensor dim. ``Replicate`` leaves them as they are. A rank outside the
    mesh (``coordinate`` None) holds nothing.

    Raises:
        ValueError: a placement that is neither ``Replicate`` nor a split of a
            tensor dim (``Partial``: its local values are not the full tensor's).
    """
    if coordinate is None:
        return [torch.zeros(0, dtype=torch.int64) for _ in full_shape]
    indices = [torch.arange(n, dtype=torch.int64) for n in full_shape]
    for mesh_dim, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        split = getattr(placement, "_split_tensor", None)
        if placement.is_partial() or split is None or not isinstance(getattr(placement, "dim", None), int):
            raise ValueError(
                f"DropGrad can mask a DTensor gradient only with Shard, _StridedShard or Replicate placements, "
                f"got {placement!r} on mesh dim {mesh_dim} of {tuple(placements)}: its local values are not "
                "elements of the full tensor (Partial: not yet reduced). Redistribute the gradient (e.g. to "
                "Shard(0)) before the optimizer step."
            )
        d = placement.dim + len(full_shape) if placement.dim < 0 else placement.dim
        # the placement splits tensor dim d: give it the held indices laid along dim d
        held = indices[d].view([1] * d + [-1])
        chunks, _ = split(held, mesh_shape[mesh_dim], with_padding=False, contiguous=False)
        indices[d] = chunks[coordinate[mesh_dim]].reshape(-1)
    return indices


def _index_pieces(local: torch.Tensor, full_shape: tuple[int, ...],
                  indices: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """Pieces of ``local`` (whose dim ``d`` holds global indices ``indices[d]``) over contiguous full ranges."""
    if local.numel() == 0:
        return []
    partial = [d for d, idx in enumerate(indices) if len(idx) != full_shape[d]
               or not torch.equal(idx, torch.arange(full_shape[d], dtype=idx.dtype))]
    if not partial:
        return [(local, 0)]
    strides = _strides(full_shape)
    k = partial[-1]  # the dims after k are held whole: a run of dim k's indices is one contiguous range
    idx_k = indices[k].tolist()
    runs = []  # (local start, length, global start) of each run of consecutive global indices
    start = 0
    for i in range(1, len(idx_k) + 1):
        if i == len(idx_k) or idx_k[i] != idx_k[i - 1] + 1:
            runs.append((start, i - start, idx_k[start]))
            start = i
    lead_indices = [indices[d].tolist() for d in range(k)]
    pieces = []
    for lead in itertools.product(*(range(len(ix)) for ix in lead_indices)):
        base = sum(lead_indices[d][i] * strides[d] for d, i in enumerate(lead))
        row = local[lead]
        for local_start, length, global_start in runs:
            piece = row if length == len(idx_k) else row.narrow(0, local_start, length)
            pieces.append((piece, base + global_start * strides[k]))
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


# ---------------------------------------------------------------------- flat buffers
_USE_INSTEAD = (
    "DropGrad is exact with DDP, FSDP2 (torch.distributed.fsdp.fully_shard), torch's "
    "ZeroRedundancyOptimizer, tensor parallelism and DeepSpeed ZeRO stage 0 in fp32"
)


def refuse_flat_params(params: list[torch.Tensor], where: str) -> None:
    """Refuse FSDP1's parameters (``FullyShardedDataParallel``), flattened or not.

    FSDP1 marks its ``FlatParameter`` and, with ``use_orig_params=True``, every
    original parameter it views into one (attribute ``_fsdp_flattened``). Either
    way the optimizer sees a padded, flattened concatenation or a rank-dependent
    1-D slice of it, so the element (and with ``FlatParameter``, the parameter)
    indices of the masks would depend on the wrapping and the world size.

    Raises:
        ValueError: naming the first such parameter and what to use instead.
    """
    for j, p in enumerate(params):
        if getattr(p, "_fsdp_flattened", False):
            flat = getattr(p, "_is_flat_param", False)  # what isinstance(p, FlatParameter) tests
            kind = "a FlatParameter" if flat else "a view into a FlatParameter"
            raise ValueError(
                f"{where}: parameter {j} (shape {tuple(p.shape)}) is {kind} of FSDP1 (FullyShardedDataParallel"
                f"{'' if flat else ', use_orig_params=True'}): it is a flattened, padded "
                "concatenation of parameters (or a rank-dependent slice of one), so DropGrad's masks would depend "
                f"on the wrapping and the world size. Use FSDP2 (torch.distributed.fsdp.fully_shard) instead; "
                f"{_USE_INSTEAD}."
            )


class ParamRegistry:
    """The tensors DropGrad's masks refer to; :meth:`check` refuses others in their place.

    A mask's parameter and element indices refer to the parameters DropGrad
    was built with. Someone who swaps them for other tensors (DeepSpeed's ZeRO
    stages 1-2 and its fp16/bf16 optimizers replace the client optimizer's
    parameters by one flat partition per rank) would get masks that are
    correlated across partitions and depend on the world size. What stays
    allowed: param groups added later (``add_param_group``, on DropGrad or on
    the wrapped optimizer: their tensors join the registry), and parameters
    removed from or reordered within a group. A cheap identity check: no
    tensor is read, and the common case is one pass of ``is`` comparisons.
    The registry holds the tensors weakly: it keeps none alive.
    """

    def __init__(self, param_groups: list[dict]) -> None:
        self._last: list[torch.Tensor] = []
        self._groups = 0
        # weak: a parameter removed from its group and dropped by its owner is freed (with its
        # gradient); its entry goes with it, so a tensor reusing its id is not taken for it
        self._known: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.check(param_groups, adopt=True)

    def check(self, param_groups: list[dict], adopt: bool = False) -> None:
        """Raise if a group that existed at the last check holds a tensor never seen in one.

        Raises:
            ValueError: naming the group, the position and the shape of the
                first foreign tensor (and DeepSpeed, when it is loaded), and
                what to use instead.
        """
        current = [p for group in param_groups for p in group["params"]]
        if len(current) == len(self._last) and len(param_groups) == self._groups \
                and all(map(operator.is_, current, self._last)):
            return
        known = self._known
        for i, group in enumerate(param_groups):
            for k, p in enumerate(group["params"]):
                if known.get(id(p)) is p:
                    continue
                if i >= self._groups or adopt:
                    known[id(p)] = p  # a group added since the last check
                    continue
                raise ValueError(_foreign_param_message(i, k, p, len(known)))
        self._last, self._groups = current, len(param_groups)


def _foreign_param_message(group: int, position: int, p: torch.Tensor, known: int) -> str:
    why = (
        "DeepSpeed is loaded: its ZeRO stages 1 and 2, and its fp16/bf16 optimizers at any stage, replace the "
        "client optimizer's parameters by flat fp32 partitions, one per rank"
        if "deepspeed" in sys.modules
        else "something (a flat-buffer engine such as DeepSpeed ZeRO-1/2, or code assigning to "
        "param_groups[i]['params']) put it there"
    )
    return (
        f"DropGrad's param_groups no longer hold the parameters it was built with: param_groups[{group}]['params']"
        f"[{position}] (shape {tuple(p.shape)}) is none of the {known} tensors it was given. {why}. Masks drawn "
        "on such tensors would be correlated across partitions and depend on the world size. "
        f"{_USE_INSTEAD}; add parameters with add_param_group."
    )
