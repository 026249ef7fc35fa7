"""Counter-based gradient masks: a mask is a pure function of its counters.

Every mask element is decided by hashing four counters,
``(seed, step, tensor index, element index)``, and comparing the 32-bit hash
with an integer threshold::

    key        = derive_key(seed, step, index, stream)      # host side, Python ints
    h(i)       = fmix32(fmix32(lo32(i) ^ k0) ^ ((hi32(i) + k1) mod 2^32))
    keep(i)    = h(i) < threshold,   threshold = round((1 - p) * 2^32)
    g[i]      <- g[i] * (keep(i) ? scale : 0),   scale = 2**32 / threshold  (or 1)

``fmix32`` is MurmurHash3's 32-bit finalizer and the key derivation chains
SplitMix64. Because nothing is sequential, the same counters give the same
mask on any device, in any chunking, on any number of threads, and on every
rank of a distributed job; a shard of a parameter computes exactly its part of
the full mask from its element offset. The keep probability is exact to
``2**-32`` (the threshold's resolution), and the survivors' factor is the inverse
of the realised keep probability, so the masked gradient is exactly unbiased.

A note on strength: the xorshift that ends the inner ``fmix32`` and the one that
starts the outer one cancel (``x ^ x>>16`` is an involution), so the mixer is in
effect four multiply/xorshift rounds with the key XORed in between. That is
what the statistical tests (``tests/test_statistics.py``, ``tests/test_kernels.py``:
kept fraction, neighbour and long-lag correlation, chi-square on blocks, bit
balance, independence across steps, tensors and seeds) check, and it passes
them at 6 sigma; it is not a cryptographic generator. The fused kernel uses the
cancellation to skip four operations.

This module holds the definitions (counters, keys, thresholds, the survivors'
factor and :func:`keep_mask` in eager torch on int64 tensors). The kernels that
apply masks to gradients live in :mod:`dropgrad.kernels`; every one of them
agrees with :func:`keep_mask` bit for bit.
"""

from __future__ import annotations

import numbers

import torch

__all__ = [
    "MASK_RESOLUTION_BITS",
    "TWO32",
    "check_seed",
    "draw_seed",
    "derive_key",
    "step_prefix",
    "key_from_prefix",
    "keep_threshold",
    "survivor_scale",
    "keep_mask",
    "hash32",
    "fmix32",
    "uniform_from_key",
    "MASKS_STREAM",
    "FULL_UPDATE_STREAM",
    "clock_tensor",
    "int64_bits",
]

MASK_RESOLUTION_BITS = 32
#: ``2**32``: the threshold that keeps every element (thresholds live in ``[0, TWO32]``)
TWO32 = 1 << MASK_RESOLUTION_BITS
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_TWO32 = TWO32

#: stream id of gradient masks (the closure evaluation number is added to it)
MASKS_STREAM = 0
#: stream id of the full-update-drop coin, far from any closure evaluation number
FULL_UPDATE_STREAM = 0x5EED_F00D


def _splitmix64(x: int) -> int:
    """SplitMix64's output function applied to ``x + golden ratio`` (64-bit)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def derive_key(seed: int, step: int, index: int, stream: int = MASKS_STREAM) -> tuple[int, int]:
    """Two 32-bit keys for one tensor's mask at one step.

    Args:
        seed: the run's seed (any int; taken modulo 2**64).
        step: the optimizer step count (0 for the first step).
        index: the tensor's index (a parameter's position in the optimizer).
        stream: separates independent uses of the same counters
            (mask draws of successive closure evaluations, the full-update coin).

    Returns:
        ``(k0, k1)``, each in ``[0, 2**32)``.
    """
    return key_from_prefix(step_prefix(seed, step), index, stream)


def step_prefix(seed: int, step: int) -> int:
    """The part of :func:`derive_key` shared by every tensor of one step (compute it once per step)."""
    return _splitmix64(_splitmix64(seed & _M64) ^ (step & _M64))


def clock_tensor(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A *clock*: ``[seed, step]`` as an int64 tensor on ``device`` (the unsigned 64-bit values' bit patterns).

    The mask kernels accept it in place of ``step_prefix(seed, step)``
    (:func:`dropgrad.functional.apply_masks_`): they derive the prefix where the
    tensor lives, so a step can advance on the device (``clock[1:].add_(1)``)
    without the host, as a captured CUDA graph's replays need.
    """
    return torch.tensor([int64_bits(seed), int64_bits(step)], dtype=torch.int64, device=device)


def int64_bits(v: int) -> int:
    """The signed 64-bit integer with the bit pattern of ``v mod 2**64`` (how int64 tensors and kernel arguments hold it)."""
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def key_from_prefix(prefix: int, index: int, stream: int = MASKS_STREAM) -> tuple[int, int]:
    """``derive_key(seed, step, index, stream)`` given ``prefix = step_prefix(seed, step)``."""
    z = _splitmix64(prefix ^ (index & _M64))
    z = _splitmix64(z ^ (stream & _M64))
    return z & _M32, z >> 32


def check_seed(seed: object, name: str = "seed") -> int:
    """Validate a mask seed (any integer, numpy integers included; not a bool) and return it as an int.

    Raises:
        TypeError: ``seed`` is not an integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {seed!r} of type {type(seed).__name__}")
    return int(seed)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed in ``[0, 2**62)`` drawn from ``generator`` (default: torch's global generator)."""
    return int(torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64).item())


def keep_threshold(drop_rate: float) -> int:
    """Integer threshold in ``[0, 2**32]``: an element is kept when its hash is below it.

    The keep probability is exactly ``threshold / 2**32``.
    """
    return int(round((1.0 - float(drop_rate)) * _TWO32))


def survivor_scale(threshold: int, rescale: bool = True) -> float:
    """The survivors' factor for a keep threshold: the inverse of the realised keep probability.

    ``2**32 / threshold`` (``1/(1-p)`` up to the threshold's rounding), so that
    ``E[g * keep * scale] = g`` exactly for every threshold; 0.0 when nothing is
    kept (no division by zero); 1.0 without rescaling.
    """
    if not rescale:
        return 1.0
    if threshold <= 0:
        return 0.0
    return _TWO32 / threshold


def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finalizer on a Python int (the scalar twin of the tensor form)."""
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def hash32(key: tuple[int, int], i: int) -> int:
    """The 32-bit hash of element ``i`` under ``key`` (scalar reference, for tests and coins)."""
    k0, k1 = key
    h = fmix32((i & _M32) ^ k0)
    return fmix32(h ^ (((i >> 32) + k1) & _M32))


def uniform_from_key(key: tuple[int, int]) -> float:
    """A number in ``[0, 1)`` with 32-bit resolution, for host-side coins (full update drop)."""
    return hash32(key, 0) / _TWO32


def _fmix32_tensor(h: torch.Tensor) -> torch.Tensor:
    # int64 holds the 32-bit values; a product may wrap past 2**63, but its low
    # 32 bits (all we keep) are those of the unsigned product.
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def hash_tensor(numel: int, key: tuple[int, int], offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Hashes of elements ``offset .. offset + numel - 1`` as an int64 tensor of 32-bit values."""
    k0, k1 = key
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    h = _fmix32_tensor((idx & _M32) ^ k0)
    return _fmix32_tensor(h ^ (((idx >> 32) + k1) & _M32))


def keep_mask(
    numel: int,
    key: tuple[int, int],
    threshold: int,
    offset: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean keep-mask of ``numel`` elements starting at element ``offset`` (reference)."""
    if threshold >= _TWO32:
        return torch.ones(numel, dtype=torch.bool, device=device)
    if threshold <= 0:
        return torch.zeros(numel, dtype=torch.bool, device=device)
    return hash_tensor(numel, key, offset, device) < threshold
