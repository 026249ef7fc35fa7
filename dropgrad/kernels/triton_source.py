"""The Triton source of the CUDA mask kernel (imported only when Triton is importable).

Kept apart from :mod:`dropgrad.kernels.cuda` because ``@triton.jit``
functions must live at module level (the JIT resolves the helpers a kernel
calls through the module's globals). See that module for the contract.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per vector step of a program
CHUNK = 4 * BLOCK  # elements per program (the steps unrolled, so their loads overlap)
COLS = 8  # int64 words per tensor in the table


@triton.jit
def _splitmix64(x):
    # dropgrad.masks._splitmix64 on uint64 (the constants are uint64 literals)
    z = x + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _arg32(x):
    # a per-call 32-bit value, passed as value + 2**40 so that Triton always types it int64
    # (no recompile when a value crosses 2**31) and, with do_not_specialize, never specializes on it
    return x.to(tl.uint32)


@triton.jit
def _mask_chunk(ptr, start, numel, off, k0, k1, thr, bits, OUT_DTYPE: tl.constexpr, WIDE: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # elements start .. start + CHUNK - 1 of the tensor at ptr (numel elements, its first at
    # element offset off of the full tensor) under key (k0, k1), threshold thr and factor bits
    if WIDE:  # noqa: SIM108 - float64: the factor is the double itself (constexpr branches, not a ternary)
        fk = bits.to(tl.float64, bitcast=True)
    else:  # float32/float16/bfloat16: torch multiplies in float32 (bits: the float32 pattern)
        fk = bits.to(tl.uint32).to(tl.float32, bitcast=True)
    f0 = fk * 0.0
    for t in tl.static_range(0, CHUNK, BLOCK):
        i = start + t + tl.arange(0, BLOCK)
        inside = i < numel
        idx = off + i
        # hash32: fmix32(fmix32(lo ^ k0) ^ (hi + k1)), the two middle xorshifts
        # cancelled as in kernels/masks.c (c1 ^ c1 >> 16 is xored in instead of c1)
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
        elif OUT_DTYPE == tl.bfloat16:  # noqa: SIM300 - a constexpr comparison Triton resolves at compile time
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


@triton.jit(do_not_specialize=["prefix_lo", "prefix_hi", "stream_lo", "stream_hi", "thr_arg", "bits_lo", "bits_hi"])
def _masks_kernel(table_ptr, chunks_ptr, prefix_lo, prefix_hi, stream_lo, stream_hi, thr_arg, bits_lo, bits_hi,
                  OUT_DTYPE: tl.constexpr, WIDE: tl.constexpr, UNIFORM: tl.constexpr,
                  COLS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # program pid masks one chunk of one tensor: chunks_ptr[pid] is the tensor's table row, and the
    # row's column 7 the program id of its first chunk. Per-step values come as arguments, so a
    # table cached on the device serves every step without a host-to-device copy.
    pid = tl.program_id(0)
    row = table_ptr + tl.load(chunks_ptr + pid).to(tl.int64) * COLS
    numel = tl.load(row + 1)
    start = (pid - tl.load(row + 7)) * CHUNK
    ptr = tl.load(row).to(tl.pointer_type(OUT_DTYPE))
    # the key: masks.key_from_prefix(prefix, index, stream), the index in column 2
    prefix = (_arg32(prefix_hi).to(tl.uint64) << 32) | _arg32(prefix_lo).to(tl.uint64)
    stream = (_arg32(stream_hi).to(tl.uint64) << 32) | _arg32(stream_lo).to(tl.uint64)
    z = _splitmix64(prefix ^ tl.load(row + 2).to(tl.uint64, bitcast=True))
    z = _splitmix64(z ^ stream)
    k0 = z.to(tl.uint32)
    k1 = (z >> 32).to(tl.uint32)
    if UNIFORM:  # one rate for every tensor: threshold and factor bits from the arguments
        thr = thr_arg - 1099511627776  # 2**40 bias; int64 in [0, 2**32]
        bits = ((_arg32(bits_hi).to(tl.uint64) << 32) | _arg32(bits_lo).to(tl.uint64)).to(tl.int64, bitcast=True)
    else:
        thr = tl.load(row + 4)  # int64 in [0, 2**32]: 2**32 keeps every element
        bits = tl.load(row + 5)
    off = tl.load(row + 6)
    _mask_chunk(ptr, start, numel, off, k0, k1, thr, bits, OUT_DTYPE, WIDE, CHUNK, BLOCK)


@triton.jit(do_not_specialize=["numel_arg", "index_lo", "index_hi", "stream_lo", "stream_hi", "off_lo", "off_hi",
                               "thr_arg", "bits_lo", "bits_hi"])
def _clocked_kernel(x_ptr, clock_ptr, numel_arg, index_lo, index_hi, stream_lo, stream_hi, off_lo, off_hi,
                    thr_arg, bits_lo, bits_hi, OUT_DTYPE: tl.constexpr, WIDE: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # one tensor, one program per chunk; the step's prefix is derived here from the device clock
    # (int64 [seed, step]), so a CUDA graph that captured this launch draws fresh masks at every
    # replay once the step word has been advanced (the clock is read, never written, here)
    pid = tl.program_id(0).to(tl.int64)
    numel = numel_arg - 1099511627776  # 2**40 bias, as _arg32's values
    seed = tl.load(clock_ptr).to(tl.uint64, bitcast=True)
    step = tl.load(clock_ptr + 1).to(tl.uint64, bitcast=True)
    prefix = _splitmix64(_splitmix64(seed) ^ step)  # masks.step_prefix(seed, step)
    index = (_arg32(index_hi).to(tl.uint64) << 32) | _arg32(index_lo).to(tl.uint64)
    stream = (_arg32(stream_hi).to(tl.uint64) << 32) | _arg32(stream_lo).to(tl.uint64)
    z = _splitmix64(prefix ^ index)
    z = _splitmix64(z ^ stream)
    k0 = z.to(tl.uint32)
    k1 = (z >> 32).to(tl.uint32)
    thr = thr_arg - 1099511627776
    bits = ((_arg32(bits_hi).to(tl.uint64) << 32) | _arg32(bits_lo).to(tl.uint64)).to(tl.int64, bitcast=True)
    off = ((_arg32(off_hi).to(tl.uint64) << 32) | _arg32(off_lo).to(tl.uint64)).to(tl.int64, bitcast=True)
    _mask_chunk(x_ptr, pid * CHUNK, numel, off, k0, k1, thr, bits, OUT_DTYPE, WIDE, CHUNK, BLOCK)


_TYPES = {
    torch.float32: tl.float32, torch.float64: tl.float64,
    torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
}


_BIAS = 1 << 40


def launch(dtype: torch.dtype, table: torch.Tensor, chunks: torch.Tensor, nprograms: int, prefix: int,
           stream: int, uniform: tuple[int, int] | None) -> None:
    """Mask the tensors of ``table`` (device int64, ``COLS`` words a row) with one program per chunk.

    ``chunks`` (device int64) maps each program to its row. The keys are derived
    from ``prefix``, the rows' indices and ``stream``; with ``uniform = (threshold,
    factor bits)`` every row uses those instead of its own columns 4-5.
    """
    p = prefix
    thr, bits = uniform if uniform is not None else (0, 0)
    m32 = 0xFFFFFFFF
    _masks_kernel[(nprograms,)](
        table, chunks,
        (p & m32) + _BIAS, (p >> 32 & m32) + _BIAS, (stream & m32) + _BIAS, (stream >> 32 & m32) + _BIAS,
        thr + _BIAS, (bits & m32) + _BIAS, (bits >> 32 & m32) + _BIAS,
        OUT_DTYPE=_TYPES[dtype], WIDE=dtype == torch.float64, UNIFORM=uniform is not None,
        COLS=COLS, CHUNK=CHUNK, BLOCK=BLOCK,
    )


def launch_clocked(grad: torch.Tensor, clock: torch.Tensor, index: int, stream: int, offset: int, threshold: int,
                   bits: int) -> None:
    """Mask one contiguous tensor under the keys of the device clock ``clock`` (int64 ``[seed, step]``).

    Every per-tensor value is a kernel argument and the step's is read from
    ``clock`` on the device: nothing is uploaded and nothing synchronizes, so the
    launch can be captured in a CUDA graph.
    """
    m32 = 0xFFFFFFFF
    numel = grad.numel()
    _clocked_kernel[(-(-numel // CHUNK),)](
        grad, clock, numel + _BIAS,
        (index & m32) + _BIAS, (index >> 32 & m32) + _BIAS, (stream & m32) + _BIAS, (stream >> 32 & m32) + _BIAS,
        (offset & m32) + _BIAS, (offset >> 32 & m32) + _BIAS, threshold + _BIAS, (bits & m32) + _BIAS,
        (bits >> 32 & m32) + _BIAS,
        OUT_DTYPE=_TYPES[grad.dtype], WIDE=grad.dtype == torch.float64, CHUNK=CHUNK, BLOCK=BLOCK,
    )
