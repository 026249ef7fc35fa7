"""The reference mask kernel: plain eager torch, one tensor at a time; the readable definition.

Every fast kernel (:mod:`dropgrad.kernels.cpu`, :mod:`dropgrad.kernels.cuda`) is
tested against this one bit for bit. It serves every tensor the fast kernels
cannot: any device, dense tensors of any layout (transposed, ``channels_last``,
other non-contiguous views), complex dtypes, and tensors that require grad
(the multiply is recorded by autograd).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import masks
from .common import is_idle

__all__ = ["mask_", "CHUNK"]

#: elements hashed at a time (the int64 temporaries take about 40 bytes an element)
CHUNK = 1 << 20


def _factor_dtype(grad: torch.Tensor) -> torch.dtype:
    # the dtype torch itself computes `grad * python_scalar` in (its "opmath" type)
    if grad.dtype in (torch.float64, torch.complex128):
        return torch.float64
    return torch.float32


def _mask_block(g: torch.Tensor, key: tuple[int, int], threshold: int, scale: float, offset: int) -> None:
    """Mask every element of ``g`` (at most about CHUNK of them), whose first element is ``offset``."""
    keep = masks.keep_mask(g.numel(), key, threshold, offset, g.device)
    g.mul_((keep.to(_factor_dtype(g)) * scale).view(g.shape))


def _mask_chunked(g: torch.Tensor, key: tuple[int, int], threshold: int, scale: float, offset: int) -> None:
    """Mask ``g`` in blocks of at most CHUNK elements, in any layout (elementwise: blocks give the same bits)."""
    n = g.numel()
    if n <= CHUNK:
        _mask_block(g, key, threshold, scale, offset)
        return
    if g.is_contiguous():
        flat = g.view(-1)
        for start in range(0, n, CHUNK):
            _mask_block(flat[start : start + CHUNK], key, threshold, scale, offset + start)
        return
    # a non-contiguous view: slices along dim 0 are views covering consecutive ranges of
    # row-major positions; rows larger than a block are split recursively
    inner = n // g.shape[0]
    if inner > CHUNK:
        for i in range(g.shape[0]):
            _mask_chunked(g[i], key, threshold, scale, offset + i * inner)
        return
    rows = max(1, CHUNK // inner)
    for start in range(0, g.shape[0], rows):
        _mask_block(g[start : start + rows], key, threshold, scale, offset + start * inner)


def mask_(
    grads: Sequence[torch.Tensor],
    indices: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
    prefix: int,
    stream: int,
) -> None:
    """Mask ``grads`` in place (the contract of :mod:`dropgrad.kernels.common`), in eager torch.

    Element ``i`` (row-major logical order) of ``grads[j]`` is kept iff
    ``hash32(key_from_prefix(prefix, indices[j], stream), offsets[j] + i) < thresholds[j]``
    and then multiplied by ``scales[j]``; dropped elements are multiplied by zero.
    Peak extra memory is bounded (about 40 bytes times ``CHUNK``) whatever the
    tensors' sizes and layouts.
    """
    for g, index, thr, scale, off in zip(grads, indices, thresholds, scales, offsets):
        if is_idle(g.numel(), thr, scale):
            continue
        _mask_chunked(g, masks.key_from_prefix(prefix, index, stream), thr, scale, off)
