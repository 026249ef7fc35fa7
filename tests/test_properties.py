"""Property-based tests (hypothesis): rates, names, schedules, state dicts, dtypes/layouts."""

import copy
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dropgrad import DropGrad, drop_grad_
from dropgrad import schedules as S

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FEW = settings(max_examples=15, deadline=None)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))


def _train(opt, model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(4, 3, generator=gen)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------- rates
@given(st.floats(0.0, 1.0, allow_nan=False))
def test_valid_rates_are_accepted(p):
    opt = DropGrad(torch.optim.SGD(_model().parameters(), lr=0.1), drop_rate=p, seed=0)
    assert opt.current_drop_rates() == [p] * 4


bad_rates = st.one_of(
    st.floats(allow_nan=True).filter(lambda x: math.isnan(x) or not 0 <= x <= 1),
    st.text(max_size=4), st.booleans(), st.lists(st.floats(0, 1), max_size=2),
)


@given(bad_rates)
def test_invalid_rates_are_refused_naming_the_argument(p):
    with pytest.raises((TypeError, ValueError), match="drop_rate"):
        DropGrad(torch.optim.SGD(_model().parameters(), lr=0.1), drop_rate=p, seed=0)


# ---------------------------------------------------------------- names
@FEW
@given(st.lists(st.sampled_from(["0", "1", "0.weight", "0.bias", "1.weight", "1.bias", "*.bias", "*.weight", "?.*"]),
                min_size=1, max_size=4, unique=True), st.data())
def test_the_most_specific_name_key_wins(keys, data):
    model = _model()
    rates = {k: data.draw(st.sampled_from([0.1, 0.2, 0.3, 0.4, 0.5]), label=k) for k in keys}

    def specificity(key, name):
        if key == name:
            return (2, len(key))
        if name.startswith(key + "."):
            return (1, len(key))
        import fnmatch
        if set("*?[") & set(key) and fnmatch.fnmatchcase(name, key):
            return (0, sum(c not in "*?[" for c in key))
        return None

    expected, ambiguous = [], False
    for name, _ in model.named_parameters():
        scored = [(specificity(k, name), k) for k in keys if specificity(k, name) is not None]
        if not scored:
            expected.append(0.0)
            continue
        best = max(s for s, _ in scored)
        winners = [k for s, k in scored if s == best]
        ambiguous |= len(winners) > 1 and len({rates[k] for k in winners}) > 1
        expected.append(rates[winners[0]])
    def build():
        return DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), params=rates, model=model, seed=0)

    if ambiguous:
        with pytest.raises(ValueError):
            build()
        return
    try:
        opt = build()
    except ValueError as exc:  # equally specific keys with equal rates may be refused as well
        assert "specific" in str(exc) or "claim" in str(exc) or "match" in str(exc)
        return
    assert opt.current_drop_rates() == expected


# ---------------------------------------------------------------- schedules
unit = st.floats(0.0, 1.0, allow_nan=False)
pure_and_stateful = st.one_of(
    st.tuples(unit, unit, st.integers(1, 50)).map(
        lambda a: (S.linear_schedule(*a), S.LinearDropRateScheduler(*a))),
    st.tuples(unit, unit, st.integers(1, 50)).map(
        lambda a: (S.cosine_annealing_schedule(*a), S.CosineAnnealingDropRateScheduler(*a))),
)


@given(pure_and_stateful, st.integers(0, 80))
def test_schedules_stay_in_the_unit_interval_and_stateful_equals_pure(pair, steps):
    pure, stateful = pair
    for t in range(steps):
        value = stateful.get_drop_rate()
        assert 0.0 <= value <= 1.0 and value == pure(t)
        stateful.step()


# ---------------------------------------------------------------- state dicts
configs = st.fixed_dictionaries({
    "drop_rate": st.sampled_from([0.0, 0.25, 0.6]),
    "full_update_drop": st.sampled_from([False, True, 0.3]),
    "rescale": st.booleans(),
    "seed": st.integers(0, 2**64 - 1),
})


@FEW
@given(configs, st.integers(0, 4))
def test_round_trip_in_a_fresh_optimizer_is_bitwise(config, before):
    model = _model()
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-2), **config)
    _train(opt, model, before)
    sd = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    _train(opt, model, 3, seed=1)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model2 = _model()
    model2.load_state_dict(weights)
    fresh = DropGrad(torch.optim.Adam(model2.parameters(), lr=1e-2), **config)
    fresh.load_state_dict(sd)
    _train(fresh, model2, 3, seed=1)
    for a, b in zip(uninterrupted, model2.parameters()):
        assert torch.equal(a, b)


tampering = st.sampled_from([
    ("step", st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), st.floats(), st.text(max_size=3),
                       st.booleans(), st.none())),
    ("seed", st.one_of(st.floats(), st.text(max_size=3), st.booleans(), st.none())),
    ("rescale", st.one_of(st.integers(), st.text(max_size=3), st.none(), st.floats())),
    ("format", st.one_of(st.integers(max_value=0), st.integers(min_value=2), st.text(max_size=2), st.booleans())),
    ("drop_rate", st.one_of(st.floats().filter(lambda x: math.isnan(x) or not 0 <= x <= 1), st.text(max_size=3),
                            st.booleans())),
    ("param_rates", st.one_of(st.none(), st.dictionaries(st.integers(4, 100), st.floats(0, 1), min_size=1),
                              st.dictionaries(st.integers(0, 3), st.text(max_size=2), min_size=1))),
])


@FEW
@given(tampering.flatmap(lambda kv: st.tuples(st.just(kv[0]), kv[1])))
def test_tampering_any_field_raises_naming_it_and_changes_nothing(tampered):
    key, value = tampered
    model = _model()
    src = DropGrad(torch.optim.Adam(model.parameters()), drop_rate=0.2, seed=1)
    _train(src, model, 2)
    sd = copy.deepcopy(src.state_dict())
    sd["dropgrad"][key] = value
    opt = DropGrad(torch.optim.Adam(model.parameters()), drop_rate=0.2, seed=2)
    _train(opt, model, 1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises((TypeError, ValueError), match=key):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["dropgrad"] == before["dropgrad"] and after["param_groups"] == before["param_groups"]
    for k, entry in before["state"].items():
        for name, v in entry.items():
            assert torch.equal(v, after["state"][k][name])
    assert opt.step_count == 1 and opt.seed == 2


# ---------------------------------------------------------------- dtypes and layouts
def _layouts(shape):
    n, m = shape
    base = torch.randn(n, m, generator=torch.Generator().manual_seed(n * 31 + m))
    yield "contiguous", base.clone()
    yield "transposed", base.t().contiguous().t()
    x4 = torch.randn(2, n, m, 3, generator=torch.Generator().manual_seed(n + m))
    yield "channels_last", x4.to(memory_format=torch.channels_last)


@FEW
@given(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       st.tuples(st.integers(1, 9), st.integers(1, 9)), st.sampled_from([0.0, 0.3, 0.9, 1.0]),
       st.integers(0, 2**32), st.sampled_from([None, "reference"]))
def test_masks_do_not_depend_on_memory_layout(dtype, shape, p, seed, impl):
    for layout, x in _layouts(shape):
        x = x.to(dtype)
        dense = x.contiguous().clone()
        strided = x.clone(memory_format=torch.preserve_format)
        assert strided.stride() == x.stride(), layout
        drop_grad_(strided, p, seed=seed, step=3, impl=impl)
        drop_grad_(dense, p, seed=seed, step=3, impl=impl)
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
        assert torch.equal(strided.contiguous().view(bits), dense.view(bits)), (layout, dtype)
