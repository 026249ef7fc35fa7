"""Fused mask kernel: the reference kernel's result in one pass over memory.

:func:`fused_drop_grad_` has the signature of
:func:`dropgrad.functional._single_tensor_drop_grad_` and the same output bit
for bit. The work is done by a small C file (``_csrc/masks.c``, no torch
headers) that is compiled at first use with the system C compiler into a cache
directory and loaded through :mod:`ctypes`; ``pip install`` builds nothing.

* One call masks all tensors of a step: the C side splits the concatenation of
  all tensors into 64K-element chunks over ``torch.get_num_threads()`` OpenMP
  threads, so 161 small tensors cost one parallel region.
* The Python side per tensor is kept to whole-list passes (``map`` over the
  list for each check, array conversions), not a Python loop, when every
  tensor is servable: about 1 us a tensor. :func:`mask_planned_` (what
  :class:`~dropgrad.DropGrad` calls) also leaves the keys to C, which runs
  the SplitMix64 chain of :func:`dropgrad.masks.key_from_prefix` from the
  step's prefix, the tensor index and the stream.
* A tensor the kernel cannot serve (not a plain contiguous CPU tensor of
  float32/float64/float16/bfloat16, or one that requires grad) goes to the
  reference kernel; so does everything when no compiler works or
  ``DROPGRAD_DISABLE_FUSED=1``. With ``strict=True`` that is an error instead.
* The build (about 1 s with gcc, once per machine and source version) is
  keyed by a hash of the source, compiler and flags, written to a temporary
  file and renamed into place, so concurrent processes never load a half
  written library. ``DROPGRAD_CACHE_DIR`` overrides the cache location
  (default ``$XDG_CACHE_HOME/dropgrad`` or ``~/.cache/dropgrad``), ``CC`` the
  compiler.
* Under ``torch.compile`` the call is excluded from tracing (a graph break);
  torch._dynamo is not imported for that unless it is already loaded.
* CUDA tensors use the reference kernel, which runs on the device.
"""

from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Sequence
from pathlib import Path

import torch

from . import masks as _masks
from .functional import _eager_only, _scale_for, _single_tensor_drop_grad_

__all__ = ["fused_drop_grad_", "mask_planned_", "available", "unavailable_reason", "keep_bits", "count_kept", "build_info"]

_SOURCE = Path(__file__).with_name("_csrc") / "masks.c"
_TWO32 = 1 << 32
_MAX_OFFSET = (1 << 63) - 1
_ABI_VERSION = 3
_M64 = (1 << 64) - 1
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_SET = frozenset(_DTYPE_CODES)
# C flags: never -ffast-math (it changes NaN, subnormal and rounding behaviour).
_BASE_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-fno-math-errno"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None  # why the fused kernel is unavailable (None: not tried yet or fine)
_build_info: dict = {}


def _cache_dir() -> Path:
    env = os.environ.get("DROPGRAD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dropgrad"


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    parts = cc.split()
    if not parts:
        return None
    return cc if shutil.which(parts[0]) else None


def _compile(cc: str, src: Path, out: Path, flags: list[str]) -> tuple[bool, str]:
    cmd = cc.split() + flags + [str(src), "-o", str(out)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{' '.join(cmd)}: {exc}"
    if res.returncode != 0:
        return False, f"{' '.join(cmd)} exited with {res.returncode}: {res.stderr.strip()[:500]}"
    return True, ""


def _build() -> ctypes.CDLL:
    """Compile (or reuse) and load the shared library; raise RuntimeError on failure."""
    if os.environ.get("DROPGRAD_DISABLE_FUSED", "") not in ("", "0"):
        raise RuntimeError("disabled by DROPGRAD_DISABLE_FUSED")
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler found (CC={os.environ.get('CC', 'cc')!r})")
    source = _SOURCE.read_bytes()
    suffix = ".dll" if sys.platform == "win32" else ".so"
    directory = _cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise OSError(f"{directory} is not writable")
    except OSError:
        directory = Path(tempfile.gettempdir()) / f"dropgrad-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        directory.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    # OpenMP first; a compiler without it (Apple clang) still gives a one-thread kernel.
    for flags in (_BASE_FLAGS + ["-fopenmp"], _BASE_FLAGS):
        tag = hashlib.sha256(
            b"\0".join([source, cc.encode(), " ".join(flags).encode(), platform.machine().encode(), sys.platform.encode()])
        ).hexdigest()[:16]
        path = directory / f"masks-{tag}{suffix}"
        lib = _load_or_compile(cc, flags, path, errors)
        if lib is not None:
            return lib
    raise RuntimeError("could not build the fused mask kernel: " + " | ".join(errors))


def _load_or_compile(cc: str, flags: list[str], path: Path, errors: list[str]) -> ctypes.CDLL | None:
    # a cached library that fails to load (truncated, wrong ABI) is rebuilt once
    for _attempt in range(2):
        t0 = time.perf_counter()
        built = False
        if not path.exists():
            # compile beside the target, then rename: a reader never sees a partial file
            fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp" + path.suffix, dir=path.parent)
            os.close(fd)
            ok, err = _compile(cc, _SOURCE, Path(tmp), flags)
            if not ok:
                os.unlink(tmp)
                errors.append(err)
                return None
            os.replace(tmp, path)
            built = True
        try:
            lib = ctypes.CDLL(str(path))
            if lib.dropgrad_abi_version() != _ABI_VERSION:
                raise OSError("ABI version mismatch")
        except (OSError, AttributeError) as exc:
            errors.append(f"loading {path}: {exc}")
            try:
                path.unlink()
            except OSError:
                pass
            continue
        _declare(lib)
        _build_info.update(
            path=str(path), compiler=cc, flags=" ".join(flags), built=built,
            seconds=time.perf_counter() - t0, openmp="-fopenmp" in flags,
        )
        return lib
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p = ctypes.c_void_p
    u64 = ctypes.c_uint64
    lib.dropgrad_mask_tensors.argtypes = [ctypes.c_int64, p, p, p, p, p, p, p, u64, u64, ctypes.c_int, ctypes.c_int]
    lib.dropgrad_mask_tensors.restype = ctypes.c_int
    lib.dropgrad_derive_keys.argtypes = [ctypes.c_int64, u64, u64, p, p]
    lib.dropgrad_derive_keys.restype = None
    lib.dropgrad_keep_bits.argtypes = [p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32, u64, u64]
    lib.dropgrad_keep_bits.restype = None
    lib.dropgrad_count_below4.argtypes = [ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32, u64, p, p, ctypes.c_int]
    lib.dropgrad_count_below4.restype = None


def _library() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None (with a reason) if impossible."""
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib
    with _lock:
        if _lib is None and _reason is None:
            try:
                _lib = _build()
            except Exception as exc:  # noqa: BLE001 - any failure means: use the reference
                _reason = str(exc) or type(exc).__name__
    return _lib


def available() -> bool:
    """Whether the fused CPU kernel can run here (builds it on first call)."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, or None."""
    _library()
    return _reason


def build_info() -> dict:
    """Where the kernel was loaded from, the flags, and how long the build or load took."""
    _library()
    return dict(_build_info)


def _reset_for_tests() -> None:
    """Forget the loaded library so that the next call rebuilds (tests of the build logic)."""
    global _lib, _reason
    with _lock:
        _lib, _reason = None, None
        _build_info.clear()


def _unsupported(g: torch.Tensor) -> str | None:
    # Everything the C loop assumes, checked per tensor; a reason routes it to the reference.
    if type(g) is not torch.Tensor:
        return f"a {type(g).__name__} subclass"
    if not g.is_cpu:
        return f"on device {g.device}"
    if g.layout != torch.strided:
        return f"of layout {g.layout}"
    if g.dtype not in _DTYPE_CODES:
        return f"of dtype {g.dtype}"
    if g.requires_grad:
        return "requiring grad (the reference records the multiply for autograd)"
    if not g.is_contiguous():
        return "not contiguous"
    if g.is_neg():
        return "a lazy negative view"
    return None


def _cpu_code(g: torch.Tensor) -> int | None:
    """The C loop's dtype code for ``g``, or None if the loop cannot mask it (the checks of :func:`_unsupported`)."""
    code = _DTYPE_CODES.get(g.dtype)
    if (
        code is None
        or type(g) is not torch.Tensor
        or not g.is_cpu
        or g.requires_grad
        or g.layout is not torch.strided
        or not g.is_contiguous()
        or g.is_neg()
    ):
        return None
    return code


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    try:
        torch.autograd.graph.increment_version(tensors)
    except (TypeError, RuntimeError):  # older torch (2.4 raises RuntimeError) takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def fused_drop_grad_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[tuple[int, int]],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
    strict: bool = False,
) -> None:
    """Mask tensors in place with the fused kernel; same contract and output as the reference.

    Element ``i`` of ``grads[j]`` is kept iff
    ``hash32(keys[j], offsets[j] + i) < thresholds[j]`` and then multiplied by
    ``scales[j]``; dropped elements are multiplied by zero. Tensors must not
    share memory with each other.

    Args:
        strict: raise instead of falling back to the reference kernel for a
            tensor (or a machine) the fused kernel cannot serve.
    """
    return _eager_only(_fused_drop_grad)(grads, keys, thresholds, scales, offsets, strict)


def _fused_drop_grad(
    grads: Sequence[torch.Tensor],
    keys: Sequence[tuple[int, int]],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
    strict: bool = False,
) -> None:
    n = len(grads)
    if not (len(keys) == len(thresholds) == len(scales) == len(offsets) == n):
        raise ValueError(
            f"grads, keys, thresholds, scales and offsets must have equal lengths, got "
            f"{n}, {len(keys)}, {len(thresholds)}, {len(scales)}, {len(offsets)}"
        )
    lib = _library()
    if lib is None:
        if strict:
            raise RuntimeError(f"impl='fused' was requested but the fused mask kernel is unavailable: {_reason}")
        return _single_tensor_drop_grad_(grads, keys, thresholds, scales, offsets)
    if n == 0:
        return None
    grads = list(grads)
    scan = _scan(grads)
    if scan is not None and not any(offsets):
        # the common case, every tensor servable at offset 0: whole-list conversions, no Python loop
        ptrs, numels, codes = scan
        words = [k0 | (k1 << 32) for k0, k1 in keys]
        thrs = _threshold_array(thresholds)
        scs = array("d", scales)
        offs = None
        served = grads
        if 0 in numels or (max(thrs) >= _TWO32 and 1.0 in scs):  # the kernel leaves these alone
            served = [g for g, m, t, c in zip(grads, numels, thrs, scs) if m and not (t >= _TWO32 and c == 1.0)]
        rest = ()
    else:
        ptrs, numels, codes, words, thr_list, sc_list, off_list, served, rest = [], [], [], [], [], [], [], [], []
        for j, (g, key, thr, scale, off) in enumerate(zip(grads, keys, thresholds, scales, offsets)):
            numel = g.numel()
            if numel == 0 or (thr >= _TWO32 and scale == 1.0):
                continue  # the reference leaves these untouched too
            code = _cpu_code(g)  # the cheap checks; _unsupported() names the reason only when one fails
            if code is None or not 0 <= off <= _MAX_OFFSET - numel:
                if strict:
                    why = _unsupported(g) or f"with element offset {off} outside [0, 2**63 - numel]"
                    raise RuntimeError(f"impl='fused' cannot mask grads[{j}]: it is {why}")
                rest.append(j)
                continue
            ptrs.append(g.data_ptr())
            numels.append(numel)
            codes.append(code)
            words.append(key[0] | (key[1] << 32))
            thr_list.append(min(max(int(thr), 0), _TWO32))
            sc_list.append(float(scale))
            off_list.append(off)
            served.append(g)
        thrs, scs, offs = array("Q", thr_list), array("d", sc_list), array("Q", off_list)

    if ptrs:
        _run(lib, ptrs, numels, codes, array("Q", words), thrs, scs, offs, 0, 0, False)
        if served:
            _bump_versions(served)  # as g.mul_ would: autograd then sees the in-place change
    if rest:
        _single_tensor_drop_grad_(
            [grads[j] for j in rest], [keys[j] for j in rest], [thresholds[j] for j in rest],
            [scales[j] for j in rest], [offsets[j] for j in rest],
        )
    return None


_T = torch.Tensor
_TENSOR_ONLY = {torch.Tensor}
_STRIDED_ONLY = {torch.strided}
_get_dtype = operator.attrgetter("dtype")
_get_layout = operator.attrgetter("layout")
_get_is_cpu = operator.attrgetter("is_cpu")
_get_requires_grad = operator.attrgetter("requires_grad")


def _plain_dense(grads: list, on_device) -> set | None:
    """The set of dtypes of ``grads`` if a mask kernel can serve every one of them, else None.

    Served: plain (not subclassed), strided, contiguous, not lazily negated
    tensors of float32/float64/float16/bfloat16 that do not require grad and
    for which ``on_device(g)`` holds (None: any device). Each check is one
    C-level pass over the list (``map``), not a Python loop: about 0.6 us a
    tensor instead of 2. Shared by the C (CPU) and Triton (CUDA) kernels.
    """
    if set(map(type, grads)) != _TENSOR_ONLY:
        return None  # a subclass, a None, or an empty list
    dtypes = set(map(_get_dtype, grads))
    if (
        not dtypes <= _DTYPE_SET
        or set(map(_get_layout, grads)) != _STRIDED_ONLY  # before is_contiguous, which sparse layouts refuse
        or (on_device is not None and not all(map(on_device, grads)))
        or any(map(_get_requires_grad, grads))
        or not all(map(_T.is_contiguous, grads))
        or any(map(_T.is_neg, grads))
    ):
        return None
    return dtypes


def _scan(grads: list) -> tuple[list[int], list[int], list[int]] | None:
    """``(data pointers, numels, dtype codes)`` if the C kernel can serve every tensor of ``grads``, else None."""
    dtypes = _plain_dense(grads, _get_is_cpu)
    if dtypes is None:
        return None
    if len(dtypes) == 1:
        codes = [_DTYPE_CODES[next(iter(dtypes))]] * len(grads)
    else:
        codes = list(map(_DTYPE_CODES.__getitem__, map(_get_dtype, grads)))
    return list(map(_T.data_ptr, grads)), list(map(_T.numel, grads)), codes


def _threshold_array(thresholds: Sequence[int]) -> array:
    """Thresholds clamped to ``[0, 2**32]`` as the kernel's uint64 array."""
    try:
        if thresholds and (min(thresholds) < 0 or max(thresholds) > _TWO32):
            raise OverflowError
        return array("Q", thresholds)
    except (TypeError, OverflowError):  # floats, out-of-range values: one at a time
        return array("Q", [min(max(int(t), 0), _TWO32) for t in thresholds])


def _run(lib, ptrs, numels, codes, keys, thrs, scs, offs, prefix: int, stream: int, derive: bool) -> None:
    """One call of ``dropgrad_mask_tensors`` (keys: key words, or tensor indices with ``derive``; None: 0..n-1)."""
    ptr_a, numel_a, code_a = array("Q", ptrs), array("q", numels), array("i", codes)
    rc = lib.dropgrad_mask_tensors(
        len(ptr_a), ptr_a.buffer_info()[0], numel_a.buffer_info()[0], code_a.buffer_info()[0],
        None if keys is None else keys.buffer_info()[0], thrs.buffer_info()[0], scs.buffer_info()[0],
        None if offs is None else offs.buffer_info()[0], prefix, stream, 1 if derive else 0, torch.get_num_threads(),
    )
    if rc != 0:  # validation happens before any write, so nothing is half masked
        raise RuntimeError(f"dropgrad fused mask kernel failed with code {rc}")


# (rates, rescale) -> (thresholds, scales, positions the kernel leaves alone); a few entries
_rate_arrays: dict = {}


def _rates_to_arrays(rates: tuple[float, ...], rescale: bool) -> tuple[array, array, list[int]]:
    key = (rates, rescale)
    hit = _rate_arrays.get(key)
    if hit is not None:
        return hit
    per_rate = {r: (_masks.keep_threshold(r), _scale_for(r, rescale)) for r in set(rates)}
    thrs = array("Q", [per_rate[r][0] for r in rates])
    scs = array("d", [per_rate[r][1] for r in rates])
    idle = [j for j, r in enumerate(rates) if per_rate[r][0] >= _TWO32 and per_rate[r][1] == 1.0]
    if len(_rate_arrays) >= 8:  # schedules change the rates every step: keep the cache small
        _rate_arrays.clear()
    hit = _rate_arrays[key] = (thrs, scs, idle)
    return hit


def mask_planned_(plan: Sequence[tuple[int, torch.Tensor, float]], prefix: int, stream: int, rescale: bool,
                  strict: bool = False) -> list | None:
    """Mask the gradients of a :class:`~dropgrad.DropGrad` step plan; return the entries left to the caller.

    ``plan`` holds ``(index, parameter, rate)``; the key of an entry is
    ``key_from_prefix(prefix, index, stream)``, derived in C. Entries whose
    gradient the kernel cannot serve (None and rate-0 entries aside, which
    need nothing) come back for the general path; with ``strict`` and any such
    entry nothing is masked and the whole plan comes back (the general path
    then raises, before any write, as before). Returns None when the kernel is
    unavailable.

    Per step this reads every ``p.grad`` again and checks it with whole-list
    passes, so re-allocated gradients (``zero_grad(set_to_none=True)``), dtype
    or device changes and added or removed parameters need no invalidation;
    only the rates' thresholds and factors are cached (keyed by the rates).
    """
    lib = _library()
    if lib is None:
        return None
    if not plan:
        return []
    indices, params, rates = zip(*plan)
    in_order = indices[0] == 0 and indices[-1] == len(indices) - 1 and indices == tuple(range(len(indices)))
    thrs, scs, idle = _rates_to_arrays(rates, rescale)
    grads = [p.grad for p in params]
    scan = _scan(grads)
    left: list = []
    if scan is not None:  # every gradient is present and servable
        ptrs, numels, codes = scan
        keys = None if in_order else array("Q", [i & _M64 for i in indices])  # None: index j
        served = grads
        if idle or 0 in numels:
            idle_set = set(idle)
            served = [g for j, (g, m) in enumerate(zip(grads, numels)) if m and j not in idle_set]
    else:
        if not any(map(_get_is_cpu, [g for g in grads if g is not None])):
            return list(plan)  # nothing on the CPU (a CUDA model): no per-tensor loop here
        pos, ptrs, numels, codes, served = [], [], [], [], []
        for j, (g, thr, scale) in enumerate(zip(grads, thrs, scs)):
            if g is None or (thr >= _TWO32 and scale == 1.0):
                continue
            numel = g.numel()
            if numel == 0:
                continue
            code = _cpu_code(g)
            if code is None:
                left.append(plan[j])
                continue
            pos.append(j)
            ptrs.append(g.data_ptr())
            numels.append(numel)
            codes.append(code)
            served.append(g)
        if strict and left:
            return list(plan)
        keys = array("Q", [indices[j] & _M64 for j in pos])
        thrs = array("Q", [thrs[j] for j in pos])
        scs = array("d", [scs[j] for j in pos])
    if ptrs:
        _run(lib, ptrs, numels, codes, keys, thrs, scs, None, prefix & _M64, stream & _M64, True)
        if served:
            _bump_versions(served)
    return left


def derive_key_words(prefix: int, indices: Sequence[int], stream: int) -> list[int]:
    """``k0 | k1 << 32`` of ``key_from_prefix(prefix, index, stream)`` for each index, computed in C (for tests)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the fused mask kernel is unavailable: {_reason}")
    idx = array("Q", [i & _M64 for i in indices])
    out = array("Q", [0] * len(idx))
    if idx:
        lib.dropgrad_derive_keys(len(idx), prefix & _M64, stream & _M64, idx.buffer_info()[0], out.buffer_info()[0])
    return list(out)


def keep_bits(numel: int, key: tuple[int, int], threshold: int, offset: int = 0) -> torch.Tensor:
    """The keep mask from the C kernel as a bool tensor (for tests; mirrors :func:`dropgrad.masks.keep_mask`)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the fused mask kernel is unavailable: {_reason}")
    out = torch.empty(numel, dtype=torch.uint8)
    lib.dropgrad_keep_bits(out.data_ptr(), numel, key[0], key[1], min(max(int(threshold), 0), _TWO32), offset)
    return out.bool()


def count_kept(numel: int, key: tuple[int, int], thresholds: Sequence[int], offset: int = 0) -> list[int]:
    """How many of elements ``offset .. offset + numel - 1`` each threshold keeps (no memory used).

    For tests of the keep probability: over an aligned block of ``2**32``
    elements the count equals the threshold exactly.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the fused mask kernel is unavailable: {_reason}")
    counts = []
    for i in range(0, len(thresholds), 4):
        part = [min(max(int(t), 0), _TWO32) for t in thresholds[i : i + 4]]
        thr = array("I", [min(t, _TWO32 - 1) for t in part] + [0] * (4 - len(part)))
        out = array("Q", [0] * 4)
        lib.dropgrad_count_below4(
            numel, key[0], key[1], offset, thr.buffer_info()[0], out.buffer_info()[0], torch.get_num_threads()
        )
        counts += [numel if t >= _TWO32 else c for t, c in zip(part, out)]
    return counts
