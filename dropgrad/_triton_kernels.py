"""Fused mask kernel for CUDA tensors, in Triton: the reference kernel's bits in one launch.

:func:`triton_drop_grad_` has the signature of
:func:`dropgrad.functional._single_tensor_drop_grad_` and the same output bit
for bit (tested on the GPU against the reference running on the same GPU and
against the CPU kernels). It is the GPU member of the kernel family whose CPU
member is ``_csrc/masks.c``: the same hash (with the same cancellation of the
two middle xorshifts), the same threshold compare, the factor formed in the
dtype torch computes in and the result rounded by the hardware conversion that
torch's own CUDA ``mul_`` uses.

* **One launch per dtype per step.** A small int64 table (per tensor: address,
  size, key, threshold, scale bits, element offset) goes to the device in one
  copy; program ``(c, j)`` of a 2-D grid masks chunk ``c`` (``_CHUNK``
  elements) of tensor ``j`` and exits at once past the tensor's end, so 161
  tensors cost one launch, not 161, and the host does no per-chunk work.
* **Needs only Triton**, which ships with torch's CUDA wheels on Linux; nothing
  is built by ``pip install``. Triton compiles the kernel at its first call for
  each dtype (about a second, cached on disk by Triton afterwards). Without
  Triton, CUDA tensors take the reference kernel, with identical results.
* ``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors through Triton's
  interpreter; the test suite uses that, where Triton is installed, to check the
  kernel's arithmetic against the reference without a GPU.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from collections.abc import Sequence

import torch

__all__ = ["available", "unavailable_reason", "supported", "triton_drop_grad_", "cuda_drop_grad_", "mask_planned_"]

_TWO32 = 1 << 32
_M64 = (1 << 64) - 1
_MAX_OFFSET = (1 << 63) - 1
_COLS = 8  # int64 words per tensor in the table (as _triton_masks._COLS)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_kernel = None
_reason: str | None = None
_INTERPRET = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _load():
    """Import Triton and define the kernel once; None (with a reason) when impossible."""
    global _kernel, _reason
    if _kernel is not None or _reason is not None:
        return _kernel
    if os.environ.get("DROPGRAD_DISABLE_TRITON", "") not in ("", "0"):
        _reason = "disabled by DROPGRAD_DISABLE_TRITON"
        return None
    try:
        from ._triton_masks import launch  # noqa: PLC0415 - imports triton
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        _reason = f"triton is not importable ({type(exc).__name__}: {exc})"
        return None
    _kernel = launch
    return _kernel


def available() -> bool:
    """Whether CUDA tensors can take the Triton kernel here (imports Triton on first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, or None."""
    _load()
    return _reason


def _device_ok(g: torch.Tensor) -> bool:
    return g.is_cuda or (_INTERPRET and g.is_cpu)


def supported(g: torch.Tensor, offset: int = 0) -> str | None:
    """None if the kernel can mask ``g`` at element ``offset``, else the reason it cannot."""
    if type(g) is not torch.Tensor:
        return f"a {type(g).__name__} subclass"
    if not _device_ok(g):
        return f"on device {g.device}"
    if g.layout != torch.strided:
        return f"of layout {g.layout}"
    if g.dtype not in _DTYPES:
        return f"of dtype {g.dtype}"
    if g.requires_grad:
        return "requiring grad (the reference records the multiply for autograd)"
    if not g.is_contiguous():
        return "not contiguous"
    if g.is_neg() or g.is_conj():
        return "a lazy negative or conjugate view"
    if not 0 <= offset <= _MAX_OFFSET - g.numel():
        return f"with element offset {offset} outside [0, 2**63 - numel]"
    return None


def _scale_bits(scale: float, wide: bool) -> int:
    if wide:
        return struct.unpack("<q", struct.pack("<d", scale))[0]
    return struct.unpack("<i", struct.pack("<f", scale))[0]  # rounds to float32 as C's (float) does


def cuda_drop_grad_(grads, keys, thresholds, scales, offsets, strict: bool):
    """Mask the CUDA tensors this kernel serves; return the lists of the others.

    Without Triton (or for a tensor it cannot serve) CUDA tensors stay in the
    returned lists, for the reference kernel, which runs on the device with the
    same bits; ``strict`` makes that an error naming the tensor and the reason.
    """
    n = len(grads)
    if not (len(keys) == len(thresholds) == len(scales) == len(offsets) == n):
        raise ValueError(
            f"grads, keys, thresholds, scales and offsets must have equal lengths, got "
            f"{n}, {len(keys)}, {len(thresholds)}, {len(scales)}, {len(offsets)}"
        )
    ok = available()
    served, rest = [], []
    dtypes = _DTYPES
    for j, g in enumerate(grads):
        if not g.is_cuda:
            rest.append(j)
        elif (
            ok and type(g) is torch.Tensor and g.dtype in dtypes and not g.requires_grad
            and g.is_contiguous() and not g.is_neg() and 0 <= offsets[j] <= _MAX_OFFSET - g.numel()
            and g.layout is torch.strided
        ):
            served.append(j)
        elif strict:
            why = supported(g, offsets[j]) if ok else f"on device {g.device} and {_reason}"
            raise RuntimeError(f"impl='fused' cannot mask grads[{j}]: it is {why}")
        else:
            rest.append(j)
    if served:
        triton_drop_grad_(
            [grads[j] for j in served], [keys[j] for j in served], [thresholds[j] for j in served],
            [scales[j] for j in served], [offsets[j] for j in served],
        )
    if not served:
        return grads, keys, thresholds, scales, offsets
    return ([grads[j] for j in rest], [keys[j] for j in rest], [thresholds[j] for j in rest],
            [scales[j] for j in rest], [offsets[j] for j in rest])


def triton_drop_grad_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[tuple[int, int]],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
) -> None:
    """Mask tensors in place with the Triton kernel; same contract and output as the reference.

    Every tensor must pass :func:`supported` (the caller routes the others to the
    reference kernel) and tensors must not share memory with each other.
    """
    _eager(_mask_rows)(grads, keys, thresholds, scales, offsets, None, 0)


_disabled: dict = {}


def _eager(fn):
    """``fn``, or under a loaded torch._dynamo ``fn`` excluded from tracing (a graph break, run eagerly).

    torch._dynamo is not imported for this unless it is already loaded (the import costs seconds).
    """
    if "torch._dynamo" not in sys.modules:
        return fn
    wrapped = _disabled.get(fn)
    if wrapped is None:
        wrapped = _disabled[fn] = torch.compiler.disable(fn)
    return wrapped


def _signed64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def _mask_rows(grads, keys, thresholds, scales, offsets, prefix: int | None, stream: int) -> None:
    """Build the table (keys, or with ``prefix`` tensor indices whose keys the kernel derives) and launch."""
    launch = _load()
    if launch is None:
        raise RuntimeError(f"the Triton mask kernel is unavailable: {_reason}")
    derive = prefix is not None
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for j, (g, thr, scale) in enumerate(zip(grads, thresholds, scales)):
        if thr >= _TWO32 and scale == 1.0:
            continue  # the reference leaves these untouched too
        groups.setdefault((g.device, g.dtype), []).append(j)
    bits_cache: dict[tuple[float, bool], int] = {}
    header = (_signed64(prefix), _signed64(stream)) if derive else (0, 0)
    for (device, dtype), members in groups.items():
        wide = dtype == torch.float64
        table = array("q", header + (0,) * (_COLS - 2))
        max_numel = 0
        for j in members:
            g, key, scale = grads[j], keys[j], float(scales[j])
            numel = g.numel()
            max_numel = max(max_numel, numel)
            bits = bits_cache.get((scale, wide))
            if bits is None:
                bits = bits_cache[(scale, wide)] = _scale_bits(scale, wide)
            thr = min(max(int(thresholds[j]), 0), _TWO32)
            if derive:  # key: the tensor's index
                table.extend((g.data_ptr(), numel, _signed64(key), 0, thr, bits, offsets[j], 0))
            else:
                table.extend((g.data_ptr(), numel, key[0], key[1], thr, bits, offsets[j], 0))
        if max_numel == 0:
            continue
        host = torch.frombuffer(table, dtype=torch.int64)
        meta = host.to(device) if device.type != "cpu" else host
        with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
            launch(dtype, meta, 0, len(members), max_numel, derive)
    _bump_versions([grads[j] for members in groups.values() for j in members])


def mask_planned_(plan, prefix: int, stream: int, rescale: bool, strict: bool = False) -> list | None:
    """The CUDA twin of :func:`dropgrad._kernels.mask_planned_`: mask a DropGrad step plan, keys derived on the GPU.

    ``plan`` holds ``(index, parameter, rate)``; the key of an entry is
    ``masks.key_from_prefix(prefix, index, stream)``, computed by the kernel, so
    the host does no per-tensor hashing. Entries whose gradient this kernel
    cannot serve (None, rate 0 and zero-size gradients aside, which need
    nothing) come back for the general path; with ``strict`` and any such entry
    nothing is masked and the whole plan comes back. Returns None when Triton
    is unavailable.
    """
    if _load() is None:
        return None
    from .functional import _scale_for  # noqa: PLC0415 - functional imports this module lazily
    from .masks import keep_threshold  # noqa: PLC0415

    grads, indices, thrs, scs, offs, left = [], [], [], [], [], []
    per_rate: dict[float, tuple[int, float]] = {}
    dtypes = _DTYPES
    for entry in plan:
        index, p, rate = entry
        g = p.grad
        if g is None or rate == 0.0:
            continue
        if not (
            type(g) is torch.Tensor and g.is_cuda and g.dtype in dtypes and not g.requires_grad
            and g.layout is torch.strided and g.is_contiguous() and not g.is_neg()
        ):
            left.append(entry)
            continue
        if g.numel() == 0:
            continue
        hit = per_rate.get(rate)
        if hit is None:
            hit = per_rate[rate] = (keep_threshold(rate), _scale_for(rate, rescale))
        grads.append(g)
        indices.append(index)
        thrs.append(hit[0])
        scs.append(hit[1])
        offs.append(0)
    if strict and left:
        return list(plan)
    if grads:
        _eager(_mask_rows)(grads, indices, thrs, scs, offs, prefix, stream)
    return left


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    # as g.mul_ would: autograd then sees the in-place change
    if not tensors:
        return
    try:
        torch.autograd.graph.increment_version(tensors)
    except (TypeError, RuntimeError):
        for t in tensors:
            torch.autograd.graph.increment_version(t)
