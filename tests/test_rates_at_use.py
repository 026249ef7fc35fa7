"""Rates from every source are validated at the moment they are used, and nothing changes on error."""

from __future__ import annotations

import math

import pytest
import torch

from dropgrad import DropGrad
from dropgrad.schedules import LinearDropRateScheduler

BAD = [(-0.5, ValueError), (1.0000001, ValueError), (math.nan, ValueError), (math.inf, ValueError),
       (1 - 1e-12, ValueError), ("0.3", TypeError), (None, None)]


def _setup(**kw):
    model = torch.nn.Linear(3, 2)
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=0.1), seed=0, **kw)
    model(torch.randn(4, 3)).sum().backward()
    return model, opt


def _unchanged(model, opt, grads, params, count):
    assert opt.step_count == count
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert not opt.state  # Adam never stepped


@pytest.mark.parametrize("value, error", BAD)
def test_a_group_rate_set_after_construction_is_checked_at_the_step(value, error):
    model, opt = _setup(drop_rate=0.1)
    opt.param_groups[0]["drop_rate"] = value
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    if value is None:  # None means "no dropping" for a group, as at construction
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        return
    with pytest.raises(error, match=r"param_groups\[0\]\['drop_rate'\]") as info:
        opt.step()
    assert str(value)[:6] in str(info.value) or repr(value)[:6] in str(info.value)
    _unchanged(model, opt, grads, params, 0)


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan])
def test_a_callable_or_schedule_going_out_of_range_is_checked_at_that_step(value):
    model, opt = _setup(drop_rate=lambda step: 0.2 if step == 0 else value)
    opt.step()
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
    with pytest.raises(ValueError, match=r"drop_rate \(callable .* at step 1\) must be in \[0, 1\]"):
        opt.step()
    assert opt.step_count == 1
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(opt.state[k][n], t) for k, v in state.items() for n, t in v.items())


def test_a_schedule_is_named_in_the_error():
    sched = LinearDropRateScheduler(0.1, 0.2, 10)
    sched.get_drop_rate = lambda: 2.0  # a broken schedule
    model, opt = _setup(drop_rate=sched)
    with pytest.raises(ValueError, match=r"drop_rate \(schedule .*LinearDropRateScheduler.* at step 0\) must be in \[0, 1\], got 2.0"):
        opt.step()
    assert opt.step_count == 0


def test_a_parameter_listed_twice_is_refused():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="parameter 1 .* is the same tensor as parameter 0"):
        DropGrad(torch.optim.SGD([w, w], lr=0.1), drop_rate=0.5)
    opt = DropGrad(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), drop_rate=0.5)
    with pytest.raises(ValueError, match="add_param_group: parameter 1"):
        opt.add_param_group({"params": [w, w]})
    assert len(opt.param_groups) == 1  # nothing was added
