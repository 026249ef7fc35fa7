"""The C mask kernel for CPU gradients: the reference kernel's bits in one pass over memory.

:func:`mask_` implements the contract of :mod:`dropgrad.kernels.common` for
plain contiguous CPU tensors of float32/float64/float16/bfloat16
(:func:`~dropgrad.kernels.common.servable`). The work is done by a small C file
(``masks.c`` beside this module, no torch headers), compiled with the system C
compiler into a private cache directory and loaded through :mod:`ctypes`
(which releases the GIL); ``pip install`` builds nothing.

* One call masks all tensors of a step: the C side splits the concatenation of
  all tensors into 64K-element chunks over ``torch.get_num_threads()`` OpenMP
  threads and derives each tensor's key from the step prefix, its index and
  the stream (the SplitMix64 chain of :func:`dropgrad.masks.key_from_prefix`).
* **Off the critical path.** :func:`start_build` (called by ``DropGrad()`` when
  it has CPU parameters) compiles in a background thread, about 1 s once per
  machine and source version; until it is ready the dispatcher uses the
  reference kernel, which gives the same bits. A CUDA-only run never builds it.
* **The cache directory is private.** ``DROPGRAD_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/dropgrad``, else ``~/.cache/dropgrad``; it is created with
  mode 0700 and used only if ``lstat`` shows a real directory (no symlink)
  owned by this user with no group or world write permission, and a cached
  library is loaded only if it is a regular file owned by this user and not
  writable by others. Otherwise the build goes to a fresh ``mkdtemp``
  directory of this process (unpredictable name, mode 0700) and is not cached.
* Builds are keyed by a hash of the source, compiler, flags and platform,
  compiled to a temporary file and renamed into place, so concurrent processes
  (4 at once with an empty cache are tested) never load a half-written library.
* When the kernel cannot be built (no compiler, ``CC`` failing, no usable
  directory) one ``RuntimeWarning`` per process says why and how to fix it, and
  every gradient takes the reference kernel. ``DROPGRAD_DISABLE_FUSED=1``
  turns the kernel off on purpose (no warning).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import operator
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from array import array
from collections.abc import Sequence
from pathlib import Path

import torch

from .common import DTYPE_CODES, M64, bump_versions

__all__ = [
    "mask_", "available", "ready", "start_build", "unavailable_reason", "build_info", "cache_dir", "load_library",
]

SOURCE = Path(__file__).with_name("masks.c")
ABI_VERSION = 4
# C flags: never -ffast-math (it changes NaN, subnormal and rounding behaviour).
_BASE_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-fno-math-errno"]
_get_dtype_code = DTYPE_CODES.__getitem__
_get_dtype = operator.attrgetter("dtype")


class _Build:
    """One library variant (the kernel, or the kernel plus test entry points), built at most once per process."""

    def __init__(self, testing: bool) -> None:
        self.testing = testing
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.lib: ctypes.CDLL | None = None
        self.reason: str | None = None  # why it is unavailable (None: not tried yet, or fine)
        self.info: dict = {}
        self.done = threading.Event()

    def run(self) -> None:
        with self.lock:
            if self.done.is_set():
                return
            try:
                self.lib = _build(self.testing, self.info)
            except Exception as exc:  # noqa: BLE001 - any failure means: use the reference kernel
                self.reason = str(exc) or type(exc).__name__
            self.done.set()
        if self.reason is not None and not self.testing:
            _warn_unavailable(self.reason)

    def start(self) -> None:
        if self.done.is_set() or self.thread is not None:
            return
        with self.lock:
            if self.thread is None and not self.done.is_set():
                self.thread = threading.Thread(target=self.run, name="dropgrad-kernel-build", daemon=True)
                self.thread.start()

    def get(self, wait: bool) -> ctypes.CDLL | None:
        if not self.done.is_set():
            if not wait:
                self.start()
                return None
            self.run()  # blocks on the lock while a background build runs
        return self.lib


_kernel = _Build(testing=False)
_testing = _Build(testing=True)
_warned = False


def _warn_unavailable(reason: str) -> None:
    global _warned
    if _warned or reason.startswith("disabled by DROPGRAD_DISABLE_FUSED"):
        return
    _warned = True
    warnings.warn(
        f"dropgrad: the fast CPU mask kernel is unavailable ({reason}); CPU gradients are masked by the "
        "reference kernel instead (the same masks, several times slower). To fix it: install a C compiler "
        "(e.g. `apt-get install gcc`) or point CC at one, and make sure DROPGRAD_CACHE_DIR (default "
        "~/.cache/dropgrad) is a directory you own that others cannot write; set DROPGRAD_DISABLE_FUSED=1 "
        "to use the reference kernel without this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


# ------------------------------------------------------------------ the private cache directory
def _default_cache_dir() -> Path:
    env = os.environ.get("DROPGRAD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dropgrad"


def _unsafe_dir(path: Path) -> str | None:
    """Why ``path`` must not hold code this process loads (None: it is a private directory of ours)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user ({os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


def _unsafe_file(path: Path) -> str | None:
    """Why the library file ``path`` must not be loaded (None: a regular file of ours, not writable by others)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others"
    return None


def _private_dir(path: Path) -> str | None:
    """Create ``path`` (mode 0700) if needed, tighten a directory of ours; None if it is then safe."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        return f"{path} cannot be created: {exc.strerror or exc}"
    why = _unsafe_dir(path)
    if why is not None and "writable by group or others" in why:
        try:  # our own directory with loose permissions: make it private
            os.chmod(path, 0o700, follow_symlinks=False)
        except (OSError, NotImplementedError):
            return why
        why = _unsafe_dir(path)
    return why


_process_dir: Path | None = None


def cache_dir() -> tuple[Path, str | None]:
    """The directory builds go to, and why the configured one was not used (None: it was).

    The configured directory when it is private (see the module docstring),
    else a fresh ``mkdtemp`` directory of this process.
    """
    configured = _default_cache_dir()
    why = _private_dir(configured)
    if why is None:
        return configured, None
    return _private_process_dir(), why


def _private_process_dir() -> Path:
    """This process's own build directory (``mkdtemp``: mode 0700, unpredictable name; not cached)."""
    global _process_dir
    if _process_dir is None:
        _process_dir = Path(tempfile.mkdtemp(prefix="dropgrad-"))
    return _process_dir


# ------------------------------------------------------------------ the build
def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    parts = cc.split()
    if not parts:
        return None
    return cc if shutil.which(parts[0]) else None


def _compile(cc: str, out: Path, flags: list[str]) -> tuple[bool, str]:
    cmd = cc.split() + flags + [str(SOURCE), "-o", str(out)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{' '.join(cmd)}: {exc}"
    if res.returncode != 0:
        return False, f"{' '.join(cmd)} exited with {res.returncode}: {res.stderr.strip()[:500]}"
    return True, ""


def _build(testing: bool, info: dict) -> ctypes.CDLL:
    """Compile (or reuse) and load the shared library; raise RuntimeError on failure."""
    if os.environ.get("DROPGRAD_DISABLE_FUSED", "") not in ("", "0"):
        raise RuntimeError("disabled by DROPGRAD_DISABLE_FUSED")
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler found (CC={os.environ.get('CC', 'cc')!r})")
    source = SOURCE.read_bytes()
    suffix = ".dll" if sys.platform == "win32" else ".so"
    directory, why_not_cached = cache_dir()
    errors: list[str] = []
    extra = ["-DDROPGRAD_TESTING"] if testing else []
    # OpenMP first; a compiler without it (Apple clang) still gives a one-thread kernel.
    for flags in (_BASE_FLAGS + extra + ["-fopenmp"], _BASE_FLAGS + extra):
        tag = hashlib.sha256(
            b"\0".join([source, cc.encode(), " ".join(flags).encode(), platform.machine().encode(), sys.platform.encode()])
        ).hexdigest()[:16]
        name = f"masks-{tag}{'-testing' if testing else ''}{suffix}"
        lib = _load_or_compile(cc, flags, directory / name, errors, info)
        if lib is None and errors and errors[-1].startswith("refusing to load"):
            # a planted or tampered file in the cache: build this process's own copy elsewhere
            why_not_cached = errors[-1][len("refusing to load "):]
            directory = _private_process_dir()
            lib = _load_or_compile(cc, flags, directory / name, errors, info)
        if lib is not None:
            info["cache_dir_refused"] = why_not_cached
            return lib
    raise RuntimeError("could not build the C mask kernel: " + " | ".join(errors))


def _load_or_compile(cc: str, flags: list[str], path: Path, errors: list[str], info: dict) -> ctypes.CDLL | None:
    # a cached library that fails to load (truncated, wrong ABI) is rebuilt once
    for _attempt in range(2):
        t0 = time.perf_counter()
        built = False
        if not os.path.lexists(path):
            # compile beside the target, then rename: a reader never sees a partial file
            fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp" + path.suffix, dir=path.parent)
            os.close(fd)
            ok, err = _compile(cc, Path(tmp), flags)
            if not ok:
                os.unlink(tmp)
                errors.append(err)
                return None
            os.chmod(tmp, 0o700)
            os.replace(tmp, path)
            built = True
        try:
            why = _unsafe_file(path)
            if why is not None:
                errors.append(f"refusing to load {why}")
                return None
            lib = ctypes.CDLL(str(path))
            if lib.dropgrad_abi_version() != ABI_VERSION:
                raise OSError("ABI version mismatch")
        except (OSError, AttributeError) as exc:
            errors.append(f"loading {path}: {exc}")
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        _declare(lib)
        info.update(
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


def start_build() -> None:
    """Start building (or loading) the kernel in a background thread, if that has not happened yet."""
    _kernel.start()


def ready() -> bool:
    """Whether the kernel is loaded now (never waits; starts the build if needed)."""
    return _kernel.get(wait=False) is not None


def available() -> bool:
    """Whether the kernel can run here (waits for the build)."""
    return _kernel.get(wait=True) is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, or None (waits for the build)."""
    _kernel.get(wait=True)
    return _kernel.reason


def build_info() -> dict:
    """Where the kernel was loaded from, the flags, how long the build or load took (waits for the build)."""
    _kernel.get(wait=True)
    return dict(_kernel.info)


def load_library(testing: bool = False) -> ctypes.CDLL:
    """The loaded library (``testing=True``: the variant with the test entry points); waits for the build.

    Raises:
        RuntimeError: the library cannot be built here.
    """
    build = _testing if testing else _kernel
    lib = build.get(wait=True)
    if lib is None:
        raise RuntimeError(f"the C mask kernel is unavailable: {build.reason}")
    return lib


def reset() -> None:
    """Forget the loaded libraries and the warning, so the next use builds again (tests of the build logic)."""
    global _kernel, _testing, _warned, _process_dir
    _kernel, _testing, _warned, _process_dir = _Build(testing=False), _Build(testing=True), False, None


# ------------------------------------------------------------------ the kernel
# thresholds, scales (and which entries are idle) keyed by the exact lists: schedules change
# the rates every step, so the cache stays small
_arrays: dict = {}


def _rate_arrays(thresholds: Sequence[int], scales: Sequence[float]) -> tuple[array, array]:
    key = (tuple(thresholds), tuple(scales))
    hit = _arrays.get(key)
    if hit is None:
        if len(_arrays) >= 8:
            _arrays.clear()
        hit = _arrays[key] = (array("Q", key[0]), array("d", key[1]))
    return hit


def mask_(
    grads: Sequence[torch.Tensor],
    indices: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
    prefix: int,
    stream: int,
) -> None:
    """Mask servable CPU tensors in place in one C call (the contract of :mod:`dropgrad.kernels.common`).

    The caller checks servability and the kernel's readiness (:func:`ready`);
    idle entries (see :func:`~dropgrad.kernels.common.is_idle`) are skipped in C.
    """
    lib = _kernel.get(wait=True)
    if lib is None:
        raise RuntimeError(f"the C mask kernel is unavailable: {_kernel.reason}")
    n = len(grads)
    if n == 0:
        return
    ptrs = array("Q", map(torch.Tensor.data_ptr, grads))
    numels = array("q", map(torch.Tensor.numel, grads))
    codes = array("i", map(_get_dtype_code, map(_get_dtype, grads)))
    in_order = indices[0] == 0 and indices[-1] == n - 1 and tuple(indices) == tuple(range(n))
    idx = None if in_order else array("Q", [i & M64 for i in indices])
    thrs, scs = _rate_arrays(thresholds, scales)
    offs = None if not any(offsets) else array("Q", offsets)
    rc = lib.dropgrad_mask_tensors(
        n, ptrs.buffer_info()[0], numels.buffer_info()[0], codes.buffer_info()[0],
        None if idx is None else idx.buffer_info()[0], thrs.buffer_info()[0], scs.buffer_info()[0],
        None if offs is None else offs.buffer_info()[0], prefix & M64, stream & M64, 1, torch.get_num_threads(),
    )
    if rc != 0:  # validation happens before any write, so nothing is half masked
        raise RuntimeError(f"dropgrad's C mask kernel failed with code {rc}")
    bump_versions(list(grads))  # as g.mul_ would: autograd then sees the in-place change

