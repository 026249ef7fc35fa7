"""The Triton source of the CUDA mask kernel (imported only when Triton is importable).

Kept apart from :mod:`dropgrad._triton_kernels` because ``@triton.jit``
functions must live at module level (the JIT resolves the helpers a kernel
calls through the module's globals). See that module for the contract.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024  # elements per vector step of a program
_CHUNK = 4 * _BLOCK  # elements per program (the steps unrolled, so their loads overlap)
_COLS = 8  # int64 words per tensor in the table
_MAX_GRID_Y = 65535  # CUDA's cap on the second grid dimension


@triton.jit
def _splitmix64(x):
    # dropgrad.masks._splitmix64 on uint64 (the constants are uint64 literals)
    z = x + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _masks_kernel(table_ptr, first_row, OUT_DTYPE: tl.constexpr, WIDE: tl.constexpr, DERIVE: tl.constexpr,
                  COLS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # row 0 of the table is a header (prefix, stream); program (c, j) masks chunk c of the
    # tensor of row 1 + first_row + j, and exits at once past the tensor's end
    c = tl.program_id(0)
    row = table_ptr + (1 + first_row + tl.program_id(1)) * COLS
    numel = tl.load(row + 1)
    start = c.to(tl.int64) * CHUNK
    if start >= numel:
        return
    ptr = tl.load(row).to(tl.pointer_type(OUT_DTYPE))
    if DERIVE:  # masks.key_from_prefix(prefix, index, stream) with index in column 2
        prefix = tl.load(table_ptr).to(tl.uint64, bitcast=True)
        stream = tl.load(table_ptr + 1).to(tl.uint64, bitcast=True)
        z = _splitmix64(prefix ^ tl.load(row + 2).to(tl.uint64, bitcast=True))
        z = _splitmix64(z ^ stream)
        k0 = z.to(tl.uint32)
        k1 = (z >> 32).to(tl.uint32)
    else:
        k0 = tl.load(row + 2).to(tl.uint32)
        k1 = tl.load(row + 3).to(tl.uint32)
    thr = tl.load(row + 4)  # int64 in [0, 2**32]: 2**32 keeps every element
    bits = tl.load(row + 5)
    off = tl.load(row + 6)
    if WIDE:  # float64: the factor is the double itself
        fk = bits.to(tl.float64, bitcast=True)
    else:  # float32/float16/bfloat16: torch multiplies in float32
        fk = bits.to(tl.int32).to(tl.float32, bitcast=True)
    f0 = fk * 0.0
    for t in tl.static_range(0, CHUNK, BLOCK):
        i = start + t + tl.arange(0, BLOCK)
        inside = i < numel
        idx = off + i
        # hash32: fmix32(fmix32(lo ^ k0) ^ (hi + k1)), the two middle xorshifts
        # cancelled as in _csrc/masks.c (c1 ^ c1 >> 16 is xored in instead of c1)
        h = idx.to(tl.uint32) ^ k0
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        c1 = (idx >> 32).to(tl.uint32) + k1
        h ^= c1 ^ (c1 >> 16)
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        h ^= h >> 16
        keep = h.to(tl.int64) < thr
        x = tl.load(ptr + i, mask=inside)
        if WIDE:
            y = x * tl.where(keep, fk, f0)
        elif OUT_DTYPE == tl.bfloat16:
            # widen and round to nearest even on the bits, as the hardware does (Triton's
            # CPU interpreter truncates and mishandles subnormals); NaN: the hardware's own
            x32 = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
            y32 = x32 * tl.where(keep, fk, f0)
            w = y32.to(tl.uint32, bitcast=True)
            r = ((w + 0x7FFF + ((w >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            y = tl.where(y32 != y32, y32.to(tl.bfloat16), r)
        else:
            y = (x.to(tl.float32) * tl.where(keep, fk, f0)).to(OUT_DTYPE)
        tl.store(ptr + i, y, mask=inside)


_TYPES = {
    torch.float32: tl.float32, torch.float64: tl.float64,
    torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
}


def launch(dtype: torch.dtype, table: torch.Tensor, first_row: int, rows: int, max_numel: int,
           derive: bool) -> None:
    """Mask the tensors of rows ``1 + first_row ..`` of ``table`` (a device int64 tensor, row 0 the header)."""
    for r in range(0, rows, _MAX_GRID_Y):  # CUDA caps the second grid dimension
        _masks_kernel[(-(-max_numel // _CHUNK), min(rows - r, _MAX_GRID_Y))](
            table, first_row + r, OUT_DTYPE=_TYPES[dtype], WIDE=dtype == torch.float64, DERIVE=derive,
            COLS=_COLS, CHUNK=_CHUNK, BLOCK=_BLOCK,
        )
