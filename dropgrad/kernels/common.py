"""What every mask kernel shares: the contract's constants, the dtype table and one servability check.

The kernel contract (every module of :mod:`dropgrad.kernels` implements it)::

    mask_(grads, indices, thresholds, scales, offsets, prefix, stream) -> None

masks, in place, element ``i`` (row-major logical order) of every ``grads[j]``:
it is kept iff ``hash32(key_j, offsets[j] + i) < thresholds[j]`` and then
multiplied by ``scales[j]``, else multiplied by zero, where
``key_j = masks.key_from_prefix(prefix, indices[j], stream)``. Entries with no
elements, or with ``thresholds[j] >= 2**32`` and ``scales[j] == 1``, are left
untouched. The caller (:func:`dropgrad.functional.apply_masks_`, the one
dispatcher) guarantees equal lengths, thresholds in ``[0, 2**32]``, offsets in
``[0, 2**63 - numel]``, tensors that share no memory, and, for a fast kernel,
tensors that pass :func:`servable`.
"""

from __future__ import annotations

import operator
import sys

import torch

from ..masks import TWO32

__all__ = [
    "TWO32", "M64", "MAX_OFFSET", "DTYPE_CODES", "FAST_DTYPES",
    "servable", "unservable_reason", "is_idle", "bump_versions", "eager_only",
]

M64 = (1 << 64) - 1
#: largest element offset a kernel accepts (``offset + numel`` must stay below it)
MAX_OFFSET = (1 << 63) - 1
#: dtype codes of the C kernel (the Triton kernel serves the same dtypes)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
FAST_DTYPES = frozenset(DTYPE_CODES)

_TENSOR_ONLY = {torch.Tensor}
_STRIDED_ONLY = {torch.strided}
_get_dtype = operator.attrgetter("dtype")
_get_layout = operator.attrgetter("layout")
_get_requires_grad = operator.attrgetter("requires_grad")
_get_device_type = operator.attrgetter("device.type")
# is_cpu / is_cuda read a flag; device.type builds a torch.device per tensor (5x the cost)
_ON_DEVICE_TYPE = {t: operator.attrgetter(f"is_{t}") for t in ("cpu", "cuda") if hasattr(torch.Tensor, f"is_{t}")}


def _all_on(grads: list, device_type: str) -> bool:
    flag = _ON_DEVICE_TYPE.get(device_type)
    if flag is not None:
        return all(map(flag, grads))
    return set(map(_get_device_type, grads)) == {device_type}


def servable(grads: list, device_type: str | None) -> bool:
    """Whether a fast kernel can mask every tensor of ``grads`` (list-wide, C-level passes).

    Served: plain (not subclassed), strided, contiguous tensors of
    float32/float64/float16/bfloat16 that do not require grad, are not lazily
    negated or conjugated, and are on ``device_type`` (None: any device).
    Each check is one ``map`` over the list, 0.1 to 0.2 us a tensor.
    """
    if set(map(type, grads)) != _TENSOR_ONLY:
        return False  # a subclass (DTensor), a None, or an empty list
    return not (
        not set(map(_get_dtype, grads)) <= FAST_DTYPES
        or set(map(_get_layout, grads)) != _STRIDED_ONLY  # before is_contiguous, which sparse layouts refuse
        or (device_type is not None and not _all_on(grads, device_type))
        or any(map(_get_requires_grad, grads))
        or not all(map(torch.Tensor.is_contiguous, grads))
        or any(map(torch.Tensor.is_neg, grads))
        or any(map(torch.Tensor.is_conj, grads))
    )


def unservable_reason(g: torch.Tensor, device_type: str | None) -> str | None:
    """Why a fast kernel cannot mask ``g`` (None: it can); the per-tensor form of :func:`servable`."""
    if type(g) is not torch.Tensor:
        return f"a {type(g).__name__} (not a plain torch.Tensor)"
    if device_type is not None and g.device.type != device_type:
        return f"on device {g.device}"
    if g.layout != torch.strided:
        return f"of layout {g.layout}"
    if g.dtype not in FAST_DTYPES:
        return f"of dtype {g.dtype}"
    if g.requires_grad:
        return "requiring grad (the reference records the multiply for autograd)"
    if not g.is_contiguous():
        return "not contiguous"
    if g.is_neg() or g.is_conj():
        return "a lazy negative or conjugate view"
    return None


def is_idle(numel: int, threshold: int, scale: float) -> bool:
    """Whether the contract leaves an entry untouched (no elements, or keep-all with factor 1)."""
    return numel == 0 or (threshold >= TWO32 and scale == 1.0)


def bump_versions(tensors: list[torch.Tensor]) -> None:
    """Advance the tensors' version counters, as an in-place torch op would (autograd sees the change)."""
    if not tensors:
        return
    try:
        torch.autograd.graph.increment_version(tensors)
    except (TypeError, RuntimeError):  # older torch (2.4 raises RuntimeError) takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


_disabled: dict = {}


def eager_only(fn):
    """``fn``, or, once torch._dynamo is loaded, ``fn`` excluded from tracing (it runs eagerly).

    Only a loaded torch._dynamo can be tracing a call, and importing it costs
    seconds, so it is never imported for this.
    """
    if "torch._dynamo" not in sys.modules:
        return fn
    wrapped = _disabled.get(fn)
    if wrapped is None:
        wrapped = _disabled[fn] = torch.compiler.disable(fn)
    return wrapped
