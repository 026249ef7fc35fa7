"""DropGrad applied from a framework's "before the optimizer step" hook, optimizer untouched.

The framework callbacks (:mod:`dropgrad.integrations.lightning`,
:mod:`dropgrad.integrations.transformers`) are thin shells around
:class:`DropGradHook`, which needs only torch and dropgrad.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch

from ..masks import draw_seed
from ..rates import validate_rate
from ..wrapper import DropGrad

__all__ = ["DropGradHook", "base_optimizer"]

_FORMAT = 1
_SLOT_SEED_STRIDE = 0x9E3779B97F4A7C15  # golden-ratio stride: distinct, well-mixed seeds per optimizer


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` under framework wrappers (Lightning's, Accelerate's).

    Raises:
        ValueError: a :class:`~dropgrad.DropGrad` is in the chain (the masks would apply twice).
        TypeError: no ``torch.optim.Optimizer`` is found.
    """
    opt = optimizer
    for _ in range(16):  # wrappers nest a few levels at most
        if isinstance(opt, DropGrad):
            raise ValueError(
                "the optimizer is already a DropGrad: use either the DropGrad wrapper or the DropGrad "
                "callback, not both (the gradients would be masked twice)"
            )
        inner = getattr(opt, "optimizer", None)  # LightningOptimizer, AcceleratedOptimizer, ...
        if inner is None or inner is opt:
            break
        opt = inner
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or a framework wrapper of one), got {type(optimizer).__name__}")
    return opt


class DropGradHook:
    r"""Gradient dropout applied in place from a hook that runs right before ``optimizer.step()``.

    Each call of :meth:`apply` is one optimizer step: every gradient element is
    zeroed with probability ``p`` and survivors are multiplied by ``1/(1-p)``,
    with exactly the masks a :class:`~dropgrad.DropGrad` wrapper with the same
    ``seed`` would draw at the same step (it keeps such a wrapper beside the
    framework's optimizer and never calls its ``step``). Rates, schedules,
    ``params=`` and param-group ``"drop_rate"`` keys work as in the wrapper.

    Full update drop cannot skip a step the framework is about to take, so a
    skipped step sets every gradient to ``None``: ``torch.optim`` optimizers leave
    a parameter without a gradient untouched (no momentum or Adam moment update,
    no weight decay, no step count), which is the wrapper's skip. Optimizers that
    treat a missing gradient as zero, or that do not allow it (LBFGS, some fused
    or sharded third-party optimizers), do not skip cleanly.

    Args:
        drop_rate, params, full_update_drop, seed, rescale, impl: as for
            :class:`~dropgrad.DropGrad`. Without ``seed`` one is drawn now from
            torch's global RNG (and agreed across ranks at the first step).
    """

    def __init__(
        self,
        drop_rate: Any = None,
        params: Mapping[Any, Any] | None = None,
        full_update_drop: Any = False,
        seed: int | None = None,
        rescale: bool = True,
        *,
        impl: str | None = None,
    ) -> None:
        if drop_rate is None and params is None:
            raise ValueError("DropGradHook needs drop_rate or params (or both); got neither")
        validate_rate(drop_rate, "drop_rate", allow_none=True)
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict mapping parameters or names to drop rates, got {type(params).__name__}")
        if full_update_drop is True and drop_rate is None:
            raise ValueError("full_update_drop=True means 'skip with probability drop_rate', but drop_rate is None")
        if full_update_drop not in (True, False, None):
            validate_rate(full_update_drop, "full_update_drop")
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be a bool, got {rescale!r}")
        self._seed_given = seed is not None
        if seed is None:
            seed = draw_seed(None)
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = int(seed)
        self._config = {
            "drop_rate": drop_rate,
            "params": params,
            "full_update_drop": full_update_drop,
            "rescale": rescale,
            "impl": impl,
        }
        self.reset()

    def reset(self) -> None:
        """Forget progress: the next step is step 0 again (same seed, same masks)."""
        self._wrappers: dict[int, DropGrad] = {}
        self._pending: dict[int, Mapping[str, Any]] = {}
        self.skipped_steps: dict[int, int] = {}

    def _slot_seed(self, slot: int) -> int:
        # slot 0 keeps the seed itself: its masks equal a DropGrad(seed=seed) wrapper's
        return self.seed if slot == 0 else (self.seed + slot * _SLOT_SEED_STRIDE) % (1 << 62)

    def wrapper(self, optimizer: Any, model: torch.nn.Module | None = None, slot: int = 0) -> DropGrad:
        """The DropGrad kept beside ``optimizer`` (built at first use, rebuilt if the optimizer changes)."""
        base = base_optimizer(optimizer)
        dg = self._wrappers.get(slot)
        if dg is not None and dg.optimizer is base:
            return dg
        c = self._config
        new = DropGrad(
            base,
            c["drop_rate"],
            params=c["params"],
            full_update_drop=c["full_update_drop"],
            seed=self._slot_seed(slot),
            rescale=c["rescale"],
            model=model,
            impl=c["impl"],
        )
        new.set_seed(new.seed, agreed=self._seed_given)
        if dg is not None:  # the framework rebuilt its optimizer: keep our clock and seed
            new.load_dropgrad_state(dg.dropgrad_state())
        elif slot in self._pending:
            new.load_dropgrad_state(self._pending.pop(slot))
        self._wrappers[slot] = new
        return new

    @torch.no_grad()
    def apply(self, optimizer: Any, model: torch.nn.Module | None = None, slot: int = 0) -> bool:
        """Mask ``optimizer``'s gradients for the coming step; returns True if the step is dropped whole.

        Args:
            optimizer: the optimizer about to step (framework wrappers are unwrapped).
            model: the module, to resolve parameter names in ``params``.
            slot: which of several optimizers this is (0 for the first).
        """
        dg = self.wrapper(optimizer, model, slot)
        skip = dg.mask_gradients()
        if skip:
            for group in dg.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped_steps[slot] = self.skipped_steps.get(slot, 0) + 1
        return skip

    def step_count(self, slot: int = 0) -> int:
        """Steps taken so far (skipped ones included)."""
        dg = self._wrappers.get(slot)
        if dg is not None:
            return dg.step_count
        return int(self._pending[slot]["step"]) if slot in self._pending else 0

    def stats(self, slot: int = 0, exact: bool = False) -> dict[str, Any]:
        """:meth:`DropGrad.stats` of the last step, plus ``skipped_steps`` (the running count)."""
        dg = self._wrappers.get(slot)
        out: dict[str, Any] = dg.stats(exact=exact) if dg is not None else {"last_step": None, "skipped": False}
        out["skipped_steps"] = self.skipped_steps.get(slot, 0)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (JSON- and ``torch.load(weights_only=True)``-safe)."""
        slots: dict[str, Any] = {}
        for slot in sorted(set(self._wrappers) | set(self._pending)):
            own = self._wrappers[slot].dropgrad_state() if slot in self._wrappers else self._pending[slot]
            own = {**own, "param_rates": {str(k): v for k, v in own["param_rates"].items()}}
            slots[str(slot)] = {"dropgrad": own, "skipped_steps": self.skipped_steps.get(slot, 0)}
        return {"format": _FORMAT, "seed": self.seed, "seed_given": self._seed_given, "slots": slots}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied to each optimizer when it is next seen."""
        if not isinstance(state_dict, Mapping) or not {"format", "seed", "slots"} <= set(state_dict):
            raise ValueError(f"not a DropGradHook state dict: {state_dict!r}")
        if state_dict["format"] > _FORMAT:
            raise ValueError(f"DropGradHook state has format {state_dict['format']}, newer than this dropgrad; upgrade")
        self.reset()
        self.seed = int(state_dict["seed"])
        self._seed_given = bool(state_dict.get("seed_given", True))
        for key, entry in state_dict["slots"].items():
            slot = int(key)
            self._pending[slot] = entry["dropgrad"]
            self.skipped_steps[slot] = int(entry.get("skipped_steps", 0))
