"""DropGrad's checkpoint format: encoding, validation, and the values a load would assign.

A load is two phases so that a rejected checkpoint changes nothing:
:func:`plan_load` type- and range-checks every field (errors name the key) and
computes the new values without assigning anything; :func:`apply_plan` then
assigns them (it cannot fail on a validated plan).

What wins on resume (the same in every direction): the checkpoint wins for
every value it records, as ``torch.optim`` does for ``lr`` -- seed, step,
rescale, the default rate, ``full_update_drop``, per-parameter rates and param
group rates. Where that replaces a different value the live optimizer was
built with, a :class:`UserWarning` names the setting, the constructor value and
the checkpoint value. Schedules and callables cannot be saved: the checkpoint
holds a marker (``"<live TypeName>"``) and the schedule's position; on load the
live object of the same kind at the same place is kept and its saved position
loaded. A marker with no live schedule/callable of the same kind at that place,
or a live schedule the checkpoint has no position for, is an error naming the key.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .masks import check_seed
from .rates import encode_rate, is_live_marker, is_schedule, validate_rate

__all__ = ["STATE_FORMAT", "STATE_KEY", "LoadPlan", "apply_plan", "plan_load"]

STATE_KEY = "dropgrad"
STATE_FORMAT = 1
_STEP_LIMIT = 1 << 63
_REQUIRED = ("format", "seed", "step", "last_step_skipped", "rescale", "drop_rate", "full_update_drop",
             "param_rates", "schedules")


def _key(name: str) -> str:
    return f"state_dict['{STATE_KEY}']['{name}']"


def check_step(value: Any, name: str) -> int:
    """A step count: a non-negative int below 2**63 (a 0-d integer tensor is accepted)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a non-negative int, got tensor {value!r}")
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if not 0 <= value < _STEP_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _same_kind(marker: str, live: Any) -> bool:
    return (
        live is not None
        and not isinstance(live, (float, str))
        and (is_schedule(live) or callable(live))
        and marker == encode_rate(live)
    )


def restore_rate(saved: Any, live: Any, name: str, allow_none: bool = True) -> Any:
    """The rate a load would assign at ``name``: the checkpoint's number, or the live schedule for a marker."""
    if is_live_marker(saved):
        if not _same_kind(saved, live):
            raise ValueError(
                f"{name}: the checkpoint's rate was a schedule/callable ({saved}); build DropGrad with a "
                f"schedule/callable of the same kind there before loading (the live one is {live!r})"
            )
        return live
    if isinstance(saved, (str, bool)):
        raise TypeError(f"{name} must be a number in [0, 1], None or a schedule marker, got {saved!r}")
    if saved is None:
        if not allow_none:
            raise TypeError(f"{name} must be a number in [0, 1] or a schedule marker, got None")
        return None
    if not isinstance(saved, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1] or a schedule marker, got {saved!r}")
    if math.isnan(float(saved)):
        raise ValueError(f"{name} must be a number in [0, 1], got nan")
    return validate_rate(float(saved), name, allow_none=False)


def _differs(live: Any, new: Any) -> bool:
    if live is new:
        return False
    if isinstance(live, float) and isinstance(new, float):
        return live != new
    return True


def _show(value: Any) -> str:
    return value if isinstance(value, str) and value == "drop_rate" else repr(value)


@dataclass
class LoadPlan:
    """The values a validated load assigns, and the warnings to give for replaced settings."""

    seed: int
    seed_agreed: bool
    step: int
    last_step_skipped: bool
    rescale: bool
    drop_rate: Any
    full_update_drop: Any
    param_rates: dict[int, Any]
    group_rates: list[tuple[bool, Any]]  # per group: (has a 'drop_rate' key, value)
    schedules: list[tuple[Any, Any]] = field(default_factory=list)  # (live schedule, state to load)
    warnings: list[str] = field(default_factory=list)


def check_group_rates(opt: Any, saved_groups: Any) -> list[tuple[bool, Any]]:
    """The param groups' rates a load would assign (the checkpoint's; markers keep live schedules)."""
    if not isinstance(saved_groups, list):
        raise TypeError(f"state_dict['param_groups'] must be a list, got {type(saved_groups).__name__}")
    live_groups = opt.param_groups
    if len(saved_groups) != len(live_groups):
        raise ValueError(
            f"state_dict['param_groups'] has {len(saved_groups)} groups, the optimizer has {len(live_groups)}"
        )
    out = []
    for i, (saved, live) in enumerate(zip(saved_groups, live_groups)):
        if not isinstance(saved, Mapping):
            raise TypeError(f"state_dict['param_groups'][{i}] must be a dict, got {type(saved).__name__}")
        if "drop_rate" in saved:
            out.append((True, restore_rate(saved["drop_rate"], live.get("drop_rate"),
                                           f"state_dict['param_groups'][{i}]['drop_rate']")))
        else:
            out.append((False, None))
    return out


def plan_load(opt: Any, ours: Any, group_rates: list[tuple[bool, Any]] | None = None) -> LoadPlan:
    """Validate DropGrad's part of a checkpoint against ``opt`` and compute what a load would assign.

    Nothing is assigned. ``group_rates`` (from :func:`check_group_rates`) are the
    param groups' rates after the load; ``None`` keeps the live ones.
    """
    if not isinstance(ours, Mapping):
        raise TypeError(f"state_dict['{STATE_KEY}'] must be a dict, got {type(ours).__name__}")
    missing = [k for k in _REQUIRED if k not in ours]
    if missing:
        raise ValueError(f"state_dict['{STATE_KEY}'] is not a DropGrad state (missing {missing})")
    fmt = ours["format"]
    if isinstance(fmt, bool) or not isinstance(fmt, numbers.Integral):
        raise TypeError(f"{_key('format')} must be an int, got {fmt!r}")
    if int(fmt) > STATE_FORMAT:
        raise ValueError(
            f"{_key('format')} is {fmt}, newer than this dropgrad understands ({STATE_FORMAT}); upgrade dropgrad"
        )
    if fmt < 1:
        raise ValueError(f"{_key('format')} must be in [1, {STATE_FORMAT}], got {fmt}")

    seed = check_seed(ours["seed"], _key("seed"))
    # missing (an older checkpoint): agree again at the next step, a no-op if ranks already agree
    seed_agreed = check_bool(ours.get("seed_agreed", False), _key("seed_agreed"))
    step = check_step(ours["step"], _key("step"))
    last_skipped = check_bool(ours["last_step_skipped"], _key("last_step_skipped"))
    rescale = check_bool(ours["rescale"], _key("rescale"))

    drop_rate = restore_rate(ours["drop_rate"], opt._drop_rate, _key("drop_rate"))
    saved_fud = ours["full_update_drop"]
    if saved_fud == "drop_rate":
        if drop_rate is None:
            raise ValueError(f"{_key('full_update_drop')} is 'drop_rate' but {_key('drop_rate')} is None")
        full_update_drop: Any = "drop_rate"
    else:
        live_fud = None if opt._full_update_drop == "drop_rate" else opt._full_update_drop
        full_update_drop = restore_rate(saved_fud, live_fud, _key("full_update_drop"), allow_none=False)

    saved_rates = ours["param_rates"]
    if not isinstance(saved_rates, Mapping):
        raise TypeError(f"{_key('param_rates')} must be a dict {{parameter index: rate}}, got {saved_rates!r}")
    n_params = len(opt._flat_params())
    param_rates: dict[int, Any] = {}
    for j, r in saved_rates.items():
        if isinstance(j, bool) or not isinstance(j, numbers.Integral) or not 0 <= int(j) < n_params:
            raise ValueError(
                f"{_key('param_rates')} has key {j!r}; keys must be parameter indices in [0, {n_params})"
            )
        param_rates[int(j)] = restore_rate(r, opt._param_rates.get(int(j)), f"{_key('param_rates')}[{j}]",
                                           allow_none=False)

    if group_rates is None:
        group_rates = [("drop_rate" in g, g.get("drop_rate")) for g in opt.param_groups]

    # the schedules in force after the load, named as DropGrad._schedules names them
    live_after: list[tuple[str, Any]] = []
    if is_schedule(drop_rate):
        live_after.append(("default", drop_rate))
    if is_schedule(full_update_drop):
        live_after.append(("full_update_drop", full_update_drop))
    for i, (has, rate) in enumerate(group_rates):
        if has and is_schedule(rate):
            live_after.append((f"group:{i}", rate))
    for j in sorted(param_rates):
        if is_schedule(param_rates[j]):
            live_after.append((f"param:{j}", param_rates[j]))
    saved_scheds = ours["schedules"]
    if not isinstance(saved_scheds, Mapping):
        raise TypeError(f"{_key('schedules')} must be a dict, got {type(saved_scheds).__name__}")
    names = {name for name, _ in live_after}
    extra = sorted(str(k) for k in saved_scheds if k not in names)
    if extra:
        raise ValueError(f"{_key('schedules')} has entries {extra} for no schedule in use after the load")
    schedules = []
    for name, sched in live_after:
        if name not in saved_scheds:
            raise ValueError(
                f"{_key('schedules')} has no entry {name!r} for the live schedule {sched!r}; "
                "its position cannot be restored"
            )
        state = saved_scheds[name]
        try:
            trial = copy.deepcopy(sched)
        except Exception:  # noqa: BLE001 - an uncopyable schedule is only checked when loaded
            trial = None
        if trial is not None:
            try:
                trial.load_state_dict(state)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{_key('schedules')}[{name!r}]: {exc}") from exc
        schedules.append((sched, state))

    plan = LoadPlan(seed, seed_agreed, step, last_skipped, rescale, drop_rate, full_update_drop,
                    param_rates, group_rates, schedules)
    # settings the checkpoint replaces: warn where the live value differs
    if opt._seed_agreed and opt._step_count == 0 and seed != opt.seed:  # an explicit constructor seed
        plan.warnings.append(f"seed: the constructor's {opt.seed} is replaced by the checkpoint's {seed}")
    if rescale != opt.rescale:
        plan.warnings.append(f"rescale: the constructor's {opt.rescale} is replaced by the checkpoint's {rescale}")
    if _differs(opt._drop_rate, drop_rate):
        plan.warnings.append(f"drop_rate: the constructor's {opt._drop_rate!r} is replaced by the checkpoint's "
                             f"{drop_rate!r}")
    if _differs(opt._full_update_drop, full_update_drop) and opt._full_update_drop != full_update_drop:
        plan.warnings.append(f"full_update_drop: the constructor's {_show(opt._full_update_drop)} is replaced by "
                             f"the checkpoint's {_show(full_update_drop)}")
    for j in sorted(set(opt._param_rates) | set(param_rates)):
        live, new = opt._param_rates.get(j), param_rates.get(j)
        if _differs(live, new):
            plan.warnings.append(f"params rate of parameter {j}: the constructor's {live!r} is replaced by the "
                                 f"checkpoint's {new!r}")
    for i, ((has, new), g) in enumerate(zip(group_rates, opt.param_groups)):
        live = g.get("drop_rate")
        if (has != ("drop_rate" in g)) or (has and _differs(live, new)):
            plan.warnings.append(f"param_groups[{i}]['drop_rate']: the constructor's {live!r} is replaced by the "
                                 f"checkpoint's {new if has else 'no key'!r}")
    return plan


def apply_plan(opt: Any, plan: LoadPlan, stacklevel: int = 3) -> None:
    """Assign a validated :class:`LoadPlan` to ``opt`` (group rates included) and give its warnings."""
    opt._seed = plan.seed
    opt._seed_agreed = plan.seed_agreed
    opt._step_count = plan.step
    opt._clocks.mark_stale()  # capturable: the next eager step writes the loaded counters to the device
    opt.last_step_skipped = plan.last_step_skipped
    opt._rescale = plan.rescale
    opt._drop_rate = plan.drop_rate
    opt._full_update_drop = plan.full_update_drop
    opt._param_rates = dict(plan.param_rates)
    for group, (has, rate) in zip(opt.param_groups, plan.group_rates):
        if has:
            group["drop_rate"] = rate
        else:
            group.pop("drop_rate", None)
    for sched, state in plan.schedules:
        sched.load_state_dict(state)
    for message in plan.warnings:
        warnings.warn(f"load_state_dict: {message} (the checkpoint wins for every value it records)",
                      UserWarning, stacklevel=stacklevel)
