"""The :class:`DropGrad` optimizer wrapper: gradient dropout before any torch optimizer's step."""

from __future__ import annotations

import itertools
import operator
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
import torch.optim.optimizer as _torch_optimizer

from . import checkpoint as _checkpoint
from . import compiled
from . import dcp as _dcp
from . import masks as _masks
from .agreement import agree_seed_if_distributed, process_group_size
from .clocks import DeviceClocks, refuse_uncapturable
from .functional import apply_masks_, check_impl
from .kernels import cpu as _cpu_kernel
from .rates import (
    Rate,
    collect_param_names,
    encode_rate,
    evaluate_rate,
    is_schedule,
    resolve_param_rates,
    validate_rate,
)
from .sharding import ParamRegistry, local_shards, refuse_flat_params, zero_owned_param_ids

__all__ = ["DropGrad"]

_STATE_KEY = "dropgrad"
_STATE_FORMAT = 1
_TWO32 = _masks.TWO32
_is_sparse = operator.attrgetter("is_sparse")
_get_grad = operator.attrgetter("grad")
_PLAIN = {torch.Tensor}
# torch's global optimizer step hooks (register_optimizer_step_pre_hook/post_hook): DropGrad.step runs them
_GLOBAL_PRE_HOOKS = _torch_optimizer._global_optimizer_pre_hooks
_GLOBAL_POST_HOOKS = _torch_optimizer._global_optimizer_post_hooks


def _refuse_duplicates(params: list[torch.Tensor], where: str) -> None:
    """A parameter listed twice would be masked twice (and raced on by the C kernel's threads): refuse it."""
    if len(set(map(id, params))) != len(params):
        seen: dict[int, int] = {}
        for j, p in enumerate(params):
            if id(p) in seen:
                raise ValueError(
                    f"{where}: parameter {j} (shape {tuple(p.shape)}) is the same tensor as parameter {seen[id(p)]}; "
                    "list each parameter once (DropGrad would mask its gradient twice)"
                )
            seen[id(p)] = j


class DropGrad(torch.optim.Optimizer):
    r"""Wrap a ``torch.optim`` optimizer so that every step sees dropped-out gradients.

    Before each step, every gradient element is zeroed independently with
    probability ``p`` and survivors are multiplied by ``1/(1-p)``:
    ``g <- g * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)``, so ``E[g]`` is
    unchanged. Then the wrapped optimizer's own ``step()`` runs.

    The wrapper *is* a ``torch.optim.Optimizer`` and shares ``param_groups`` and
    ``state`` with the wrapped one, so LR schedulers, ``GradScaler``, hooks and
    checkpoints work on either object.

    Args:
        optimizer: the ``torch.optim.Optimizer`` to wrap.
        drop_rate: default rate for every parameter: a number in ``[0, 1]``, a
            schedule from :mod:`dropgrad.schedules`, or a ``callable(step)``.
            ``None`` leaves parameters that ``params`` and param groups do not
            name undropped (then ``params`` is required).
        params: per-parameter rates: a dict from parameters or parameter names
            to rates. A name matches itself and its dotted children
            (``'encoder'`` matches ``'encoder.layer0.weight'``); globs such as
            ``'*.bias'`` work; the most specific key wins.
        full_update_drop: probability of skipping a whole step (a number in
            ``[0, 1]`` or a schedule); ``True`` means "with probability
            ``drop_rate``", ``False`` never skips.
        seed: seed of the masks (and of the full-update coin). Without one, a
            seed is drawn once from torch's global RNG here, at construction,
            and inside an initialized process group the first ``step()``
            replaces it by rank 0's (see :mod:`dropgrad.distributed`).
        rescale: multiply survivors by ``1/(1-p)`` (default ``True``).
        model: a module to take parameter names from (for name keys in ``params``).
        named_parameters: ``(name, parameter)`` pairs to take names from.
        drop_rate_scheduler: a schedule for the default rate (same as passing it
            as ``drop_rate``).
        impl: mask kernel: ``None`` (fastest available), ``"reference"`` or ``"fused"``.
        capturable: keep the step count on the gradients' devices as well (one
            int64 *clock* ``[seed, step]`` per device, advanced by the step itself),
            so that ``optimizer.step()`` can be captured in a CUDA graph and every
            replay draws fresh masks, like ``torch.optim``'s ``capturable=True``
            (give the wrapped optimizer ``capturable=True`` too where it has it).
            Needs constant drop rates (numbers; no schedules or callables) and no
            full update drop, since a graph replays what it captured. See
            :doc:`/performance` ("CUDA graphs").

    A param group may carry its own ``"drop_rate"`` key (like ``"lr"``); rates
    resolve as: ``params`` entry, else the group's ``drop_rate``, else ``drop_rate``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1, seed=0)
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        drop_rate: Rate | None = None,
        params: Mapping[Any, Rate] | None = None,
        full_update_drop: bool | Rate = False,
        seed: int | None = None,
        rescale: bool = True,
        *,
        model: torch.nn.Module | None = None,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
        drop_rate_scheduler: Any = None,
        impl: str | None = None,
        capturable: bool = False,
    ) -> None:
        if isinstance(optimizer, DropGrad):
            raise TypeError("optimizer is already a DropGrad; wrap the underlying optimizer once")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # What torch.optim.Optimizer.__init__ would set up, minus param_groups/state,
        # which belong to the wrapped optimizer (see the properties below).
        self.optimizer = optimizer
        self._init_hook_dicts()

        if drop_rate_scheduler is not None:
            if not (is_schedule(drop_rate_scheduler) or callable(drop_rate_scheduler)):
                raise TypeError(
                    f"drop_rate_scheduler must be a schedule (get_drop_rate/step) or a callable(step), "
                    f"got {drop_rate_scheduler!r}"
                )
            if drop_rate is not None:
                warnings.warn(
                    f"drop_rate={drop_rate!r} is replaced by drop_rate_scheduler={drop_rate_scheduler!r}",
                    UserWarning,
                    stacklevel=2,
                )
            drop_rate = drop_rate_scheduler
        if drop_rate is None and params is None and not any("drop_rate" in g for g in optimizer.param_groups):
            raise ValueError(
                "DropGrad needs drop_rate or params (or a 'drop_rate' key in a param group); got none of them"
            )
        self._drop_rate = validate_rate(drop_rate, "drop_rate", allow_none=True)

        if full_update_drop is True:
            if self._drop_rate is None:
                raise ValueError("full_update_drop=True means 'skip with probability drop_rate', but drop_rate is None")
            self._full_update_drop: Rate | str = "drop_rate"
        elif full_update_drop is False or full_update_drop is None:
            self._full_update_drop = 0.0
        else:
            self._full_update_drop = validate_rate(full_update_drop, "full_update_drop")

        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be a bool, got {rescale!r}")
        self.rescale = rescale
        self.impl = check_impl(impl)
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {capturable!r}")
        self._capturable = capturable
        # capturable: the clocks (int64 [seed, step]) the masks read on each device (dropgrad.clocks)
        self._clocks = DeviceClocks()

        # an explicit seed is the same on every rank on the user's word; a drawn one
        # is agreed across the process group at the first step (dropgrad.distributed)
        self._seed_agreed = seed is not None
        # id(param) -> step count for gradients a DDP comm hook already masked (without
        # the 1/(1-p) factor) for that step: dropgrad.distributed.masked_allreduce_hook
        self._premasked: dict[int, int] = {}
        # None, or what DCP's loads left for the next step to settle: "missing" (DCP loaded the
        # optimizer without DropGrad's state) or "loaded" (DropGrad's state was loaded since the last step)
        self._dcp_load: str | None = None
        self.seed = _masks.draw_seed() if seed is None else _masks.check_seed(seed, "seed")
        self._step_count = 0
        self.last_step_skipped = False
        # (step, skipped, default rate, [(param index, masked numel, rate)]) of the last step, for stats()
        self._last_step_record: tuple[int, bool, float | None, list[tuple[int, int, float]]] | None = None
        # the plan of the step in progress (between _begin_step and _end_step), else None
        self._pending_plan: list[tuple[int, torch.Tensor, float]] | None = None
        # whether the last mask pass over that plan found every gradient present and dense
        self._pending_dense = False

        for i, group in enumerate(self.param_groups):
            if "drop_rate" in group:
                group["drop_rate"] = validate_rate(group["drop_rate"], f"param_groups[{i}]['drop_rate']", allow_none=True)
        self._param_rates: dict[int, Rate] = {}
        flat = self._flat_params()
        _refuse_duplicates(flat, "optimizer")
        refuse_flat_params(flat, "optimizer")
        self._registry = ParamRegistry(self.param_groups)  # refuses flat buffers swapped in (DeepSpeed ZeRO-1/2)
        # names (from model=, named_parameters= or the groups' "param_names"), validated even when
        # params= does not use them; kept in optimizer order for the rank checks (param_names())
        names = collect_param_names(self.param_groups, model, named_parameters)
        self._param_names: list[str | None] = [names.get(id(p)) for p in flat]
        if params is not None:
            self._param_rates = resolve_param_rates(params, flat, names)
        self._handle = compiled.register(self._mask_compiled_step)
        if capturable:
            self._refuse_uncapturable()
        if any(p.device.type == "cpu" for p in flat):
            _cpu_kernel.start_build()  # off the first step's critical path; a CUDA-only model never builds it

    # ------------------------------------------------------------------ plumbing
    def _init_hook_dicts(self) -> None:
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    # param_groups, state and defaults *are* the wrapped optimizer's: a scheduler
    # built on either object changes the same dicts, and load_state_dict on the
    # wrapped optimizer (which replaces its lists) never leaves us stale.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        skip = {name for name in self.__dict__ if name.startswith("_optimizer_") and name.endswith("_hooks")}
        skip.update(("_handle", "_registry"))  # the latter: rebuilt from param_groups on load
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Optimizer.__setstate__ would write param_groups/state into __dict__,
        # shadowed by our properties; restore our own attributes instead.
        self.__dict__.update(state)
        self.__dict__.setdefault("_seed_agreed", False)  # pickled before distributed support
        self.__dict__.setdefault("_premasked", {})
        self.__dict__.setdefault("_pending_plan", None)
        self.__dict__.setdefault("_pending_dense", False)
        self._registry = ParamRegistry(self.param_groups)
        self.__dict__.setdefault("_dcp_load", None)
        self.__dict__.setdefault("_param_names", [])  # pickled before names were kept: unknown
        self.__dict__.setdefault("_capturable", False)
        self.__dict__.setdefault("_clocks", DeviceClocks())
        for old in ("rescale", "impl", "seed"):  # pickled before these became validated properties
            if old in self.__dict__:
                self.__dict__["_" + old] = self.__dict__.pop(old)
        self._handle = compiled.register(self._mask_compiled_step)
        self._init_hook_dicts()

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n    ")
        fud = "drop_rate" if self._full_update_drop == "drop_rate" else self._full_update_drop
        return (
            f"DropGrad(drop_rate={self._drop_rate!r}, full_update_drop={fud!r}, rescale={self.rescale}, "
            f"per_param_rates={len(self._param_rates)}, seed={self.seed}, step={self.step_count},\n"
            f"    optimizer={inner})"
        )

    def _flat_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def param_names(self) -> list[str | None]:
        """Every parameter's name, in optimizer order (``None`` where unknown).

        Names come from ``model=``, ``named_parameters=`` or the param groups'
        ``"param_names"`` (an optimizer built on ``model.named_parameters()``),
        as they were at construction or :meth:`add_param_group`. The rank checks
        of :mod:`dropgrad.distributed` compare them, so that parameters listed in
        a different order on some rank are named in the error.
        """
        count = sum(len(group["params"]) for group in self.param_groups)
        return (self._param_names + [None] * count)[:count]

    # ------------------------------------------------------------------ rates
    @property
    def drop_rate(self) -> Rate | None:
        """The default drop rate (a number, a schedule, a callable or None)."""
        return self._drop_rate

    @drop_rate.setter
    def drop_rate(self, value: Rate | None) -> None:
        self._drop_rate = validate_rate(value, "drop_rate", allow_none=True)

    @property
    def rescale(self) -> bool:
        """Multiply survivors by ``1/(1-p)`` (a bool)."""
        return self._rescale

    @rescale.setter
    def rescale(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"rescale must be a bool, got {value!r}")
        self._rescale = value

    @property
    def impl(self) -> str | None:
        """Mask kernel: ``None`` (fastest available), ``"reference"`` or ``"fused"``."""
        return self._impl

    @impl.setter
    def impl(self, value: str | None) -> None:
        self._impl = check_impl(value)

    @property
    def seed(self) -> int:
        """Seed of the masks (an int; used modulo 2**64)."""
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = _masks.check_seed(value, "seed")
        self._clocks.mark_stale()  # capturable: the next eager step writes it to the devices

    @property
    def full_update_drop(self) -> Rate | bool:
        """Probability of skipping a whole step (``True``: the drop rate)."""
        return True if self._full_update_drop == "drop_rate" else self._full_update_drop

    @property
    def step_count(self) -> int:
        """Number of ``step()`` calls so far, skipped ones included (the schedules' clock).

        With ``capturable=True`` the count is read from the device clock (a
        synchronization on a GPU), which the replays of a captured step advance.
        """
        self._read_clock()
        return self._step_count

    @property
    def capturable(self) -> bool:
        """Whether the step count also lives on the devices, so that a step can be captured in a CUDA graph."""
        return self._capturable

    # ------------------------------------------------------------------ CUDA graphs (capturable=True)
    def _refuse_uncapturable(self) -> None:
        """capturable=True: every rate a number and no full update drop (a graph replays what it captured)."""
        sources: list[tuple[str, Any]] = [("drop_rate", self._drop_rate)]
        sources += [(f"param_groups[{i}]['drop_rate']", g["drop_rate"])
                    for i, g in enumerate(self.param_groups) if "drop_rate" in g]
        sources += [(f"the params rate of parameter {j}", r) for j, r in sorted(self._param_rates.items())]
        refuse_uncapturable(sources, self.full_update_drop)

    def _read_clock(self) -> None:
        """capturable: take the step count from the device clocks, which replays of a graph advanced."""
        if self._clocks:
            step = self._clocks.step()
            if step is not None:
                self._step_count = step

    def _apply_masks(self, grads: list[torch.Tensor], indices: Any, thresholds: Any, scales: Any, offsets: Any,
                     stream: int) -> None:
        """Mask through the dispatcher: keys from the host's counters, or (capturable) from each device's clock."""
        if not self._capturable:
            prefix = _masks.step_prefix(self.seed, self._step_count)  # the per-step half of every key
            apply_masks_(grads, indices, thresholds, scales, offsets, prefix=prefix, stream=stream, impl=self.impl)
            return
        devices: dict[torch.device, list[int]] = {}
        for j, g in enumerate(grads):
            devices.setdefault(g.device, []).append(j)
        offsets = [0] * len(grads) if offsets is None else offsets
        for device, members in devices.items():
            pick = lambda xs: [xs[j] for j in members]  # noqa: E731, B023 - used at once
            clock = self._clocks.get(device, self.seed, self._step_count)
            apply_masks_(pick(grads), pick(indices), pick(thresholds), pick(scales), pick(offsets),
                         prefix=clock, stream=stream, impl=self.impl)

    def _schedules(self) -> list[tuple[str, Any]]:
        """Every stateful schedule in use, with a stable name for checkpoints."""
        found = []
        if is_schedule(self._drop_rate):
            found.append(("default", self._drop_rate))
        if is_schedule(self._full_update_drop):
            found.append(("full_update_drop", self._full_update_drop))
        for i, group in enumerate(self.param_groups):
            if is_schedule(group.get("drop_rate")):
                found.append((f"group:{i}", group["drop_rate"]))
        for j in sorted(self._param_rates):
            if is_schedule(self._param_rates[j]):
                found.append((f"param:{j}", self._param_rates[j]))
        return found

    def current_drop_rates(self) -> list[float]:
        """The rate each parameter gets at the coming step, in optimizer order."""
        cache: dict[int, float] = {}
        return [rate for _, _, rate in self._plan(cache)]

    def stats(self, exact: bool = False) -> dict[str, Any]:
        """Statistics of the last step, to log: rates, share of dropped elements, skip.

        Returns a dict with ``last_step`` (the index of the step just taken,
        ``step_count - 1``; ``step_count`` is the number of steps taken),
        ``skipped`` (full update drop skipped it), ``drop_rate`` (the default rate
        in force, or None), ``min_drop_rate``/``max_drop_rate`` and
        ``expected_dropped_fraction`` (numel-weighted mean rate) over the
        parameters that had a gradient, and ``dropped_fraction``: with
        ``exact=True``, the share of those gradient elements the masks zeroed,
        recounted from the counters (one pass over the elements; the first
        closure evaluation's masks), else None. On a skipped step no masks were
        applied: ``dropped_fraction`` is None and the update was dropped whole.
        Before the first step every value is None (``skipped`` False).
        """
        record = getattr(self, "_last_step_record", None)
        if record is None:
            return {"last_step": None, "skipped": False, "drop_rate": None, "min_drop_rate": None,
                    "max_drop_rate": None, "expected_dropped_fraction": None, "dropped_fraction": None}
        step, skipped, default, sizes = record
        if self._clocks:  # capturable: replays of a captured step ran since (same plan: constant rates)
            step = self.step_count - 1
        total = sum(n for _, n, _ in sizes)
        rates = [rate for _, _, rate in sizes]
        dropped = None
        if exact and not skipped and total:
            zeros = 0
            for index, n, rate in sizes:
                threshold = _masks.keep_threshold(rate)
                if rate == 0.0:
                    continue
                key = _masks.derive_key(self.seed, step, index, _masks.MASKS_STREAM)
                chunk = 1 << 22  # bounds the int64 temporaries of the hash
                for start in range(0, n, chunk):
                    zeros += int((_masks.hash_tensor(min(chunk, n - start), key, start) >= threshold).sum())
            dropped = zeros / total
        return {
            "last_step": step,
            "skipped": skipped,
            "drop_rate": default,
            "min_drop_rate": min(rates) if rates else None,
            "max_drop_rate": max(rates) if rates else None,
            "expected_dropped_fraction": sum(n * rate for _, n, rate in sizes) / total if total else None,
            "dropped_fraction": dropped,
        }

    def _plan(self, cache: dict[int, float]) -> list[tuple[int, torch.Tensor, float]]:
        step = self._step_count
        default = evaluate_rate(self._drop_rate, step, cache, "drop_rate")
        plan: list[tuple[int, torch.Tensor, float]] = []
        index = 0
        overrides = sorted(self._param_rates) if self._param_rates else ()
        k = 0  # next entry of overrides
        for i, group in enumerate(self.param_groups):
            if "drop_rate" in group:
                group_rate = evaluate_rate(group["drop_rate"], step, cache, f"param_groups[{i}]['drop_rate']")
            else:
                group_rate = default
            params = group["params"]
            stop = index + len(params)
            # whole-group construction (C-level zip); per-parameter rates patched in afterwards, in order
            plan.extend(zip(range(index, stop), params, itertools.repeat(group_rate)))
            while k < len(overrides) and overrides[k] < stop:
                j = overrides[k]
                if j >= index:
                    rate = evaluate_rate(self._param_rates[j], step, cache, f"params rate of parameter {j}")
                    plan[j] = (j, plan[j][1], rate)
                k += 1
            index = stop
        return plan

    def drop_plan(self) -> list[tuple[int, torch.Tensor, float]]:
        """``(index, parameter, rate)`` for every parameter at the coming step, in optimizer order.

        ``index`` is the parameter's position in the optimizer (the counter its
        mask key is derived from). Rates are validated here, so an invalid rate
        (a param group's ``drop_rate`` set to -0.5, a schedule returning 2.0)
        raises naming its source; the coming ``step()`` raises the same way.
        """
        return self._plan({})

    # ------------------------------------------------------------------ the step
    def _rate_tables(self, rates: tuple[float, ...]) -> tuple[list[int], list[float]]:
        """Thresholds and survivors' factors for the plan's rates (cached: rates rarely change)."""
        key = (rates, self.rescale)
        cached = self.__dict__.get("_rate_cache")
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        per_rate = {}
        for r in set(rates):
            thr = _masks.keep_threshold(r)
            per_rate[r] = (thr, _masks.survivor_scale(thr, self.rescale))
        thresholds = [per_rate[r][0] for r in rates]
        scales = [per_rate[r][1] for r in rates]
        self.__dict__["_rate_cache"] = (key, thresholds, scales)
        return thresholds, scales

    @torch.no_grad()
    def _mask_gradients(self, plan: list[tuple[int, torch.Tensor, float]], evaluation: int,
                        grads: list[torch.Tensor | None] | None = None) -> None:
        """Mask the gradients of ``plan`` (``grads``: the plan's gradients, default each ``p.grad``)."""
        if not plan:
            return
        indices, params, rates = zip(*plan)
        if grads is None:
            grads = list(map(_get_grad, params))
        stream = _masks.MASKS_STREAM + evaluation
        owned = zero_owned_param_ids(self.optimizer)  # None: every parameter
        thresholds, scales = self._rate_tables(rates)
        dense = set(map(type, grads)) == _PLAIN and not any(map(_is_sparse, grads))
        if plan is self._pending_plan:
            self._pending_dense = dense  # then _end_step need not look at the gradients again
        if owned is None and not self._premasked and dense:
            # the common case, list-wide: the dispatcher picks the kernel once for the whole step
            self._apply_masks(cast("list[torch.Tensor]", grads), indices, thresholds, scales, None, stream)
            return
        pieces, piece_indices, piece_thresholds, piece_scales, offsets = [], [], [], [], []
        for index, p, g, thr, scale in zip(indices, params, grads, thresholds, scales):
            if g is None or thr >= _TWO32 and scale == 1.0:
                continue
            if owned is not None and id(p) not in owned:
                continue  # ZeroRedundancyOptimizer: another rank steps p and broadcasts it
            if g.is_sparse:
                g = g._values()
            if self._premasked and self._premasked.get(id(p)) == self._step_count:
                if evaluation:
                    raise RuntimeError(
                        "step(closure) evaluated the closure more than once (e.g. LBFGS), but the gradients "
                        "come from dropgrad.distributed.masked_allreduce_hook, which can only draw the first "
                        "evaluation's masks; use DDP's default all-reduce with this optimizer"
                    )
                thr = _TWO32  # the hook applied this step's mask; only the factor is left
            # a DTensor gradient (FSDP2) is masked shard by shard, at its offset in the full parameter
            for piece, offset in (local_shards(g) if type(g) is not torch.Tensor else ((g, 0),)):
                if piece.numel() == 0:
                    continue
                pieces.append(piece)
                piece_indices.append(index)
                piece_thresholds.append(thr)
                piece_scales.append(scale)
                offsets.append(offset)
        if pieces:
            self._apply_masks(pieces, piece_indices, piece_thresholds, piece_scales, offsets, stream)

    def _skip_this_step(self, cache: dict[int, float]) -> bool:
        fud = self._drop_rate if self._full_update_drop == "drop_rate" else self._full_update_drop
        q = evaluate_rate(fud, self._step_count, cache, "full_update_drop")
        if q == 0.0:
            return False
        key = _masks.derive_key(self.seed, self._step_count, 0, _masks.FULL_UPDATE_STREAM)
        return _masks.hash32(key, 0) < int(round(q * _TWO32))

    # The bookkeeping around the wrapped step (rates, the full-update coin, mask
    # keys: Python-int hashing of counters) runs outside torch.compile's tracing:
    # traced, the counters would become guarded constants (a recompile every step,
    # a frozen clock). A compiled step without full update drop or a closure goes
    # through the custom op of dropgrad.compiled (no graph break); otherwise these
    # are excluded from tracing (a graph break each).
    @torch._disable_dynamo
    def _begin_step(self, mask_now: bool) -> bool:
        self._registry.check(self.param_groups)
        if self._dcp_load is not None:
            self._settle_dcp_load()
        if not self._seed_agreed:
            agree_seed_if_distributed(self)
        if self._capturable:
            self._refuse_uncapturable()
            self._read_clock()  # replays since the last eager step advanced the device's count
            self._clocks.prepare(self.seed, self._step_count, self._seed_agreed, process_group_size())
        cache: dict[int, float] = {}
        plan = self._plan(cache)  # validates every rate before anything changes
        default = None if self._drop_rate is None else evaluate_rate(self._drop_rate, self._step_count, cache)
        skip = self._skip_this_step(cache)
        self._pending_plan = plan
        self._pending_dense = False
        self._pending_evaluations = itertools.count()
        self._pending_default = default
        if mask_now and not skip:
            self._mask_gradients(plan, 0)
        return skip

    def _settle_dcp_load(self) -> None:
        missing = self._dcp_load == "missing"
        self._dcp_load = None
        if missing:
            warnings.warn(
                "torch.distributed.checkpoint loaded this DropGrad's optimizer state without DropGrad's own "
                "state (seed, step count, schedule positions; DCP's get_state_dict/set_state_dict keep only "
                f"'state' and 'param_groups'): this step continues at step count {self._step_count} with seed "
                f"{self.seed}, not where the checkpoint was taken. Put dropgrad.distributed.DropGradStateful(opt) "
                "beside the model and optimizer in the dict given to dcp.save and dcp.load.",
                UserWarning,
                stacklevel=5,
            )

    @torch._disable_dynamo
    def _mask_closure_gradients(self) -> None:
        pending = cast("list[tuple[int, torch.Tensor, float]]", self._pending_plan)  # inside a step
        self._mask_gradients(pending, next(self._pending_evaluations))

    @torch._disable_dynamo
    def _end_step(self, skip: bool) -> None:
        plan = self._pending_plan
        indices, params, rates = zip(*plan) if plan else ((), (), ())
        grads = None if self._pending_dense else [p.grad for p in params]
        if grads is None or type(None) not in set(map(type, grads)) and not any(map(_is_sparse, grads)):
            sizes = list(zip(indices, map(torch.Tensor.numel, params), rates))  # the common case, no Python loop
        else:
            sizes = []
            for index, p, rate, g in zip(indices, params, rates, grads):
                if g is not None:
                    sizes.append((index, g._values().numel() if g.is_sparse else p.numel(), rate))
        self._last_step_record = (self._step_count, skip, self._pending_default, sizes)
        # nothing of the step lingers: pickling itertools.count goes away in Python 3.14
        self._pending_plan = self._pending_evaluations = None  # type: ignore[assignment]
        self._pending_dense = False
        if skip and hasattr(self.optimizer.step, "_wrapped_by_lr_sched"):
            # an LR scheduler built on the wrapped optimizer tracks its step calls;
            # a deliberate skip is still a step, so don't let it warn about order
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
        self.last_step_skipped = skip
        self._step_count += 1
        self._clocks.advance()  # capturable: the step advances on the device too (recorded by a capture)
        seen: set[int] = set()
        for _, sched in self._schedules():
            if id(sched) not in seen:
                seen.add(id(sched))
                sched.step()

    def _mask_compiled_step(self, grads: list[torch.Tensor], indices: list[int]) -> None:
        """The eager body of ``torch.ops.dropgrad.mask_step_``: plan, mask ``grads``, advance the clock.

        ``grads`` are the gradients of the parameters at positions ``indices``
        (under functionalization, possibly copies that are written back after
        the op), so they are masked as given rather than read from ``p.grad``.
        """
        skip = self._begin_step(mask_now=False)
        if skip:  # the traced step checked that full update drop is off; it changed since
            self._end_step(skip)
            raise RuntimeError("full_update_drop was turned on under a compiled step; recompile (torch._dynamo.reset())")
        pending = cast("list[tuple[int, torch.Tensor, float]]", self._pending_plan)  # set by _begin_step
        position = {j: k for k, (j, _, _) in enumerate(pending)}
        plan = [pending[position[j]] for j in indices]
        self._mask_gradients(plan, 0, list[torch.Tensor | None](grads))
        self._end_step(False)

    def _plain_step(self, closure: Any) -> bool:
        # the path a compiled step can keep inside its graph: no closure, no full update drop, no
        # comm-hook premasking, no step hooks; read by traced code, so each is a guard, not per-step work
        return (
            closure is None and self._full_update_drop == 0.0 and not self._premasked
            and not self._optimizer_step_pre_hooks and not self._optimizer_step_post_hooks
            and not _GLOBAL_PRE_HOOKS and not _GLOBAL_POST_HOOKS
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Mask the gradients, then step the wrapped optimizer (or skip the step).

        With a closure, the gradients each closure evaluation produces are masked
        (LBFGS evaluates it several times; each evaluation draws fresh masks).
        A step skipped by full update drop still evaluates the closure and
        returns its loss, but leaves parameters and optimizer state untouched.
        An invalid rate (from any source) raises before anything changes.
        Step pre- and post-hooks (``register_step_pre_hook``, and torch's global
        optimizer hooks) run around it as for any ``torch.optim`` optimizer.

        Calling the wrapped optimizer's own ``step()`` instead (for example
        ``opt.optimizer.step()``) bypasses DropGrad: no masks, no clock. So does
        the step that ``torch.distributed.checkpoint`` takes on zero gradients
        with ``lr=0`` to initialise an optimizer's state (see :mod:`dropgrad.dcp`):
        the step count, schedules, full-update coin and statistics stay put.
        """
        # No torch.compiler.is_compiling() branch in this frame: Dynamo meets the
        # wrapped step's own graph breaks once more for each frame above it that
        # branches on it, so the choice between the custom op and the eager
        # bookkeeping is made in _mask_before_step, a leaf.
        if self._plain_step(closure):
            self._mask_before_step()
            loss = self.optimizer.step()  # attribute lookup: schedulers patch it
            self._finish_step()
            return loss
        return self._general_step(closure)

    def _mask_before_step(self) -> None:
        if torch.compiler.is_compiling() and compiled.SUPPORTED:
            params = self._flat_params()
            indices = [j for j, p in enumerate(params) if p.grad is not None]
            grads = cast("list[torch.Tensor]", [params[j].grad for j in indices])
            if all(type(g) is torch.Tensor and not g.is_sparse for g in grads):
                # plans, masks and advances the clock at run time (dropgrad.compiled)
                compiled.mask_step_(grads, self._handle, indices)
                return
        self._start_plain_step()

    @torch._disable_dynamo
    def _start_plain_step(self) -> None:
        if _dcp.in_dcp_init_step():  # DCP's _init_optim_state: not a training step
            return
        self._begin_step(mask_now=True)  # never skips: full update drop is off on this path

    def _finish_step(self) -> None:
        if self._pending_plan is not None:  # None after the custom op and after DCP's initialising step
            self._end_step(False)

    def _general_step(self, closure: Callable[[], Any] | None) -> Any:
        """:meth:`step` with hooks, a closure, full update drop or premasked gradients."""
        args: tuple[Any, ...] = (self,) if closure is None else (self, closure)
        kwargs: dict[str, Any] = {}
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            for pre_hook in itertools.chain(_GLOBAL_PRE_HOOKS.values(), self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"step pre-hook {pre_hook!r} must return None or a tuple (new_args, new_kwargs), got {result!r}"
                        )
                    args, kwargs = result
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
            loss = self._step_body(closure)
            for post_hook in itertools.chain(self._optimizer_step_post_hooks.values(), _GLOBAL_POST_HOOKS.values()):
                post_hook(self, args, kwargs)
        return loss

    def _step_body(self, closure: Callable[[], Any] | None) -> Any:
        if _dcp.in_dcp_init_step():  # DCP's _init_optim_state: not a training step
            return self.optimizer.step(closure)
        skip = self._begin_step(mask_now=closure is None)
        if skip:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
        elif closure is None:
            loss = self.optimizer.step()  # attribute lookup: schedulers patch it
        else:

            def masked_closure():
                with torch.enable_grad():
                    result = closure()
                self._mask_closure_gradients()
                return result

            loss = self.optimizer.step(masked_closure)
        self._end_step(skip)
        return loss

    def mask_gradients(self) -> bool:
        """Mask this step's gradients and advance the clock, without stepping the wrapped optimizer.

        For callers that run the wrapped optimizer's step themselves (the
        framework callbacks of :mod:`dropgrad.integrations`): the masks, the
        full-update coin, the step count and the schedules move exactly as in
        :meth:`step`. Returns True when full update drop says to skip this
        step (the gradients are then left unmasked; don't step).
        """
        skip = self._begin_step(mask_now=True)
        self._end_step(skip)
        return skip

    # ------------------------------------------------------------------ distributed
    @property
    def seed_agreed(self) -> bool:
        """Whether every rank is known to use this seed (explicit ``seed=``, or agreed at the first step)."""
        return self._seed_agreed

    def set_seed(self, seed: int, *, agreed: bool = True) -> None:
        """Use ``seed`` for the masks from now on.

        ``agreed`` says whether every rank is known to use it (as after
        :func:`dropgrad.distributed.agree_seed`); with False, the next step inside
        an initialized process group agrees on rank 0's seed first.
        """
        self.seed = _masks.check_seed(seed, "seed")
        self._seed_agreed = bool(agreed)

    def mark_premasked(self, params: Iterable[torch.Tensor]) -> None:
        """Note that ``params``' gradients already carry this step's masks (without the factor).

        :func:`dropgrad.distributed.masked_allreduce_hook` masks gradients while
        it all-reduces them; the coming :meth:`step` then only multiplies those
        gradients by the survivors' factor instead of masking them again.
        """
        if self._capturable:
            raise RuntimeError("DropGrad(capturable=True) cannot take gradients premasked by the masked all-reduce "
                               "hook (the hook derives its keys on the host); use DDP's default all-reduce")
        step = self._step_count
        for p in params:
            self._premasked[id(p)] = step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; a ``"drop_rate"`` key sets the group's rate."""
        if isinstance(param_group, dict) and "drop_rate" in param_group:
            param_group["drop_rate"] = validate_rate(
                param_group["drop_rate"], "param_group['drop_rate']", allow_none=True
            )
        if isinstance(param_group, dict) and "params" in param_group:
            new = param_group["params"]
            new = [new] if isinstance(new, torch.Tensor) else list(new)
            param_group["params"] = new
            _refuse_duplicates(new, "add_param_group")
            refuse_flat_params(new, "add_param_group")
        before = sum(len(group["params"]) for group in self.param_groups)
        self.optimizer.add_param_group(param_group)
        added = self.param_groups[-1]
        self._param_names = (self._param_names + [None] * before)[:before] + [
            name if isinstance(name, str) else None
            for name, _ in itertools.zip_longest(added.get("param_names", ()), added["params"])
        ][: len(added["params"])]
        if any(p.device.type == "cpu" for p in self.param_groups[-1]["params"]):
            _cpu_kernel.start_build()

    # ------------------------------------------------------------------ checkpoints
    def _dropgrad_state(self) -> dict[str, Any]:
        self._read_clock()
        return {
            "format": _checkpoint.STATE_FORMAT,
            "seed": self.seed,
            "seed_agreed": self._seed_agreed,
            "step": self._step_count,
            "last_step_skipped": self.last_step_skipped,
            "rescale": self.rescale,
            "drop_rate": encode_rate(self._drop_rate),
            "full_update_drop": (
                "drop_rate" if self._full_update_drop == "drop_rate" else encode_rate(self._full_update_drop)
            ),
            "param_rates": {j: encode_rate(r) for j, r in self._param_rates.items()},
            "schedules": {name: sched.state_dict() for name, sched in self._schedules()},
        }

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus DropGrad's under ``"dropgrad"``.

        Holds only tensors and plain Python values (``torch.load(weights_only=True)``
        reads it); schedules and callables are saved as their state or as a marker,
        and restored into the live objects on load. The ``"state"`` and
        ``"param_groups"`` entries load into the bare optimizer too.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        inner = self.optimizer.state_dict()
        state_dict = {
            "state": inner["state"],
            "param_groups": [
                {**g, "drop_rate": encode_rate(g["drop_rate"])} if "drop_rate" in g else g
                for g in inner["param_groups"]
            ],
            _STATE_KEY: self._dropgrad_state(),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or from the bare optimizer, with a warning).

        Everything is validated before anything is assigned: a rejected load
        (``TypeError``/``ValueError`` naming the key) leaves the optimizer as it was.

        What wins on resume: the checkpoint, for every value it records (seed,
        step, ``rescale``, ``drop_rate``, ``full_update_drop``, per-parameter and
        param group rates), as ``torch.optim`` does for ``lr``; a ``UserWarning``
        names each constructor setting it replaces with a different value.
        Schedules and callables are saved as markers: the live object of the same
        kind at the same place is kept and its saved position loaded; a marker
        with no such live object, or a live schedule with no saved position, is
        an error.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        ours = state_dict.get(_STATE_KEY)
        group_rates = _checkpoint.check_group_rates(self, state_dict.get("param_groups"))
        plan = _checkpoint.plan_load(self, ours, group_rates) if ours is not None else None
        inner = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        # torch checks groups and sizes before it assigns anything
        self.optimizer.load_state_dict(inner)
        if plan is None:
            for group, (has, rate) in zip(self.param_groups, group_rates):
                if has:
                    group["drop_rate"] = rate
        if plan is None and _dcp.in_dcp_optimizer_load():
            # DCP never carries our state: DropGradStateful may load it before or after this;
            # the next step warns if nothing did
            if self._dcp_load is None:
                self._dcp_load = "missing"
        elif plan is None:
            warnings.warn(
                "state_dict has no DropGrad state (saved from the bare optimizer?): the wrapped optimizer's "
                "state was loaded; DropGrad's step count starts at 0 with its current seed and rates",
                UserWarning,
                stacklevel=4  # past torch's _disable_dynamo frames,
            )
        else:
            _checkpoint.apply_plan(self, plan, stacklevel=5)
            self._dcp_load = "loaded"
        for load_post_hook in self._optimizer_load_state_dict_post_hooks.values():
            load_post_hook(self)

    def dropgrad_state(self) -> dict[str, Any]:
        """DropGrad's own part of :meth:`state_dict` (seed, step count, rates, schedule positions)."""
        return self._dropgrad_state()

    def load_dropgrad_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`dropgrad_state` (validated first; a rejected state changes nothing)."""
        self._load_own_state(state)

    def _load_own_state(self, ours: Mapping[str, Any]) -> None:
        """Validate, then restore, DropGrad's own part of a state dict (also used by the framework callbacks).

        Nothing is assigned unless every field is valid (see :mod:`dropgrad.checkpoint`).
        """
        _checkpoint.apply_plan(self, _checkpoint.plan_load(self, ours), stacklevel=3)
        self._dcp_load = "loaded"  # a DCP load of the optimizer, before or after this, then needs no warning

    def _check_state(self, ours: Any) -> None:
        """Raise if ``ours`` is not a valid DropGrad state for this optimizer; assigns nothing."""
        _checkpoint.plan_load(self, ours)

    @staticmethod
    def _restore_rate(saved: Any, live: Any, name: str, allow_none: bool = False) -> Any:
        return _checkpoint.restore_rate(saved, live, name, allow_none=True)
