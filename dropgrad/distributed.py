"""DropGrad under ``torch.distributed``: every rank draws the same masks, shards draw their slice.

A mask is a pure function of ``(seed, step, parameter index, element index)``
(:mod:`dropgrad.masks`), so ranks agree on every mask without communicating as
long as they agree on four things:

- the seed: an explicit ``seed=`` is taken on the user's word; a seed drawn at
  construction is replaced, at the first ``step()`` inside an initialized
  process group, by rank 0's (:func:`agree_seed`: one exchange through the
  process group's store, never a collective that could meet a DDP bucket, which
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
- FSDP2 (``fully_shard``), tensor parallelism and both together (FSDP2 + TP's
  ``_StridedShard``): each rank masks only its local shard, at its elements'
  positions in the full parameter (``Shard``, ``_StridedShard`` and
  ``Replicate`` placements on any mesh; ``Partial`` is refused with an error).
- ``DropGrad(ZeroRedundancyOptimizer(...))``: every rank sees the full
  ``param_groups``; only the parameters this rank owns (and steps) are masked.
- :func:`masked_allreduce_hook`: an optional DDP communication hook that masks
  each bucket before the all-reduce and sends only the kept values.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import masks as _masks
from .agreement import agree_seed, check_consistency
from .dcp import DropGradStateful
from .functional import apply_masks_
from .sharding import local_shards
from .wrapper import DropGrad

__all__ = [
    "DropGradStateful",
    "agree_seed",
    "check_consistency",
    "local_shards",
    "MaskedAllreduceState",
    "masked_allreduce_hook",
    "register_masked_allreduce_hook",
]


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
        if not isinstance(optimizer, DropGrad):
            raise TypeError(f"optimizer must be the DropGrad that steps the model, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.process_group = process_group
        self.bytes_sent = 0
        self.bytes_dense = 0
        self._info_step: int | None = None
        self._info: dict[int, tuple[int, float]] = {}
        # (device, bucket layout) -> the masked parameters' (starts, ends) in the bucket, on
        # that device: made at a layout's first bucket, then reused (no upload per bucket)
        self._bounds: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        if not optimizer.seed_agreed:
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
        if self._info_step != opt.step_count:
            self._info = {id(p): (index, rate) for index, p, rate in opt.drop_plan() if rate > 0.0}
            self._info_step = opt.step_count
        return self._info

    def _entry_bounds(self, entries: list, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end offsets of the masked parameters in a bucket, as int64 tensors on its device.

        Cached per layout: DDP hands the same buckets every step, so the upload
        (a pinned, non-blocking copy on CUDA: no host sync) happens once per layout.
        """
        key = (like.device, like.numel(), tuple((off, n) for _, off, n, _, _ in entries))
        bounds = self._bounds.get(key)
        if bounds is None:
            host = torch.tensor([off for _, off, *_ in entries] + [off + n for _, off, n, *_ in entries],
                                dtype=torch.int64)
            if like.device.type == "cuda":
                dev = host.pin_memory().to(like.device, non_blocking=True)
            else:
                dev = host.to(like.device)
            bounds = (dev[: len(entries)], dev[len(entries) :])
            if len(self._bounds) >= _MAX_CACHED_LAYOUTS:  # rates changing between steps: new layouts
                self._bounds.clear()
            self._bounds[key] = bounds
        return bounds


#: CPU buckets of a dtype NumPy has are compacted through NumPy (see _Compactor); tests set
#: this to False to run the device path (the one CUDA buckets take) on CPU tensors
_NUMPY_ON_CPU = True
#: bucket layouts whose entry offsets the hook state keeps on the device
_MAX_CACHED_LAYOUTS = 256


class _Compactor:
    """Gather the kept elements of a flat tensor into a compact one, and scatter them back.

    On contiguous CPU tensors of a dtype NumPy has, the kept positions are
    found once (``flatnonzero``) and reused for the gather (``take``) and the
    scatter (index assignment): 3-10x faster than torch's ``masked_select`` /
    ``masked_scatter_`` on CPU (measured on 4M-element buckets with random
    masks), at 8 bytes per kept element while the bucket is in flight.

    Elsewhere (CUDA, bfloat16, no NumPy) the same is done with device ops:
    ``torch.nonzero`` finds the positions, ``index_select`` gathers and
    ``index_copy_`` scatters (both deterministic). ``nonzero`` is the one host
    synchronization of a bucket on CUDA: the host must learn how many elements
    are kept to size the compact tensor that goes to ``all_reduce``.
    """

    def __init__(self, keep: torch.Tensor, like: torch.Tensor) -> None:
        self.keep = keep
        self.index = None  # NumPy positions (host path)
        self.positions: torch.Tensor | None = None  # int64 positions on the device (device path)
        if _NUMPY_ON_CPU and like.device.type == "cpu" and like.is_contiguous() and like.dtype != torch.bfloat16:
            try:
                import numpy as np  # noqa: PLC0415 - optional speed-up

                like.numpy()  # raises for dtypes NumPy lacks
                self.index = np.flatnonzero(keep.numpy())
            except (ImportError, RuntimeError, TypeError):
                self.index = None
        if self.index is not None:
            self.count = len(self.index)
        else:
            # the bucket's one host sync on CUDA: nonzero's result size is the kept count
            self.positions = torch.nonzero(keep).flatten()
            self.count = self.positions.numel()

    @property
    def on_host(self) -> bool:
        """Whether the NumPy (host) path serves this bucket."""
        return self.index is not None

    def gather(self, src: torch.Tensor, out: torch.Tensor) -> None:
        """``out[:] = src[keep]``."""
        if self.positions is not None:
            torch.index_select(src, 0, self.positions, out=out)
        elif self.index is not None:
            src.numpy().take(self.index, out=out.numpy())

    def scatter(self, values: torch.Tensor, out: torch.Tensor) -> None:
        """``out[keep] = values`` (in order); other elements are left as they are."""
        if self.positions is not None:
            out.index_copy_(0, self.positions, values)
        elif self.index is not None:
            out.numpy()[self.index] = values.contiguous().numpy()


def _dropped_nonfinite_flags(
    buffer: torch.Tensor, keep: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, out: torch.Tensor
) -> None:
    """``out[j] = 1`` if a dropped element of entry ``j`` (``buffer[starts[j]:ends[j]]``) is non-finite, else 0.

    Device ops only (no host sync): a running count of the dropped non-finite
    elements, differenced at the entries' bounds.
    """
    bad = torch.isfinite(buffer).logical_or_(keep).logical_not_()
    count_dtype = torch.int32 if buffer.numel() < 2**31 - 1 else torch.int64
    running = torch.zeros(buffer.numel() + 1, dtype=count_dtype, device=buffer.device)
    torch.cumsum(bad, 0, dtype=count_dtype, out=running[1:])
    out.copy_(running.index_select(0, ends).sub_(running.index_select(0, starts)).gt(0))


def _fill_dropped_with_nan(
    buffer: torch.Tensor, keep: torch.Tensor, flags: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor
) -> None:
    """Set the dropped elements of every entry ``j`` with ``flags[j] != 0`` to NaN (device ops only)."""
    flagged = flags.ne(0).to(torch.int32)
    marks = torch.zeros(buffer.numel() + 1, dtype=torch.int32, device=buffer.device)
    marks.index_add_(0, starts, flagged).index_add_(0, ends, flagged.neg())
    inside = marks.cumsum_(0)[:-1].gt(0)  # inside a flagged entry (entries never overlap)
    buffer.masked_fill_(inside.logical_and_(keep.logical_not()), math.nan)


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

    Host synchronizations: on CUDA, one per masked bucket (``torch.nonzero``,
    which tells the host how many elements are kept, the size of the tensor
    handed to ``all_reduce``); everything else, the non-finite flags and the
    NaN fill included, stays on the device. Per bucket in flight it holds a
    bool mask, the kept positions (8 bytes per kept element) and, while the
    hook runs, a 4-byte running count per element. CPU buckets take NumPy
    (no device to wait for).

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
    if not opt.seed_agreed:
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
    step = opt.step_count
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
        [index for _, _, _, index, _ in entries],
        [_masks.keep_threshold(rate) for _, _, _, _, rate in entries],
        [1.0] * len(entries),
        prefix=_masks.step_prefix(opt.seed, step),
        stream=_masks.MASKS_STREAM,
        impl=opt.impl,
    )
    keep = ones.bool()
    compactor = _Compactor(keep, buffer)
    n_kept = compactor.count
    send = torch.empty(n_kept + len(entries), dtype=buffer.dtype, device=buffer.device)
    compactor.gather(buffer, send[:n_kept])
    # one flag per masked parameter: 1 if a *dropped* element is non-finite here
    flags = send[n_kept:]
    bounds = None
    if compactor.on_host:  # CPU: reading values costs nothing, and finite buckets need one pass
        flags.zero_()
        if not torch.isfinite(buffer.sum()):  # any NaN/inf element (or an overflowing sum) makes it non-finite
            finite_or_kept = torch.isfinite(buffer).logical_or_(keep)
            for j, (_, off, n, _, _) in enumerate(entries):
                if not bool(finite_or_kept[off : off + n].all()):
                    flags[j] = 1
    else:  # CUDA (and bfloat16): on the device, never read on the host
        bounds = state._entry_bounds(entries, buffer)
        _dropped_nonfinite_flags(buffer, keep, *bounds, out=flags)
    state.bytes_sent += send.numel() * send.element_size()
    opt.mark_premasked(p for p, *_ in entries)

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        buffer.zero_()
        compactor.scatter(reduced[:n_kept], buffer)
        if bounds is None:
            for j in torch.nonzero(reduced[n_kept:]).flatten().tolist():
                _, off, n, _, _ = entries[j]
                buffer[off : off + n].masked_fill_(~keep[off : off + n], math.nan)
        else:
            _fill_dropped_with_nan(buffer, keep, reduced[n_kept:], *bounds)
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
