"""Numerical checks of every claim in docs/analysis.md (one test per claim, same order).

Statistical tolerances are stated in sigmas of the estimator; with the fixed
seeds below the tests are deterministic.
"""

from __future__ import annotations

import math

import torch

from dropgrad import DropGrad
from dropgrad.functional import drop_grad_

N = 200_000  # elements (or draws) per estimate


def _draws(g: torch.Tensor, p: float, n: int, rescale: bool = True) -> torch.Tensor:
    """``n`` independent masked copies of ``g`` (one per step counter), stacked."""
    out = g.repeat(n, 1).contiguous()
    drop_grad_(out, p, seed=123, step=0, rescale=rescale)  # one tensor: every element an independent draw
    return out


def test_claim1_rescaled_mask_is_unbiased():
    g = torch.tensor([1.5, -0.3, 2.0, 0.0], dtype=torch.float64)
    for p in (0.1, 0.5, 0.9):
        x = _draws(g, p, N)
        mean, sd = x.mean(0), x.std(0)
        # |mean - g| within 5 standard errors of the sample mean
        assert torch.all((mean - g).abs() <= 5 * sd / math.sqrt(N) + 1e-12), (p, mean, g)


def test_claim1_unscaled_mask_shrinks_by_one_minus_p():
    g = torch.tensor([1.0, -2.0], dtype=torch.float64)
    p = 0.3
    x = _draws(g, p, N, rescale=False)
    assert torch.allclose(x.mean(0), (1 - p) * g, atol=5 * 2.0 * math.sqrt(p * (1 - p) / N))


def test_claim2_variance_is_g2_p_over_1_minus_p():
    g = torch.tensor([1.0, -0.5, 3.0], dtype=torch.float64)
    for p in (0.1, 0.3, 0.5):
        var = _draws(g, p, N).var(0)
        expected = g**2 * p / (1 - p)
        # relative standard error of a sample variance of this two-point law is below 4/sqrt(N)
        assert torch.allclose(var, expected, rtol=20 / math.sqrt(N)), (p, var, expected)


def test_claim2_elements_are_independent():
    g = torch.ones(2, dtype=torch.float64)
    x = _draws(g, 0.3, N)
    corr = torch.corrcoef(x.T)[0, 1]
    assert abs(corr) < 5 / math.sqrt(N)


def test_claim3_dropout_biases_the_gradient_dropgrad_does_not():
    """Dropout changes the function whose gradient is taken; DropGrad only adds zero-mean noise to it."""
    torch.manual_seed(0)
    w1 = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(16, 4, dtype=torch.float64)

    def loss(drop: float = 0.0) -> torch.Tensor:
        h = torch.tanh(x @ w1.T)
        if drop:
            h = torch.nn.functional.dropout(h, drop, training=True)
        return ((h @ w2.T) ** 2).mean()

    clean = torch.autograd.grad(loss(), w2)[0]
    p, n = 0.5, 4000
    dropout_mean = sum(torch.autograd.grad(loss(p), w2)[0] for _ in range(n)) / n
    dg = clean.repeat(n, 1).contiguous()
    drop_grad_(dg, p, seed=5)
    dg_mean = dg.mean(0, keepdim=True)
    scale = clean.abs().max()
    assert (dg_mean - clean).abs().max() < 0.05 * scale  # unbiased up to sampling noise
    assert (dropout_mean - clean).abs().max() > 0.2 * scale  # a systematic shift, far beyond it


def test_claim3_dropout_zeros_structured_blocks_dropgrad_scattered_elements():
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 16)
    x = torch.nn.functional.dropout(torch.randn(1, 32), 0.5, training=True)  # dropout on the layer's input
    lin(x).sum().backward()
    zero_cols = (lin.weight.grad == 0).all(0)
    assert zero_cols.sum() > 0 and ((lin.weight.grad == 0).any(0) == zero_cols).all()  # whole columns
    g = torch.ones(16, 32)
    drop_grad_(g, 0.5, seed=2)
    assert not (g == 0).all(0).any()  # no full column is dropped ...
    assert 0.4 < (g == 0).float().mean() < 0.6  # ... yet about half the elements are


def test_claim4_matched_gaussian_noise_has_same_two_moments_but_flips_signs():
    g = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    p = 0.3
    gen = torch.Generator().manual_seed(0)
    gauss = g + torch.randn(N, 3, generator=gen, dtype=torch.float64) * g.abs() * math.sqrt(p / (1 - p))
    dg = _draws(g, p, N)
    assert torch.allclose(gauss.mean(0), dg.mean(0), atol=0.02)
    assert torch.allclose(gauss.var(0), dg.var(0), rtol=0.02, atol=1e-12)
    # DropGrad never reverses a component and leaves zero gradients at zero
    assert (dg[:, :2] * g[:2] >= 0).all() and (dg[:, 2] == 0).all()
    flipped = (gauss[:, 0] < 0).double().mean()
    expected = 0.5 * math.erfc(1 / math.sqrt(p / (1 - p)) / math.sqrt(2))  # P(N(0,1) < -1/sigma)
    assert abs(flipped - expected) < 5 * math.sqrt(expected / N)


def test_claim5_adam_second_moment_sees_g2_over_1_minus_p():
    g = torch.tensor([0.7, -1.2], dtype=torch.float64)
    for p in (0.1, 0.5):
        sq = (_draws(g, p, N) ** 2).mean(0)
        assert torch.allclose(sq, g**2 / (1 - p), rtol=20 / math.sqrt(N))


def _mean_update(opt_factory, p: float, steps: int = 6000, burn: int = 2000) -> float:
    w = torch.zeros(256, dtype=torch.float64, requires_grad=True)
    base = opt_factory([w])
    opt = DropGrad(base, drop_rate=p, seed=11) if p > 0 else base
    before = None
    for t in range(steps):
        if t == burn:
            before = w.detach().clone()
        w.grad = torch.ones_like(w)  # a constant gradient g = 1 in every coordinate
        opt.step()
    return float(-(w.detach() - before).mean() / (steps - burn))


def test_claim5_adam_step_shrinks_by_sqrt_1_minus_p():
    lr = 1e-3
    adam = lambda ps: torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.999))  # noqa: E731
    for p in (0.3, 0.5):
        step = _mean_update(adam, p)
        assert abs(step / lr - math.sqrt(1 - p)) < 0.03, (p, step / lr, math.sqrt(1 - p))
    assert abs(_mean_update(adam, 0.0) / lr - 1.0) < 1e-3


def test_claim5_sgd_step_is_unchanged_in_expectation():
    lr = 1e-2
    sgd = lambda ps: torch.optim.SGD(ps, lr=lr)  # noqa: E731
    step = _mean_update(sgd, 0.3, steps=3000, burn=0)
    # mean over 256 x 3000 independent draws of variance p/(1-p)
    assert abs(step / lr - 1.0) < 5 * math.sqrt(0.3 / 0.7 / (256 * 3000))
