"""DropGrad under ``torch.distributed``: every rank draws the same masks, shards draw their slice.

A mask is a pure function of ``(seed, step, parameter index, element index)``
(:mod:`dropgrad.masks`), so ranks agree on every mask without communicating as
long as they agree on four things:

- the seed: an explicit ``seed=`` is taken on the user's word; a seed drawn at
  construction is replaced, at the first ``step()`` inside an initialized
  process group, by rank 0's (:func:`agree_seed`, one small collective that
  also checks the rest of this list and raises on every rank if it differs);
- the step count, and the rates (both are part of the optimizer's state);
- the parameter index: a parameter's position across ``param_groups``. DDP,
  FSDP2 and ``ZeroRedundancyOptimizer`` all keep the full, identically ordered
  parameter list on every rank, and a ``None`` gradient or an unused
  parameter skips its mask without shifting anyone else's index;
- the element index: for a shard it is the element's position in the *full*
  parameter (row-major), which :func:`local_shards` derives from a DTensor's
  placements, so a shard's mask is exactly the slice a single process would
  draw.

Supported layouts:

- DDP (``DistributedDataParallel``): gradients are all-reduced before
  ``step()``, every rank masks the same full gradient the same way.
- FSDP2 (``fully_shard``) and other DTensor gradients: each rank masks only its
  local shard (``Shard`` and ``Replicate`` placements on any mesh; ``Partial``
  and strided shards are refused with an error).
- ``DropGrad(ZeroRedundancyOptimizer(...))``: every rank sees the full
  ``param_groups``; only the parameters this rank owns (and steps) are masked.
- :func:`masked_allreduce_hook`: an optional DDP communication hook that masks
  each bucket before the all-reduce and sends only the kept values.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
from typing import TYPE_CHECKING, Any

import torch

from . import masks as _masks
from .functional import apply_masks_

if TYPE_CHECKING:  # pragma: no cover
    from .wrapper import DropGrad

__all__ = [
    "agree_seed",
    "check_consistency",
    "local_shards",
    "MaskedAllreduceState",
    "masked_allreduce_hook",
    "register_masked_allreduce_hook",
]


# ---------------------------------------------------------------------- process group
def _dist():
    """``torch.distributed`` if this build has it, else None."""
    try:
        import torch.distributed as dist  # noqa: PLC0415 - not every torch build has it
    except ImportError:  # pragma: no cover
        return None
    return dist if dist.is_available() else None


def _group_size(group: Any = None) -> int:
    """World size of ``group`` (1 when no process group is initialized)."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _fingerprint(optimizer: DropGrad) -> dict[str, Any]:
    """What must be equal on every rank for the masks to be equal (small, picklable)."""
    shapes = [tuple(p.shape) for p in optimizer._flat_params()]  # a DTensor reports its global shape
    rates = optimizer.current_drop_rates()
    digest = hashlib.sha256(repr((shapes, rates)).encode()).hexdigest()[:16]
    fud = optimizer._full_update_drop
    return {
        "seed": optimizer.seed,
        "step": optimizer._step_count,
        "parameters": len(shapes),
        "elements": sum(math.prod(s) for s in shapes),
        "shapes_and_rates": digest,
        "rescale": optimizer.rescale,
        "full_update_drop": fud if isinstance(fud, (float, str)) else type(fud).__name__,
    }


def _synchronize(optimizer: DropGrad, group: Any, adopt_seed: bool) -> None:
    dist = _dist()
    if _group_size(group) == 1:
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
    optimizer.seed = int(reference["seed"])
    optimizer._seed_agreed = True


def agree_seed(optimizer: DropGrad, group: Any = None) -> None:
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


def check_consistency(optimizer: DropGrad, group: Any = None) -> None:
    """Check (one collective) that every rank would draw the same masks; raise if not.

    Like :func:`agree_seed`, but the seeds must already be equal: use it once
    after building ``DropGrad(..., seed=s)`` to catch a rank-dependent seed or
    parameter list, which DropGrad cannot detect without communicating.
    """
    _synchronize(optimizer, group, adopt_seed=False)


def _agree_seed_if_distributed(optimizer: DropGrad) -> None:
    """Called by ``DropGrad.step`` while the seed is not agreed: agree when it matters."""
    dist = _dist()
    if dist is not None and dist.is_initialized() and dist.get_world_size() > 1:
        agree_seed(optimizer)


# ---------------------------------------------------------------------- shards
# DTensor's public home since torch 2.5; torch 2.4 has it in torch.distributed._tensor
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def _dtensor_types():
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
    types = _dtensor_types()
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
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset  # noqa: PLC0415

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
def _zero_owned_param_ids(optimizer: torch.optim.Optimizer) -> set[int] | None:
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


# ---------------------------------------------------------------------- DDP comm hook
class MaskedAllreduceState:
    """State of :func:`masked_allreduce_hook`: the DropGrad whose masks it applies, and counters.

    Building it is a collective when ``optimizer`` has no agreed seed yet (it
    calls :func:`agree_seed` on ``process_group``), so build it on every rank,
    like the DDP model itself.

    Attributes:
        bytes_sent: bytes handed to ``all_reduce`` by the hook (kept values plus
            one flag per masked parameter), summed over calls.
        bytes_dense: bytes the default hook would have handed over for the
            same buckets.
    """

    def __init__(self, optimizer: DropGrad, process_group: Any = None) -> None:
        from .wrapper import DropGrad  # noqa: PLC0415 - the wrapper imports this module

        if not isinstance(optimizer, DropGrad):
            raise TypeError(f"optimizer must be the DropGrad that steps the model, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.process_group = process_group
        self.bytes_sent = 0
        self.bytes_dense = 0
        self._info_step: int | None = None
        self._info: dict[int, tuple[int, float]] = {}
        if not optimizer._seed_agreed:
            agree_seed(optimizer, process_group)

    def _scratch(self, buffer: torch.Tensor) -> torch.Tensor:
        """A reused buffer like ``buffer`` (hooks run one bucket at a time in backward)."""
        scratch = getattr(self, "_scratch_buffer", None)
        if scratch is None or scratch.numel() < buffer.numel() or scratch.dtype != buffer.dtype \
                or scratch.device != buffer.device:
            scratch = torch.empty(buffer.numel(), dtype=buffer.dtype, device=buffer.device)
            self._scratch_buffer = scratch
        return scratch[: buffer.numel()]

    def _param_info(self) -> dict[int, tuple[int, float]]:
        """``id(param) -> (index, rate)`` for the coming step (computed once per step)."""
        opt = self.optimizer
        if self._info_step != opt._step_count:
            self._info = {id(p): (index, rate) for index, p, rate in opt._plan({}) if rate > 0.0}
            self._info_step = opt._step_count
        return self._info


class _Compactor:
    """Gather the kept elements of a flat tensor into a compact one, and scatter them back.

    On contiguous CPU tensors of a dtype NumPy has, the kept positions are
    found once (``flatnonzero``) and reused for the gather (``take``) and the
    scatter (index assignment): 3-10x faster than torch's ``masked_select`` /
    ``masked_scatter_`` on CPU (measured on 4M-element buckets with random
    masks), at 8 bytes per kept element while the bucket is in flight.
    Elsewhere (CUDA, bfloat16, no NumPy) torch's masked ops do the same.
    """

    def __init__(self, keep: torch.Tensor, like: torch.Tensor) -> None:
        self.keep = keep
        self.index = None
        if like.device.type == "cpu" and like.is_contiguous() and like.dtype != torch.bfloat16:
            try:
                import numpy as np  # noqa: PLC0415 - optional speed-up

                like.numpy()  # raises for dtypes NumPy lacks
                self.index = np.flatnonzero(keep.numpy())
            except (ImportError, RuntimeError, TypeError):
                self.index = None
        self.count = len(self.index) if self.index is not None else int(torch.count_nonzero(keep))

    def gather(self, src: torch.Tensor, out: torch.Tensor) -> None:
        """``out[:] = src[keep]``."""
        if self.index is None:
            out.copy_(src[self.keep])
        else:
            src.numpy().take(self.index, out=out.numpy())

    def scatter(self, values: torch.Tensor, out: torch.Tensor) -> None:
        """``out[keep] = values`` (in order); other elements are left as they are."""
        if self.index is None:
            out.masked_scatter_(self.keep, values)
        else:
            out.numpy()[self.index] = values.contiguous().numpy()


def _plain_allreduce(state: MaskedAllreduceState, buffer: torch.Tensor, group: Any, world: int):
    import torch.distributed as dist  # noqa: PLC0415

    buffer.div_(world)
    state.bytes_sent += buffer.numel() * buffer.element_size()
    return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


# No annotations on bucket and the result: DDP's register_comm_hook compares them with
# dist.GradBucket / Future[Tensor] objects, and this module's annotations are strings.
def masked_allreduce_hook(state: MaskedAllreduceState, bucket):  # noqa: ANN001, ANN201
    """DDP communication hook: mask each bucket with DropGrad's masks, all-reduce only the kept values.

    Register with ``ddp_model.register_comm_hook(MaskedAllreduceState(opt), masked_allreduce_hook)``
    (or :func:`register_masked_allreduce_hook`). Every rank draws the same
    masks, so the dropped elements are zero in every rank's contribution and
    need not be sent: the hook divides the bucket by the world size (as DDP's
    default does), gathers the kept elements into one compact tensor,
    all-reduces it (``(1 - p)`` of the bytes), and scatters the sums back.
    DropGrad's ``step()`` then only multiplies these parameters by
    ``1/(1-p)`` instead of masking them again.

    What equals the default path (DDP's all-reduce, then ``DropGrad.step``):
    every kept element, bitwise, when the per-element sum does not depend on
    the element's position in the all-reduced tensor (always with 2 ranks; with
    more, gloo's ring may add the same values in another order: equal to float
    rounding, and still identical on every rank). A dropped element is ``+0.0``
    (the default path gives ``0.0 * sum``, i.e. ``-0.0`` for a negative sum).
    If a dropped element is non-finite on some rank, the default path gives
    NaN there; the hook cannot know where without sending it, so it sets every
    dropped element of that parameter to NaN (a diverging run stays visible,
    ``GradScaler`` makes the same skip decision).

    Differences in use: gradients are masked (without the factor) already after
    ``backward()``, so clipping or logging between backward and ``step()``
    sees masked gradients; ``step(closure)`` with several closure evaluations
    (LBFGS) is refused by DropGrad. Accumulation with or without ``no_sync()``
    is fine (a mask applied twice in one step is the same mask).
    Complex or sparse buckets are all-reduced unmasked and masked by ``step()``.

    Args:
        state: a :class:`MaskedAllreduceState`.
        bucket: the ``torch.distributed.GradBucket`` DDP hands over.

    Returns:
        A ``torch.futures.Future`` of the reduced bucket buffer.
    """
    import torch.distributed as dist  # noqa: PLC0415

    opt = state.optimizer
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    params = bucket.parameters()
    state.bytes_dense += buffer.numel() * buffer.element_size()
    if not opt._seed_agreed:
        raise RuntimeError(
            "masked_allreduce_hook: DropGrad's seed is not agreed across ranks; build the hook state with "
            "MaskedAllreduceState(optimizer) on every rank (it agrees the seed), or pass seed= to DropGrad"
        )
    lengths = [p.numel() for p in params]
    if (
        buffer.is_sparse
        or not (buffer.is_floating_point())
        or any(p.is_complex() for p in params)
        or sum(lengths) != buffer.numel()
    ):
        return _plain_allreduce(state, buffer, group, world)  # step() masks these parameters

    info = state._param_info()
    step = opt._step_count
    entries = []  # (param, offset in the bucket, numel, index, rate)
    offset = 0
    for p, n in zip(params, lengths):
        if id(p) in info and n > 0:
            entries.append((p, offset, n, *info[id(p)]))
        offset += n
    if not entries:
        return _plain_allreduce(state, buffer, group, world)

    buffer.div_(world)
    # The keep mask from DropGrad's own kernel (masking ones with factor 1), so it
    # is bit for bit the mask step() would draw.
    ones = state._scratch(buffer)
    ones.fill_(1)
    apply_masks_(
        [ones[off : off + n] for _, off, n, _, _ in entries],
        [_masks.derive_key(opt.seed, step, index, _masks.MASKS_STREAM) for _, _, _, index, _ in entries],
        [_masks.keep_threshold(rate) for _, _, _, _, rate in entries],
        [1.0] * len(entries),
        impl=opt.impl,
    )
    keep = ones.bool()
    compactor = _Compactor(keep, buffer)
    n_kept = compactor.count
    send = torch.empty(n_kept + len(entries), dtype=buffer.dtype, device=buffer.device)
    compactor.gather(buffer, send[:n_kept])
    # one flag per masked parameter: 1 if a *dropped* element is non-finite here
    flags = send[n_kept:]
    flags.zero_()
    if not torch.isfinite(buffer.sum()):  # any NaN/inf element (or an overflowing sum) makes it non-finite
        finite_or_kept = torch.isfinite(buffer).logical_or_(keep)
        for j, (_, off, n, _, _) in enumerate(entries):
            if not bool(finite_or_kept[off : off + n].all()):
                flags[j] = 1
    state.bytes_sent += send.numel() * send.element_size()
    for p, *_ in entries:
        opt._premasked[id(p)] = step

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        buffer.zero_()
        compactor.scatter(reduced[:n_kept], buffer)
        for j in torch.nonzero(reduced[n_kept:]).flatten().tolist():
            _, off, n, _, _ = entries[j]
            buffer[off : off + n].masked_fill_(~keep[off : off + n], math.nan)
        return buffer

    return dist.all_reduce(send, group=group, async_op=True).get_future().then(unpack)


def register_masked_allreduce_hook(ddp_model: Any, optimizer: DropGrad, process_group: Any = None) -> MaskedAllreduceState:
    """Register :func:`masked_allreduce_hook` on ``ddp_model`` for ``optimizer``; returns its state.

    A collective (see :class:`MaskedAllreduceState`): call it on every rank.

    Example (under ``torchrun``)::

        ddp = DistributedDataParallel(model)
        opt = DropGrad(torch.optim.AdamW(ddp.parameters()), drop_rate=0.5)
        hook_state = register_masked_allreduce_hook(ddp, opt)
    """
    state = MaskedAllreduceState(optimizer, process_group)
    ddp_model.register_comm_hook(state, masked_allreduce_hook)
    return state
