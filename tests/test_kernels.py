"""The fused mask kernel against the reference, and the statistics of the masks.

Parity is bitwise (integer views of the results). Statistical bounds are
stated in standard deviations of the statistic under the null hypothesis
(independent Bernoulli(1 - p) bits) and use fixed seeds, so every run checks
the same numbers; with a 6-sigma bound a correct generator fails none of them
(about 1e-9 per check), while a broken counter, key or threshold does.
"""

from __future__ import annotations

import math
import os
import shutil
import threading

import pytest
import torch

from dropgrad import _kernels, masks
from dropgrad.functional import _single_tensor_drop_grad_, apply_masks_

TWO32 = 1 << 32
SIGMA = 6.0
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

needs_fused = pytest.mark.skipif(not _kernels.available(), reason=f"fused kernel unavailable: {_kernels.unavailable_reason()}")


def _scale(p: float, rescale: bool = True) -> float:
    if not rescale:
        return 1.0
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


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


def _both(grads, keys, thresholds, scales, offsets):
    ref = [g.clone() for g in grads]
    fused = [g.clone() for g in grads]
    _single_tensor_drop_grad_(ref, keys, thresholds, scales, offsets)
    _kernels.fused_drop_grad_(fused, keys, thresholds, scales, offsets, strict=True)
    return ref, fused


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


# ---------------------------------------------------------------- parity


def test_builds_when_a_compiler_exists():
    # otherwise every parity test below would silently skip
    if shutil.which("cc") is None or not _kernels._compiler():
        pytest.skip("no C compiler on this machine")
    if os.environ.get("DROPGRAD_DISABLE_FUSED", "") not in ("", "0"):
        pytest.skip("DROPGRAD_DISABLE_FUSED is set")
    assert _kernels.available(), _kernels.unavailable_reason()


@needs_fused
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.9, 1.0])
def test_parity_sizes_offsets(dtype, p):
    # sizes: empty, one, odd, one vector +- 1, and more than 2 threads x 64K-element chunks;
    # offsets: 0, a block that crosses 2**32 (hi32 changes inside), and one far above it
    sizes = [0, 1, 7, 9, 200_003]
    offsets = [0, TWO32 - 150_000, 5 * TWO32 + 3]
    grads, keys, offs = [], [], []
    for i, n in enumerate(sizes):
        for j, off in enumerate(offsets):
            grads.append(_grad(n, dtype, seed=i))
            keys.append(masks.derive_key(7, 3, len(keys)))
            offs.append(off)
    k = len(grads)
    ref, fused = _both(grads, keys, [masks.keep_threshold(p)] * k, [_scale(p)] * k, offs)
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
    grads, keys, offs = [], [], []
    for off in offsets:
        for n in lengths:
            grads.append(_grad(n, dtype, seed=len(grads)))
            keys.append(masks.derive_key(17, 5, len(keys)))
            offs.append(off)
    k = len(grads)
    args = (keys, [masks.keep_threshold(0.3)] * k, [_scale(0.3)] * k, offs)
    ref = [g.clone() for g in grads]
    _single_tensor_drop_grad_(ref, *args)
    for nthreads in (1, 2):
        threads(nthreads)
        fused = [g.clone() for g in grads]
        _kernels.fused_drop_grad_(fused, *args, strict=True)
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
        (masks.keep_threshold(0.3), 1.0),
        (TWO32, 1 / 0.9),
        (TWO32, -3.0),
        (TWO32, 1e-5),
        (0, 0.0),
    ]
    for thr, scale in cases:
        ref, fused = _both([every], [(12345, 678)], [thr], [scale], [0])
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
        ref, fused = _both([raw.view(dtype)], [(99, 1)], [thr], [scale], [0])
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
        (TWO32 + 5, 3.0),  # thresholds outside [0, 2**32] clamp as in keep_mask
        (-7, 2.0),
        (masks.keep_threshold(0.5), -2.0),  # negative scale: dropped elements become -0.0
    ],
)
def test_parity_scale_variants(threshold, scale):
    grads = [_grad(20_001, dt, seed=3) for dt in FLOATS]
    keys = [masks.derive_key(0, 0, j) for j in range(4)]
    ref, fused = _both(grads, keys, [threshold] * 4, [scale] * 4, [0] * 4)
    for a, b in zip(ref, fused):
        _assert_same_bits(a, b)


@needs_fused
def test_parity_shapes_and_many_tensors():
    # a ResNet-like list of 4-d, 2-d and 1-d tensors in one grouped call
    shapes = [(64, 3, 7, 7), (64,), (64,), (256, 64, 1, 1), (300, 512), (300,)] * 5 + [(3, 5)] * 40
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    n = len(grads)
    keys = [masks.derive_key(11, 2, j) for j in range(n)]
    thr = [masks.keep_threshold(p) for p in torch.linspace(0, 1, n).tolist()]
    scales = [_scale(p) for p in torch.linspace(0, 1, n).tolist()]
    ref, fused = _both(grads, keys, thr, scales, [0] * n)
    for a, b in zip(ref, fused):
        _assert_same_bits(a, b)


@needs_fused
def test_same_result_on_any_thread_count(threads):
    g = _grad(400_003, torch.float32)
    key, thr = masks.derive_key(5, 9, 1), masks.keep_threshold(0.3)
    results = []
    for n in (1, 2, 3):
        threads(n)
        out = g.clone()
        _kernels.fused_drop_grad_([out], [key], [thr], [1 / 0.7], [0], strict=True)
        results.append(out)
    for r in results[1:]:
        _assert_same_bits(results[0], r)


@needs_fused
def test_shards_compute_their_part_of_the_full_mask():
    # a parameter split in uneven shards (as FSDP/ZeRO would) masks each shard alone from its offset
    full = _grad(500_000, torch.float32)
    key, thr = masks.derive_key(1, 2, 3), masks.keep_threshold(0.25)
    whole = full.clone()
    _kernels.fused_drop_grad_([whole], [key], [thr], [4 / 3], [0], strict=True)
    bounds = [0, 1, 65_535, 65_537, 200_000, 499_999, 500_000]
    shards = [full[a:b].clone() for a, b in zip(bounds, bounds[1:])]
    _kernels.fused_drop_grad_(shards, [key] * len(shards), [thr] * len(shards), [4 / 3] * len(shards), bounds[:-1], strict=True)
    _assert_same_bits(whole, torch.cat(shards))


@needs_fused
@pytest.mark.parametrize("offset", [0, 12_345, TWO32 - 1000, 3 * TWO32, (1 << 62) + 17])
def test_c_keep_bits_match_definition(offset):
    key = masks.derive_key(2024, 1, 7)
    for p in (0.05, 0.5, 0.9):
        thr = masks.keep_threshold(p)
        assert torch.equal(_kernels.keep_bits(5000, key, thr, offset), masks.keep_mask(5000, key, thr, offset))
    # and the scalar definition, element by element
    mask = masks.keep_mask(64, key, masks.keep_threshold(0.5), offset)
    assert mask.tolist() == [masks.hash32(key, offset + i) < masks.keep_threshold(0.5) for i in range(64)]


@needs_fused
def test_c_derived_keys_match_derive_key():
    # the wrapper's path derives keys in C from (step prefix, index, stream); Python masks every counter
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
                words = _kernels.derive_key_words(prefix, counters, stream)
                for index, word in zip(counters, words):
                    k0, k1 = masks.derive_key(seed, step, index, stream)
                    assert word == k0 | (k1 << 32), (seed, step, index, stream)


def _plan_reference(plan, seed, step, stream, rescale):
    """What the wrapper's general path does with a plan: Python keys, the reference kernel."""
    prefix = masks.step_prefix(seed, step)
    for index, p, rate in plan:
        g = p.grad
        if g is None or rate == 0.0:
            continue
        if g.is_sparse:
            g = g._values()
        key = masks.key_from_prefix(prefix, index, stream)
        _single_tensor_drop_grad_([g], [key], [masks.keep_threshold(rate)], [_scale(rate, rescale)], [0])


@needs_fused
@pytest.mark.parametrize("rescale", [True, False])
def test_planned_kernel_matches_reference(threads, rescale):
    shapes = [(300, 7), (5,), (0,), (70_000,), (3, 3, 3), (1,), (200_001,)]
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    rates = [0.1, 0.0, 0.5, 1.0, 1e-12, 0.3, 0.9]

    def fresh(with_none):
        params = []
        for j, s in enumerate(shapes * 2):
            p = torch.zeros(s, dtype=dtypes[j % 4], requires_grad=True)
            if not (with_none and j % 5 == 2):
                p.grad = _grad(p.numel(), p.dtype, seed=j).view(s)
            params.append(p)
        return [(j, p, rates[j % len(rates)]) for j, p in enumerate(params)]

    for nthreads in (1, 2):
        threads(nthreads)
        for with_none in (False, True):
            for stream in (0, 2):
                plan, ref = fresh(with_none), fresh(with_none)
                versions = [None if p.grad is None else p.grad._version for _, p, _ in plan]
                left = _kernels.mask_planned_(plan, masks.step_prefix(9, 4), stream, rescale, strict=True)
                assert left == []
                _plan_reference(ref, 9, 4, stream, rescale)
                for (_, p, rate), (_, q, _), v in zip(plan, ref, versions):
                    if q.grad is None:
                        assert p.grad is None
                        continue
                    _assert_same_bits(p.grad, q.grad)
                    touched = p.numel() > 0 and not (masks.keep_threshold(rate) >= TWO32 and _scale(rate, rescale) == 1.0)
                    assert p.grad._version == v + touched


@needs_fused
def test_planned_kernel_returns_what_it_cannot_serve():
    base = torch.randn(40, 30)
    params = [torch.zeros(s, requires_grad=True) for s in [(30, 40), (100,), (100,), (5000,), (64,), (8,)]]
    params[0].grad = base.clone().t()  # non-contiguous
    params[1].grad = torch.randn(100, dtype=torch.float64).to(torch.float32)
    params[2].grad = torch.randn(100)._neg_view()  # a lazy negative view
    params[3].grad = torch.randn(5000)
    params[4].grad = torch.randn(64)._neg_view()  # unservable, but its rate is 0: nothing to do
    params[5].grad = None
    plan = [(j, p, 0.0 if j == 4 else 0.5) for j, p in enumerate(params)]
    before = [None if p.grad is None else p.grad.clone() for p in params]
    strict_left = _kernels.mask_planned_(plan, masks.step_prefix(1, 1), 0, True, strict=True)
    assert strict_left == plan  # strict: nothing written, everything back to the general path (which raises)
    assert all(torch.equal(p.grad, b) for p, b in zip(params[:5], before[:5]))
    left = _kernels.mask_planned_(plan, masks.step_prefix(1, 1), 0, True)
    assert [entry[0] for entry in left] == [0, 2]
    ref = [(j, torch.zeros_like(p, requires_grad=True), rate) for j, p, rate in plan]
    for (_, q, _), b in zip(ref, before):
        q.grad = None if b is None else b.clone()
    _plan_reference([ref[1], ref[3]], 1, 1, 0, True)
    _assert_same_bits(params[1].grad, ref[1][1].grad)
    _assert_same_bits(params[3].grad, ref[3][1].grad)
    assert torch.equal(params[0].grad, before[0]) and torch.equal(params[2].grad, before[2])
    assert torch.equal(params[4].grad, before[4])


@needs_fused
def test_plan_with_any_indices_and_empty():
    assert _kernels.mask_planned_([], 0, 0, True) == []
    params = [torch.zeros(1000, requires_grad=True) for _ in range(3)]
    for j, p in enumerate(params):
        p.grad = torch.randn(1000, generator=torch.Generator().manual_seed(j))
    ref = [(i, torch.zeros(1000, requires_grad=True), 0.4) for i in (5, 2**40, 1)]
    for (_, q, _), p in zip(ref, params):
        q.grad = p.grad.clone()
    plan = [(i, p, 0.4) for i, p in zip((5, 2**40, 1), params)]
    assert _kernels.mask_planned_(plan, masks.step_prefix(3, 3), 1, True) == []
    _plan_reference(ref, 3, 3, 1, True)
    for (_, p, _), (_, q, _) in zip(plan, ref):
        _assert_same_bits(p.grad, q.grad)


@needs_fused
def test_fused_fast_path_skips_what_the_reference_skips():
    # numel-0 tensors and (threshold 2**32, scale 1) entries are left alone, versions included
    grads = [torch.randn(100), torch.randn(0), torch.randn(50), torch.randn(70)]
    keys = [masks.derive_key(0, 0, j) for j in range(4)]
    thr = [masks.keep_threshold(0.5), masks.keep_threshold(0.5), TWO32, TWO32]
    scales = [2.0, 2.0, 1.0, 3.0]
    before = [g._version for g in grads]
    ref, fused = _both(grads, keys, thr, scales, [0] * 4)
    for a, b in zip(ref, fused):
        _assert_same_bits(a, b)
    _kernels.fused_drop_grad_(grads, keys, thr, scales, [0] * 4)
    assert [g._version - v for g, v in zip(grads, before)] == [1, 0, 0, 1]
    # thresholds out of range or as floats are clamped as the reference reads them
    g1, g2 = torch.randn(1000), torch.randn(1000)
    r1, r2 = g1.clone(), g2.clone()
    _kernels.fused_drop_grad_([g1, g2], keys[:2], [-5, float(TWO32 + 10)], [2.0, 2.0], [0, 0])
    _single_tensor_drop_grad_([r1, r2], keys[:2], [-5, float(TWO32 + 10)], [2.0, 2.0], [0, 0])
    _assert_same_bits(g1, r1)
    _assert_same_bits(g2, r2)


# ------------------------------------------------------- dispatch and fallback


@needs_fused
def test_unsupported_tensors_fall_back_per_tensor():
    base = torch.randn(40, 30)
    grads = [
        base.clone().t(),  # non-contiguous
        torch.randn(100, dtype=torch.complex64),
        torch.randn(100, requires_grad=True) * 1.0,  # non-leaf that records autograd
        torch.randn(5000),  # this one takes the fused path
    ]
    keys = [masks.derive_key(0, 0, j) for j in range(4)]
    args = ([masks.keep_threshold(0.5)] * 4, [2.0] * 4, [0] * 4)
    ref = [g.detach().clone().requires_grad_(g.requires_grad) * 1.0 if g.requires_grad else g.clone() for g in grads]
    fused = [g.detach().clone().requires_grad_(g.requires_grad) * 1.0 if g.requires_grad else g.clone() for g in grads]
    _single_tensor_drop_grad_(ref, keys, *args)
    _kernels.fused_drop_grad_(fused, keys, *args)
    for a, b in zip(ref, fused):
        assert torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))
    assert fused[2].grad_fn is not None  # the multiply was recorded, as in the reference

    for j, reason in [(0, "not contiguous"), (1, "complex64"), (2, "requiring grad")]:
        with pytest.raises(RuntimeError, match=rf"grads\[0\].*{reason}"):
            _kernels.fused_drop_grad_([grads[j].detach() if j != 2 else grads[j]], keys[:1], *(a[:1] for a in args), strict=True)


@needs_fused
def test_fused_kernel_bumps_version_counters():
    # autograd's in-place checks must see the write, as they see the reference's g.mul_
    grads = [torch.randn(1000), torch.randn(10)]
    before = [g._version for g in grads]
    _kernels.fused_drop_grad_(grads, [(1, 2), (3, 4)], [1 << 31] * 2, [2.0] * 2, [0, 0], strict=True)
    assert [g._version for g in grads] == [v + 1 for v in before]


@needs_fused
def test_dispatcher_uses_fused_kernel_and_matches_reference(monkeypatch):
    calls = []
    real = _kernels.fused_drop_grad_
    monkeypatch.setattr(_kernels, "fused_drop_grad_", lambda *a, **k: (calls.append(k), real(*a, **k)))
    g = _grad(10_001, torch.float32)
    keys, thr, sc = [masks.derive_key(1, 1, 0)], [masks.keep_threshold(0.2)], [1.25]
    fast, fused, ref = g.clone(), g.clone(), g.clone()
    apply_masks_([fast], keys, thr, sc)
    apply_masks_([fused], keys, thr, sc, impl="fused")
    apply_masks_([ref], keys, thr, sc, impl="reference")
    assert calls == [{"strict": False}, {"strict": True}]
    _assert_same_bits(fast, ref)
    _assert_same_bits(fused, ref)


@pytest.fixture
def rebuild(monkeypatch, tmp_path):
    """Forget the loaded kernel; build it afresh into an empty cache; restore afterwards."""
    monkeypatch.setenv("DROPGRAD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DROPGRAD_DISABLE_FUSED", raising=False)
    _kernels._reset_for_tests()
    yield tmp_path
    monkeypatch.undo()
    _kernels._reset_for_tests()


@pytest.mark.parametrize(("var", "value", "reason"), [("DROPGRAD_DISABLE_FUSED", "1", "DROPGRAD_DISABLE_FUSED"), ("CC", "false", "exited with"), ("CC", "/no/such/cc", "no C compiler")])
def test_without_a_compiler_results_are_identical(rebuild, monkeypatch, var, value, reason):
    monkeypatch.setenv(var, value)
    assert not _kernels.available()
    assert reason in _kernels.unavailable_reason()
    assert list(rebuild.glob("*.so")) == []
    grads = [_grad(20_001, dt, seed=5) for dt in FLOATS]
    keys = [masks.derive_key(3, 1, j) for j in range(4)]
    args = ([masks.keep_threshold(0.4)] * 4, [1 / 0.6] * 4, [0] * 4)
    ref = [g.clone() for g in grads]
    out = [g.clone() for g in grads]
    _single_tensor_drop_grad_(ref, keys, *args)
    apply_masks_(out, keys, *args)  # the default silently takes the reference path
    for a, b in zip(ref, out):
        _assert_same_bits(a, b)
    with pytest.raises(RuntimeError, match="unavailable"):
        apply_masks_(out, keys, *args, impl="fused")


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_generic_loops_match_reference(rebuild, monkeypatch):
    # on x86-64 the hot loops run as an AVX2 clone; -DDG_NO_CLONES builds the generic (SSE2) code
    # alone, which machines without AVX2 run: it must give the same bits
    monkeypatch.setenv("CC", os.environ.get("CC", "cc") + " -DDG_NO_CLONES")
    assert _kernels.available(), _kernels.unavailable_reason()
    for dtype in FLOATS:
        grads, keys, offs = [], [], []
        for off in (0, 33, 65_536 - 40, TWO32 - 70):
            for n in (1, 33, 200, 70_001):
                grads.append(_grad(n, dtype, seed=len(grads)))
                keys.append(masks.derive_key(8, 1, len(keys)))
                offs.append(off)
        k = len(grads)
        ref, fused = _both(grads, keys, [masks.keep_threshold(0.3)] * k, [_scale(0.3)] * k, offs)
        for a, b in zip(ref, fused):
            _assert_same_bits_f16_nan_aside(a, b)
    words = _kernels.derive_key_words(masks.step_prefix(5, 6), [0, 9, -1], 2)
    assert words == [k0 | (k1 << 32) for k0, k1 in (masks.derive_key(5, 6, i, 2) for i in (0, 9, -1))]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_build_is_cached_and_thread_safe(rebuild, monkeypatch):
    libs = []
    workers = [threading.Thread(target=lambda: libs.append(_kernels._library())) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(libs) == 4 and libs[0] is not None and all(lib is libs[0] for lib in libs)
    info = _kernels.build_info()
    assert info["built"] and info["seconds"] < 60
    files = list(rebuild.iterdir())
    assert [f.suffix for f in files] == [".so"], files  # no temporary file left behind

    # a second process (simulated: forget the handle) loads the cached file without compiling
    _kernels._reset_for_tests()
    assert _kernels.available() and not _kernels.build_info()["built"]

    # a corrupt cached file is replaced, not trusted (in a directory this process has not
    # loaded from: dlopen would hand back the already loaded library for a known path)
    other = rebuild / "other"
    other.mkdir()
    (other / files[0].name).write_bytes(b"not a shared library")
    monkeypatch.setenv("DROPGRAD_CACHE_DIR", str(other))
    _kernels._reset_for_tests()
    assert _kernels.available(), _kernels.unavailable_reason()
    assert _kernels.build_info()["built"]
    assert (other / files[0].name).stat().st_size > 1000


@needs_fused
def test_works_inside_torch_compile():
    # the fused call is excluded from tracing (a graph break) and must still run eagerly
    def step(gs):
        gs = [g * 1.0 for g in gs]
        apply_masks_(gs, [masks.derive_key(0, 4, j) for j in range(2)], [masks.keep_threshold(0.5)] * 2, [2.0] * 2)
        return [g + 0.0 for g in gs]

    gs = [_grad(1000, torch.float32), _grad(77, torch.float32, seed=1)]
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager")
    for a, b in zip(compiled(gs), step(gs)):
        _assert_same_bits(a, b)


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
    assert _kernels.count_kept(TWO32, masks.derive_key(3, 4, 5), thresholds, offset=7 * TWO32) == thresholds


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


@needs_fused
def test_planned_kernel_hands_back_a_plan_with_nothing_on_the_cpu():
    # gradients on another device (here the meta device; CUDA in practice) come back untouched, as a whole
    params = [torch.zeros(10, device="meta", requires_grad=True) for _ in range(3)]
    params[0].grad = torch.empty(10, device="meta")
    params[2].grad = torch.empty(10, device="meta")
    plan = [(j, p, 0.5) for j, p in enumerate(params)]
    assert _kernels.mask_planned_(plan, 0, 0, True) == plan
    assert _kernels.mask_planned_(plan, 0, 0, True, strict=True) == plan
