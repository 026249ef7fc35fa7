"""The Triton mask kernel for CUDA gradients: the reference kernel's bits in one launch per dtype.

:func:`mask_` implements the contract of :mod:`dropgrad.kernels.common` for
servable CUDA tensors. It is the GPU member of the kernel family whose CPU
member is ``masks.c``: the same hash (with the same cancellation of the two
middle xorshifts), the same threshold compare, the factor formed in the dtype
torch computes in, and the result rounded by the hardware conversion that
torch's own CUDA ``mul_`` uses (tested on an H200 against the reference on the
same GPU and against the CPU kernels).

* **One launch per dtype per call.** An int64 table (per tensor: address,
  size, index, -, threshold, factor bits, element offset, first chunk) and a
  chunk map (program -> row) go to the device in one pinned, non-blocking copy;
  each program masks one ``CHUNK``-element chunk of one tensor and derives its
  key on the GPU from the step prefix, the row's index and the stream.
* **Cached tables.** A table depends only on the gradients' addresses, sizes,
  dtypes, indices, offsets and rates; the prefix and stream (and the rate,
  when every entry shares one) are kernel arguments. In the steady state the
  gradients come back at the same addresses, so a step neither uploads nor
  synchronizes.
* **Needs only Triton**, which ships with torch's CUDA wheels on Linux; Triton
  compiles the kernel at its first call per dtype (about a second, cached on
  disk afterwards). Without Triton, CUDA tensors take the reference kernel.
* ``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors through Triton's
  interpreter; the test suite uses that to check the arithmetic without a GPU.
"""

from __future__ import annotations

import operator
import os
import struct
from array import array
from collections.abc import Sequence

import torch

from ..masks import int64_bits
from .common import M64, bump_versions

__all__ = ["mask_", "mask_clocked_", "available", "unavailable_reason", "device_type", "capturing",
           "refuse_graph_capture"]

_launch = None
_reason: str | None = None
_INTERPRET = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def device_type() -> str:
    """The device type this kernel serves: ``"cuda"`` (``"cpu"`` under Triton's interpreter, for tests)."""
    return "cpu" if _INTERPRET else "cuda"


def _load():
    """Import Triton and the kernel once; None (with a reason) when impossible."""
    global _launch, _reason
    if _launch is not None or _reason is not None:
        return _launch
    if os.environ.get("DROPGRAD_DISABLE_TRITON", "") not in ("", "0"):
        _reason = "disabled by DROPGRAD_DISABLE_TRITON"
        return None
    try:
        from .triton_source import launch  # noqa: PLC0415 - imports triton
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        _reason = f"triton is not importable ({type(exc).__name__}: {exc})"
        return None
    _launch = launch
    return _launch


def available() -> bool:
    """Whether CUDA tensors can take the Triton kernel here (imports Triton on first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, or None."""
    _load()
    return _reason


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def refuse_graph_capture() -> None:
    """Raise inside a CUDA graph capture: a captured step would replay the same keys, the same mask, forever."""
    if capturing():
        raise RuntimeError(
            "DropGrad masks CUDA gradients with keys that change every step; a CUDA graph capture of this call "
            "would freeze them (the same mask at every replay). Build the optimizer with "
            "DropGrad(..., capturable=True) (its step count lives on the GPU, so every replay draws fresh "
            "masks), or keep optimizer.step() outside the captured region."
        )


def _scale_bits(scale: float, wide: bool) -> int:
    """The factor's bit pattern (unsigned): float64 for float64 tensors, else float32 as C's (float) rounds."""
    if wide:
        return struct.unpack("<Q", struct.pack("<d", scale))[0]
    return struct.unpack("<I", struct.pack("<f", scale))[0]


class _Launch:
    """A table and chunk map on the device for one (device, dtype) group, ready to launch."""

    __slots__ = ("dtype", "device", "table", "chunks", "nprograms")

    def __init__(self, dtype, device, rows: array, numels: list[int]):
        from .triton_source import CHUNK, COLS  # noqa: PLC0415

        counts = [-(-m // CHUNK) for m in numels]
        first = 0
        for r, c in enumerate(counts):  # column 7: the program id of the row's first chunk
            rows[r * COLS + 7] = first
            first += c
        chunk_map = array("q")
        for r, c in enumerate(counts):  # program -> row
            chunk_map.extend(array("q", [r]) * c)
        host = torch.frombuffer(rows + chunk_map, dtype=torch.int64)
        if device.type == "cuda":  # noqa: SIM108 - each branch explained below
            # pinned and non-blocking: no host-device synchronization; torch's caching host
            # allocator keeps the pinned block until the copy is done
            buf = host.pin_memory().to(device, non_blocking=True)
        else:  # Triton's interpreter (tests)
            buf = host.clone()
        self.dtype, self.device = dtype, device
        self.table, self.chunks, self.nprograms = buf[: len(rows)], buf[len(rows) :], first

    def __call__(self, prefix: int, stream: int, uniform) -> None:
        launch = _load()
        if self.device.type == "cuda" and self.device.index != torch.cuda.current_device():
            with torch.cuda.device(self.device):
                launch(self.dtype, self.table, self.chunks, self.nprograms, prefix, stream, uniform)
        else:
            launch(self.dtype, self.table, self.chunks, self.nprograms, prefix, stream, uniform)


def _build(grads, indices, thresholds, scales, offsets, uniform: bool) -> list[_Launch]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for j, g in enumerate(grads):
        groups.setdefault((g.device, g.dtype), []).append(j)
    launches = []
    for (device, dtype), members in groups.items():
        wide = dtype == torch.float64
        rows, sizes = array("q"), []
        for j in members:
            numel = grads[j].numel()
            if uniform:
                thr, bits = 0, 0  # from the kernel's arguments
            else:
                thr, bits = int(thresholds[j]), int64_bits(_scale_bits(float(scales[j]), wide))
            rows.extend((grads[j].data_ptr(), numel, int64_bits(indices[j]), 0, thr, bits, offsets[j], 0))
            sizes.append(numel)
        launches.append(_Launch(dtype, device, rows, sizes))
    return launches


# device tables of recent calls, keyed by everything they were built from
_tables: dict = {}
_TABLES_KEPT = 4
_get_dtype = operator.attrgetter("dtype")


def mask_(
    grads: Sequence[torch.Tensor],
    indices: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
    prefix: int,
    stream: int,
) -> None:
    """Mask servable CUDA tensors in place, one launch per (device, dtype) (the contract of :mod:`~dropgrad.kernels.common`).

    The caller checks servability; idle entries must not be passed (the
    dispatcher drops them).
    """
    if _load() is None:
        raise RuntimeError(f"the Triton mask kernel is unavailable: {_reason}")
    if not grads:
        return
    refuse_graph_capture()
    grads = list(grads)
    uniform = len(set(thresholds)) == 1 and len(set(scales)) == 1
    key = (
        tuple(map(torch.Tensor.data_ptr, grads)), tuple(map(torch.Tensor.numel, grads)),
        tuple(map(torch.Tensor.get_device, grads)), tuple(map(_get_dtype, grads)), tuple(indices), tuple(offsets),
        None if uniform else (tuple(thresholds), tuple(scales)),
    )
    launches = _tables.get(key)
    if launches is None:
        launches = _build(grads, indices, thresholds, scales, offsets, uniform)
        if len(_tables) >= _TABLES_KEPT:
            _tables.clear()
        _tables[key] = launches
    per_kind = None
    if uniform:
        thr, scale = int(thresholds[0]), float(scales[0])
        per_kind = {False: (thr, _scale_bits(scale, False)), True: (thr, _scale_bits(scale, True))}
    for launch in launches:
        launch(prefix & M64, stream & M64, None if per_kind is None else per_kind[launch.dtype == torch.float64])
    bump_versions(grads)


def mask_clocked_(
    grads: Sequence[torch.Tensor],
    indices: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
    clock: torch.Tensor,
    stream: int,
) -> None:
    """:func:`mask_` with the step's keys read from ``clock`` on the device: capturable in a CUDA graph.

    ``clock`` is an int64 tensor ``[seed, step]`` (bit patterns of the
    unsigned values) on the tensors' device; each tensor's keys are
    ``key_from_prefix(step_prefix(seed, step), indices[j], stream)``, as
    :func:`mask_` gets them from ``prefix``. One launch per tensor, every value
    a kernel argument: nothing is uploaded and nothing synchronizes, so a graph
    that captured these launches replays them with whatever step the clock then
    holds. The caller advances the clock (``clock[1:].add_(1)``).
    """
    if _load() is None:
        raise RuntimeError(f"the Triton mask kernel is unavailable: {_reason}")
    from .triton_source import launch_clocked  # noqa: PLC0415

    grads = list(grads)
    for g, index, thr, scale, off in zip(grads, indices, thresholds, scales, offsets):
        bits = _scale_bits(float(scale), g.dtype == torch.float64)
        if g.device.type == "cuda" and g.device.index != torch.cuda.current_device():
            with torch.cuda.device(g.device):
                launch_clocked(g, clock, index & M64, stream & M64, off, int(thr), bits)
        else:
            launch_clocked(g, clock, index & M64, stream & M64, off, int(thr), bits)
    bump_versions(grads)


