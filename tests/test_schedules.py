"""Tests of dropgrad.schedules: closed-form values, stepping, state, validation, and use inside DropGrad."""

from __future__ import annotations

import doctest
import io
import math
import pickle

import pytest
import torch

from dropgrad import DropGrad
from dropgrad import schedules as S
from dropgrad.schedules import (
    AdaptiveDropRateScheduler,
    ConstantDropRateScheduler,
    CosineAnnealingDropRateScheduler,
    CyclicalDropRateScheduler,
    DropRateScheduler,
    ExponentialDecayDropRateScheduler,
    LinearDropRateScheduler,
    LinearWarmupDropRateScheduler,
    SequentialDropRateScheduler,
    StepDropRateScheduler,
)

from _compat import requires_named_optimizers


def _save_load(obj):
    """Round trip through torch.save / torch.load(weights_only=True), as a checkpoint does."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------------
# closed forms, written independently of the implementation
# ---------------------------------------------------------------------------

def lin(a, b, n):
    return lambda t: a + (b - a) * min(t, n) / n


def cos_(a, b, n):
    return lambda t: b + (a - b) * (1 + math.cos(math.pi * min(t, n) / n)) / 2


def tri(lo, hi, period, decay=1.0):
    def f(t):
        k, r = divmod(t, period)
        x = r / period
        return lo + (hi - lo) * decay**k * (2 * x if x <= 0.5 else 2 - 2 * x)
    return f


def cyc_cos(lo, hi, period):
    return lambda t: lo + (hi - lo) * (1 - math.cos(2 * math.pi * t / period)) / 2


def expo(a, r, k, b=0.0, staircase=False):
    return lambda t: b + (a - b) * r ** ((t // k) if staircase else (t / k))


# (id, stateful constructor, pure constructor, closed form, steps to check:
#  0, midway, last step of the horizon, and past the end)
CASES = [
    ("constant", lambda: ConstantDropRateScheduler(0.15), lambda: S.constant_schedule(0.15),
     lambda t: 0.15, [0, 50, 99, 100, 10**6]),
    ("linear_down", lambda: LinearDropRateScheduler(0.5, 0.1, 100), lambda: S.linear_schedule(0.5, 0.1, 100),
     lin(0.5, 0.1, 100), [0, 50, 99, 100, 101, 10**6]),
    ("linear_up", lambda: LinearDropRateScheduler(0.0, 0.3, 7), lambda: S.linear_schedule(0.0, 0.3, 7),
     lin(0.0, 0.3, 7), [0, 3, 6, 7, 8, 1000]),
    ("cosine_down", lambda: CosineAnnealingDropRateScheduler(0.4, 0.05, 100),
     lambda: S.cosine_annealing_schedule(0.4, 0.05, 100), cos_(0.4, 0.05, 100), [0, 25, 50, 99, 100, 10**6]),
    ("cosine_up", lambda: CosineAnnealingDropRateScheduler(0.0, 0.3, 9),
     lambda: S.cosine_annealing_schedule(0.0, 0.3, 9), cos_(0.0, 0.3, 9), [0, 4, 8, 9, 10, 500]),
    ("step", lambda: StepDropRateScheduler(0.5, {80: 0.1, 50: 0.3}),
     lambda: S.step_schedule(0.5, {50: 0.3, 80: 0.1}),
     lambda t: 0.5 if t < 50 else (0.3 if t < 80 else 0.1), [0, 49, 50, 65, 79, 80, 10**6]),
    ("exponential", lambda: ExponentialDecayDropRateScheduler(0.4, 0.5, 10, 0.05),
     lambda: S.exponential_decay_schedule(0.4, 0.5, 10, 0.05), expo(0.4, 0.5, 10, 0.05), [0, 5, 10, 37, 10**4]),
    ("exponential_staircase", lambda: ExponentialDecayDropRateScheduler(0.4, 0.5, 10, staircase=True),
     lambda: S.exponential_decay_schedule(0.4, 0.5, 10, staircase=True), expo(0.4, 0.5, 10, staircase=True),
     [0, 9, 10, 19, 20, 95]),
    ("cyclical_triangular", lambda: CyclicalDropRateScheduler(0.05, 0.45, 20),
     lambda: S.cyclical_schedule(0.05, 0.45, 20), tri(0.05, 0.45, 20), [0, 5, 10, 15, 19, 20, 30, 10**6 + 10]),
    ("cyclical_odd_period", lambda: CyclicalDropRateScheduler(0.0, 0.4, 5),
     lambda: S.cyclical_schedule(0.0, 0.4, 5), tri(0.0, 0.4, 5), [0, 1, 2, 3, 4, 5, 7, 12]),
    ("cyclical_cosine", lambda: CyclicalDropRateScheduler(0.0, 0.4, 16, mode="cosine"),
     lambda: S.cyclical_schedule(0.0, 0.4, 16, mode="cosine"), cyc_cos(0.0, 0.4, 16), [0, 4, 8, 12, 16, 24, 1608]),
    ("cyclical_triangular2", lambda: CyclicalDropRateScheduler(0.1, 0.5, 10, amplitude_decay=0.5),
     lambda: S.cyclical_schedule(0.1, 0.5, 10, amplitude_decay=0.5), tri(0.1, 0.5, 10, 0.5), [0, 5, 15, 25, 35]),
    ("warmup", lambda: LinearWarmupDropRateScheduler(0.2, 10), lambda: S.linear_warmup_schedule(0.2, 10),
     lin(0.0, 0.2, 10), [0, 5, 9, 10, 11, 10**6]),
    ("warmup_from", lambda: LinearWarmupDropRateScheduler(0.2, 4, initial_drop_rate=0.1),
     lambda: S.linear_warmup_schedule(0.2, 4, 0.1), lin(0.1, 0.2, 4), [0, 2, 3, 4, 100]),
    ("sequential", lambda: SequentialDropRateScheduler(
        [LinearWarmupDropRateScheduler(0.3, 20), CosineAnnealingDropRateScheduler(0.3, 0.0, 80)], [20]),
     lambda: S.join_schedules([S.linear_warmup_schedule(0.3, 20), S.cosine_annealing_schedule(0.3, 0.0, 80)], [20]),
     lambda t: lin(0.0, 0.3, 20)(t) if t < 20 else cos_(0.3, 0.0, 80)(t - 20), [0, 10, 19, 20, 60, 99, 100, 10**5]),
    ("sequential_three", lambda: SequentialDropRateScheduler(
        [ConstantDropRateScheduler(0.0), S.linear_schedule(0.0, 0.4, 10), lambda t: 0.1], [5, 15]),
     lambda: S.join_schedules([S.constant_schedule(0.0), S.linear_schedule(0.0, 0.4, 10), lambda t: 0.1], [5, 15]),
     lambda t: 0.0 if t < 5 else (lin(0.0, 0.4, 10)(t - 5) if t < 15 else 0.1), [0, 4, 5, 10, 14, 15, 99]),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pure_and_stateful_values_match_closed_form(case):
    _, make, make_pure, formula, steps = case
    pure, sched = make_pure(), make()
    for t in steps:
        want = formula(t)
        assert pure(t) == pytest.approx(want, rel=1e-12, abs=1e-15), (t, pure(t), want)
        assert sched(t) == pure(t), t
        assert isinstance(pure(t), float)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_stepping_follows_the_pure_form(case):
    _, make, _, _, steps = case
    sched = make()
    horizon = max(s for s in steps if s < 1000) + 3
    for t in range(horizon):
        assert sched.step_count == t
        assert sched.get_drop_rate() == sched(t)
        sched.step()


@pytest.mark.parametrize(
    "sched, initial, final, n",
    [
        (LinearDropRateScheduler(0.1, 0.3, 10), 0.1, 0.3, 10),
        (LinearDropRateScheduler(0.7, 0.1, 3), 0.7, 0.1, 3),
        (CosineAnnealingDropRateScheduler(0.1, 0.3, 10), 0.1, 0.3, 10),
        (CosineAnnealingDropRateScheduler(0.9, 0.2, 7), 0.9, 0.2, 7),
        (LinearWarmupDropRateScheduler(0.3, 6, initial_drop_rate=0.1), 0.1, 0.3, 6),
    ],
)
def test_exact_initial_and_final_rates(sched, initial, final, n):
    # "exactly": no 0.30000000000000004 after num_steps steps
    assert sched.get_drop_rate() == initial
    for _ in range(n):
        sched.step()
    assert sched.get_drop_rate() == final
    for _ in range(5):
        sched.step()
        assert sched.get_drop_rate() == final


def test_exact_end_points_of_other_schedules():
    assert ExponentialDecayDropRateScheduler(0.4, 0.5, 10, 0.05).get_drop_rate() == 0.4
    assert ExponentialDecayDropRateScheduler(0.4, 0.5, 1, 0.05)(10**4) == 0.05
    for mode in ("triangular", "cosine"):
        f = S.cyclical_schedule(0.05, 0.45, 20, mode=mode)
        assert (f(0), f(10), f(20), f(30)) == (0.05, 0.45, 0.05, 0.45)


@pytest.mark.parametrize("a", [0.0, 0.1, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("b", [0.0, 0.2, 0.9, 1.0])
def test_rates_never_leave_their_range(a, b):
    lo, hi = min(a, b), max(a, b)
    fs = [S.linear_schedule(a, b, 13), S.cosine_annealing_schedule(a, b, 13),
          S.exponential_decay_schedule(a, 0.7, 3, b)]
    if a <= b:
        fs += [S.cyclical_schedule(a, b, 7), S.cyclical_schedule(a, b, 6, mode="cosine")]
    for f in fs:
        for t in range(40):
            assert lo <= f(t) <= hi, (f, t, f(t))


def test_cyclical_is_periodic():
    f = S.cyclical_schedule(0.1, 0.5, 12, mode="cosine")
    for t in range(30):
        assert f(t + 12 * 1000) == pytest.approx(f(t), abs=1e-12)


def test_step_schedule_key_zero_replaces_initial_and_input_is_copied():
    table = {0: 0.2, 10: 0.0}
    sched = StepDropRateScheduler(0.5, table)
    table[5] = 0.9  # later changes to the caller's dict must not leak in
    assert sched.get_drop_rate() == 0.2
    assert sched(5) == 0.2 and sched(10) == 0.0


def test_join_uses_pure_form_of_stateful_parts_and_leaves_them_alone():
    part = LinearDropRateScheduler(0.4, 0.0, 4)
    for _ in range(3):
        part.step()
    joined = SequentialDropRateScheduler([ConstantDropRateScheduler(0.1), part], [2])
    assert [joined(t) for t in range(7)] == pytest.approx([0.1, 0.1, 0.4, 0.3, 0.2, 0.1, 0.0])
    for _ in range(5):
        joined.step()
    assert part.step_count == 3


def test_custom_callable_scheduler():
    sched = DropRateScheduler(lambda t: 0.1 * (t % 3))
    got = []
    for _ in range(5):
        got.append(sched.get_drop_rate())
        sched.step()
    assert got == pytest.approx([0.0, 0.1, 0.2, 0.0, 0.1])


# ---------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_round_trip_continues_identically(case):
    _, make, _, _, _ = case
    a = make()
    for _ in range(13):
        a.step()
    sd = _save_load(a.state_dict())
    assert sd == {"step_count": 13}
    b = make()
    b.load_state_dict(sd)
    for _ in range(40):
        assert b.get_drop_rate() == a.get_drop_rate()
        a.step()
        b.step()


def test_load_state_dict_rejects_garbage():
    sched = LinearDropRateScheduler(0.5, 0.0, 10)
    with pytest.raises(ValueError, match="step_count"):
        sched.load_state_dict({"drop_rate": 0.3})
    with pytest.raises(ValueError, match="step_count"):
        sched.load_state_dict({"step_count": -1})
    with pytest.raises(TypeError, match="step_count"):
        sched.load_state_dict({"step_count": 2.5})
    sched.load_state_dict({"step_count": torch.tensor(5)})
    assert sched.step_count == 5 and sched.get_drop_rate() == 0.25


def test_schedules_pickle_and_repr():
    sched = SequentialDropRateScheduler(
        [S.linear_warmup_schedule(0.3, 20), CosineAnnealingDropRateScheduler(0.3, 0.0, 80)], [20])
    sched.step()
    clone = pickle.loads(pickle.dumps(sched))
    assert [clone(t) for t in range(0, 120, 7)] == [sched(t) for t in range(0, 120, 7)]
    assert clone.step_count == 1
    assert repr(LinearDropRateScheduler(0.5, 0.0, 100)) == (
        "LinearDropRateScheduler(initial_drop_rate=0.5, final_drop_rate=0.0, num_steps=100)")
    assert repr(S.cyclical_schedule(0.0, 0.4, 10)) == (
        "cyclical_schedule(low_drop_rate=0.0, high_drop_rate=0.4, period=10, mode='triangular', amplitude_decay=1.0)")
    assert "CosineAnnealingDropRateScheduler(initial_drop_rate=0.3" in repr(sched)
    assert repr(StepDropRateScheduler(0.5, {80: 0.1, 50: 0.3})) == (
        "StepDropRateScheduler(initial_drop_rate=0.5, drop_rate_schedule={50: 0.3, 80: 0.1})")


def test_legacy_attributes():
    sched = LinearDropRateScheduler(0.5, 0.1, 10)
    assert (sched.initial_drop_rate, sched.final_drop_rate, sched.num_steps) == (0.5, 0.1, 10)
    step = StepDropRateScheduler(0.5, {50: 0.3})
    assert step.initial_drop_rate == 0.5 and step.drop_rate_schedule == {50: 0.3}
    assert CyclicalDropRateScheduler(0.0, 0.4, 10).period == 10


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

BAD = [
    (lambda: LinearDropRateScheduler(1.5, 0.0, 10), ValueError, ["initial_drop_rate", "1.5", "[0, 1]"]),
    (lambda: LinearDropRateScheduler(0.5, -0.1, 10), ValueError, ["final_drop_rate", "-0.1"]),
    (lambda: LinearDropRateScheduler(0.5, float("nan"), 10), ValueError, ["final_drop_rate", "nan"]),
    (lambda: LinearDropRateScheduler("0.5", 0.0, 10), TypeError, ["initial_drop_rate", "'0.5'", "str"]),
    (lambda: LinearDropRateScheduler(True, 0.0, 10), TypeError, ["initial_drop_rate", "True"]),
    (lambda: LinearDropRateScheduler(0.5, 0.0, 0), ValueError, ["num_steps", ">= 1", "0"]),
    (lambda: LinearDropRateScheduler(0.5, 0.0, 10.0), TypeError, ["num_steps", "int", "10.0"]),
    (lambda: CosineAnnealingDropRateScheduler(0.5, 0.0, -3), ValueError, ["num_steps", "-3"]),
    (lambda: CosineAnnealingDropRateScheduler(0.5, 2, 3), ValueError, ["final_drop_rate", "2"]),
    (lambda: StepDropRateScheduler(0.5, [(50, 0.3)]), TypeError, ["drop_rate_schedule", "mapping", "list"]),
    (lambda: StepDropRateScheduler(0.5, {-1: 0.3}), ValueError, ["drop_rate_schedule key -1", ">= 0"]),
    (lambda: StepDropRateScheduler(0.5, {1.5: 0.3}), TypeError, ["drop_rate_schedule key 1.5"]),
    (lambda: StepDropRateScheduler(0.5, {10: 1.3}), ValueError, ["drop_rate_schedule[10]", "1.3"]),
    (lambda: ExponentialDecayDropRateScheduler(0.5, 0.0), ValueError, ["decay_rate", "(0, 1]", "0.0"]),
    (lambda: ExponentialDecayDropRateScheduler(0.5, 1.2), ValueError, ["decay_rate", "1.2"]),
    (lambda: ExponentialDecayDropRateScheduler(0.5, 0.9, decay_steps=0), ValueError, ["decay_steps"]),
    (lambda: ExponentialDecayDropRateScheduler(0.5, 0.9, staircase=1), TypeError, ["staircase"]),
    (lambda: CyclicalDropRateScheduler(0.5, 0.1, 10), ValueError, ["low_drop_rate", "high_drop_rate", "shift"]),
    (lambda: CyclicalDropRateScheduler(0.0, 0.5, 1), ValueError, ["period", ">= 2"]),
    (lambda: CyclicalDropRateScheduler(0.0, 0.5, 10, mode="sine"), ValueError, ["mode", "'sine'", "triangular"]),
    (lambda: CyclicalDropRateScheduler(0.0, 0.5, 10, amplitude_decay=0), ValueError, ["amplitude_decay"]),
    (lambda: LinearWarmupDropRateScheduler(0.2, 0), ValueError, ["warmup_steps"]),
    (lambda: LinearWarmupDropRateScheduler(1.2, 10), ValueError, ["drop_rate", "1.2"]),
    (lambda: ConstantDropRateScheduler(-0.5), ValueError, ["drop_rate", "-0.5"]),
    (lambda: SequentialDropRateScheduler([], []), ValueError, ["at least one"]),
    (lambda: SequentialDropRateScheduler([S.constant_schedule(0.1)] * 2, []), ValueError,
     ["len(schedules) - 1 = 1", "got 0"]),
    (lambda: SequentialDropRateScheduler([S.constant_schedule(0.1)] * 3, [5, 5]), ValueError,
     ["strictly increasing"]),
    (lambda: SequentialDropRateScheduler([S.constant_schedule(0.1)] * 2, [0]), ValueError, ["boundaries[0]"]),
    (lambda: SequentialDropRateScheduler([0.1, S.constant_schedule(0.1)], [3]), TypeError, ["schedules[0]"]),
    (lambda: SequentialDropRateScheduler([AdaptiveDropRateScheduler()], []), TypeError,
     ["schedules[0]", "cannot be joined"]),
    (lambda: DropRateScheduler(0.3), TypeError, ["schedule must be a callable"]),
    (lambda: S.linear_schedule(0.5, 0.0, 10)(-1), ValueError, ["step number", "-1"]),
    (lambda: S.linear_schedule(0.5, 0.0, 10)(1.5), TypeError, ["step number", "1.5"]),
    (lambda: AdaptiveDropRateScheduler(0.3, 0.2), ValueError, ["min_drop_rate", "max_drop_rate"]),
    (lambda: AdaptiveDropRateScheduler(0.0, 0.2, initial_drop_rate=0.3), ValueError, ["initial_drop_rate", "0.3"]),
    (lambda: AdaptiveDropRateScheduler(max_drop_rate=1.5), ValueError, ["max_drop_rate", "1.5"]),
    (lambda: AdaptiveDropRateScheduler(monitor="loss"), ValueError, ["monitor", "'loss'"]),
    (lambda: AdaptiveDropRateScheduler(mode="up"), ValueError, ["mode", "'up'"]),
    (lambda: AdaptiveDropRateScheduler(monitor="gap", mode="max"), ValueError, ["gap", "mode='min'"]),
    (lambda: AdaptiveDropRateScheduler(patience=-1), ValueError, ["patience"]),
    (lambda: AdaptiveDropRateScheduler(patience=2.0), TypeError, ["patience"]),
    (lambda: AdaptiveDropRateScheduler(cooldown=-2), ValueError, ["cooldown"]),
    (lambda: AdaptiveDropRateScheduler(increment=-0.1), ValueError, ["increment", "-0.1"]),
    (lambda: AdaptiveDropRateScheduler(factor=0.5), ValueError, ["factor", "0.5", ">= 1"]),
    (lambda: AdaptiveDropRateScheduler(increment=0.0), ValueError, ["never rise"]),
    (lambda: AdaptiveDropRateScheduler(threshold=-1e-3), ValueError, ["threshold"]),
    (lambda: AdaptiveDropRateScheduler(threshold_mode="pct"), ValueError, ["threshold_mode", "'pct'"]),
]


@pytest.mark.parametrize("make, exc, fragments", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_invalid_arguments_raise_clear_errors(make, exc, fragments):
    with pytest.raises(exc) as info:
        make()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_numpy_and_tensor_arguments_are_accepted():
    np = pytest.importorskip("numpy")
    sched = LinearDropRateScheduler(np.float32(0.5), torch.tensor(0.0), np.int64(10))
    assert sched(5) == pytest.approx(0.25) and sched.num_steps == 10
    assert S.linear_schedule(0.5, 0.0, 10)(np.int64(10)) == 0.0


def test_docstring_examples():
    result = doctest.testmod(S, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 20 and result.failed == 0


# ---------------------------------------------------------------------------
# adaptive
# ---------------------------------------------------------------------------

def _feed(sched, values):
    return [sched.report(v) for v in values]


def test_adaptive_patience_counts_reports_without_improvement():
    sched = AdaptiveDropRateScheduler(0.0, 0.5, patience=2, increment=0.1)
    # first report sets the baseline; the rate rises on the 3rd bad report in a row
    assert _feed(sched, [1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    assert sched.num_bad_reports == 2
    assert sched.report(1.0) == pytest.approx(0.1)
    assert sched.num_bad_reports == 0 and sched.num_raises == 1
    # an improvement resets the count
    assert _feed(sched, [1.1, 1.1, 0.5, 0.6, 0.6]) == pytest.approx([0.1] * 5)
    assert sched.report(0.6) == pytest.approx(0.2)
    assert sched.best == 0.5


def test_adaptive_patience_zero_raises_on_first_bad_report():
    sched = AdaptiveDropRateScheduler(0.0, 0.5, patience=0, increment=0.1)
    assert _feed(sched, [1.0, 0.9, 0.95, 0.8, 0.85]) == pytest.approx([0.0, 0.0, 0.1, 0.1, 0.2])


def test_adaptive_threshold_modes():
    rel = AdaptiveDropRateScheduler(patience=0, increment=0.1, threshold=0.1, threshold_mode="rel")
    # 0.95 is not 10% better than 1.0: no improvement
    assert _feed(rel, [1.0, 0.95]) == pytest.approx([0.0, 0.1])
    assert rel.best == 1.0
    ab = AdaptiveDropRateScheduler(patience=0, increment=0.1, threshold=0.01, threshold_mode="abs")
    assert _feed(ab, [1.0, 0.985, 0.98]) == pytest.approx([0.0, 0.0, 0.1])


def test_adaptive_cooldown_ignores_reports_after_a_raise():
    sched = AdaptiveDropRateScheduler(0.0, 0.5, patience=0, increment=0.1, cooldown=2)
    rates = _feed(sched, [1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    # raise at report 2, two ignored reports, raise at the next bad one, ...
    assert rates == pytest.approx([0.0, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2])
    assert sched.num_raises == 2 and sched.cooldown_counter == 0


def test_adaptive_bounds_factor_and_initial():
    sched = AdaptiveDropRateScheduler(0.05, 0.3, patience=0, increment=0.0, factor=2.0)
    assert sched.get_drop_rate() == 0.05
    rates = _feed(sched, [1.0] * 6)
    assert rates == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3, 0.3])
    assert max(rates) == 0.3  # exactly the bound, not just below
    mixed = AdaptiveDropRateScheduler(0.0, 1.0, initial_drop_rate=0.1, patience=0, increment=0.05, factor=1.5)
    assert _feed(mixed, [1.0, 1.0]) == pytest.approx([0.1, 0.2])


def test_adaptive_mode_max_and_nan():
    acc = AdaptiveDropRateScheduler(patience=1, increment=0.1, mode="max")
    assert _feed(acc, [0.5, 0.6, 0.6, 0.59]) == pytest.approx([0.0, 0.0, 0.0, 0.1])
    nan = AdaptiveDropRateScheduler(patience=0, increment=0.1)
    assert _feed(nan, [1.0, float("nan")]) == pytest.approx([0.0, 0.1])
    assert nan.best == 1.0


def test_adaptive_gap_mode():
    sched = AdaptiveDropRateScheduler(patience=1, increment=0.1, monitor="gap", threshold=0.0)
    # validation loss still falls, but the gap to the training loss grows: overfitting
    pairs = [(1.0, 0.9), (0.95, 0.8), (0.94, 0.7), (0.93, 0.6)]
    rates = [sched.report(val_loss=v, train_loss=t) for v, t in pairs]
    assert rates == pytest.approx([0.0, 0.0, 0.1, 0.1])
    assert sched.best == pytest.approx(0.1)
    with pytest.raises(TypeError, match="val_loss=..., train_loss=..."):
        sched.report(0.5)
    with pytest.raises(TypeError, match="train_loss"):
        sched.report(val_loss=0.5)


def test_adaptive_report_arguments():
    sched = AdaptiveDropRateScheduler(patience=0, increment=0.1)
    assert sched.report(val_loss=1.0) == 0.0
    assert sched.report(torch.tensor(2.0)) == pytest.approx(0.1)
    with pytest.raises(TypeError, match="exactly one value"):
        sched.report()
    with pytest.raises(TypeError, match="monitor='gap'"):
        sched.report(val_loss=1.0, train_loss=0.5)
    with pytest.raises(TypeError, match="metric"):
        sched.report("low")


def test_adaptive_step_does_not_change_the_rate():
    sched = AdaptiveDropRateScheduler(initial_drop_rate=0.1, patience=0)
    for _ in range(10):
        sched.step()
    assert sched.get_drop_rate() == 0.1 and sched.step_count == 10


def test_adaptive_state_round_trip():
    metrics = [1.0, 0.9, 0.95, 0.97, 0.96, 0.85, 0.9, 0.9, 0.9, 0.9, 0.91, 0.92, 0.93, 0.8, 0.81, 0.9, 0.9, 0.9]

    def make():
        return AdaptiveDropRateScheduler(0.0, 0.35, patience=1, increment=0.1, cooldown=1)

    a = make()
    _feed(a, metrics[:6])
    for _ in range(4):
        a.step()
    sd = _save_load(a.state_dict())
    b = make()
    b.load_state_dict(sd)
    assert b.state_dict() == a.state_dict()
    assert _feed(b, metrics[6:]) == _feed(a, metrics[6:])
    assert b.state_dict() == a.state_dict()
    assert a.num_raises == 4 and a.get_drop_rate() == 0.35  # the last raise stopped at the bound
    with pytest.raises(ValueError, match="missing keys"):
        b.load_state_dict({"step_count": 3})
    with pytest.raises(ValueError, match="drop_rate"):
        b.load_state_dict({**a.state_dict(), "drop_rate": 1.5})


# ---------------------------------------------------------------------------
# inside DropGrad
# ---------------------------------------------------------------------------


def _binomial_check(grad: torch.Tensor, rate: float, sigmas: float = 6.0) -> float:
    """Assert the fraction of zeroed elements of a masked all-ones gradient is ``rate`` within ``sigmas`` std."""
    n = grad.numel()
    frac = (grad == 0).double().mean().item()
    std = math.sqrt(rate * (1 - rate) / n)
    if rate in (0.0, 1.0):
        assert frac == rate
    else:
        assert abs(frac - rate) <= sigmas * std, (frac, rate, std)
    return frac


def test_dropped_fraction_follows_the_schedule():
    # 1M elements: the binomial std is <= 5e-4, so 6 sigma still tells 0.27 from 0.28
    p = torch.nn.Parameter(torch.zeros(1_000_000))
    sched = LinearDropRateScheduler(0.0, 0.9, 6)
    opt = DropGrad(torch.optim.SGD([p], lr=0.0), drop_rate_scheduler=sched, seed=0)
    for t in range(8):  # start, ramp, end, past the end
        want = lin(0.0, 0.9, 6)(t)
        assert opt.current_drop_rates() == [pytest.approx(want, abs=1e-15)]
        p.grad = torch.ones_like(p)
        opt.step()
        _binomial_check(p.grad, sched(t))
        # survivors are rescaled, so the mask really came from this rate
        if 0 < sched(t) < 1:
            kept = p.grad[p.grad != 0]
            assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - sched(t))))
    assert sched.step_count == 8 and sched.get_drop_rate() == 0.9


@pytest.mark.parametrize(
    "rate",
    [CyclicalDropRateScheduler(0.1, 0.7, 4, mode="cosine"), S.cyclical_schedule(0.1, 0.7, 4), lambda t: 0.1 * t],
    ids=["stateful_cyclical", "pure_cyclical", "lambda"],
)
def test_dropped_fraction_with_other_schedule_forms(rate):
    p = torch.nn.Parameter(torch.zeros(200_000))
    opt = DropGrad(torch.optim.SGD([p], lr=0.0), drop_rate=rate, seed=1)
    for t in range(6):
        p.grad = torch.ones_like(p)
        opt.step()
        _binomial_check(p.grad, rate(t))
    assert opt.step_count == 6


def test_skipped_steps_count():
    p = torch.nn.Parameter(torch.zeros(1000))
    sched = LinearDropRateScheduler(0.6, 0.0, 30)
    opt = DropGrad(torch.optim.SGD([p], lr=0.0), drop_rate_scheduler=sched, full_update_drop=0.5, seed=3)
    skipped = 0
    for t in range(40):
        assert sched.get_drop_rate() == sched(t)
        assert opt.current_drop_rates() == [sched(t)]
        p.grad = torch.ones_like(p)
        opt.step()
        skipped += opt.last_step_skipped
    assert 5 < skipped < 35  # full update drop did skip steps
    assert sched.step_count == opt.step_count == 40


def test_shared_schedule_is_stepped_once_per_step():
    a, b = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(10))
    sched = LinearDropRateScheduler(0.5, 0.0, 10)
    inner = torch.optim.SGD([{"params": [a], "drop_rate": sched}, {"params": [b], "drop_rate": sched}], lr=0.0)
    opt = DropGrad(inner, drop_rate=sched, seed=0)
    for _ in range(4):
        a.grad, b.grad = torch.ones(10), torch.ones(10)
        opt.step()
    assert sched.step_count == 4


class _EncDec(torch.nn.Module):
    def __init__(self, width=500, hidden=400):  # 200k weights each by default
        super().__init__()
        self.encoder = torch.nn.Linear(width, hidden)
        self.decoder = torch.nn.Linear(hidden, width)


@requires_named_optimizers
def test_encoder_and_decoder_follow_different_schedules():
    model = _EncDec()
    enc = LinearDropRateScheduler(0.8, 0.0, 4)
    dec = CyclicalDropRateScheduler(0.0, 0.6, 4)
    inner = torch.optim.SGD(model.named_parameters(), lr=0.0)
    opt = DropGrad(inner, params={"encoder": enc, "decoder": dec}, seed=5)
    names = [n for n, _ in model.named_parameters()]
    for t in range(6):
        want = [enc(t) if n.startswith("encoder") else dec(t) for n in names]
        assert opt.current_drop_rates() == want
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        _binomial_check(model.encoder.weight.grad, enc(t))
        _binomial_check(model.decoder.weight.grad, dec(t))
    assert enc.step_count == dec.step_count == 6


def test_param_group_drop_rate_schedules():
    model = _EncDec()
    enc, dec = CosineAnnealingDropRateScheduler(0.5, 0.0, 3), S.linear_warmup_schedule(0.4, 3)
    inner = torch.optim.SGD(
        [{"params": model.encoder.parameters(), "drop_rate": enc},
         {"params": model.decoder.parameters(), "drop_rate": dec}], lr=0.0)
    opt = DropGrad(inner, drop_rate=0.0, seed=2)
    for t in range(5):
        assert opt.current_drop_rates() == [enc(t)] * 2 + [dec(t)] * 2
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        _binomial_check(model.encoder.weight.grad, enc(t))
        _binomial_check(model.decoder.weight.grad, dec(t))


def _build_resumable():
    torch.manual_seed(0)
    model = _EncDec(40, 30)  # exactness, not statistics: small is enough
    inner = torch.optim.Adam(
        [{"params": model.encoder.parameters(), "drop_rate": CyclicalDropRateScheduler(0.0, 0.5, 6)},
         {"params": model.decoder.parameters(),
          "drop_rate": AdaptiveDropRateScheduler(0.0, 0.4, patience=0, increment=0.1)}], lr=1e-3)
    sched = SequentialDropRateScheduler([LinearWarmupDropRateScheduler(0.3, 3), S.constant_schedule(0.1)], [5])
    opt = DropGrad(inner, drop_rate_scheduler=sched, params={"decoder.bias": sched}, seed=11, model=model)
    return model, opt


def _train(model, opt, steps, start):
    rates, grads = [], []
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(42))
    for t in range(start, start + steps):
        rates.append(opt.current_drop_rates())
        opt.zero_grad()
        model.decoder(model.encoder(x)).pow(2).mean().backward()
        opt.step()
        grads.append(model.encoder.weight.grad.clone())
        if t % 3 == 2:  # an "evaluation": the adaptive schedule of the decoder group rises
            opt.param_groups[1]["drop_rate"].report(1.0)
    return rates, grads


def test_resume_uses_exactly_the_rates_of_an_uninterrupted_run():
    model, opt = _build_resumable()
    rates, grads = _train(model, opt, 14, 0)

    model, opt = _build_resumable()
    rates_a, grads_a = _train(model, opt, 6, 0)
    ckpt = _save_load({"model": model.state_dict(), "opt": opt.state_dict()})

    model, opt = _build_resumable()  # fresh schedule objects at step 0
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    rates_b, grads_b = _train(model, opt, 8, 6)

    assert rates_a + rates_b == rates
    assert len({tuple(r) for r in rates}) > 5  # the rates really changed over the run
    assert max(r[2] for r in rates) > 0.0  # and the adaptive one did rise
    for g, h in zip(grads, grads_a + grads_b):
        assert torch.equal(g, h)


@pytest.mark.parametrize(
    "rate, bad_step",
    [(DropRateScheduler(lambda t: 0.5 + 0.3 * t), 2), (lambda t: -0.1 if t == 3 else 0.1, 3)],
    ids=["stateful", "callable"],
)
def test_rate_out_of_range_raises_naming_schedule_and_step(rate, bad_step):
    p = torch.nn.Parameter(torch.zeros(10))
    opt = DropGrad(torch.optim.SGD([p], lr=0.1), drop_rate=rate, seed=0)
    for _ in range(bad_step):
        p.grad = torch.ones_like(p)
        opt.step()
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError) as info:
        opt.step()
    msg = str(info.value)
    assert repr(rate) in msg and f"step {bad_step}" in msg and "[0, 1]" in msg, msg
    assert torch.equal(p.detach(), before)  # nothing was applied


# ---------------------------------------------------------------------------
# docs/schedules.md: its examples run, and every `print(...)  # output` claim holds
# ---------------------------------------------------------------------------

@requires_named_optimizers  # the docs build optimizers from named_parameters()
def test_docs_examples_run(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "schedules.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert len(blocks) >= 12
    namespace: dict = {"__name__": "docs"}
    checked = 0
    for i, block in enumerate(blocks):
        capsys.readouterr()
        exec(compile(block, f"docs/schedules.md python block {i}", "exec"), namespace)
        printed = capsys.readouterr().out.splitlines()
        claims = re.findall(r"^\s*print\(.*\)\s+# (.*)$", block, re.MULTILINE)
        assert printed == claims, (i, block)
        checked += len(claims)
    assert checked >= 14


# ---------------------------------------------------------------------------
# the adapter: stateful classes generated from the pure functions
# ---------------------------------------------------------------------------

# (class, pure function, argument sets: positional tuples and keyword dicts)
FORMS = [
    (ConstantDropRateScheduler, S.constant_schedule, [(0.0,), (0.37,), {"drop_rate": 1.0}]),
    (LinearDropRateScheduler, S.linear_schedule, [(0.5, 0.0, 97), (0.1, 0.9, 1), {"initial_drop_rate": 0.3,
                                                 "final_drop_rate": 0.7, "num_steps": 333}]),
    (CosineAnnealingDropRateScheduler, S.cosine_annealing_schedule, [(0.4, 0.05, 250), (0.0, 1.0, 3),
                                                                     {"num_steps": 17, "initial_drop_rate": 0.9,
                                                                      "final_drop_rate": 0.1}]),
    (StepDropRateScheduler, S.step_schedule, [(0.5, {80: 0.1, 50: 0.3}), (0.2, {0: 0.9, 299: 0.0}),
                                              {"initial_drop_rate": 0.1, "drop_rate_schedule": {150: 0.4}}]),
    (ExponentialDecayDropRateScheduler, S.exponential_decay_schedule, [(0.4, 0.97), (0.4, 0.5, 10, 0.05, True),
                                                                       (0.1, 0.9, 7, 0.6),
                                                                       {"initial_drop_rate": 0.8, "decay_rate": 0.99,
                                                                        "staircase": True}]),
    (CyclicalDropRateScheduler, S.cyclical_schedule, [(0.05, 0.45, 20), (0.0, 0.4, 7, "cosine", 0.5),
                                                      {"low_drop_rate": 0.1, "high_drop_rate": 0.3, "period": 33,
                                                       "amplitude_decay": 0.9}]),
    (LinearWarmupDropRateScheduler, S.linear_warmup_schedule, [(0.2, 10), (0.3, 123, 0.1),
                                                               {"drop_rate": 0.9, "warmup_steps": 1}]),
    (SequentialDropRateScheduler, S.join_schedules, [([S.linear_warmup_schedule(0.3, 20),
                                                       CosineAnnealingDropRateScheduler(0.3, 0.0, 80)], [20])]),
]


def _call(fn, args):
    return fn(**args) if isinstance(args, dict) else fn(*args)


@pytest.mark.parametrize("cls, pure, arg_sets", FORMS, ids=[f[0].__name__ for f in FORMS])
def test_stateful_rates_are_bitwise_those_of_the_pure_function(cls, pure, arg_sets):
    for args in arg_sets:
        sched, f = _call(cls, args), _call(pure, args)
        assert isinstance(sched, DropRateScheduler)
        rates = []
        for t in range(400):
            rates.append(sched.get_drop_rate())
            assert rates[-1].hex() == f(t).hex() == sched(t).hex(), (args, t)
            sched.step()
        assert len(set(rates)) > (1 if cls is not ConstantDropRateScheduler else 0)


@pytest.mark.parametrize("cls, pure, arg_sets", FORMS, ids=[f[0].__name__ for f in FORMS])
def test_stateful_signature_attributes_and_repr_come_from_the_pure_function(cls, pure, arg_sets):
    import ast
    import inspect

    params = list(inspect.signature(pure).parameters.values())
    got = list(inspect.signature(cls).parameters.values())
    assert [(p.name, p.kind, p.default) for p in got] == [(p.name, p.kind, p.default) for p in params]
    # the TYPE_CHECKING declaration (what type checkers and mkdocstrings read) says the same
    tree = ast.parse(inspect.getsource(S))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__).body
    decl = next(f for n in body if isinstance(n, ast.If) for f in n.body if getattr(f, "name", "") == "__init__")
    declared = [(a.arg, ast.unparse(a.annotation)) for a in decl.args.args[1:]]
    assert declared == [(p.name, p.annotation) for p in params]
    assert [ast.literal_eval(d) for d in decl.args.defaults] == [p.default for p in params if p.default is not p.empty]
    sched, f = _call(cls, arg_sets[0]), _call(pure, arg_sets[0])
    assert repr(sched) == f"{cls.__name__}({repr(f)[len(pure.__name__) + 1:-1]})"
    for p in params:
        value = getattr(sched, p.name)
        with pytest.raises(AttributeError):
            setattr(sched, p.name, value)
    with pytest.raises(TypeError, match=f"{cls.__name__}\\(\\): missing a required argument"):
        cls()


def test_subclass_of_a_builtin_keeps_its_constructor():
    class Slower(LinearDropRateScheduler):
        def __init__(self, rate):
            super().__init__(rate, 0.0, num_steps=1000)

    s = Slower(0.4)
    assert isinstance(s, LinearDropRateScheduler) and s.num_steps == 1000 and s(500) == S.linear_schedule(0.4, 0.0, 1000)(500)


# pickle.dumps (protocol 2, zlib, base64) of the eight schedulers below after 7 steps, made by the
# schedules.py of commit 693040e (before the adapter): old pickles must still load and give the same rates
_OLD_PICKLE = "eJx9VdlS1EAUHRFZwiY4oCDuW3BBBfdtQMBBg4osElEYM5OWjjVk5iaTQh66Sh90/AX9Az/BZ5+s0iefrPLBT/F2Z5IO0pC3qT7n9jnn3tvztm4JUnrB9krlFc+yB/0CJXZQJL42VnL9iuVWxvFoxqqQ2dqJp8GOgXdQx2CnbjalUqmIAvWqMrmIp8EupDWYnUgp1GrnYm6jkhvhNGhi0Gw2I5XDch7qAS2b+TYsPr8KLXlT41oqpIyswK1Aq9FIJSTIqy6YclxieQqHbSi1nUGHTuspl73b7MDqRQGXojuVokOUBl0M9ujCruM6Fccq5qT2dDbzNyU+UfiV42447s5mvn7i32fh2Q1Wc9yZDz2GHVRhb55yd7IIlQTKIUqzYyUflY26qA4lrihc70OnvQz6Itf7zV7RLM7LWRFR+u/fomkcr8EBBgd1LvJ3TRmK/JIQWYVDsY8tIEofs5iEQvxhFHyEwdFI/DGzLRqIWPBxpeCyQwpkzfFR8wkGJ/VEsGZXcuRkoVMMdN0YymZ+heNlTMcNCNDYwKYGIeH0lgSlzYk35ZJLXD4446RgrSssn0GbZxmciywPmn14F5HEnM2ZUvZ5pf8EQYMLDC4muybWKiwjRnNIZtMSn4TDOWxoiQaKycXtdbyC5RO49BFzubyp4bIc3UinSFCP8Xqh6BQwlM15XMEMrjK4FuVxPXxsagQZww313NZwGtxkcEsX41MsrSXW8rY0184VOys0cXonm/nzg38/zQY8LRPPKdmQMdJmPf5cLdkERsRJuCAwKlbfWi0XnUpgk7BXcDcOBPMaC/OS91J5CcXKdISO0gRjm0duwfJWA9XejGNQEwzuRaFlzR751K0JlkxuUplciNLgPoMHOn90v9dSasVKUQkxIgb2OC0nvwpToUPJof9B1E8AgaC2GpsNPUQTjxg8jgxNi2a9Ljlu7MOHJ0ojHKTBDINZPRzfGD9HeU7zDJ5GZRfoJEXDpjBc22oUn0bxqVTcwWfcX2obSF4UW6T9FN/L52LzImR3jMLHcBqLvch/gCWxkHn8i7Mtz0Fly0b6PeTw9GUY5dwSWDqdp4uELi9B3khbQZ4M/gPWbbz+"


def test_pickles_from_before_the_adapter_still_load():
    import base64
    import zlib

    old = pickle.loads(zlib.decompress(base64.b64decode(_OLD_PICKLE)))
    new = [ConstantDropRateScheduler(0.15), LinearDropRateScheduler(0.5, 0.1, 100),
           CosineAnnealingDropRateScheduler(0.4, 0.05, 100), StepDropRateScheduler(0.5, {80: 0.1, 50: 0.3}),
           ExponentialDecayDropRateScheduler(0.4, 0.5, 10, 0.05, True),
           CyclicalDropRateScheduler(0.05, 0.45, 20, "cosine", 0.5), LinearWarmupDropRateScheduler(0.2, 10, 0.1),
           SequentialDropRateScheduler([LinearWarmupDropRateScheduler(0.3, 20),
                                        S.cosine_annealing_schedule(0.3, 0.0, 80)], [20])]
    assert [type(o) for o in old] == [type(o) for o in new]
    for o, n in zip(old, new):
        assert o.state_dict() == {"step_count": 7} and repr(o) == repr(n)
        assert [o(t).hex() for t in range(300)] == [n(t).hex() for t in range(300)]


@pytest.mark.parametrize("value, exc", [(1.5, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                        ("0.5", TypeError), (True, TypeError), (None, TypeError)])
def test_rates_from_a_callable_are_checked_naming_schedule_step_value_and_range(value, exc):
    for sched in (DropRateScheduler(lambda t: 0.1 if t < 3 else value),
                  S.join_schedules([S.constant_schedule(0.1), lambda t: value], [3])):
        assert sched(2) == 0.1
        with pytest.raises(exc) as info:
            sched(3)
        msg = str(info.value)
        assert repr(sched) in msg and "step 3" in msg and repr(value) in msg and "[0, 1]" in msg, msg
