"""The fast mask kernels against the reference kernel, the C build, and the statistics of the masks.

Parity is bitwise (integer views of the results): :func:`dropgrad.kernels.cpu.mask_`
is called directly against :func:`dropgrad.kernels.reference.mask_` (the kernel
contract of :mod:`dropgrad.kernels.common`), and the dispatcher
:func:`dropgrad.functional.apply_masks_` is tested for which kernel it picks and
that every choice gives the same bits. Statistical bounds are stated in
standard deviations of the statistic under the null hypothesis (independent
Bernoulli(1 - p) bits) and use fixed seeds, so every run checks the same
numbers; with a 6-sigma bound a correct generator fails none of them (about
1e-9 per check), while a broken counter, key or threshold does.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from dropgrad import DropGrad, masks, testing
from dropgrad.functional import apply_masks_
from dropgrad.kernels import cpu, reference

TWO32 = 1 << 32
SIGMA = 6.0
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
ROOT = Path(__file__).resolve().parent.parent

needs_fused = pytest.mark.skipif(not cpu.available(), reason=f"C kernel unavailable: {cpu.unavailable_reason()}")
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
#: the file name the kernel is cached under with the default compiler and flags (what a planted file would take)
KERNEL_NAME = Path(cpu.build_info()["path"]).name if cpu.available() else None


def _scale(p: float, rescale: bool = True) -> float:
    if not rescale:
        return 1.0
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.resolve_neg().contiguous().view(INT_VIEW[t.dtype])


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (_bits(a) != _bits(b)).nonzero()
    assert diff.numel() == 0, (
        f"{diff.shape[0]} elements differ, first at {diff[0].tolist()}: "
        f"{a.flatten()[diff[0, 0]].item()!r} vs {b.flatten()[diff[0, 0]].item()!r}"
    )


def _assert_same_bits_f16_nan_aside(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality, except float16 NaN payloads (torch's own float16 multiply is not
    consistent about them: see test_parity_sizes_offsets); NaN positions must still agree."""
    if a.dtype == torch.float16:
        a, b = a.clone(), b.clone()
        assert torch.equal(a.isnan(), b.isnan())
        a[a.isnan()] = 0
        b[b.isnan()] = 0
    _assert_same_bits(a, b)


def _grad(numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(numel, generator=gen, dtype=torch.float64) * 10
    g[::97] = math.nan
    g[5::101] = math.inf
    g[7::103] = -math.inf
    g[11::107] = -0.0
    g[13::109] = 1e-42  # a float32 subnormal (flushed to zero or kept per dtype's rounding)
    return g.to(dtype)


def _both(grads, thresholds, scales, offsets, prefix, indices=None, stream=0):
    """The reference kernel and the C kernel (called directly) on copies of ``grads``."""
    indices = list(range(len(grads))) if indices is None else list(indices)
    ref = [g.clone() for g in grads]
    fused = [g.clone() for g in grads]
    reference.mask_(ref, indices, thresholds, scales, offsets, prefix, stream)
    cpu.mask_(fused, indices, thresholds, scales, offsets, prefix, stream)
    return ref, fused


def _spy(monkeypatch, module=cpu):
    """Record the grads lists ``module.mask_`` is called with (the call still happens)."""
    calls: list[list[torch.Tensor]] = []
    real = module.mask_

    def spy(grads, *args):
        calls.append(list(grads))
        return real(grads, *args)

    monkeypatch.setattr(module, "mask_", spy)
    return calls


def _wait_ready() -> None:
    """Wait for the C kernel (a test of the build logic may have reset it), so impl=None takes it."""
    assert cpu.available(), cpu.unavailable_reason()
    assert cpu.ready()


def _join_builds() -> None:
    """Wait for background builds of this process (so none finishes inside another test)."""
    for t in threading.enumerate():
        if t.name == "dropgrad-kernel-build" and t is not threading.current_thread():
            t.join(timeout=300)


def _wait_for(cond, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (waited {seconds} s)")
        time.sleep(0.02)


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


# ---------------------------------------------------------------- parity


def test_builds_when_a_compiler_exists():
    # otherwise every parity test below would silently skip
    cc = os.environ.get("CC", "cc").split()
    if not cc or shutil.which(cc[0]) is None:
        pytest.skip("no C compiler on this machine")
    if os.environ.get("DROPGRAD_DISABLE_FUSED", "") not in ("", "0"):
        pytest.skip("DROPGRAD_DISABLE_FUSED is set")
    assert cpu.available(), cpu.unavailable_reason()
    assert cpu.unavailable_reason() is None
    info = cpu.build_info()
    assert Path(info["path"]).is_file() and info["compiler"]


@needs_fused
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.9, 1.0])
def test_parity_sizes_offsets(dtype, p):
    # sizes: empty, one, odd, one vector +- 1, and more than 2 threads x 64K-element chunks;
    # offsets: 0, a block that crosses 2**32 (hi32 changes inside), and one far above it
    sizes = [0, 1, 7, 9, 200_003]
    offsets = [0, TWO32 - 150_000, 5 * TWO32 + 3]
    grads, offs = [], []
    for i, n in enumerate(sizes):
        for off in offsets:
            grads.append(_grad(n, dtype, seed=i))
            offs.append(off)
    k = len(grads)
    ref, fused = _both(grads, [masks.keep_threshold(p)] * k, [_scale(p)] * k, offs, masks.step_prefix(7, 3))
    for a, b in zip(ref, fused):
        if dtype == torch.float16:
            # torch's own float16 kernel writes NaN as 0x7FFF in the scalar tail of its
            # vector loop and keeps the payload elsewhere; NaN stays NaN either way.
            # Every payload is compared bit for bit in test_parity_every_half_value.
            a, b = a.clone(), b.clone()
            assert torch.equal(a.isnan(), b.isnan())
            a[a.isnan()] = 0
            b[b.isnan()] = 0
        _assert_same_bits(a, b)


@needs_fused
@pytest.mark.parametrize("dtype", FLOATS)
def test_parity_block_boundaries(dtype, threads):
    # the C loops take the first hash round in 32-element blocks aligned on the element index, with a
    # table per 2**16-element run: heads, tails, run and high-word boundaries at every alignment
    offsets = [0, 1, 31, 32, 33, 65_536 - 40, 65_536 - 32, 65_535, 3 * 65_536 + 5, TWO32 - 65_536 - 7, TWO32 - 33,
               7 * TWO32 + 65_536 - 3]
    lengths = [1, 31, 32, 33, 64, 95, 200, 65_536 + 70]
    grads, offs = [], []
    for off in offsets:
        for n in lengths:
            grads.append(_grad(n, dtype, seed=len(grads)))
            offs.append(off)
    k = len(grads)
    args = (list(range(k)), [masks.keep_threshold(0.3)] * k, [_scale(0.3)] * k, offs, masks.step_prefix(17, 5), 0)
    ref = [g.clone() for g in grads]
    reference.mask_(ref, *args)
    for nthreads in (1, 2):
        threads(nthreads)
        fused = [g.clone() for g in grads]
        cpu.mask_(fused, *args)
        for a, b in zip(ref, fused):
            _assert_same_bits_f16_nan_aside(a, b)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_every_half_value(dtype):
    # all 65536 bit patterns (NaN payloads, subnormals, overflow to inf) through rescales
    # that round, keep-everything scales, sign flips, underflow and the p=1 zero
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    cases = [
        (masks.keep_threshold(0.5), 2.0),
        (masks.keep_threshold(0.05), 1 / 0.95),
        (masks.keep_threshold(0.05), masks.survivor_scale(masks.keep_threshold(0.05))),
        (masks.keep_threshold(0.3), 1.0),
        (TWO32, 1 / 0.9),
        (TWO32, -3.0),
        (TWO32, 1e-5),
        (0, 0.0),
    ]
    for thr, scale in cases:
        ref, fused = _both([every], [thr], [scale], [0], prefix=12345, indices=[678])
        _assert_same_bits(ref[0], fused[0])


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_random_bit_patterns(dtype):
    # uniformly random bits: subnormals, signalling and quiet NaNs with payloads, infinities
    gen = torch.Generator().manual_seed(1)
    idt = INT_VIEW[dtype]
    info = torch.iinfo(idt)
    raw = torch.randint(info.min, info.max, (100_003,), generator=gen, dtype=idt)
    for thr, scale in [(masks.keep_threshold(0.5), 2.0), (masks.keep_threshold(0.1), 1 / 0.9), (TWO32, 1e-30), (0, 0.0)]:
        ref, fused = _both([raw.view(dtype)], [thr], [scale], [0], prefix=99, indices=[1])
        _assert_same_bits(ref[0], fused[0])


@needs_fused
@pytest.mark.parametrize(
    ("threshold", "scale"),
    [
        (masks.keep_threshold(0.5), 1.0),  # rescale=False
        (masks.keep_threshold(0.9), 1.0),
        (0, 0.0),  # p = 1 with rescale
        (0, 1.0),  # p = 1 without rescale
        (TWO32, 2.0),  # keep all but scale
        (1, masks.survivor_scale(1)),  # the smallest keep probability, the largest factor
        (TWO32 - 1, masks.survivor_scale(TWO32 - 1)),
        (masks.keep_threshold(0.5), -2.0),  # negative scale: dropped elements become -0.0
    ],
)
def test_parity_scale_variants(threshold, scale):
    grads = [_grad(20_001, dt, seed=3) for dt in FLOATS]
    ref, fused = _both(grads, [threshold] * 4, [scale] * 4, [0] * 4, masks.step_prefix(0, 0))
    for a, b in zip(ref, fused):
        _assert_same_bits(a, b)


@pytest.mark.parametrize(
    ("thresholds", "offsets", "match"),
    [
        ([TWO32 + 5, 0], [0, 0], r"thresholds must be in \[0, 2\*\*32\], got 4294967301"),
        ([1 << 31, -7], [0, 0], r"thresholds must be in \[0, 2\*\*32\], got -7"),
        ([1 << 31] * 2, [0, -1], r"offsets must be in \[0, 2\*\*63 - 1\], got -1"),
        ([1 << 31] * 2, [1 << 63, 0], r"offsets must be in"),
    ],
)
@pytest.mark.parametrize("impl", [None, "reference", "fused"])
def test_dispatcher_refuses_thresholds_and_offsets_out_of_range(thresholds, offsets, match, impl):
    # (the kernels before the redesign clamped such thresholds; the dispatcher now refuses them, nothing written)
    grads = [torch.randn(100), torch.randn(100)]
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match=match):
        apply_masks_(grads, [0, 1], thresholds, [2.0, 2.0], offsets, prefix=1, impl=impl)
    for g, b in zip(grads, before):
        _assert_same_bits(g, b)
    with pytest.raises(ValueError, match="equal lengths"):
        apply_masks_(grads, [0], [1 << 31] * 2, [2.0] * 2, prefix=1, impl=impl)
    with pytest.raises(ValueError, match="impl must be None, 'reference' or 'fused', got 'c'"):
        apply_masks_(grads, [0, 1], [1 << 31] * 2, [2.0] * 2, prefix=1, impl="c")


@needs_fused
def test_parity_shapes_and_many_tensors():
    # a ResNet-like list of 4-d, 2-d and 1-d tensors in one grouped call
    shapes = [(64, 3, 7, 7), (64,), (64,), (256, 64, 1, 1), (300, 512), (300,)] * 5 + [(3, 5)] * 40
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    n = len(grads)
    rates = torch.linspace(0, 1, n).tolist()
    thr = [masks.keep_threshold(p) for p in rates]
    scales = [masks.survivor_scale(t) for t in thr]
    ref, fused = _both(grads, thr, scales, [0] * n, masks.step_prefix(11, 2))
    for a, b in zip(ref, fused):
        _assert_same_bits(a, b)


@needs_fused
def test_same_result_on_any_thread_count(threads):
    g = _grad(400_003, torch.float32)
    thr = masks.keep_threshold(0.3)
    results = []
    for n in (1, 2, 3):
        threads(n)
        out = g.clone()
        cpu.mask_([out], [1], [thr], [1 / 0.7], [0], masks.step_prefix(5, 9), 0)
        results.append(out)
    for r in results[1:]:
        _assert_same_bits(results[0], r)


@needs_fused
def test_shards_compute_their_part_of_the_full_mask():
    # a parameter split in uneven shards (as FSDP/ZeRO would) masks each shard alone from its offset
    full = _grad(500_000, torch.float32)
    prefix, thr = masks.step_prefix(1, 2), masks.keep_threshold(0.25)
    whole = full.clone()
    cpu.mask_([whole], [3], [thr], [4 / 3], [0], prefix, 0)
    bounds = [0, 1, 65_535, 65_537, 200_000, 499_999, 500_000]
    shards = [full[a:b].clone() for a, b in zip(bounds, bounds[1:])]
    k = len(shards)
    cpu.mask_(shards, [3] * k, [thr] * k, [4 / 3] * k, bounds[:-1], prefix, 0)
    _assert_same_bits(whole, torch.cat(shards))
    # and through the dispatcher, against the reference
    ref = [full[a:b].clone() for a, b in zip(bounds, bounds[1:])]
    reference.mask_(ref, [3] * k, [thr] * k, [4 / 3] * k, bounds[:-1], prefix, 0)
    _assert_same_bits(whole, torch.cat(ref))


@needs_fused
@pytest.mark.parametrize("offset", [0, 12_345, TWO32 - 1000, 3 * TWO32, (1 << 62) + 17])
def test_c_keep_bits_match_definition(offset):
    key = masks.derive_key(2024, 1, 7)
    for p in (0.05, 0.5, 0.9):
        thr = masks.keep_threshold(p)
        assert torch.equal(testing.keep_bits(5000, key, thr, offset), masks.keep_mask(5000, key, thr, offset))
    # and the scalar definition, element by element
    mask = masks.keep_mask(64, key, masks.keep_threshold(0.5), offset)
    assert mask.tolist() == [masks.hash32(key, offset + i) < masks.keep_threshold(0.5) for i in range(64)]


@needs_fused
def test_c_derived_keys_match_derive_key():
    # the C kernel derives keys from (step prefix, index, stream); Python masks every counter
    # with & (2**64 - 1), so huge and negative ints must give the same words
    M64 = (1 << 64) - 1
    counters = [0, 1, 2, 7, 12345, TWO32 - 1, TWO32, (1 << 63) - 1, 1 << 63, (1 << 63) + 5, M64, M64 + 1, 1 << 70,
                -1, -2, -(1 << 63), -(1 << 64) - 3]
    gen = torch.Generator().manual_seed(3)
    counters += torch.randint(-(2**62), 2**62, (12,), generator=gen).tolist()
    for seed in (0, 1, 2**63 + 11, -5, 1 << 80):
        for step in (0, 1, 999_999, 2**64 - 1, -1):
            prefix = masks.step_prefix(seed, step)
            for stream in (masks.MASKS_STREAM, 1, 3, masks.FULL_UPDATE_STREAM, M64, -1, 1 << 65):
                words = testing.derive_key_words(prefix, counters, stream)
                for index, word in zip(counters, words):
                    k0, k1 = masks.derive_key(seed, step, index, stream)
                    assert word == k0 | (k1 << 32), (seed, step, index, stream)
                    assert (k0, k1) == masks.key_from_prefix(prefix, index, stream)


# ------------------------------------------------------- dispatch and fallback


def _plan_reference(entries, prefix, stream):
    """What the dispatcher must give: the reference kernel, one tensor at a time, keys from (prefix, index, stream)."""
    for index, g, thr, scale in entries:
        reference.mask_([g], [index], [thr], [scale], [0], prefix, stream)


@needs_fused
@pytest.mark.parametrize("rescale", [True, False])
def test_dispatcher_matches_reference_on_a_plan(threads, monkeypatch, rescale):
    # a DropGrad-like step: mixed dtypes and shapes, rates 0 (idle), tiny (rounds to keep-all), 1 and between,
    # indices with gaps (parameters without a gradient are not passed), streams 0 and 2
    _wait_ready()
    calls = _spy(monkeypatch)
    shapes = [(300, 7), (5,), (0,), (70_000,), (3, 3, 3), (1,), (200_001,)]
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    rates = [0.1, 0.0, 0.5, 1.0, 1e-12, 0.3, 0.9]

    def fresh(with_gaps):
        entries = []
        for j, s in enumerate(shapes * 2):
            if with_gaps and j % 5 == 2:
                continue  # no gradient for this parameter
            thr = masks.keep_threshold(rates[j % len(rates)])
            entries.append((j, _grad(math.prod(s), dtypes[j % 4], seed=j).view(s), thr, masks.survivor_scale(thr, rescale)))
        return entries

    for nthreads in (1, 2):
        threads(nthreads)
        for with_gaps in (False, True):
            for stream in (0, 2):
                plan, ref = fresh(with_gaps), fresh(with_gaps)
                versions = [g._version for _, g, _, _ in plan]
                calls.clear()
                indices, grads, thr, scales = (list(x) for x in zip(*plan))
                apply_masks_(grads, indices, thr, scales, prefix=masks.step_prefix(9, 4), stream=stream)
                _plan_reference(ref, masks.step_prefix(9, 4), stream)
                touched = [g.numel() > 0 and not (t >= TWO32 and s == 1.0) for _, g, t, s in plan]
                assert len(calls) == 1  # one C call for the whole list, idle entries left out
                assert [id(g) for g in calls[0]] == [id(g) for (_, g, _, _), t in zip(plan, touched) if t]
                for (_, g, _, _), (_, q, _, _), v, t in zip(plan, ref, versions, touched):
                    _assert_same_bits(g, q)
                    assert g._version == v + t


@needs_fused
def test_unservable_tensors_fall_back_per_tensor_with_the_same_bits(monkeypatch):
    # what the C kernel cannot serve goes to the reference kernel, tensor by tensor, in the same call
    _wait_ready()
    calls = _spy(monkeypatch)
    ref_calls = _spy(monkeypatch, reference)
    base = torch.randn(40, 30)
    grads = [
        base.clone().t(),  # non-contiguous
        torch.randn(100, dtype=torch.float64).to(torch.float32),
        torch.randn(100)._neg_view(),  # a lazy negative view
        torch.randn(5000),
        torch.randn(64)._neg_view(),  # unservable, but its rate is 0: nothing to do
        torch.randn(100, dtype=torch.complex64),
        torch.randn(100, requires_grad=True) * 1.0,  # a non-leaf that records autograd
    ]
    n = len(grads)
    thr = [masks.keep_threshold(0.0 if j == 4 else 0.5) for j in range(n)]
    scales = [masks.survivor_scale(t) for t in thr]
    prefix = masks.step_prefix(1, 1)

    def copy(g):
        if g.requires_grad:
            return g.detach().clone().requires_grad_() * 1.0
        if g.is_neg():  # clone() would resolve the lazy negation
            return g.resolve_neg().neg()._neg_view()
        return g.clone()  # keeps the strides

    def copies():
        out = [copy(g) for g in grads]
        assert [g.is_contiguous() for g in out] == [g.is_contiguous() for g in grads]
        assert [g.is_neg() for g in out] == [g.is_neg() for g in grads]
        return out

    out, ref = copies(), copies()
    before = [g.detach().clone() for g in out]
    apply_masks_(out, range(n), thr, scales, prefix=prefix)
    assert [id(g) for g in calls[0]] == [id(out[1]), id(out[3])] and len(calls) == 1
    assert [len(c) for c in ref_calls] == [4]  # the other active tensors, in one reference call
    _plan_reference([(j, g, t, s) for j, (g, t, s) in enumerate(zip(ref, thr, scales))], prefix, 0)
    for a, b in zip(ref, out):
        assert torch.equal(a.detach().resolve_neg().contiguous().view(torch.uint8),
                           b.detach().resolve_neg().contiguous().view(torch.uint8))
    assert out[6].grad_fn is not None  # the multiply was recorded, as in the reference
    assert torch.equal(out[4].resolve_neg(), before[4].resolve_neg())  # idle: untouched

    # impl="fused" refuses, naming the tensor it cannot serve, before writing anything (even the servable one)
    calls.clear()
    for j, reason in [(0, "not contiguous"), (2, "lazy negative"), (5, "complex64"), (6, "requiring grad")]:
        fresh = copies()
        pair = [fresh[3], fresh[j]]
        kept = [g.detach().clone() for g in pair]
        with pytest.raises(RuntimeError, match=rf"impl='fused' cannot mask grads\[1\]: it is .*{reason}"):
            apply_masks_(pair, [3, j], [thr[3], thr[j]], [scales[3], scales[j]], prefix=prefix, impl="fused")
        for g, k in zip(pair, kept):
            assert torch.equal(g.detach().resolve_neg(), k.resolve_neg())
    assert calls == []


@needs_fused
def test_plan_with_any_indices_and_empty(monkeypatch):
    _wait_ready()
    calls = _spy(monkeypatch)
    apply_masks_([], [], [], [], prefix=0)  # nothing to do, no kernel called
    apply_masks_([], [], [], [], prefix=0, impl="fused")
    assert calls == []
    indices = (5, 2**40, 1)
    grads = [torch.randn(1000, generator=torch.Generator().manual_seed(j)) for j in range(3)]
    ref = [(i, g.clone(), masks.keep_threshold(0.4), masks.survivor_scale(masks.keep_threshold(0.4)))
           for i, g in zip(indices, grads)]
    apply_masks_(grads, indices, [e[2] for e in ref], [e[3] for e in ref], prefix=masks.step_prefix(3, 3), stream=1)
    assert len(calls) == 1
    _plan_reference(ref, masks.step_prefix(3, 3), 1)
    for g, (_, q, _, _) in zip(grads, ref):
        _assert_same_bits(g, q)


@needs_fused
@pytest.mark.parametrize("impl", [None, "fused", "reference"])
def test_dispatcher_skips_what_the_reference_skips(impl):
    # numel-0 tensors and (threshold 2**32, scale 1) entries are left alone, versions included
    _wait_ready()
    grads = [torch.randn(100), torch.randn(0), torch.randn(50), torch.randn(70)]
    thr = [masks.keep_threshold(0.5), masks.keep_threshold(0.5), TWO32, TWO32]
    scales = [2.0, 2.0, 1.0, 3.0]
    ref = [g.clone() for g in grads]
    reference.mask_(ref, range(4), thr, scales, [0] * 4, 7, 0)
    before = [g._version for g in grads]
    apply_masks_(grads, range(4), thr, scales, [0] * 4, prefix=7, impl=impl)
    assert [g._version - v for g, v in zip(grads, before)] == [1, 0, 0, 1]
    for a, b in zip(ref, grads):
        _assert_same_bits(a, b)


@needs_fused
def test_fused_kernel_bumps_version_counters():
    # autograd's in-place checks must see the write, as they see the reference's g.mul_
    grads = [torch.randn(1000), torch.randn(10)]
    before = [g._version for g in grads]
    cpu.mask_(grads, [1, 3], [1 << 31] * 2, [2.0] * 2, [0, 0], 2, 0)
    assert [g._version for g in grads] == [v + 1 for v in before]


@needs_fused
def test_dispatcher_uses_fused_kernel_and_matches_reference(monkeypatch):
    _wait_ready()
    calls = _spy(monkeypatch)
    g = _grad(10_001, torch.float32)
    args = ([0], [masks.keep_threshold(0.2)], [1.25])
    prefix = masks.step_prefix(1, 1)
    fast, fused, ref = g.clone(), g.clone(), g.clone()
    apply_masks_([fast], *args, prefix=prefix)
    assert len(calls) == 1
    apply_masks_([fused], *args, prefix=prefix, impl="fused")
    assert len(calls) == 2
    apply_masks_([ref], *args, prefix=prefix, impl="reference")
    assert len(calls) == 2  # impl="reference" never calls the C kernel
    _assert_same_bits(fast, ref)
    _assert_same_bits(fused, ref)
    assert not torch.equal(ref, g)  # something was masked


@needs_fused
def test_dispatcher_refuses_the_same_memory_twice():
    g = torch.randn(100)
    for impl in (None, "fused", "reference"):
        with pytest.raises(ValueError, match=r"grads\[0\] and grads\[2\] are the same memory"):
            apply_masks_([g, torch.randn(5), g.view(10, 10)], range(3), [1 << 31] * 3, [2.0] * 3, prefix=0, impl=impl)


def test_nothing_on_the_cpu_never_touches_the_c_kernel(monkeypatch):
    # gradients on another device (the meta device here; CUDA in practice) never reach the C kernel
    calls = _spy(monkeypatch)
    g = torch.empty(10, device="meta")
    apply_masks_([g], [0], [1 << 31], [2.0], prefix=0)
    assert calls == []
    with pytest.raises(RuntimeError, match=r"impl='fused' cannot mask grads\[0\]: it is on device meta"):
        apply_masks_([g], [0], [1 << 31], [2.0], prefix=0, impl="fused")
    assert calls == []


def test_an_all_cuda_list_reaches_the_triton_kernel_in_one_call_without_a_per_tensor_pass(monkeypatch):
    # routing only (CPU tensors posing as CUDA ones); tests/test_cuda.py checks the bits on a GPU
    import dropgrad.functional as F
    from dropgrad.kernels import common, cuda

    calls, looked_at = [], []
    monkeypatch.setattr(F, "_get_is_cuda", lambda g: True)
    monkeypatch.setattr(F, "servable", lambda grads, device_type: common.servable(grads, None))
    monkeypatch.setattr(F, "unservable_reason", lambda g, kind: looked_at.append(g) or common.unservable_reason(g, None))
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(cuda, "refuse_graph_capture", lambda: None)
    monkeypatch.setattr(cuda, "mask_", lambda *args: calls.append(args))
    grads = [torch.randn(7), torch.randn(3, 2, dtype=torch.bfloat16), torch.randn(5, dtype=torch.float64)]
    apply_masks_(grads, [0, 4, 2], [1 << 31] * 3, [2.0] * 3, prefix=9, stream=1)
    assert looked_at == [] and len(calls) == 1
    got, indices, thresholds, scales, offsets, prefix, stream = calls[0]
    assert [id(g) for g in got] == [id(g) for g in grads] and list(indices) == [0, 4, 2]
    assert (list(thresholds), list(scales), list(offsets), prefix, stream) == ([1 << 31] * 3, [2.0] * 3, [0] * 3, 9, 1)
    # one tensor the kernel cannot take (not contiguous): the per-tensor pass sorts them (here, being
    # CPU tensors after all, towards the C kernel and the reference)
    calls.clear()
    grads[1] = torch.randn(4, 6).t()
    apply_masks_(grads, [0, 4, 2], [1 << 31] * 3, [2.0] * 3, prefix=9, stream=1)
    assert len(looked_at) == 3 and calls == []


@pytest.fixture
def rebuild(monkeypatch, tmp_path):
    """Forget the loaded kernel; build it afresh into an empty cache; restore afterwards."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DROPGRAD_CACHE_DIR", str(cache))
    monkeypatch.delenv("DROPGRAD_DISABLE_FUSED", raising=False)
    _join_builds()
    cpu.reset()
    yield cache
    _join_builds()
    monkeypatch.undo()
    cpu.reset()


@pytest.mark.parametrize(
    ("var", "value", "reason", "warns"),
    [("DROPGRAD_DISABLE_FUSED", "1", "DROPGRAD_DISABLE_FUSED", 0), ("CC", "false", "exited with", 1),
     ("CC", "/no/such/cc", "no C compiler", 1)],
)
def test_without_a_compiler_results_are_identical(rebuild, monkeypatch, var, value, reason, warns):
    monkeypatch.setenv(var, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu.available()
        assert not cpu.ready()
    assert reason in cpu.unavailable_reason()
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == warns
    assert not rebuild.exists() or list(rebuild.glob("*.so")) == []
    grads = [_grad(20_001, dt, seed=5) for dt in FLOATS]
    args = (range(4), [masks.keep_threshold(0.4)] * 4, [1 / 0.6] * 4, [0] * 4)
    ref = [g.clone() for g in grads]
    out = [g.clone() for g in grads]
    reference.mask_(ref, *args, masks.step_prefix(3, 1), 0)
    apply_masks_(out, *args, prefix=masks.step_prefix(3, 1))  # the default silently takes the reference path
    for a, b in zip(ref, out):
        _assert_same_bits(a, b)
    with pytest.raises(RuntimeError, match="unavailable"):
        apply_masks_(out, *args, prefix=masks.step_prefix(3, 1), impl="fused")
    with pytest.raises(RuntimeError, match="unavailable"):
        testing.keep_bits(10, (1, 2), 1 << 31)


@needs_cc
def test_generic_loops_match_reference(rebuild, monkeypatch):
    # on x86-64 the hot loops run as an AVX2 clone; -DDG_NO_CLONES builds the generic (SSE2) code
    # alone, which machines without AVX2 run: it must give the same bits
    monkeypatch.setenv("CC", os.environ.get("CC", "cc") + " -DDG_NO_CLONES")
    assert cpu.available(), cpu.unavailable_reason()
    assert "-DDG_NO_CLONES" in cpu.build_info()["compiler"]
    for dtype in FLOATS:
        grads, offs = [], []
        for off in (0, 33, 65_536 - 40, TWO32 - 70):
            for n in (1, 33, 200, 70_001):
                grads.append(_grad(n, dtype, seed=len(grads)))
                offs.append(off)
        k = len(grads)
        ref, fused = _both(grads, [masks.keep_threshold(0.3)] * k, [_scale(0.3)] * k, offs, masks.step_prefix(8, 1))
        for a, b in zip(ref, fused):
            _assert_same_bits_f16_nan_aside(a, b)
    words = testing.derive_key_words(masks.step_prefix(5, 6), [0, 9, -1], 2)
    assert words == [k0 | (k1 << 32) for k0, k1 in (masks.derive_key(5, 6, i, 2) for i in (0, 9, -1))]


@needs_cc
def test_build_is_cached_and_thread_safe(rebuild, monkeypatch):
    libs = []
    workers = [threading.Thread(target=lambda: libs.append(cpu.load_library())) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(libs) == 4 and libs[0] is not None and all(lib is libs[0] for lib in libs)
    info = cpu.build_info()
    assert info["built"] and info["seconds"] < 60 and info["cache_dir_refused"] is None
    assert stat.S_IMODE(os.lstat(rebuild).st_mode) == 0o700  # the cache directory was created private
    files = list(rebuild.iterdir())
    assert [f.suffix for f in files] == [".so"], files  # no temporary file left behind
    assert Path(info["path"]) == files[0]

    # a second process (simulated: forget the handle) loads the cached file without compiling
    cpu.reset()
    assert cpu.available() and not cpu.build_info()["built"]

    # a corrupt cached file is replaced, not trusted (in a directory this process has not
    # loaded from: dlopen would hand back the already loaded library for a known path)
    other = rebuild.parent / "other"
    other.mkdir(mode=0o700)
    (other / files[0].name).write_bytes(b"not a shared library")
    monkeypatch.setenv("DROPGRAD_CACHE_DIR", str(other))
    cpu.reset()
    assert cpu.available(), cpu.unavailable_reason()
    assert cpu.build_info()["built"]
    assert (other / files[0].name).stat().st_size > 1000


@needs_fused
def test_works_inside_torch_compile():
    # the dispatcher is excluded from tracing and must still run eagerly, with the kernels' bits
    def step(gs):
        gs = [g * 1.0 for g in gs]
        apply_masks_(gs, [0, 1], [masks.keep_threshold(0.5)] * 2, [2.0] * 2, prefix=masks.step_prefix(0, 4))
        return [g + 0.0 for g in gs]

    _wait_ready()
    gs = [_grad(1000, torch.float32), _grad(77, torch.float32, seed=1)]
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager")
    expect = [g.clone() for g in gs]
    reference.mask_(expect, [0, 1], [masks.keep_threshold(0.5)] * 2, [2.0] * 2, [0, 0], masks.step_prefix(0, 4), 0)
    for a, b, c in zip(compiled(gs), step(gs), expect):
        _assert_same_bits(a, b)
        _assert_same_bits(a, c + 0.0)  # (+ 0.0 as in step: -0.0 becomes 0.0)


# ------------------------------------------------- the build off the critical path, and its cache


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5))


def _train(model, opt, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 20, generator=gen)).square().mean().backward()
        opt.step()


def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        _assert_same_bits(p.detach(), q.detach())
        _assert_same_bits(p.grad, q.grad)


def _gated_compiler(monkeypatch, tmp_path: Path) -> tuple[Path, Path]:
    """CC = a script that marks that it started, then waits for a gate file before running the real compiler."""
    gate, started = tmp_path / "gate", tmp_path / "started"
    script = tmp_path / "gated-cc"
    script.write_text(
        "#!/bin/sh\n"
        f': > "{started}"\n'
        "n=0\n"
        f'while [ ! -e "{gate}" ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done\n'
        f'exec {os.environ.get("CC", "cc")} "$@"\n'
    )
    script.chmod(0o700)
    monkeypatch.setenv("CC", str(script))
    return gate, started


@needs_cc
def test_construction_starts_the_build_in_the_background(rebuild, monkeypatch, tmp_path):
    # DropGrad() on a CPU model starts the build; a step before it is done takes the reference kernel
    # (the same bits as impl="reference") without waiting; once built, steps take the C kernel
    gate, started = _gated_compiler(monkeypatch, tmp_path)
    calls = _spy(monkeypatch)
    model, twin = _model(), _model()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.3, seed=5)
    _wait_for(started.exists, 60, "constructing DropGrad did not start the compiler")  # no step, no ready() call
    ref_opt = DropGrad(torch.optim.SGD(twin.parameters(), lr=0.1), drop_rate=0.3, seed=5, impl="reference")
    _train(model, opt, 2)
    _train(twin, ref_opt, 2)
    # the build is still held at the gate: the steps did not wait for it (had they, the gate's 60 s
    # timeout would have let the compiler run and the C kernel would have served them)
    assert not cpu.ready()
    assert calls == []
    _assert_same_model(model, twin)
    gate.touch()
    _wait_for(cpu.ready, 120, "the background build did not finish")
    assert cpu.build_info()["built"] and Path(cpu.build_info()["path"]).parent == rebuild
    _train(model, opt, 1, seed=1)
    _train(twin, ref_opt, 1, seed=1)
    assert len(calls) == 1  # now the C kernel, with the same bits
    _assert_same_model(model, twin)


_CONCURRENT_WORKER = r"""
import hashlib, os, sys, time
import torch
from dropgrad import masks
from dropgrad.functional import apply_masks_
from dropgrad.kernels import cpu, reference
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
grads = [torch.randn(n, generator=gen) for n in (70_001, 300, 5)]
n = len(grads)
thr = [masks.keep_threshold(0.3)] * n
sc = [masks.survivor_scale(thr[0])] * n
prefix = masks.step_prefix(1, 2)
ref = [g.clone() for g in grads]
reference.mask_(ref, range(n), thr, sc, [0] * n, prefix, 0)
open(sys.argv[1] + ".ready", "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:  # start the builds together
    time.sleep(0.01)
ok = cpu.available()
apply_masks_(grads, range(n), thr, sc, prefix=prefix, impl="fused" if ok else None)
same = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(ref, grads))
digest = hashlib.sha256(b"".join(g.view(torch.int32).numpy().tobytes() for g in grads)).hexdigest()
print(ok, same, digest)
print(cpu.unavailable_reason(), file=sys.stderr)
"""


@needs_cc
def test_four_processes_build_into_an_empty_cache_at_once(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = dict(os.environ, DROPGRAD_CACHE_DIR=str(cache), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("DROPGRAD_DISABLE_FUSED", None)
    procs = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT_WORKER, str(tmp_path / f"w{i}"), str(go)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    try:
        _wait_for(lambda: all((tmp_path / f"w{i}.ready").exists() or procs[i].poll() is not None for i in range(4)),
                  240, "the workers did not start")
        go.touch()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    lines = [out.split() for out, _ in results]
    assert all(line[1] == "True" for line in lines), lines  # every process: the reference's bits
    assert len({line[2] for line in lines}) == 1, lines  # identical masks
    assert len({line[0] for line in lines}) == 1, lines  # all got the kernel, or all fell back
    assert lines[0][0] == "True", [err for _, err in results]  # a compiler exists: all got it
    names = sorted(f.name for f in cache.iterdir())
    assert names and all(name.endswith(".so") and ".tmp" not in name for name in names), names


def _fake_foreign_owner(monkeypatch, path: Path) -> None:
    real = os.lstat

    def lstat(p, *args, **kwargs):
        st = real(p, *args, **kwargs)
        if os.fspath(p) == os.fspath(path):
            fields = list(st[:10])
            fields[4] = st.st_uid + 1  # st_uid: another user's directory
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(os, "lstat", lstat)


def _refuse_chmod(monkeypatch, path: Path) -> None:
    real = os.chmod

    def chmod(p, *args, **kwargs):
        if os.fspath(p) == os.fspath(path):
            raise PermissionError(1, "Operation not permitted")
        return real(p, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", chmod)


def _assert_private_process_dir(configured: Path) -> Path:
    """The build went to a fresh mkdtemp directory (mode 0700, ours), never the configured or a predictable one."""
    info = cpu.build_info()
    where = Path(info["path"]).parent
    assert where.resolve() != configured.resolve()
    if hasattr(os, "getuid"):
        assert where != Path(tempfile.gettempdir()) / f"dropgrad-{os.getuid()}"
        assert os.lstat(where).st_uid == os.getuid()
    assert where.parent == Path(tempfile.gettempdir()) and where.name.startswith("dropgrad-") and len(where.name) > 12
    assert stat.S_IMODE(os.lstat(where).st_mode) == 0o700
    return where


@needs_fused
@pytest.mark.parametrize(
    ("case", "why"),
    [("symlink", "symbolic link"), ("foreign owner", "owned by uid"), ("loose, chmod refused", "writable by group or others")],
)
def test_an_unsafe_cache_dir_is_never_loaded_from(rebuild, monkeypatch, tmp_path, case, why):
    # a planted text file under the kernel's cache name would fail loudly if loaded (an OSError, and then
    # it would be replaced): it must stay as it is, and the build go to a private directory of this process
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    planted = real / KERNEL_NAME
    planted.write_text("not a library: loading this is a bug")
    configured = real
    if case == "symlink":
        configured = tmp_path / "link"
        configured.symlink_to(real, target_is_directory=True)
    elif case == "foreign owner":
        _fake_foreign_owner(monkeypatch, real)
    else:
        os.chmod(real, 0o777)
        _refuse_chmod(monkeypatch, real)
    monkeypatch.setenv("DROPGRAD_CACHE_DIR", str(configured))
    cpu.reset()
    assert cpu.available(), cpu.unavailable_reason()
    where = _assert_private_process_dir(configured)
    assert why in cpu.build_info()["cache_dir_refused"]
    assert str(configured) in cpu.build_info()["cache_dir_refused"]
    assert planted.read_text() == "not a library: loading this is a bug"
    assert cpu.cache_dir() == (where, cpu.build_info()["cache_dir_refused"])
    ref, fused = _both([_grad(5000, torch.float32)], [1 << 31], [2.0], [0], prefix=3)
    _assert_same_bits(ref[0], fused[0])


@needs_fused
def test_a_loose_cache_dir_of_ours_is_tightened(rebuild, monkeypatch, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    monkeypatch.setenv("DROPGRAD_CACHE_DIR", str(loose))
    cpu.reset()
    assert cpu.available(), cpu.unavailable_reason()
    assert stat.S_IMODE(os.lstat(loose).st_mode) == 0o700
    assert Path(cpu.build_info()["path"]).parent == loose and cpu.build_info()["cache_dir_refused"] is None


def _plant(directory: Path, how: str) -> Path:
    planted = directory / KERNEL_NAME
    if how == "symlink":
        target = directory.parent / "elsewhere.txt"
        target.write_text("not a library: loading this is a bug")
        planted.symlink_to(target)
    else:
        planted.write_text("not a library: loading this is a bug")
        os.chmod(planted, 0o664 if how == "group-writable" else 0o646)
    return planted


@needs_fused
@pytest.mark.parametrize("how", ["group-writable", "world-writable", "symlink"])
def test_a_planted_library_is_never_loaded(rebuild, monkeypatch, tmp_path, how):
    cache = tmp_path / "private"
    cache.mkdir(mode=0o700)
    planted = _plant(cache, how)
    monkeypatch.setenv("DROPGRAD_CACHE_DIR", str(cache))
    cpu.reset()
    assert cpu.available(), cpu.unavailable_reason()
    assert Path(cpu.build_info()["path"]) != planted
    assert planted.is_symlink() == (how == "symlink")
    assert planted.read_text() == "not a library: loading this is a bug"  # never loaded, never replaced
    ref, fused = _both([_grad(5000, torch.float32)], [1 << 31], [2.0], [0], prefix=3)
    _assert_same_bits(ref[0], fused[0])


@needs_fused
@pytest.mark.parametrize("how", ["group-writable", "symlink"])
def test_a_planted_library_sends_the_build_to_a_private_dir(rebuild, monkeypatch, tmp_path, how):
    cache = tmp_path / "private"
    cache.mkdir(mode=0o700)
    _plant(cache, how)
    monkeypatch.setenv("DROPGRAD_CACHE_DIR", str(cache))
    cpu.reset()
    assert cpu.available(), cpu.unavailable_reason()
    info = cpu.build_info()
    assert info["openmp"]  # the same kernel as without the planted file
    assert info["cache_dir_refused"] and KERNEL_NAME in info["cache_dir_refused"]
    _assert_private_process_dir(cache)


def test_a_failing_compiler_warns_once_per_process_and_changes_no_result(rebuild, monkeypatch):
    monkeypatch.setenv("CC", "/bin/false")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in (0, 1):
            model, twin = _model(), _model()
            opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.4, seed=seed)
            ref_opt = DropGrad(torch.optim.SGD(twin.parameters(), lr=0.1), drop_rate=0.4, seed=seed, impl="reference")
            _train(model, opt, 2)
            _train(twin, ref_opt, 2)
            _assert_same_model(model, twin)
            _join_builds()  # a warning from the background build lands inside this block
        assert not cpu.available()
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "dropgrad" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    text = str(ours[0].message)
    assert "/bin/false" in text and "exited with" in text  # why
    assert "install a C compiler" in text and "DROPGRAD_DISABLE_FUSED=1" in text  # how to fix it or silence it


def test_only_cpu_parameters_start_the_build(monkeypatch):
    # a CUDA-only model never builds the C kernel; without a GPU: meta-device and empty parameter lists
    calls = []
    monkeypatch.setattr(cpu, "start_build", lambda: calls.append("start"))
    DropGrad(torch.optim.SGD(torch.nn.Linear(4, 4, device="meta").parameters(), lr=0.1), drop_rate=0.5)
    opt = DropGrad(torch.optim.SGD([{"params": []}], lr=0.1), drop_rate=0.5)
    assert calls == []
    opt.add_param_group({"params": [torch.zeros(3, device="meta", requires_grad=True)]})
    assert calls == []
    opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)]})  # a CPU parameter joins
    assert calls == ["start"]
    DropGrad(torch.optim.SGD(torch.nn.Linear(4, 4).parameters(), lr=0.1), drop_rate=0.5)
    assert calls == ["start", "start"]


def test_a_step_with_nothing_on_the_cpu_does_not_build(rebuild):
    model = torch.nn.Linear(4, 4, bias=False, device="meta")  # one tensor: meta tensors all have data_ptr 0
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=0)
    model.weight.grad = torch.ones_like(model.weight)
    opt.step()
    apply_masks_([torch.empty(10, device="meta")], [0], [1 << 31], [2.0], prefix=0)
    _join_builds()
    assert not rebuild.exists() or list(rebuild.iterdir()) == []


# ------------------------------------------------------------- resolution


def test_threshold_resolution_is_2_to_the_minus_32():
    assert masks.MASK_RESOLUTION_BITS == 32
    for p in [0.0, 1e-9, 0.05, 0.1, 1 / 3, 0.5, 0.9, 1 - 1e-9, 1.0]:
        thr = masks.keep_threshold(p)
        assert 0 <= thr <= TWO32
        assert abs(thr / TWO32 - (1 - p)) <= 2.0**-33  # exact to half a step of 2**-32
    assert masks.keep_threshold(1 - 2.0**-32) == 1  # the smallest non-zero keep probability
    assert masks.keep_threshold(2.0**-32) == TWO32 - 1


@needs_fused
def test_keep_probability_is_exact_over_a_full_block():
    # For a fixed high word the hash is a bijection of the low word (xor, fmix32 and
    # xor again are invertible), so an aligned block of 2**32 elements keeps exactly
    # `threshold` elements: the keep probability is threshold / 2**32, no more, no less.
    thresholds = [masks.keep_threshold(0.1), masks.keep_threshold(1 / 3), 123_456_789, 1]
    assert testing.count_kept(TWO32, masks.derive_key(3, 4, 5), thresholds, offset=7 * TWO32) == thresholds


# ------------------------------------------------------------- statistics


def _bits_of(n, seed=0, step=0, index=0, p=0.5, offset=0):
    return masks.keep_mask(n, masks.derive_key(seed, step, index), masks.keep_threshold(p), offset).to(torch.float64)


def _assert_fraction(bits: torch.Tensor, q: float, what: str) -> None:
    n = bits.numel()
    z = (bits.sum().item() - n * q) / math.sqrt(n * q * (1 - q))
    assert abs(z) < SIGMA, f"{what}: kept fraction {bits.mean().item():.6f} vs {q} is {z:.1f} sigma off"


def _assert_uncorrelated(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # Pearson correlation of independent bits is ~ N(0, 1/n)
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    z = r * math.sqrt(a.numel())
    assert abs(z) < SIGMA, f"{what}: correlation {r:.2e} is {z:.1f} sigma from 0"


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_fraction_kept(p):
    n = 1 << 20
    for seed, step, index, offset in [(0, 0, 0, 0), (1, 5, 3, 0), (2**63, 10**6, 160, 0), (4, 2, 1, 3 * TWO32 - n // 2)]:
        _assert_fraction(_bits_of(n, seed, step, index, p, offset), 1 - p, f"seed={seed} step={step} index={index} offset={offset}")
    # the fraction summed over many short tensors (small-count keys) is right too
    short = torch.cat([_bits_of(256, 9, 0, j, p) for j in range(1024)])
    _assert_fraction(short, 1 - p, "1024 tensors of 256")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_neighbouring_elements_are_independent(p):
    n = 1 << 20
    bits = _bits_of(n + (1 << 16), seed=3, step=1, p=p)
    for lag in [1, 2, 3, 4, 8, 16, 32, 1 << 8, 1 << 12, 1 << 16]:
        _assert_uncorrelated(bits[:n], bits[lag : lag + n], f"lag {lag}")
        both = (bits[:n] * bits[lag : lag + n]).sum().item()  # pair agreement: P(keep, keep) = (1-p)^2
        q = (1 - p) ** 2
        z = (both - n * q) / math.sqrt(n * q * (1 - q))
        assert abs(z) < SIGMA, f"lag {lag}: P(both kept) is {z:.1f} sigma off"
    # runs of 8 (one vector): the number of kept elements per block is Binomial(8, 1-p)
    per_block = bits[:n].view(-1, 8).sum(1)
    counts = torch.bincount(per_block.long(), minlength=9).double()
    expected = torch.tensor([math.comb(8, k) * (1 - p) ** k * p ** (8 - k) for k in range(9)], dtype=torch.float64) * (n // 8)
    ok = expected > 50
    chi2 = (((counts - expected) ** 2 / expected)[ok]).sum().item()
    dof = int(ok.sum()) - 1
    assert (chi2 - dof) / math.sqrt(2 * dof) < SIGMA, f"blocks of 8: chi2 {chi2:.1f} with {dof} dof"


def test_masks_are_independent_across_steps_indices_seeds_and_high_words():
    n = 1 << 19
    base = _bits_of(n, seed=10, step=100, index=4)
    _assert_uncorrelated(base, _bits_of(n, seed=10, step=101, index=4), "consecutive steps")
    _assert_uncorrelated(base, _bits_of(n, seed=10, step=100, index=5), "neighbouring tensors")
    _assert_uncorrelated(base, _bits_of(n, seed=11, step=100, index=4), "neighbouring seeds")
    _assert_uncorrelated(base, _bits_of(n, seed=10, step=100, index=4, offset=TWO32), "offsets 2**32 apart")
    swapped = masks.keep_mask(n, masks.derive_key(10, 4, 100), masks.keep_threshold(0.5)).double()
    _assert_uncorrelated(base, swapped, "step and index swapped")
    # one element followed over 4096 steps is a fair coin sequence with no lag-1 memory
    over_steps = torch.tensor([float(masks.hash32(masks.derive_key(10, s, 4), 12345) < TWO32 // 2) for s in range(4097)])
    _assert_fraction(over_steps, 0.5, "one element over steps")
    _assert_uncorrelated(over_steps[:-1], over_steps[1:], "one element, consecutive steps")


def test_hash_bits_are_balanced():
    # each of the 32 hash bits is a fair coin over consecutive indices (a weak bit would bias
    # the keep decision for thresholds that are not powers of two)
    h = masks.hash_tensor(1 << 18, masks.derive_key(0, 0, 0), offset=TWO32 - (1 << 17))
    bits = torch.stack([((h >> b) & 1) for b in range(32)]).double()
    n = h.numel()
    z = (bits.sum(1) - n / 2) / math.sqrt(n / 4)
    assert z.abs().max().item() < SIGMA, f"bit {int(z.abs().argmax())} is {z.abs().max().item():.1f} sigma off"


def test_dispatcher_refuses_non_integer_thresholds():
    g = torch.randn(10)
    with pytest.raises(TypeError, match=r"thresholds must be ints in \[0, 2\*\*32\].*got 2147483648.0 of type float"):
        apply_masks_([g], [0], [float(1 << 31)], [2.0], prefix=1)
