"""The mask definition itself: scalar and tensor forms agree, chunking changes nothing,
and the definition is pinned so that a seed means the same masks in every release."""

import pytest
import torch

from dropgrad import masks
from dropgrad.kernels import reference

M32 = 0xFFFFFFFF


def test_tensor_hash_equals_scalar_hash_including_high_words():
    key = masks.derive_key(42, 7, 3)
    for offset in [0, 12345, 2**32 - 3, 5 * 2**32 + 11]:
        got = masks.hash_tensor(6, key, offset).tolist()
        want = [masks.hash32(key, offset + i) for i in range(6)]
        assert got == want


def test_hash32_follows_the_documented_formula():
    # h = fmix32(fmix32(lo32(i) ^ k0) ^ ((hi32(i) + k1) mod 2^32)), fmix32 = murmur3's finalizer
    def fmix32(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & M32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & M32
        return h ^ (h >> 16)

    k0, k1 = masks.derive_key(9, 8, 7, 6)
    for i in [0, 1, 99, 2**32 + 17]:
        assert masks.hash32((k0, k1), i) == fmix32(fmix32((i & M32) ^ k0) ^ (((i >> 32) + k1) & M32))


def test_prefix_split_equals_derive_key():
    for seed, step, index, stream in [(0, 0, 0, 0), (2**64 - 1, 10**9, 160, 2), (-5, 3, 1, masks.FULL_UPDATE_STREAM)]:
        assert masks.key_from_prefix(masks.step_prefix(seed, step), index, stream) == masks.derive_key(
            seed, step, index, stream
        )


def test_definition_is_pinned():
    # Golden values: changing the key derivation or the hash changes every user's masks
    # for a given seed, breaking resumes from older checkpoints and published runs.
    # If this fails, the change needs a new checkpoint format, not a new golden value.
    assert masks.derive_key(0, 0, 0) == (2865234536, 556823690)
    assert masks.derive_key(2**64 - 1, 123456789, 7, 3) == (1692760697, 831254474)
    key = masks.derive_key(42, 7, 3)
    assert [masks.hash32(key, i) for i in (0, 1, 2**32 + 5)] == [2171735126, 2150089143, 3512955254]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_kernel_chunks_give_the_same_bits(dtype):
    n = 2 * reference.CHUNK + 12345
    g = torch.randn(n).to(dtype)
    key, thr, scale, off = masks.derive_key(3, 1, 4), masks.keep_threshold(0.3), 1 / 0.7, 2**32 - 1000
    chunked = g.clone()
    reference.mask_([chunked], [4], [thr], [scale], [off], masks.step_prefix(3, 1), 0)
    whole = g * (masks.keep_mask(n, key, thr, off).to(torch.float32) * scale)
    assert torch.equal(chunked, whole.to(dtype))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "strided"])
def test_reference_kernel_masks_non_contiguous_gradients_in_bounded_chunks(layout, monkeypatch):
    # the logical (row-major) element order defines the mask, whatever the memory layout;
    # a small CHUNK forces the chunked path, whose bits must equal masking a contiguous copy
    monkeypatch.setattr(reference, "CHUNK", 64)
    base = torch.randn(6, 5, 7, 9)
    view = {
        "transposed": base.transpose(0, 3),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "strided": base[:, ::2, :, ::3],
    }[layout]
    thr, prefix = masks.keep_threshold(0.4), masks.step_prefix(5, 2)
    got = torch.empty_strided(view.shape, view.stride()).copy_(view)  # the same non-contiguous layout
    assert not got.is_contiguous() and got.numel() > 64
    want = view.contiguous()
    reference.mask_([got], [3], [thr], [1 / 0.6], [17], prefix, 0)
    reference.mask_([want], [3], [thr], [1 / 0.6], [17], prefix, 0)
    assert torch.equal(got.contiguous(), want)


def test_survivor_scale_is_the_inverse_keep_probability():
    for p in [0.0, 0.1, 0.5, 0.9, 1 - 1e-9, 1.0]:
        thr = masks.keep_threshold(p)
        scale = masks.survivor_scale(thr)
        assert (thr / 2**32) * scale == pytest.approx(1.0 if thr else 0.0, rel=1e-15)
    assert masks.survivor_scale(masks.keep_threshold(0.3), rescale=False) == 1.0


def test_reference_kernel_never_hashes_more_than_a_chunk_at_once(monkeypatch):
    # bounded extra memory for any layout: every keep mask the kernel draws has at most CHUNK
    # elements (its int64 temporaries are ~40 bytes an element), also for transposed gradients
    monkeypatch.setattr(reference, "CHUNK", 100)
    sizes = []
    real = masks.keep_mask

    def spy(numel, *args, **kwargs):
        sizes.append(numel)
        return real(numel, *args, **kwargs)

    monkeypatch.setattr(masks, "keep_mask", spy)
    for g in (torch.randn(40, 70).t(), torch.randn(3, 50, 9).permute(2, 0, 1), torch.randn(5000)[::3]):
        want = g.contiguous()
        reference.mask_([want], [0], [masks.keep_threshold(0.5)], [2.0], [0], 7, 0)
        sizes.clear()
        got = torch.empty_strided(g.shape, g.stride()).copy_(g) if g.dim() > 1 else g.clone()[::1]
        reference.mask_([got], [0], [masks.keep_threshold(0.5)], [2.0], [0], 7, 0)
        assert sizes and max(sizes) <= 100 and sum(sizes) == g.numel()
        assert torch.equal(got.contiguous(), want)


def test_the_same_tensor_twice_is_refused():
    from dropgrad import drop_grad_

    g = torch.ones(10)
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[1\] are the same memory"):
        drop_grad_([g, g], 0.5, seed=0)
    assert torch.equal(g, torch.ones(10))  # nothing was masked
