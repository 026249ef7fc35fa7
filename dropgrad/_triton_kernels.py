"""Fused mask kernel for CUDA tensors, in Triton: the reference kernel's bits in one launch.

:func:`triton_drop_grad_` has the signature of
:func:`dropgrad.functional._single_tensor_drop_grad_` and the same output bit
for bit (tested on the GPU against the reference running on the same GPU and
against the CPU kernels). It is the GPU member of the kernel family whose CPU
member is ``_csrc/masks.c``: the same hash (with the same cancellation of the
two middle xorshifts), the same threshold compare, the factor formed in the
dtype torch computes in and the result rounded by the hardware conversion that
torch's own CUDA ``mul_`` uses.

* **One launch per dtype per step.** An int64 table (per tensor: address,
  size, key or index, threshold, factor bits, element offset, first chunk) and
  a chunk map (program -> tensor) go to the device in one pinned, non-blocking
  copy; each program masks one ``_CHUNK``-element chunk of one tensor, so 161
  tensors cost one launch, not 161. On DropGrad's path (:func:`mask_planned_`)
  the table is cached across steps and the keys are derived on the GPU.
* **Needs only Triton**, which ships with torch's CUDA wheels on Linux; nothing
  is built by ``pip install``. Triton compiles the kernel at its first call for
  each dtype (about a second, cached on disk by Triton afterwards). Without
  Triton, CUDA tensors take the reference kernel, with identical results.
* ``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors through Triton's
  interpreter; the test suite uses that, where Triton is installed, to check the
  kernel's arithmetic against the reference without a GPU.
"""

from __future__ import annotations

import operator
import os
import struct
from array import array
from collections.abc import Sequence

import torch

from ._kernels import _bump_versions, _get_dtype, _plain_dense
from .functional import _eager_only, _scale_for
from .masks import keep_threshold

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
    """The factor's bit pattern (unsigned): float64 for float64 tensors, else float32 as C's (float) rounds."""
    if wide:
        return struct.unpack("<Q", struct.pack("<d", scale))[0]
    return struct.unpack("<I", struct.pack("<f", scale))[0]


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
    for j, g in enumerate(grads):
        if not g.is_cuda:
            rest.append(j)
        elif ok and _all_servable([g]) and 0 <= offsets[j] <= _MAX_OFFSET - g.numel():
            served.append(j)
        elif strict:
            why = supported(g, offsets[j]) if ok else f"on device {g.device} and {_reason}"
            raise RuntimeError(f"impl='fused' cannot mask grads[{j}]: it is {why}")
        else:
            rest.append(j)
    if not served:
        return grads, keys, thresholds, scales, offsets
    triton_drop_grad_(
        [grads[j] for j in served], [keys[j] for j in served], [thresholds[j] for j in served],
        [scales[j] for j in served], [offsets[j] for j in served],
    )
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
    _eager_only(_mask_rows)(grads, keys, thresholds, scales, offsets)


def _refuse_graph_capture() -> None:
    # A captured launch would replay the same keys (host-side arguments) at every replay:
    # the same mask every step. Refuse rather than silently repeat masks.
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "DropGrad masks CUDA gradients with keys that change every step; a CUDA graph capture would "
            "freeze them (the same mask at every replay). Keep optimizer.step() outside the captured region."
        )


def _signed64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


class _Launch:
    """A table and chunk map on the device for one (device, dtype) group, ready to launch."""

    __slots__ = ("dtype", "device", "table", "chunks", "nprograms")

    def __init__(self, dtype, device, rows: array, numels: list[int]):
        from ._triton_masks import _CHUNK  # noqa: PLC0415

        counts = [-(-m // _CHUNK) for m in numels]
        first = 0
        for r, c in enumerate(counts):  # column 7: the program id of the row's first chunk
            rows[r * _COLS + 7] = first
            first += c
        chunk_map = array("q")
        for r, c in enumerate(counts):  # program -> row
            chunk_map.extend(array("q", [r]) * c)
        host = torch.frombuffer(rows + chunk_map, dtype=torch.int64)
        if device.type == "cuda":
            # pinned and non-blocking: no host-device synchronization; torch's caching host
            # allocator keeps the pinned block until the copy is done
            buf = host.pin_memory().to(device, non_blocking=True)
        else:  # Triton's interpreter (tests)
            buf = host.clone()
        self.dtype, self.device = dtype, device
        self.table, self.chunks, self.nprograms = buf[: len(rows)], buf[len(rows) :], first

    def __call__(self, prefix, stream, uniform) -> None:
        launch = _load()
        if self.device.type == "cuda" and self.device.index != torch.cuda.current_device():
            with torch.cuda.device(self.device):
                launch(self.dtype, self.table, self.chunks, self.nprograms, prefix, stream, uniform)
        else:
            launch(self.dtype, self.table, self.chunks, self.nprograms, prefix, stream, uniform)


def _groups(grads) -> dict:
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for j, g in enumerate(grads):
        out.setdefault((g.device, g.dtype), []).append(j)
    return out


def _mask_rows(grads, keys, thresholds, scales, offsets) -> None:
    """Mask ``grads`` (servable tensors) with explicit ``(k0, k1)`` keys: a table built and uploaded per call."""
    if _load() is None:
        raise RuntimeError(f"the Triton mask kernel is unavailable: {_reason}")
    bits_cache: dict[tuple[float, bool], int] = {}
    masked = []
    for (device, dtype), members in _groups(grads).items():
        wide = dtype == torch.float64
        rows, numels = array("q"), []
        for j in members:
            g, key, scale, thr = grads[j], keys[j], float(scales[j]), int(thresholds[j])
            if thr >= _TWO32 and scale == 1.0:
                continue  # the reference leaves these untouched too
            numel = g.numel()
            if numel == 0:
                continue
            bits = bits_cache.get((scale, wide))
            if bits is None:
                bits = bits_cache[(scale, wide)] = _scale_bits(scale, wide)
            rows.extend((g.data_ptr(), numel, key[0], key[1], min(max(thr, 0), _TWO32), _signed64(bits), offsets[j], 0))
            numels.append(numel)
            masked.append(g)
        if numels:
            _Launch(dtype, device, rows, numels)(None, 0, None)
    _bump_versions(masked)


# device tables of recent DropGrad plans, keyed by everything they were built from: in the
# steady state the gradients come back at the same addresses, and a step reuses its table
_plan_tables: dict = {}
_PLAN_TABLES_KEPT = 4


def mask_planned_(plan, prefix: int, stream: int, rescale: bool, strict: bool = False) -> list | None:
    """The CUDA twin of :func:`dropgrad._kernels.mask_planned_`: mask a DropGrad step plan, keys derived on the GPU.

    ``plan`` holds ``(index, parameter, rate)``; the key of an entry is
    ``masks.key_from_prefix(prefix, index, stream)``, computed by the kernel, so
    the host does no per-tensor hashing. The device table of a plan is cached
    (keyed by the gradients' addresses, sizes, dtypes, indices and rates) and
    the per-step values (prefix, stream, and the rate when all entries share
    one) are kernel arguments, so a steady-state step uploads nothing and never
    synchronizes with the device. Entries whose gradient this kernel cannot
    serve (None, rate-0 and zero-size gradients aside, which need nothing) come
    back for the general path; with ``strict`` and any such entry nothing is
    masked and the whole plan comes back. Returns None when Triton is unavailable.
    """
    if _load() is None:
        return None
    if not plan:
        return []
    _refuse_graph_capture()
    indices, params, rates = zip(*plan)
    grads = list(map(_get_grad, params))
    if 0.0 not in rates and _all_servable(grads):  # the common case, checked list-wide in C-level passes
        taken, left = plan, []
    else:
        taken, left = [], []
        for entry, g in zip(plan, grads):
            if g is None or entry[2] == 0.0:
                continue
            (taken if _all_servable([g]) else left).append(entry)
        if strict and left:
            return list(plan)
        if not taken:
            return left
        indices, params, rates = zip(*taken)
        grads = list(map(_get_grad, params))
    ptrs = tuple(map(torch.Tensor.data_ptr, grads))
    numels = tuple(map(torch.Tensor.numel, grads))
    kinds = (tuple(map(torch.Tensor.get_device, grads)), tuple(map(_get_dtype, grads)))
    rate_set = set(rates)
    uniform = len(rate_set) == 1
    key = (ptrs, numels, kinds, indices, rescale, None if uniform else rates)
    launches = _plan_tables.get(key)
    if launches is None:
        launches = _build_plan(grads, indices, rates, numels, rescale, uniform)
        if len(_plan_tables) >= _PLAN_TABLES_KEPT:
            _plan_tables.clear()
        _plan_tables[key] = launches
    per_dtype = None
    if uniform:
        rate = rates[0]
        thr, scale = keep_threshold(rate), _scale_for(rate, rescale)
        per_dtype = {False: (thr, _scale_bits(scale, False)), True: (thr, _scale_bits(scale, True))}
    _eager_only(_run_launches)(launches, prefix, stream, per_dtype)
    _bump_versions(grads)
    return left


_get_grad = operator.attrgetter("grad")
_get_is_cuda = operator.attrgetter("is_cuda")


def _all_servable(grads: list) -> bool:
    """Whether the kernel can mask every tensor of ``grads`` (Nones and subclasses fail), list-wide."""
    return _plain_dense(grads, None if _INTERPRET else _get_is_cuda) is not None


def _run_launches(launches, prefix, stream, per_dtype) -> None:
    for launch in launches:  # (rate-0 entries never reach a table)
        launch(prefix, stream, None if per_dtype is None else per_dtype[launch.dtype == torch.float64])


def _build_plan(grads, indices, rates, numels, rescale, uniform) -> list[_Launch]:
    launches = []
    for (device, dtype), members in _groups(grads).items():
        wide = dtype == torch.float64
        rows, sizes = array("q"), []
        for j in members:
            if numels[j] == 0:
                continue
            if uniform:
                thr, bits = 0, 0  # from the kernel's arguments
            else:
                rate = rates[j]
                thr, bits = keep_threshold(rate), _signed64(_scale_bits(_scale_for(rate, rescale), wide))
            rows.extend((grads[j].data_ptr(), numels[j], _signed64(indices[j]), 0, thr, bits, 0, 0))
            sizes.append(numels[j])
        if sizes:
            launches.append(_Launch(dtype, device, rows, sizes))
    return launches

