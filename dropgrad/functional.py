"""Functional core of DropGrad: mask gradients in place, no optimizer needed; the one kernel dispatcher.

The mask of a gradient ``g`` with drop rate ``p`` is ``m ~ Bernoulli(1 - p)``
per element, and the result is ``g * m * s`` with ``s = 2**32 / threshold``
(``1/(1-p)`` up to the threshold's rounding, so ``E[result] = g`` exactly), or
``g * m`` without rescaling. At ``p = 1`` every element is dropped and no
division happens. The multiplication keeps IEEE semantics: a NaN or infinite
element stays non-finite whether it is dropped or kept, so masking never hides
a diverging run.

Masks come from the counter-based generator of :mod:`dropgrad.masks`, so they
are a pure function of ``(seed, step, tensor index, element index)``.

:func:`apply_masks_` is the only dispatcher. Like torch.optim's choice between
its single-tensor, foreach and fused paths, it decides once per call, by
device and servability (:func:`dropgrad.kernels.common.servable`), which
kernel masks which tensors: the C kernel for plain contiguous CPU tensors
(once it is built), the Triton kernel for CUDA ones, the reference kernel for
everything else. Every kernel gives the same bits.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch

from . import masks
from .kernels import cpu, cuda, reference
from .kernels.common import MAX_OFFSET, TWO32, eager_only, is_idle, servable, unservable_reason
from .rates import check_rate

__all__ = ["drop_grad_", "apply_masks_", "check_rate", "IMPLS"]

_get_is_cuda = operator.attrgetter("is_cuda")
#: the values ``impl=`` accepts: the fastest kernel available, the reference only, or a fast kernel only
IMPLS = (None, "reference", "fused")


def check_impl(impl: object, name: str = "impl") -> str | None:
    """Validate a kernel choice (one of ``IMPLS``)."""
    if impl not in IMPLS:
        raise ValueError(f"{name} must be None, 'reference' or 'fused', got {impl!r}")
    return impl  # type: ignore[return-value,unused-ignore]


def _check_lists(grads, indices, thresholds, scales, offsets) -> None:
    n = len(grads)
    if not (len(indices) == len(thresholds) == len(scales) == len(offsets) == n):
        raise ValueError(
            "grads, indices, thresholds, scales and offsets must have equal lengths, got "
            f"{n}, {len(indices)}, {len(thresholds)}, {len(scales)}, {len(offsets)}"
        )
    if n and set(map(type, thresholds)) != {int}:
        bad = next(t for t in thresholds if type(t) is not int)
        raise TypeError(f"thresholds must be ints in [0, 2**32] (masks.keep_threshold), got {bad!r} of type {type(bad).__name__}")
    if n and (min(thresholds) < 0 or max(thresholds) > TWO32):
        bad = next(t for t in thresholds if not 0 <= t <= TWO32)
        raise ValueError(f"thresholds must be in [0, 2**32], got {bad!r}")
    if n and (min(offsets) < 0 or max(offsets) > MAX_OFFSET):
        bad = next(o for o in offsets if not 0 <= o <= MAX_OFFSET)
        raise ValueError(f"offsets must be in [0, 2**63 - 1], got {bad!r}")


def _active(grads, indices, thresholds, scales, offsets):
    """The entries the contract does not leave untouched (all of them in the common case, without a loop)."""
    numels = list(map(torch.Tensor.numel, grads))
    if 0 not in numels and (max(thresholds) < TWO32 or 1.0 not in scales):
        return grads, indices, thresholds, scales, offsets, numels
    keep = [j for j, (m, t, s) in enumerate(zip(numels, thresholds, scales)) if not is_idle(m, t, s)]
    pick = lambda xs: [xs[j] for j in keep]  # noqa: E731
    return pick(grads), pick(indices), pick(thresholds), pick(scales), pick(offsets), pick(numels)


def _refuse_shared_memory(grads: list[torch.Tensor]) -> None:
    ptrs = list(map(torch.Tensor.data_ptr, grads))
    if len(set(ptrs)) != len(ptrs):
        first: dict[int, int] = {}
        for j, ptr in enumerate(ptrs):
            if ptr in first:
                raise ValueError(
                    f"grads[{first[ptr]}] and grads[{j}] are the same memory (a tensor listed twice?); "
                    "each tensor can be masked once per call"
                )
            first[ptr] = j


def apply_masks_(
    grads: Sequence[torch.Tensor],
    indices: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
    *,
    prefix: int | torch.Tensor,
    stream: int = masks.MASKS_STREAM,
    impl: str | None = None,
) -> None:
    """Mask dense tensors in place, choosing the kernel once for the whole call.

    Element ``i`` (row-major) of ``grads[j]`` is kept iff
    ``hash32(key_from_prefix(prefix, indices[j], stream), offsets[j] + i) < thresholds[j]``
    and then multiplied by ``scales[j]``; dropped elements are multiplied by zero.

    Args:
        grads: dense tensors to mask (sparse gradients: pass ``g._values()``); no
            two may share memory.
        indices: the tensor index each key is derived from (a parameter's position).
        thresholds: one :func:`dropgrad.masks.keep_threshold` per tensor, in ``[0, 2**32]``.
        scales: the survivors' factor per tensor (:func:`dropgrad.masks.survivor_scale`).
        offsets: element offset of each tensor inside the full tensor it is a shard of.
        prefix: :func:`dropgrad.masks.step_prefix` of the seed and step, or a *clock*:
            an int64 tensor ``[seed, step]`` on the tensors' device, from which the
            keys are derived where the tensors live. On CUDA the Triton kernel reads
            it on the GPU, so the call can be captured in a CUDA graph and every
            replay masks with the step the clock holds then
            (``DropGrad(..., capturable=True)`` keeps one per device); other
            kernels read it once on the host.
        stream: separates independent draws of the same counters.
        impl: ``None`` (the fastest kernel ready now), ``"reference"`` or ``"fused"``
            (the fast kernel of each tensor's device: C on CPU, waiting for its
            build, Triton on CUDA; an error naming a tensor it cannot serve).
            All give the same bits.
    """
    return eager_only(_dispatch)(grads, indices, thresholds, scales, offsets, prefix, stream, impl)


def _dispatch(grads, indices, thresholds, scales, offsets, prefix, stream, impl) -> None:
    check_impl(impl)
    grads = list(grads)
    if offsets is None:
        offsets = [0] * len(grads)
    _check_lists(grads, indices, thresholds, scales, offsets)
    if not grads:
        return
    grads, indices, thresholds, scales, offsets, numels = _active(grads, indices, thresholds, scales, offsets)
    if not grads:
        return
    _refuse_shared_memory(grads)
    if isinstance(prefix, torch.Tensor):
        _mask_clocked(grads, indices, thresholds, scales, offsets, numels, _check_clock(prefix), stream, impl)
        return
    _route(grads, indices, thresholds, scales, offsets, numels, prefix, stream, impl)


def _route(grads, indices, thresholds, scales, offsets, numels, prefix: int, stream, impl) -> None:
    """Send checked, non-empty lists (see _dispatch) to the kernels that serve them, under an int prefix."""
    on_cuda = any(map(_get_is_cuda, grads))
    if on_cuda:
        cuda.refuse_graph_capture()  # for every kernel: a captured step would repeat its masks
    if impl == "reference":
        reference.mask_(grads, indices, thresholds, scales, offsets, prefix, stream)
        return
    fits = max(offsets) <= MAX_OFFSET - max(numels)
    if not on_cuda and fits and servable(grads, "cpu"):
        # the common case: every tensor a plain CPU tensor, one C call
        if cpu.ready() or (impl == "fused" and _fused_cpu_or_raise()):
            cpu.mask_(grads, indices, thresholds, scales, offsets, prefix, stream)
        else:
            reference.mask_(grads, indices, thresholds, scales, offsets, prefix, stream)
        return
    if on_cuda and fits and cuda.available() and servable(grads, "cuda"):
        # the common GPU case: the call the loop below would make, without its Python pass per tensor
        cuda.mask_(grads, indices, thresholds, scales, offsets, prefix, stream)
        return
    groups: dict[str, list[int]] = {"cpu": [], "cuda": [], "reference": []}
    has_cpu = any(g.device.type == "cpu" for g in grads)  # only then may the C kernel be built
    cpu_ok = has_cpu and (cpu.ready() or (impl == "fused" and _fused_cpu_or_raise()))
    cuda_ok = on_cuda and cuda.available()
    for j, g in enumerate(grads):
        kind = g.device.type
        fits = offsets[j] <= MAX_OFFSET - numels[j]
        if kind == "cpu" and cpu_ok and fits and unservable_reason(g, "cpu") is None:
            groups["cpu"].append(j)
        elif kind == "cuda" and cuda_ok and fits and unservable_reason(g, "cuda") is None:
            groups["cuda"].append(j)
        elif impl == "fused":
            why = unservable_reason(g, kind) if fits else f"at element offset {offsets[j]} past 2**63"
            if why is None and kind == "cuda":
                why = f"on {g.device}, and {cuda.unavailable_reason()}"
            raise RuntimeError(f"impl='fused' cannot mask grads[{j}]: it is {why or f'on device {g.device}'}")
        else:
            groups["reference"].append(j)
    for name, members in groups.items():
        if members:
            kernel = {"cpu": cpu.mask_, "cuda": cuda.mask_, "reference": reference.mask_}[name]
            kernel([grads[j] for j in members], [indices[j] for j in members], [thresholds[j] for j in members],
                   [scales[j] for j in members], [offsets[j] for j in members], prefix, stream)


def _check_clock(clock: torch.Tensor) -> torch.Tensor:
    if type(clock) is not torch.Tensor or clock.dtype != torch.int64 or tuple(clock.shape) != (2,):
        raise TypeError(
            "prefix must be an int (masks.step_prefix) or a clock (a plain int64 tensor [seed, step] of shape (2,)), "
            f"got a {type(clock).__name__} of dtype {clock.dtype} and shape {tuple(clock.shape)}"
        )
    return clock


def _mask_clocked(grads, indices, thresholds, scales, offsets, numels, clock, stream, impl) -> None:
    """Mask under a clock tensor: the Triton kernel reads it on the device, every other kernel gets its prefix."""
    fast_type = cuda.device_type()
    fast = impl != "reference" and clock.device.type == fast_type and cuda.available()
    served: list[int] = []
    rest: list[int] = []
    for j, g in enumerate(grads):
        if g.device != clock.device:
            raise ValueError(f"grads[{j}] is on {g.device} but the clock on {clock.device}: pass one clock per device")
        if fast and offsets[j] <= MAX_OFFSET - numels[j] and unservable_reason(g, fast_type) is None:
            served.append(j)
        else:
            rest.append(j)
    if rest:
        if cuda.capturing():
            j = rest[0]
            why = ("excluded by impl='reference'" if impl == "reference" else
                   unservable_reason(grads[j], fast_type) or f"on {grads[j].device}, and {cuda.unavailable_reason()}")
            raise RuntimeError(
                f"cannot mask grads[{j}] inside a CUDA graph capture: it is {why}. Only the Triton kernel reads "
                "the step from the device (contiguous float32/float64/float16/bfloat16 CUDA tensors); every other "
                "kernel derives its keys on the host, and a captured graph would repeat them at every replay"
            )
        seed, step = clock.tolist()  # one read (a synchronization on a GPU); never inside a capture
        pick = lambda xs: [xs[j] for j in rest]  # noqa: E731
        _route(pick(grads), pick(indices), pick(thresholds), pick(scales), pick(offsets), pick(numels),
               masks.step_prefix(seed, step), stream, impl)  # the lists were checked once, in _dispatch
    if served:
        pick = lambda xs: [xs[j] for j in served]  # noqa: E731
        cuda.mask_clocked_(pick(grads), pick(indices), pick(thresholds), pick(scales), pick(offsets), clock, stream)


def _fused_cpu_or_raise() -> bool:
    if not cpu.available():  # waits for the build
        raise RuntimeError(f"impl='fused' was requested but the C mask kernel is unavailable: {cpu.unavailable_reason()}")
    return True


def drop_grad_(
    tensors: torch.Tensor | Iterable[torch.Tensor],
    drop_rate: float,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    step: int = 0,
    rescale: bool = True,
    impl: str | None = None,
) -> list[torch.Tensor]:
    """Gradient dropout in place on ``tensors``: ``g <- g * m / (1 - p)``, ``m ~ Bernoulli(1 - p)``.

    For custom loops, e.g. a meta-learning inner loop on the output of
    ``torch.autograd.grad``. Dense and sparse COO tensors of floating or complex
    dtypes are supported; a sparse tensor's stored values are masked.

    Args:
        tensors: a tensor or an iterable of tensors (the gradients themselves); no
            tensor may appear twice.
        drop_rate: probability ``p`` in ``[0, 1]`` of zeroing an element.
        generator: torch generator to draw the mask seed from (one draw per call);
            defaults to torch's global generator. Ignored when ``seed`` is given.
        seed: draw the masks for these counters directly instead: with ``seed`` and
            ``step`` fixed, the masks are fixed (tensor ``j`` of the list uses index ``j``).
            Any integer (numpy integers too).
        step: the step counter that goes with ``seed``.
        rescale: multiply survivors by the inverse keep probability (default) to
            keep the gradient unbiased.
        impl: kernel choice, see :func:`apply_masks_`.

    Returns:
        The list of the same tensors, masked.

    Example:
        >>> g = torch.ones(8)
        >>> _ = drop_grad_(g, 0.5, seed=0)
        >>> sorted(set(g.tolist())) == [0.0, 2.0]
        True
    """
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    for j, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{j}] must be a torch.Tensor, got {type(t).__name__}")
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"tensors[{j}] must have a floating or complex dtype, got {t.dtype}")
    p = check_rate(drop_rate)
    if not isinstance(rescale, bool):
        raise TypeError(f"rescale must be a bool, got {rescale!r}")
    check_impl(impl)
    seed = masks.draw_seed(generator) if seed is None else masks.check_seed(seed)
    step = masks.check_seed(step, "step")
    if p == 0.0:
        return tensors
    thr = masks.keep_threshold(p)
    scale = masks.survivor_scale(thr, rescale)
    dense = [t._values() if t.is_sparse else t for t in tensors]
    n = len(dense)
    apply_masks_(dense, range(n), [thr] * n, [scale] * n, [0] * n, prefix=masks.step_prefix(seed, step), impl=impl)
    return tensors


