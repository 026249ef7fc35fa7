"""Statistical properties of the masks, with tolerances stated in standard deviations.

All draws use fixed seeds, so these tests are deterministic; the tolerances say
how unlikely a failure would be for a correct Bernoulli(1 - p) mask.
"""

import math

import pytest
import torch

from dropgrad import DropGrad, drop_grad_, masks

SIGMA = 6.0  # a correct mask fails one of these checks with probability < 1e-8
N = 1_000_000


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_fraction_of_zeros_matches_p(p):
    g = torch.ones(N)
    drop_grad_(g, p, seed=123)
    zeros = (g == 0).sum().item()
    std = math.sqrt(N * p * (1 - p))
    assert abs(zeros - N * p) < SIGMA * std, (zeros, N * p, std)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_survivors_are_exactly_rescaled(p):
    g = torch.randn(10_000, dtype=torch.float64)
    out = g.clone()
    drop_grad_(out, p, seed=7)
    kept = out != 0
    # survivors are scaled by the inverse of the realised keep probability, 2**32 / threshold,
    # which is 1/(1-p) up to the threshold's rounding (relative 2**-32 at most)
    scale = masks.survivor_scale(masks.keep_threshold(p))
    assert abs(scale * (1 - p) - 1) < 2**-31 / (1 - p)
    torch.testing.assert_close(out[kept], g[kept] * scale, rtol=1e-15, atol=0)
    g32 = torch.randn(10_000)
    out32 = g32.clone()
    drop_grad_(out32, p, seed=7)
    kept = out32 != 0
    assert torch.equal(out32[kept], g32[kept] * scale)


@pytest.mark.parametrize("p", [0.1, 1 - 1e-9, 1 - 3.5e-10, 1 - 2**-32])
def test_exactly_unbiased_for_every_p_with_a_nonzero_threshold(p):
    # Over an aligned block of 2**32 elements exactly `threshold` are kept (the hash is a
    # bijection of the low word), so the mean of a masked all-ones gradient over the block
    # is threshold * scale / 2**32: it must be 1 to float rounding, also where 1/(1-p) is
    # far from 2**32/threshold (p = 1-1e-9: threshold 4, 1/(1-p) would give a mean of 0.93).
    testing = pytest.importorskip("dropgrad.testing")
    thr = masks.keep_threshold(p)
    assert thr > 0
    try:
        kept = testing.count_kept(2**32, masks.derive_key(1, 2, 3), [thr], offset=2**32)[0]
    except RuntimeError as exc:
        pytest.skip(str(exc))
    assert kept == thr
    assert kept * masks.survivor_scale(thr) / 2**32 == pytest.approx(1.0, rel=1e-15)


@pytest.mark.parametrize("p", [0.3, 0.9, 0.999])
def test_mean_of_masked_gradient_is_the_gradient(p):
    # statistical: the mean over N elements of a masked all-ones gradient is 1 within 6 sigma
    g = torch.ones(N, dtype=torch.float64)
    drop_grad_(g, p, seed=11)
    std = math.sqrt(p / (1 - p) / N)  # std of the mean of N iid (Bernoulli(1-p) / (1-p)) values
    assert abs(g.mean().item() - 1.0) < SIGMA * std


def test_rates_whose_threshold_rounds_to_zero_are_refused():
    # 1 - 1e-12 keeps nothing (threshold 0) while 1/(1-p) = 1e12: refused, not silently all-dropped
    with pytest.raises(ValueError, match=r"drop_rate=0.999999999999 is so close to 1 that no element would be kept"):
        drop_grad_(torch.ones(4), 1 - 1e-12, seed=0)
    with pytest.raises(ValueError, match="so close to 1"):
        DropGrad(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), drop_rate=1 - 1e-12)
    g = torch.ones(4)
    drop_grad_(g, 1.0, seed=0)  # exactly 1 still drops everything
    assert torch.equal(g, torch.zeros(4))


def test_masked_gradient_is_unbiased():
    # mean over T independent draws of g*m/(1-p) -> g; per element the variance of
    # one draw is g^2 p/(1-p), so the mean of T draws has std |g| sqrt(p/((1-p)T)).
    p, T = 0.3, 400
    g = torch.linspace(-2.0, 2.0, 2000, dtype=torch.float64)
    acc = torch.zeros_like(g)
    for step in range(T):
        x = g.clone()
        drop_grad_(x, p, seed=99, step=step)
        acc += x
    mean = acc / T
    std = g.abs() * math.sqrt(p / ((1 - p) * T))
    z = ((mean - g) / std.clamp_min(1e-12))[g.abs() > 1e-6]
    assert z.abs().max() < SIGMA
    # and the z-scores look standard normal as a whole (mean ~ 0, var ~ 1)
    assert abs(z.mean().item()) < SIGMA / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 0.15


def _agreement_z(a: torch.Tensor, b: torch.Tensor, p: float) -> float:
    """z-score of how often two supposedly independent masks agree on an element."""
    n = a.numel()
    q = 1 - p
    expected = q * q + p * p
    observed = (a == b).float().mean().item()
    return (observed - expected) / math.sqrt(expected * (1 - expected) / n)


def test_masks_independent_across_steps_and_parameters():
    p = 0.5
    key = lambda step, idx: masks.derive_key(2024, step, idx)  # noqa: E731
    thr = masks.keep_threshold(p)
    m00 = masks.keep_mask(N, key(0, 0), thr)
    m10 = masks.keep_mask(N, key(1, 0), thr)
    m01 = masks.keep_mask(N, key(0, 1), thr)
    assert abs(_agreement_z(m00, m10, p)) < SIGMA
    assert abs(_agreement_z(m00, m01, p)) < SIGMA
    assert abs(_agreement_z(m10, m01, p)) < SIGMA
    # neighbouring elements of one mask are independent too
    assert abs(_agreement_z(m00[:-1], m00[1:], p)) < SIGMA


def test_wrapper_masks_differ_across_steps_and_params_with_expected_rate():
    p = 0.2
    a = torch.nn.Parameter(torch.zeros(200_000))
    b = torch.nn.Parameter(torch.zeros(200_000))
    seen = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.append((a.grad != 0).clone())
            seen.append((b.grad != 0).clone())
            return super().step(closure)

    opt = DropGrad(Spy([a, b], lr=0.0), drop_rate=p, seed=5)
    for _ in range(2):
        a.grad = torch.ones_like(a)
        b.grad = torch.ones_like(b)
        opt.step()
    n = a.numel()
    for kept in seen:
        dropped = n - kept.sum().item()
        assert abs(dropped - n * p) < SIGMA * math.sqrt(n * p * (1 - p))
    a0, b0, a1, _ = seen
    assert abs(_agreement_z(a0, b0, p)) < SIGMA  # across parameters
    assert abs(_agreement_z(a0, a1, p)) < SIGMA  # across steps


def test_keep_threshold_resolution():
    # the keep probability is exact to 2**-32: threshold / 2**32 == 1 - p up to rounding
    for p in [0.0, 1e-9, 0.1, 1 / 3, 0.5, 0.9, 1.0]:
        thr = masks.keep_threshold(p)
        assert 0 <= thr <= 2**32
        assert abs(thr / 2**32 - (1 - p)) <= 2**-33


def test_full_update_drop_frequency():
    q, steps = 0.3, 4000
    w = torch.nn.Parameter(torch.zeros(1))
    opt = DropGrad(torch.optim.SGD([w], lr=1.0), drop_rate=0.0, full_update_drop=q, seed=11)
    skipped = 0
    for _ in range(steps):
        w.grad = torch.ones(1)
        opt.step()
        skipped += opt.last_step_skipped
    std = math.sqrt(steps * q * (1 - q))
    assert abs(skipped - steps * q) < SIGMA * std
    assert w.item() == -(steps - skipped)  # each taken step moved w by exactly -lr*1
