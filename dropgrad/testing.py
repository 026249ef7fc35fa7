"""Helpers for testing dropgrad's kernels: the C kernel's keep bits, key derivation and exact counts.

Not part of the training path: these call entry points of a separate build of
the C kernel (compiled with ``-DDROPGRAD_TESTING``), so the library that masks
gradients does not ship them. They raise ``RuntimeError`` where no C compiler
works.
"""

from __future__ import annotations

import ctypes
from array import array
from collections.abc import Sequence

import torch

from .kernels import cpu
from .kernels.common import M64, TWO32

__all__ = ["keep_bits", "count_kept", "derive_key_words"]


_declared: set[ctypes.CDLL] = set()


def _lib() -> ctypes.CDLL:
    lib = cpu.load_library(testing=True)
    if lib not in _declared:
        p, u64 = ctypes.c_void_p, ctypes.c_uint64
        lib.dropgrad_derive_keys.argtypes = [ctypes.c_int64, u64, u64, p, p]
        lib.dropgrad_derive_keys.restype = None
        lib.dropgrad_keep_bits.argtypes = [p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32, u64, u64]
        lib.dropgrad_keep_bits.restype = None
        lib.dropgrad_count_below4.argtypes = [ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32, u64, p, p, ctypes.c_int]
        lib.dropgrad_count_below4.restype = None
        _declared.add(lib)
    return lib


def derive_key_words(prefix: int, indices: Sequence[int], stream: int) -> list[int]:
    """``k0 | k1 << 32`` of ``masks.key_from_prefix(prefix, index, stream)`` for each index, computed in C."""
    lib = _lib()
    idx = array("Q", [i & M64 for i in indices])
    out = array("Q", [0] * len(idx))
    if idx:
        lib.dropgrad_derive_keys(len(idx), prefix & M64, stream & M64, idx.buffer_info()[0], out.buffer_info()[0])
    return list(out)


def keep_bits(numel: int, key: tuple[int, int], threshold: int, offset: int = 0) -> torch.Tensor:
    """The C kernel's keep mask as a bool tensor (mirrors :func:`dropgrad.masks.keep_mask`)."""
    lib = _lib()
    out = torch.empty(numel, dtype=torch.uint8)
    lib.dropgrad_keep_bits(out.data_ptr(), numel, key[0], key[1], min(max(int(threshold), 0), TWO32), offset)
    return out.bool()


def count_kept(numel: int, key: tuple[int, int], thresholds: Sequence[int], offset: int = 0) -> list[int]:
    """How many of elements ``offset .. offset + numel - 1`` each threshold keeps (no memory used).

    Over an aligned block of ``2**32`` elements the count equals the threshold
    exactly (for a fixed high word the hash is a bijection of the low word).
    """
    lib = _lib()
    counts = []
    for i in range(0, len(thresholds), 4):
        part = [min(max(int(t), 0), TWO32) for t in thresholds[i : i + 4]]
        thr = array("I", [min(t, TWO32 - 1) for t in part] + [0] * (4 - len(part)))
        out = array("Q", [0] * 4)
        lib.dropgrad_count_below4(
            numel, key[0], key[1], offset, thr.buffer_info()[0], out.buffer_info()[0], torch.get_num_threads()
        )
        counts += [numel if t >= TWO32 else c for t, c in zip(part, out)]
    return counts
