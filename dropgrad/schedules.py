"""Drop-rate schedules: the drop rate as a function of the optimizer step.

Every built-in schedule is defined once, as a **pure function** of the step in the
style of optax: ``linear_schedule(0.5, 0.0, 1000)`` checks its arguments and returns
``f`` with ``f(step) -> rate``. It needs nothing but the step count to resume, and it
composes (:func:`join_schedules`).

Each also has a **stateful form**, ``LinearDropRateScheduler(0.5, 0.0, 1000)``: the same
function with a position, generated from it by one adapter. It takes the function's
arguments (checked by the function), gives bit for bit the function's rates, and adds
``get_drop_rate()`` (the rate at the current step), ``step()`` (advance one step),
``state_dict()`` / ``load_state_dict()`` (``{"step_count": int}``) and ``__call__(step)``
(the pure form). Its arguments are readable as (read-only) attributes.

``DropGrad`` accepts either, and any ``callable(step) -> rate`` too, wherever it
accepts a rate. Per call of ``DropGrad.step()`` it reads ``get_drop_rate()`` of each
stateful schedule once, before masking, and calls its ``step()`` once afterwards,
so step 0 is the first optimizer step and ``num_steps`` counts optimizer steps; a
step whose whole update was dropped still counts. A pure callable is called with
the wrapper's own step count (0 for the first step). A schedule with a finite
horizon holds its final value past the end. A rate outside ``[0, 1]`` (from a
callable of your own) raises an error naming the schedule, the step and the value.

:class:`AdaptiveDropRateScheduler` is the one schedule that is not a function of
the step: it raises the rate when a metric you report stops improving.
"""

from __future__ import annotations

import bisect
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

__all__ = [
    # pure schedules: step -> rate
    "constant_schedule",
    "linear_schedule",
    "cosine_annealing_schedule",
    "step_schedule",
    "exponential_decay_schedule",
    "cyclical_schedule",
    "linear_warmup_schedule",
    "join_schedules",
    # stateful schedulers
    "DropRateScheduler",
    "ConstantDropRateScheduler",
    "LinearDropRateScheduler",
    "CosineAnnealingDropRateScheduler",
    "StepDropRateScheduler",
    "ExponentialDecayDropRateScheduler",
    "CyclicalDropRateScheduler",
    "LinearWarmupDropRateScheduler",
    "SequentialDropRateScheduler",
    "AdaptiveDropRateScheduler",
]


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------

def _check_real(value: object, name: str, allowed: str = "a real number") -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}")
    return float(value)


def _check_rate(value: object, name: str) -> float:
    rate = _check_real(value, name, "a real number in [0, 1]")
    if math.isnan(rate) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {rate!r}")
    return rate


def _check_fraction(value: object, name: str) -> float:
    """A factor in (0, 1] (decay_rate, amplitude_decay)."""
    x = _check_real(value, name, "a real number in (0, 1]")
    if not 0.0 < x <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return x


def _check_at_least(value: object, name: str, minimum: float) -> float:
    x = _check_real(value, name, f"a finite number >= {minimum:g}")
    if not (x >= minimum and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return x


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"a schedule is called with a step number (int >= 0), got {step!r}")
    if step < 0:
        raise ValueError(f"a schedule is called with a step number (int >= 0), got {step}")
    return int(step)


def _rate_at(value: object, schedule: object, step: int) -> float:
    """``value`` if it is a rate, else an error naming the schedule, the step, the value and ``[0, 1]``."""
    if type(value) is float and 0.0 <= value <= 1.0:  # the common case, without building a message
        return value
    return _check_rate(value, f"drop rate from {schedule!r} at step {step}")


def _between(value: float, a: float, b: float) -> float:
    # Interpolations are written a * (1 - w) + b * w, exact at w = 0 and w = 1;
    # in between they can still overshoot an end point by one ulp.
    lo, hi = (a, b) if a <= b else (b, a)
    return min(max(value, lo), hi)


# ---------------------------------------------------------------------------
# pure schedules
# ---------------------------------------------------------------------------

class _Schedule:
    """A pure schedule ``step -> rate``: a module-level function of the step and its checked arguments.

    Kept as data rather than a closure so it pickles and prints what it is.
    """

    __slots__ = ("fn", "kwargs", "name")

    def __init__(self, name: str, fn: Callable[..., float], **kwargs: Any) -> None:
        self.name, self.fn, self.kwargs = name, fn, kwargs

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        return _rate_at(self.fn(step, **self.kwargs), self, step)

    def args_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())

    def __repr__(self) -> str:
        return f"{self.name}({self.args_repr()})"

    def __getstate__(self):
        return (self.name, self.fn, self.kwargs)

    def __setstate__(self, state) -> None:
        self.name, self.fn, self.kwargs = state


def _constant(step: int, drop_rate: float) -> float:
    return drop_rate


def constant_schedule(drop_rate: float) -> Callable[[int], float]:
    """The same rate at every step.

    Args:
        drop_rate: the rate, in ``[0, 1]``.

    Example:
        >>> constant_schedule(0.1)(12345)
        0.1
    """
    return _Schedule("constant_schedule", _constant, drop_rate=_check_rate(drop_rate, "drop_rate"))


def _linear(step: int, initial_drop_rate: float, final_drop_rate: float, num_steps: int) -> float:
    if step >= num_steps:
        return final_drop_rate
    t = step / num_steps
    return _between(initial_drop_rate * (1.0 - t) + final_drop_rate * t, initial_drop_rate, final_drop_rate)


def linear_schedule(initial_drop_rate: float, final_drop_rate: float, num_steps: int) -> Callable[[int], float]:
    """Linear from ``initial_drop_rate`` at step 0 to ``final_drop_rate`` at ``num_steps``, then constant.

    ``rate(t) = initial + (final - initial) * min(t, num_steps) / num_steps``; exactly
    ``final_drop_rate`` from step ``num_steps`` on.

    Args:
        initial_drop_rate: rate at step 0, in ``[0, 1]``.
        final_drop_rate: rate from step ``num_steps`` on, in ``[0, 1]``; may be above
            ``initial_drop_rate``.
        num_steps: length of the ramp in optimizer steps, an int >= 1.

    Example:
        >>> f = linear_schedule(0.5, 0.0, 100)
        >>> f(0), f(50), f(100), f(1000)
        (0.5, 0.25, 0.0, 0.0)
    """
    return _Schedule(
        "linear_schedule",
        _linear,
        initial_drop_rate=_check_rate(initial_drop_rate, "initial_drop_rate"),
        final_drop_rate=_check_rate(final_drop_rate, "final_drop_rate"),
        num_steps=_check_int(num_steps, "num_steps", 1),
    )


def _cosine(step: int, initial_drop_rate: float, final_drop_rate: float, num_steps: int) -> float:
    if step >= num_steps:
        return final_drop_rate
    c = 0.5 * (1.0 + math.cos(math.pi * step / num_steps))
    return _between(initial_drop_rate * c + final_drop_rate * (1.0 - c), initial_drop_rate, final_drop_rate)


def cosine_annealing_schedule(
    initial_drop_rate: float, final_drop_rate: float, num_steps: int
) -> Callable[[int], float]:
    """Half a cosine from ``initial_drop_rate`` to ``final_drop_rate`` over ``num_steps``, then constant.

    ``rate(t) = final + (initial - final) * (1 + cos(pi * min(t, num_steps) / num_steps)) / 2``.
    Works in either direction (``final > initial`` rises along the cosine).

    Args:
        initial_drop_rate: rate at step 0, in ``[0, 1]``.
        final_drop_rate: rate from step ``num_steps`` on, in ``[0, 1]``.
        num_steps: length of the half cosine in optimizer steps, an int >= 1.

    Example:
        >>> f = cosine_annealing_schedule(0.4, 0.0, 100)
        >>> f(0), round(f(50), 12), f(100)
        (0.4, 0.2, 0.0)
    """
    return _Schedule(
        "cosine_annealing_schedule",
        _cosine,
        initial_drop_rate=_check_rate(initial_drop_rate, "initial_drop_rate"),
        final_drop_rate=_check_rate(final_drop_rate, "final_drop_rate"),
        num_steps=_check_int(num_steps, "num_steps", 1),
    )


def _piecewise(step: int, initial_drop_rate: float, drop_rate_schedule: dict[int, float]) -> float:
    boundaries = list(drop_rate_schedule)  # sorted at construction
    i = bisect.bisect_right(boundaries, step)
    return initial_drop_rate if i == 0 else drop_rate_schedule[boundaries[i - 1]]


def step_schedule(initial_drop_rate: float, drop_rate_schedule: Mapping[int, float]) -> Callable[[int], float]:
    """Piecewise constant: ``drop_rate_schedule`` maps a step to the rate that holds from that step on.

    Args:
        initial_drop_rate: rate before the first key, in ``[0, 1]``; a key ``0`` replaces it.
        drop_rate_schedule: ``{step: rate}``, steps ints >= 0 in any order, rates in
            ``[0, 1]``. It is copied: later changes to your dict do not reach the schedule.

    Example:
        >>> f = step_schedule(0.5, {50: 0.3, 80: 0.1})
        >>> f(0), f(49), f(50), f(79), f(80), f(10**6)
        (0.5, 0.5, 0.3, 0.3, 0.1, 0.1)
    """
    initial = _check_rate(initial_drop_rate, "initial_drop_rate")
    if not isinstance(drop_rate_schedule, Mapping):
        raise TypeError(
            "drop_rate_schedule must be a mapping {step: rate}, e.g. {50: 0.3, 80: 0.1}, "
            f"got {type(drop_rate_schedule).__name__}"
        )
    table: dict[int, float] = {}
    for k, v in drop_rate_schedule.items():
        k = _check_int(k, f"drop_rate_schedule key {k!r}", 0)
        table[k] = _check_rate(v, f"drop_rate_schedule[{k}]")
    table = dict(sorted(table.items()))
    return _Schedule("step_schedule", _piecewise, initial_drop_rate=initial, drop_rate_schedule=table)


def _exponential(
    step: int,
    initial_drop_rate: float,
    decay_rate: float,
    decay_steps: int,
    final_drop_rate: float,
    staircase: bool,
) -> float:
    e = step // decay_steps if staircase else step / decay_steps
    w = decay_rate**e
    return _between(initial_drop_rate * w + final_drop_rate * (1.0 - w), initial_drop_rate, final_drop_rate)


def exponential_decay_schedule(
    initial_drop_rate: float,
    decay_rate: float,
    decay_steps: int = 1,
    final_drop_rate: float = 0.0,
    staircase: bool = False,
) -> Callable[[int], float]:
    """Exponential approach from ``initial_drop_rate`` to ``final_drop_rate``.

    ``rate(t) = final + (initial - final) * decay_rate ** (t / decay_steps)``
    (``t // decay_steps`` with ``staircase=True``). With the default ``final_drop_rate=0``
    this is the classic ``initial * decay_rate ** (t / decay_steps)``. The final rate
    is approached, never passed, so there is no end step.

    Args:
        initial_drop_rate: rate at step 0, in ``[0, 1]``.
        decay_rate: factor by which the distance to ``final_drop_rate`` shrinks every
            ``decay_steps`` steps, in ``(0, 1]``.
        decay_steps: steps per ``decay_rate`` factor, an int >= 1.
        final_drop_rate: the asymptote, in ``[0, 1]``; may be above ``initial_drop_rate``.
        staircase: decay in whole ``decay_steps`` blocks instead of continuously.

    Example:
        >>> f = exponential_decay_schedule(0.4, 0.5, decay_steps=10)
        >>> f(0), f(10), f(20)
        (0.4, 0.2, 0.1)
    """
    if not isinstance(staircase, bool):
        raise TypeError(f"staircase must be a bool, got {staircase!r}")
    return _Schedule(
        "exponential_decay_schedule",
        _exponential,
        initial_drop_rate=_check_rate(initial_drop_rate, "initial_drop_rate"),
        decay_rate=_check_fraction(decay_rate, "decay_rate"),
        decay_steps=_check_int(decay_steps, "decay_steps", 1),
        final_drop_rate=_check_rate(final_drop_rate, "final_drop_rate"),
        staircase=staircase,
    )


_CYCLE_MODES = ("triangular", "cosine")


def _cyclical(
    step: int,
    low_drop_rate: float,
    high_drop_rate: float,
    period: int,
    mode: str,
    amplitude_decay: float,
) -> float:
    cycle, pos = divmod(step, period)
    phase = pos / period
    if mode == "triangular":  # noqa: SIM108 - the two wave shapes read better apart
        h = 1.0 - abs(1.0 - 2.0 * phase)
    else:
        h = 0.5 * (1.0 - math.cos(2.0 * math.pi * phase))
    w = amplitude_decay**cycle * h
    return _between(low_drop_rate * (1.0 - w) + high_drop_rate * w, low_drop_rate, high_drop_rate)


def cyclical_schedule(
    low_drop_rate: float,
    high_drop_rate: float,
    period: int,
    mode: str = "triangular",
    amplitude_decay: float = 1.0,
) -> Callable[[int], float]:
    """Cycles between a low and a high rate (Smith's cyclical learning rates, applied to the drop rate).

    Each cycle of ``period`` steps starts at ``low_drop_rate``, reaches ``high_drop_rate``
    at ``period / 2`` and returns. With ``phase = (t mod period) / period`` and
    ``k = t // period``: ``rate(t) = low + (high - low) * amplitude_decay**k * h(phase)``,
    ``h = 1 - |1 - 2 phase|`` (``"triangular"``) or ``(1 - cos(2 pi phase)) / 2``
    (``"cosine"``). It never ends. To start at the high rate, shift it:
    ``lambda t: f(t + period // 2)``.

    Args:
        low_drop_rate: rate at the start of each cycle, in ``[0, 1]``.
        high_drop_rate: rate at mid-cycle, in ``[low_drop_rate, 1]``.
        period: steps per cycle, an int >= 2.
        mode: ``"triangular"`` or ``"cosine"``.
        amplitude_decay: the amplitude is multiplied by this after every cycle, in
            ``(0, 1]``; ``0.5`` is Smith's ``triangular2`` policy.

    Example:
        >>> f = cyclical_schedule(0.0, 0.4, period=10)
        >>> f(0), f(5), f(10), f(15)
        (0.0, 0.4, 0.0, 0.4)
    """
    low = _check_rate(low_drop_rate, "low_drop_rate")
    high = _check_rate(high_drop_rate, "high_drop_rate")
    if low > high:
        raise ValueError(
            f"low_drop_rate must not exceed high_drop_rate, got low_drop_rate={low!r}, "
            f"high_drop_rate={high!r}; to start a cycle at the high rate, shift the schedule "
            "by half a period: lambda step: f(step + period // 2)"
        )
    return _Schedule(
        "cyclical_schedule",
        _cyclical,
        low_drop_rate=low,
        high_drop_rate=high,
        period=_check_int(period, "period", 2),
        mode=_check_choice(mode, "mode", _CYCLE_MODES),
        amplitude_decay=_check_fraction(amplitude_decay, "amplitude_decay"),
    )


def _warmup(step: int, drop_rate: float, warmup_steps: int, initial_drop_rate: float) -> float:
    return _linear(step, initial_drop_rate, drop_rate, warmup_steps)


def linear_warmup_schedule(
    drop_rate: float, warmup_steps: int, initial_drop_rate: float = 0.0
) -> Callable[[int], float]:
    """Linear warm-up from ``initial_drop_rate`` (default 0) to ``drop_rate`` over ``warmup_steps``, then constant.

    Gradient dropout is often harmful in the first steps, when the gradient is
    large and informative; a warm-up lets the model settle first. The same curve as
    ``linear_schedule(initial_drop_rate, drop_rate, warmup_steps)``.

    Args:
        drop_rate: rate from step ``warmup_steps`` on, in ``[0, 1]``.
        warmup_steps: length of the warm-up in optimizer steps, an int >= 1.
        initial_drop_rate: rate at step 0, in ``[0, 1]``.

    Example:
        >>> f = linear_warmup_schedule(0.2, warmup_steps=10)
        >>> f(0), f(5), f(10), f(99)
        (0.0, 0.1, 0.2, 0.2)
    """
    return _Schedule(
        "linear_warmup_schedule",
        _warmup,
        drop_rate=_check_rate(drop_rate, "drop_rate"),
        warmup_steps=_check_int(warmup_steps, "warmup_steps", 1),
        initial_drop_rate=_check_rate(initial_drop_rate, "initial_drop_rate"),
    )


def _join(step: int, schedules: tuple, boundaries: tuple) -> float:
    i = bisect.bisect_right(boundaries, step)
    start = boundaries[i - 1] if i else 0
    return schedules[i](step - start)


def join_schedules(
    schedules: Sequence[Callable[[int], float]], boundaries: Sequence[int]
) -> Callable[[int], float]:
    """Schedules one after another: ``schedules[i + 1]`` takes over at step ``boundaries[i]``.

    Each schedule sees its own step count, starting at 0 when it takes over (as in
    optax). Stateful schedulers may be given; their pure form ``sched(step)`` is used,
    not their position.

    Args:
        schedules: n >= 1 callables ``step -> rate``.
        boundaries: n - 1 strictly increasing ints >= 1.

    Example:
        >>> warmup_then_cosine = join_schedules(
        ...     [linear_warmup_schedule(0.3, 100), cosine_annealing_schedule(0.3, 0.0, 900)], [100])
        >>> warmup_then_cosine(50), warmup_then_cosine(100), warmup_then_cosine(1000)
        (0.15, 0.3, 0.0)
    """
    schedules = tuple(schedules)
    if not schedules:
        raise ValueError("schedules must hold at least one schedule")
    for i, s in enumerate(schedules):
        if not callable(s):
            hint = (
                " (AdaptiveDropRateScheduler is driven by reported metrics, not by the step, and cannot be joined)"
                if isinstance(s, AdaptiveDropRateScheduler)
                else ""
            )
            raise TypeError(f"schedules[{i}] must be a callable step -> rate, got {s!r}{hint}")
    boundaries = tuple(_check_int(b, f"boundaries[{i}]", 1) for i, b in enumerate(boundaries))
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"boundaries must hold len(schedules) - 1 = {len(schedules) - 1} steps, got {len(boundaries)}: {boundaries}"
        )
    if any(b >= c for b, c in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must be strictly increasing, got {boundaries}")
    return _Schedule("join_schedules", _join, schedules=schedules, boundaries=boundaries)


# ---------------------------------------------------------------------------
# stateful schedulers
# ---------------------------------------------------------------------------

class DropRateScheduler:
    """A drop rate that follows ``schedule(step)``, advanced one step at a time.

    The base of the stateful schedulers; give it any ``callable(step) -> rate`` to
    make a custom schedule with a position of its own (as ``LambdaLR`` does for
    learning rates). The state is the step count alone. Every rate read is checked:
    a value that is not a real number in ``[0, 1]`` raises an error naming this
    schedule, the step and the value.

    Args:
        schedule: a pure function ``step -> rate``.

    Attributes:
        schedule: the pure function.
        step_count: number of ``step()`` calls so far; ``get_drop_rate()`` returns
            ``schedule(step_count)``.

    Example:
        >>> sched = DropRateScheduler(lambda step: 0.1 if step < 2 else 0.0)
        >>> rates = []
        >>> for _ in range(3):
        ...     rates.append(sched.get_drop_rate()); sched.step()
        >>> rates
        [0.1, 0.1, 0.0]
    """

    def __init__(self, schedule: Callable[[int], float]) -> None:
        if not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> rate, got {schedule!r}")
        self.schedule = schedule
        self.step_count = 0

    def __call__(self, step: int) -> float:
        """The rate at ``step``, whatever the current position (the pure form)."""
        step = _check_step(step)
        return _rate_at(self.schedule(step), self, step)

    def get_drop_rate(self) -> float:
        """The rate at the current step."""
        return self(self.step_count)

    def step(self) -> None:
        """Advance one step."""
        self.step_count += 1

    def state_dict(self) -> dict[str, int]:
        """The position: ``{"step_count": int}``."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the position saved by :meth:`state_dict`."""
        if not isinstance(state_dict, Mapping) or "step_count" not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict expects a dict with key 'step_count' "
                f"(from state_dict()), got {state_dict!r}"
            )
        count = state_dict["step_count"]
        if isinstance(count, torch.Tensor) and count.numel() == 1 and not count.is_floating_point():
            count = count.item()
        self.step_count = _check_int(count, "state_dict['step_count']", 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.schedule!r})"


_SELF = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _argument(name: str, fn_name: str) -> property:
    """A read-only attribute for argument ``name``: a copy, so changing it cannot look as if it changed the rates."""

    def get(self: _StatefulForm) -> Any:
        value = self.schedule.kwargs[name]
        return list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value

    return property(get, doc=f"The ``{name}`` argument, as checked by :func:`{fn_name}` (read-only).")


class _StatefulForm(DropRateScheduler):
    """The adapter: a :class:`DropRateScheduler` generated from a pure schedule function.

    ``class XDropRateScheduler(_StatefulForm, of=x_schedule)`` gets a constructor with
    the signature of ``x_schedule`` that builds ``self.schedule = x_schedule(...)``
    (so the arguments are checked once, by the function), one read-only attribute per
    argument (the checked value) and the repr ``XDropRateScheduler(arg=value, ...)``.
    Everything else (stepping, state, the rate check) is :class:`DropRateScheduler`'s.
    """

    schedule: _Schedule
    if TYPE_CHECKING:  # the argument attributes are generated: let type checkers accept them
        def __getattr__(self, name: str) -> Any: ...

    def __init_subclass__(cls, of: Callable[..., Callable[[int], float]] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if of is None:  # a subclass of a built-in scheduler keeps the constructor it inherits
            return
        signature = inspect.signature(of)

        def __init__(self: DropRateScheduler, *args: Any, **kwargs: Any) -> None:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{cls.__name__}(): {exc}") from None
            DropRateScheduler.__init__(self, of(*bound.args, **bound.kwargs))

        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        __init__.__doc__ = f"Build the schedule with :func:`{of.__name__}`, which checks the arguments."
        __init__.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[_SELF, *signature.parameters.values()], return_annotation="None"
        )
        cls.__init__ = __init__  # type: ignore[method-assign]
        for name in signature.parameters:
            setattr(cls, name, _argument(name, of.__name__))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.schedule.args_repr()})"


# The `if TYPE_CHECKING` constructors below only declare, for type checkers and static
# documentation tools, the signature the adapter gives each class at run time (that of
# its pure function; tests/test_schedules.py checks that the two agree).


class ConstantDropRateScheduler(_StatefulForm, of=constant_schedule):
    """The same rate at every step: the stateful form of :func:`constant_schedule`.

    Example:
        >>> ConstantDropRateScheduler(0.1).get_drop_rate()
        0.1
    """

    if TYPE_CHECKING:
        def __init__(self, drop_rate: float) -> None: ...


class LinearDropRateScheduler(_StatefulForm, of=linear_schedule):
    """Linear from ``initial_drop_rate`` to ``final_drop_rate`` over ``num_steps`` steps, then constant.

    The stateful form of :func:`linear_schedule` (arguments and formula there):
    ``initial_drop_rate`` right after construction, ``final_drop_rate`` after
    ``num_steps`` calls of ``step()`` and from then on.

    Example:
        >>> sched = LinearDropRateScheduler(0.5, 0.0, num_steps=4)
        >>> rates = []
        >>> for _ in range(6):
        ...     rates.append(sched.get_drop_rate()); sched.step()
        >>> rates
        [0.5, 0.375, 0.25, 0.125, 0.0, 0.0]
    """

    if TYPE_CHECKING:
        def __init__(self, initial_drop_rate: float, final_drop_rate: float, num_steps: int) -> None: ...


class CosineAnnealingDropRateScheduler(_StatefulForm, of=cosine_annealing_schedule):
    """Half a cosine from ``initial_drop_rate`` to ``final_drop_rate`` over ``num_steps`` steps, then constant.

    The stateful form of :func:`cosine_annealing_schedule` (arguments and formula there).

    Example:
        >>> sched = CosineAnnealingDropRateScheduler(0.3, 0.0, num_steps=1000)
        >>> sched(0), sched(1000)
        (0.3, 0.0)
    """

    if TYPE_CHECKING:
        def __init__(self, initial_drop_rate: float, final_drop_rate: float, num_steps: int) -> None: ...


class StepDropRateScheduler(_StatefulForm, of=step_schedule):
    """Piecewise constant: ``drop_rate_schedule`` maps a step to the rate from that step on.

    The stateful form of :func:`step_schedule` (arguments there).

    Example:
        >>> sched = StepDropRateScheduler(0.5, {50: 0.3, 80: 0.1})
        >>> sched(49), sched(50), sched(80)
        (0.5, 0.3, 0.1)
    """

    if TYPE_CHECKING:
        def __init__(self, initial_drop_rate: float, drop_rate_schedule: Mapping[int, float]) -> None: ...


class ExponentialDecayDropRateScheduler(_StatefulForm, of=exponential_decay_schedule):
    """Exponential approach from ``initial_drop_rate`` to ``final_drop_rate`` (default 0).

    The stateful form of :func:`exponential_decay_schedule` (arguments and formula there).

    Example:
        >>> sched = ExponentialDecayDropRateScheduler(0.4, decay_rate=0.5, decay_steps=10)
        >>> sched(0), sched(10)
        (0.4, 0.2)
    """

    if TYPE_CHECKING:
        def __init__(
            self,
            initial_drop_rate: float,
            decay_rate: float,
            decay_steps: int = 1,
            final_drop_rate: float = 0.0,
            staircase: bool = False,
        ) -> None: ...


class CyclicalDropRateScheduler(_StatefulForm, of=cyclical_schedule):
    """Cycles between ``low_drop_rate`` and ``high_drop_rate`` every ``period`` steps.

    The stateful form of :func:`cyclical_schedule` (arguments and formula there).

    Example:
        >>> sched = CyclicalDropRateScheduler(0.0, 0.4, period=10, mode="cosine")
        >>> sched(0), sched(5), sched(10)
        (0.0, 0.4, 0.0)
    """

    if TYPE_CHECKING:
        def __init__(
            self,
            low_drop_rate: float,
            high_drop_rate: float,
            period: int,
            mode: str = "triangular",
            amplitude_decay: float = 1.0,
        ) -> None: ...


class LinearWarmupDropRateScheduler(_StatefulForm, of=linear_warmup_schedule):
    """Linear warm-up to ``drop_rate`` over ``warmup_steps`` steps, then constant.

    The stateful form of :func:`linear_warmup_schedule` (arguments there).

    Example:
        >>> sched = LinearWarmupDropRateScheduler(0.2, warmup_steps=10)
        >>> sched(0), sched(5), sched(10)
        (0.0, 0.1, 0.2)
    """

    if TYPE_CHECKING:
        def __init__(self, drop_rate: float, warmup_steps: int, initial_drop_rate: float = 0.0) -> None: ...


class SequentialDropRateScheduler(_StatefulForm, of=join_schedules):
    """Schedules one after another, ``schedules[i + 1]`` from step ``boundaries[i]`` on.

    The stateful form of :func:`join_schedules` (arguments there). The position is
    this object's own step count; the positions of stateful schedulers passed in are
    neither used nor changed.

    Example:
        >>> sched = SequentialDropRateScheduler(
        ...     [LinearWarmupDropRateScheduler(0.3, 100), CosineAnnealingDropRateScheduler(0.3, 0.0, 900)],
        ...     boundaries=[100])
        >>> sched(0), sched(100), sched(1000)
        (0.0, 0.3, 0.0)
    """

    if TYPE_CHECKING:
        def __init__(self, schedules: Sequence[Callable[[int], float]], boundaries: Sequence[int]) -> None: ...


# ---------------------------------------------------------------------------
# adaptive
# ---------------------------------------------------------------------------

_ADAPTIVE_STATE_KEYS = (
    "drop_rate", "best", "num_bad_reports", "cooldown_counter", "num_reports", "num_raises", "step_count",
)


class AdaptiveDropRateScheduler:
    """Raises the drop rate when a reported metric stops improving (``ReduceLROnPlateau`` in reverse).

    Call :meth:`report` after each evaluation. The monitored value is the metric
    you report (``monitor="metric"``, e.g. the validation loss) or the
    generalization gap ``val_loss - train_loss`` (``monitor="gap"``). A report
    improves on the best so far when it beats it by more than ``threshold``
    (relative: ``best * (1 -+ threshold)``, or absolute: ``best -+ threshold``).
    After more than ``patience`` reports in a row without improvement the rate rises
    to ``min(max_drop_rate, rate * factor + increment)``, the count restarts, and the
    next ``cooldown`` reports are not counted. The rate never goes down.

    When to use it: when you do not know in advance how much gradient dropout a
    model needs and want to start with little or none, adding regularization only
    once the model starts to overfit (validation loss stalls while the training
    loss keeps falling: ``monitor="gap"`` watches exactly that). If the validation
    loss stalls for other reasons (learning rate too high, underfitting) more dropout
    does not help: cap the rate with ``max_drop_rate``. Prefer a fixed schedule when
    the run must be reproducible from the step count alone, or when evaluations are
    too rare or too noisy to decide on (raise ``patience``/``threshold`` then).

    ``step()`` only counts optimizer steps (it is part of the wrapper protocol);
    the rate changes in :meth:`report`. The whole state is checkpointed.

    Args:
        min_drop_rate: lowest rate, and the starting rate unless ``initial_drop_rate`` is given.
        max_drop_rate: the rate never rises above this.
        initial_drop_rate: starting rate in ``[min_drop_rate, max_drop_rate]``.
        monitor: ``"metric"`` (``report(value)``) or ``"gap"``
            (``report(val_loss=..., train_loss=...)``).
        mode: ``"min"`` (lower is better, e.g. a loss) or ``"max"`` (e.g. accuracy);
            only ``"min"`` with ``monitor="gap"``.
        patience: reports without improvement tolerated; the rate rises on the
            ``patience + 1``-th in a row (as in ``ReduceLROnPlateau``). Int >= 0.
        increment: added to the rate on every raise, >= 0.
        factor: the rate is multiplied by this before adding ``increment``, >= 1.
        threshold: minimum improvement that counts, >= 0.
        threshold_mode: ``"rel"`` or ``"abs"``.
        cooldown: reports ignored after a raise, int >= 0.

    Example:
        >>> sched = AdaptiveDropRateScheduler(max_drop_rate=0.3, patience=1, increment=0.1)
        >>> [sched.report(v) for v in [1.0, 0.9, 0.95, 0.93, 0.92, 0.91]]
        [0.0, 0.0, 0.0, 0.1, 0.1, 0.2]
    """

    def __init__(
        self,
        min_drop_rate: float = 0.0,
        max_drop_rate: float = 0.5,
        initial_drop_rate: float | None = None,
        *,
        monitor: str = "metric",
        mode: str = "min",
        patience: int = 3,
        increment: float = 0.05,
        factor: float = 1.0,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
    ) -> None:
        self.min_drop_rate = _check_rate(min_drop_rate, "min_drop_rate")
        self.max_drop_rate = _check_rate(max_drop_rate, "max_drop_rate")
        if self.min_drop_rate > self.max_drop_rate:
            raise ValueError(
                f"min_drop_rate must not exceed max_drop_rate, got min_drop_rate={min_drop_rate!r}, "
                f"max_drop_rate={max_drop_rate!r}"
            )
        if initial_drop_rate is None:
            initial = self.min_drop_rate
        else:
            initial = _check_rate(initial_drop_rate, "initial_drop_rate")
            if not self.min_drop_rate <= initial <= self.max_drop_rate:
                raise ValueError(
                    f"initial_drop_rate must be in [min_drop_rate, max_drop_rate] = "
                    f"[{self.min_drop_rate}, {self.max_drop_rate}], got {initial_drop_rate!r}"
                )
        self.monitor = _check_choice(monitor, "monitor", ("metric", "gap"))
        self.mode = _check_choice(mode, "mode", ("min", "max"))
        if monitor == "gap" and mode != "min":
            raise ValueError("monitor='gap' watches val_loss - train_loss, where lower is better: use mode='min'")
        self.threshold_mode = _check_choice(threshold_mode, "threshold_mode", ("rel", "abs"))
        self.patience = _check_int(patience, "patience", 0)
        self.cooldown = _check_int(cooldown, "cooldown", 0)
        self.increment = _check_at_least(increment, "increment", 0.0)
        self.factor = _check_at_least(factor, "factor", 1.0)
        if self.increment == 0.0 and (self.factor == 1.0 or initial == 0.0):
            raise ValueError(
                f"with increment={increment!r} and factor={factor!r} the rate can never rise from "
                f"{initial}: give increment > 0 (additive) or factor > 1 with a nonzero starting rate"
            )
        self.threshold = _check_at_least(threshold, "threshold", 0.0)
        self.initial_drop_rate = initial
        self.drop_rate = initial
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_reports = 0
        self.cooldown_counter = 0
        self.num_reports = 0
        self.num_raises = 0
        self.step_count = 0

    def get_drop_rate(self) -> float:
        """The current rate."""
        return self.drop_rate

    def step(self) -> None:
        """Count one optimizer step (the rate only changes in :meth:`report`)."""
        self.step_count += 1

    def _is_better(self, value: float) -> bool:
        t, best = self.threshold, self.best
        if self.mode == "min":
            return value < (best * (1.0 - t) if self.threshold_mode == "rel" else best - t)
        return value > (best * (1.0 + t) if self.threshold_mode == "rel" else best + t)

    def report(
        self,
        metric: float | None = None,
        *,
        val_loss: float | None = None,
        train_loss: float | None = None,
    ) -> float:
        """Record one evaluation and return the (possibly raised) rate.

        Args:
            metric: the monitored value (``monitor="metric"``); ``val_loss=`` is accepted
                in its place.
            val_loss, train_loss: both required with ``monitor="gap"``.

        A NaN value counts as no improvement.
        """
        if self.monitor == "gap":
            if metric is not None or val_loss is None or train_loss is None:
                raise TypeError(
                    "monitor='gap' needs report(val_loss=..., train_loss=...), "
                    f"got metric={metric!r}, val_loss={val_loss!r}, train_loss={train_loss!r}"
                )
            value = _check_real(val_loss, "val_loss") - _check_real(train_loss, "train_loss")
        else:
            if train_loss is not None or (metric is None) == (val_loss is None):
                raise TypeError(
                    "monitor='metric' needs exactly one value: report(metric) or report(val_loss=...); "
                    "to watch val_loss - train_loss, build the scheduler with monitor='gap'"
                )
            value = _check_real(metric if metric is not None else val_loss, "metric")

        self.num_reports += 1
        if self._is_better(value):
            self.best = value
            self.num_bad_reports = 0
        else:
            self.num_bad_reports += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_reports = 0
        if self.num_bad_reports > self.patience:
            self.drop_rate = min(self.max_drop_rate, self.drop_rate * self.factor + self.increment)
            self.num_raises += 1
            self.cooldown_counter = self.cooldown
            self.num_bad_reports = 0
        return self.drop_rate

    def state_dict(self) -> dict[str, float | int]:
        """Everything that changes: rate, best value, counters."""
        return {k: getattr(self, k) for k in _ADAPTIVE_STATE_KEYS}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a dict from AdaptiveDropRateScheduler.state_dict(), got {state_dict!r}"
            )
        missing = [k for k in _ADAPTIVE_STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(
                f"AdaptiveDropRateScheduler.load_state_dict: missing keys {missing} "
                "(was this state saved from another kind of schedule?)"
            )
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in state_dict.items()}
        drop_rate = _check_rate(values["drop_rate"], "state_dict['drop_rate']")
        best = _check_real(values["best"], "state_dict['best']")
        counters = {
            k: _check_int(values[k], f"state_dict[{k!r}]", 0)
            for k in ("num_bad_reports", "cooldown_counter", "num_reports", "num_raises", "step_count")
        }
        self.drop_rate, self.best = drop_rate, best
        for k, v in counters.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in inspect.signature(type(self)).parameters)
        return f"{type(self).__name__}({args})"
