"""Functional core of DropGrad: mask gradients in place, no optimizer needed.

The mask of a gradient ``g`` with drop rate ``p`` is ``m ~ Bernoulli(1 - p)``
per element, and the result is ``g * m / (1 - p)`` (or ``g * m`` without
rescaling), so ``E[result] = g``. At ``p = 1`` every element is dropped and
no division happens. The multiplication keeps IEEE semantics: a NaN or
infinite element stays non-finite whether it is dropped or kept, so masking
never hides a diverging run.

Masks come from the counter-based generator of :mod:`dropgrad.masks`, so they
are a pure function of ``(seed, step, tensor index, element index)``.

Kernels follow torch.optim's layout: :func:`_single_tensor_drop_grad_` is the
readable reference, a fused kernel (when available) must match it bit for bit,
and :func:`apply_masks_` dispatches between them.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from collections.abc import Iterable, Sequence

import torch

from . import masks as _masks

__all__ = ["drop_grad_", "apply_masks_", "check_rate"]

_TWO32 = 1 << 32
_get_is_cuda = operator.attrgetter("is_cuda")
#: elements the reference kernel hashes at a time (its temporaries take ~40 bytes an element)
_REFERENCE_CHUNK = 1 << 20


def check_rate(value: object, name: str = "drop_rate") -> float:
    """Validate a drop rate (a real number in ``[0, 1]``) and return it as a float.

    Raises:
        TypeError: ``value`` is not a real number (bools are refused too).
        ValueError: ``value`` is NaN or outside ``[0, 1]``.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {value!r} of type {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _factor_dtype(grad: torch.Tensor) -> torch.dtype:
    # the dtype torch itself computes `grad * python_scalar` in (its "opmath" type)
    if grad.dtype in (torch.float64, torch.complex128):
        return torch.float64
    return torch.float32


def _single_tensor_drop_grad_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[tuple[int, int]],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
) -> None:
    """Reference kernel: one tensor at a time, in plain eager torch.

    Each ``grads[j]`` is a dense tensor of any layout, of a floating or complex
    dtype; element ``i`` (row-major logical order) is kept iff
    ``hash32(keys[j], offsets[j] + i) < thresholds[j]``, and then multiplied by
    ``scales[j]``; dropped elements are multiplied by zero.
    """
    for g, key, thr, scale, off in zip(grads, keys, thresholds, scales, offsets):
        n = g.numel()
        if n == 0 or (thr >= _TWO32 and scale == 1.0):
            continue
        dtype = _factor_dtype(g)
        if not g.is_contiguous() or n <= _REFERENCE_CHUNK:
            keep = _masks.keep_mask(n, key, thr, off, g.device)
            g.mul_((keep.to(dtype) * scale).view(g.shape))
            continue
        # elementwise, so chunks give the same bits; the int64 temporaries stay bounded
        flat = g.view(-1)
        for start in range(0, n, _REFERENCE_CHUNK):
            part = flat[start : start + _REFERENCE_CHUNK]
            keep = _masks.keep_mask(part.numel(), key, thr, off + start, g.device)
            part.mul_(keep.to(dtype) * scale)


_disabled: dict = {}


def _eager_only(fn):
    """``fn``, or, once torch._dynamo is loaded, ``fn`` excluded from tracing (a graph break; it runs eagerly).

    Only a loaded torch._dynamo can be tracing a call, and importing it costs
    seconds, so it is never imported for this.
    """
    if "torch._dynamo" not in sys.modules:
        return fn
    wrapped = _disabled.get(fn)
    if wrapped is None:
        wrapped = _disabled[fn] = torch.compiler.disable(fn)
    return wrapped


def _fused_kernel():
    """The fast kernel module if it can serve, else None (import is lazy and cached)."""
    try:
        from . import _kernels  # noqa: PLC0415 - optional fast path
    except ImportError:
        return None
    return _kernels


def apply_masks_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[tuple[int, int]],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
    impl: str | None = None,
) -> None:
    """Mask dense tensors in place, choosing the kernel.

    Args:
        grads: dense tensors to mask (sparse gradients: pass ``g._values()``).
        keys: one :func:`dropgrad.masks.derive_key` result per tensor.
        thresholds: one :func:`dropgrad.masks.keep_threshold` per tensor.
        scales: the survivors' factor per tensor (``1/(1-p)``, or 1, or 0 at ``p=1``).
        offsets: element offset of each tensor inside the full tensor it is a shard of.
        impl: ``None`` (fastest available), ``"reference"`` or ``"fused"`` (the fused
            kernel of each tensor's device: C on CPU, Triton on CUDA; an error for a
            tensor it cannot serve). All give the same bits.
    """
    if offsets is None:
        offsets = [0] * len(grads)
    if impl not in (None, "reference", "fused"):
        raise ValueError(f"impl must be None, 'reference' or 'fused', got {impl!r}")
    if any(map(_get_is_cuda, grads)):
        from . import _triton_kernels  # noqa: PLC0415 - imports Triton only when it is used

        _triton_kernels._refuse_graph_capture()  # for every kernel: a captured step would repeat its masks
        if impl != "reference":
            grads, keys, thresholds, scales, offsets = _triton_kernels.cuda_drop_grad_(
                grads, keys, thresholds, scales, offsets, strict=impl == "fused"
            )
            if not grads:
                return None
    if impl == "reference":
        return _single_tensor_drop_grad_(grads, keys, thresholds, scales, offsets)
    kernels = _fused_kernel()
    if kernels is None:
        if impl == "fused":
            raise RuntimeError("impl='fused' was requested but dropgrad's fused kernel is unavailable")
        return _single_tensor_drop_grad_(grads, keys, thresholds, scales, offsets)
    return kernels.fused_drop_grad_(grads, keys, thresholds, scales, offsets, strict=impl == "fused")


def _scale_for(drop_rate: float, rescale: bool) -> float:
    if not rescale:
        return 1.0
    if drop_rate >= 1.0:
        return 0.0
    return 1.0 / (1.0 - drop_rate)


def _seed_from_generator(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64).item())


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
        tensors: a tensor or an iterable of tensors (the gradients themselves).
        drop_rate: probability ``p`` in ``[0, 1]`` of zeroing an element.
        generator: torch generator to draw the mask seed from (one draw per call);
            defaults to torch's global generator. Ignored when ``seed`` is given.
        seed: draw the masks for these counters directly instead: with ``seed`` and
            ``step`` fixed, the masks are fixed (tensor ``j`` of the list uses index ``j``).
        step: the step counter that goes with ``seed``.
        rescale: multiply survivors by ``1 / (1 - p)`` (default) to keep the
            gradient unbiased.
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
    if seed is None:
        seed = _seed_from_generator(generator)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if p == 0.0:
        return tensors
    thr = _masks.keep_threshold(p)
    scale = _scale_for(p, rescale)
    dense = [t._values() if t.is_sparse else t for t in tensors]
    keys = [_masks.derive_key(seed, step, j) for j in range(len(dense))]
    apply_masks_(dense, keys, [thr] * len(dense), [scale] * len(dense), impl=impl)
    return tensors
