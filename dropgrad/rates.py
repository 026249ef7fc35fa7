"""Drop rates: validation, schedules as rate sources, and per-parameter resolution.

A *rate* is anything DropGrad accepts where a drop rate goes:

- a real number in ``[0, 1]``;
- a stateful schedule: an object with ``get_drop_rate()``, ``step()``,
  ``state_dict()`` and ``load_state_dict()`` (all classes in
  :mod:`dropgrad.schedules`); DropGrad reads it once per step and steps it once
  per step;
- any other callable ``f(step) -> rate``, a pure function of the step count.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch

from .masks import keep_threshold

__all__ = [
    "Rate", "check_rate", "is_schedule", "validate_rate", "evaluate_rate", "encode_rate", "is_live_marker",
    "collect_param_names", "resolve_param_rates",
]

#: a rate below 1 whose keep threshold is 1 (rates up to about it keep some elements; see check_rate)
MAX_RATE_BELOW_ONE = 1.0 - 2.0**-32


def check_rate(value: object, name: str = "drop_rate") -> float:
    """Validate a drop rate (a real number in ``[0, 1]``) and return it as a float.

    ``name`` says where the value came from (an argument, a param group key, a
    schedule at a step, a checkpoint field); every message names it, the value
    and what is allowed. A rate so close to 1 that its keep threshold rounds to
    zero (p below 1 but within about 2**-33 of it) is refused: no element would be kept, yet the
    survivors' factor could not be ``1/(1-p)``; use 1.0 to drop everything.

    Raises:
        TypeError: ``value`` is not a real number (bools are refused too).
        ValueError: ``value`` is NaN, outside ``[0, 1]``, or below 1 with a keep threshold of 0.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {value!r} of type {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if value < 1.0 and keep_threshold(value) == 0:
        raise ValueError(
            f"{name}={value!r} is so close to 1 that no element would be kept (its keep threshold rounds to 0); "
            f"use a rate of at most {MAX_RATE_BELOW_ONE!r}, or 1.0 to drop every element"
        )
    return value

Rate = Union[float, Callable[[int], float], Any]  # noqa: UP007 - a runtime alias (Python 3.9 syntax)

_GLOB_CHARS = set("*?[")


def is_schedule(value: object) -> bool:
    """True for stateful schedule objects (``get_drop_rate`` + ``step``)."""
    return callable(getattr(value, "get_drop_rate", None)) and callable(getattr(value, "step", None))


def validate_rate(value: object, name: str, allow_none: bool = False) -> Rate | None:
    """Return ``value`` if it is a valid rate (numbers are range-checked and made float)."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a number in [0, 1], a schedule or a callable(step), got None")
    if is_schedule(value) or (callable(value) and not isinstance(value, torch.Tensor)):
        return value
    return check_rate(value, name)


def evaluate_rate(value: Rate | None, step: int, cache: dict[int, float], source: str = "drop rate") -> float:
    """The rate in force at ``step`` (0.0 for None), validated now; each schedule is read once per step.

    ``source`` names where the rate comes from (``"param_groups[0]['drop_rate']"``)
    for the error of an invalid value: a number put into a param group after
    construction, or a schedule's value at this step, is checked at the moment
    it is used, so nothing has changed when it raises.
    """
    if value is None:
        return 0.0
    if type(value) is float and 0.0 <= value <= 1.0 and (value == 0.0 or value == 1.0 or value <= MAX_RATE_BELOW_ONE):
        return value  # the common case (NaN fails the comparisons)
    key = id(value)
    if key in cache:
        return cache[key]
    if is_schedule(value):
        sched: Any = value
        rate = check_rate(sched.get_drop_rate(), f"{source} (schedule {value!r} at step {step})")
    elif callable(value) and not isinstance(value, torch.Tensor):
        rate = check_rate(value(step), f"{source} (callable {value!r} at step {step})")
    else:  # a number (or anything else) put into a param group after construction
        rate = check_rate(value, source)
    cache[key] = rate
    return rate


def encode_rate(value: Rate | None) -> float | str | None:
    """A checkpoint-safe stand-in: numbers stay, a schedule/callable becomes a marker string."""
    if value is None or isinstance(value, float):
        return value
    return f"<live {type(value).__name__}>"


def is_live_marker(value: object) -> bool:
    """Whether ``value`` is :func:`encode_rate`'s stand-in for a schedule or callable."""
    return isinstance(value, str) and value.startswith("<live ")


def _match_specificity(key: str, name: str) -> tuple[int, int] | None:
    """How specifically name key ``key`` matches parameter name ``name`` (None: no match).

    Exact name beats a dotted prefix (longer prefix wins), which beats a glob
    (the glob with more literal characters wins).
    """
    if name == key:
        return (2, len(key))
    if name.startswith(key + "."):
        return (1, len(key))
    if _GLOB_CHARS & set(key) and fnmatch.fnmatchcase(name, key):
        return (0, sum(1 for c in key if c not in _GLOB_CHARS))
    return None


def collect_param_names(
    param_groups: list[dict[str, Any]],
    model: torch.nn.Module | None,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
) -> dict[int, str]:
    """Map ``id(param)`` to its name from the optimizer, ``model`` or ``named_parameters``."""
    names: dict[int, str] = {}
    for group in param_groups:
        for name, p in zip(group.get("param_names", ()), group["params"]):
            names[id(p)] = name
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, p in model.named_parameters():
            names.setdefault(id(p), name)
    if named_parameters is not None:
        for item in named_parameters:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"named_parameters must yield (name, parameter) pairs, got {item!r}")
            names.setdefault(id(item[1]), item[0])
    return names


def resolve_param_rates(
    params: Mapping[Any, Any],
    indexed_params: list[torch.Tensor],
    names: dict[int, str],
) -> dict[int, Rate]:
    """Turn a user's ``params={...}`` dict into ``{param index: rate}``.

    Keys are parameters (most specific of all) or names: a name key matches a
    parameter whose name equals it or starts with it followed by a dot, or,
    if it contains ``*``, ``?`` or ``[``, by glob. The most specific key wins.

    Raises:
        TypeError: a key is neither a tensor nor a string, or a rate is invalid.
        ValueError: a key matches no parameter, names cannot be resolved, or
            two equally specific keys claim one parameter.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict mapping parameters or names to drop rates, got {type(params).__name__}")
    position = {id(p): i for i, p in enumerate(indexed_params)}
    by_tensor: dict[int, Rate] = {}
    by_name: list[tuple[str, Rate]] = []
    for key, value in params.items():
        if isinstance(key, torch.Tensor):
            rate = validate_rate(value, f"params[<tensor of shape {tuple(key.shape)}>]")
            if id(key) not in position:
                raise ValueError(
                    f"params has a key tensor of shape {tuple(key.shape)} that the wrapped optimizer does not optimize"
                )
            by_tensor[position[id(key)]] = rate
        elif isinstance(key, str):
            by_name.append((key, validate_rate(value, f"params[{key!r}]")))
        else:
            raise TypeError(f"params keys must be parameters or parameter names (str), got {key!r}")

    resolved: dict[int, Rate] = {}
    if by_name:
        unnamed = [i for i, p in enumerate(indexed_params) if id(p) not in names]
        if len(unnamed) == len(indexed_params):
            raise ValueError(
                f"params has name keys {[k for k, _ in by_name]} but the parameter names cannot be resolved: "
                "build the optimizer from model.named_parameters(), or pass model= or named_parameters= to DropGrad"
            )
        matched: set[str] = set()
        for i, p in enumerate(indexed_params):
            name = names.get(id(p))
            if name is None:
                continue
            best: tuple[tuple[int, int], str, Rate] | None = None
            tie: str | None = None
            for key, rate in by_name:
                spec = _match_specificity(key, name)
                if spec is None:
                    continue
                matched.add(key)
                if best is None or spec > best[0]:
                    best, tie = (spec, key, rate), None
                elif spec == best[0]:
                    tie = key
            if best is not None:
                if tie is not None:
                    raise ValueError(
                        f"params keys {best[1]!r} and {tie!r} match parameter {name!r} equally specifically; "
                        "use a more specific key for it"
                    )
                resolved[i] = best[2]
        unmatched = [k for k, _ in by_name if k not in matched]
        if unmatched:
            known = sorted(names.get(id(p), "?") for p in indexed_params)
            shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
            raise ValueError(f"params keys {unmatched} match no parameter of the optimizer (names: {shown})")
    resolved.update(by_tensor)
    return resolved
