"""DropGrad under ``torch.distributed.checkpoint`` (DCP): a ``Stateful`` for its own state, and DCP's callers.

``get_state_dict`` / ``get_optimizer_state_dict`` keep only the ``"state"`` and
``"param_groups"`` of an optimizer's state dict, so DropGrad's own state (seed,
step count, schedule positions, seed agreement; the ``"dropgrad"`` entry of
:meth:`DropGrad.state_dict <dropgrad.DropGrad.state_dict>`) does not travel
through them. Put a :class:`DropGradStateful` beside the model and optimizer in
the dict given to ``dcp.save`` / ``dcp.load``::

    import torch.distributed.checkpoint as dcp
    from dropgrad.distributed import DropGradStateful

    state = {"app": AppState(model, opt), "dropgrad": DropGradStateful(opt)}
    dcp.save(state, checkpoint_id=path)
    ...
    dcp.load(state, checkpoint_id=path)   # either order of the two entries works

DCP also calls ``optimizer.step()`` once on zero gradients (with ``lr=0``) to
create a fresh optimizer's state (``_init_optim_state``: at load time, and at
save time for an optimizer without state such as plain SGD).
:meth:`DropGrad.step <dropgrad.DropGrad.step>` recognises that call (see
:func:`in_dcp_init_step`) and passes it straight to the wrapped optimizer: no
masks, no seed agreement, and the step count, the schedules, the full-update
coin and the statistics do not move. When DCP loads the optimizer without
DropGrad's state and no :class:`DropGradStateful` loads it before the next
step, that step warns once.

A leaf module: it needs nothing of dropgrad, and imports nothing of
``torch.distributed`` until DCP itself has been imported.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import CodeType
from typing import Any

__all__ = ["DropGradStateful", "in_dcp_init_step", "in_dcp_optimizer_load"]

_DCP_MODULE = "torch.distributed.checkpoint.state_dict"
_STATE = "dropgrad_state"
_DEPTH = 8  # wrappers between DCP's frame and ours: torch's step profiling, LR scheduler patches, _disable_dynamo
_codes: dict[tuple[int, str], CodeType | None] = {}


def _code_of(module: Any, name: str) -> CodeType | None:
    """The code object of ``module.name`` under its decorators (``torch.no_grad()`` wraps some), cached."""
    key = (id(module), name)
    if key not in _codes:
        fn = getattr(module, name, None)
        for _ in range(8):
            inner = getattr(fn, "__wrapped__", None)
            if inner is None:
                break
            fn = inner
        _codes[key] = getattr(fn, "__code__", None)
    return _codes[key]


def _called_from(name: str) -> bool:
    """Whether DCP's function ``name`` is among the few frames above the caller of our caller."""
    module = sys.modules.get(_DCP_MODULE)
    if module is None:  # DCP never imported: the common case costs one dict lookup
        return False
    code = _code_of(module, name)
    if code is None:
        return False
    frame: Any = sys._getframe(3)  # 0 here, 1 in_dcp_*, 2 the DropGrad method, 3 its caller
    for _ in range(_DEPTH):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def in_dcp_init_step() -> bool:
    """Whether the caller's ``step()`` was called by DCP's ``_init_optim_state`` (a few frames up).

    DCP initialises an optimizer's state by stepping it on zero gradients with
    ``lr=0``; :meth:`DropGrad.step <dropgrad.DropGrad.step>` then steps only the
    wrapped optimizer. False (after one dict lookup) when
    ``torch.distributed.checkpoint.state_dict`` was never imported.
    """
    return _called_from("_init_optim_state")


def in_dcp_optimizer_load() -> bool:
    """Whether the caller's ``load_state_dict()`` was called by DCP's ``set_(optimizer_)state_dict``.

    Such a state dict never holds DropGrad's own state (DCP keeps only
    ``"state"`` and ``"param_groups"``); :class:`DropGradStateful` carries it.
    """
    return _called_from("_load_optim_state_dict")


class DropGradStateful:
    """DropGrad's own state as a DCP ``Stateful``: put it beside the model and optimizer in ``dcp.save``/``dcp.load``.

    ``state_dict()`` returns ``{"dropgrad_state": (optimizer.dropgrad_state(),)}``:
    the 1-tuple is a terminal value for DCP's planner, saved and loaded whole
    (pickled), so the load template need not match the saved structure (per-
    parameter rates keyed by int, schedule states of any shape, seeds up to
    ``2**64 - 1``). It holds only plain Python values, so ``torch.load`` with
    ``weights_only=True`` reads it too. Every rank saves the same value (DCP
    keeps one copy), and resharding (saving on N ranks, loading on M) needs
    nothing more: DropGrad's state does not depend on the world size.

    ``load_state_dict()`` restores it with
    :meth:`DropGrad.load_dropgrad_state <dropgrad.DropGrad.load_dropgrad_state>`
    (validated first: a rejected state changes nothing). ``dcp.load`` calls the
    entries' ``load_state_dict`` in the dict's order; the optimizer's entry may
    come before or after this one.

    Args:
        optimizer: the :class:`~dropgrad.DropGrad` whose state to carry.

    Example::

        state = {"app": AppState(model, opt), "dropgrad": DropGradStateful(opt)}
        dcp.save(state, checkpoint_id=path)
    """

    def __init__(self, optimizer: Any) -> None:
        if not (callable(getattr(optimizer, "dropgrad_state", None))
                and callable(getattr(optimizer, "load_dropgrad_state", None))):
            raise TypeError(
                f"DropGradStateful needs the DropGrad optimizer (with dropgrad_state/load_dropgrad_state), "
                f"got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        """``{"dropgrad_state": (state,)}`` with ``state = optimizer.dropgrad_state()``."""
        return {_STATE: (self.optimizer.dropgrad_state(),)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` into the optimizer (validated; a rejected state changes nothing).

        Raises:
            TypeError: ``state_dict`` is not ``{"dropgrad_state": (state,)}``.
            ValueError, TypeError: from :meth:`DropGrad.load_dropgrad_state
                <dropgrad.DropGrad.load_dropgrad_state>`, naming the invalid key.
        """
        if not isinstance(state_dict, Mapping) or _STATE not in state_dict:
            raise TypeError(
                f"DropGradStateful.load_state_dict expects {{'{_STATE}': (state,)}} as saved by "
                f"DropGradStateful.state_dict(), got {_describe(state_dict)}"
            )
        wrapped = state_dict[_STATE]
        if not isinstance(wrapped, (tuple, list)) or len(wrapped) != 1:
            raise TypeError(
                f"DropGradStateful.load_state_dict: state_dict['{_STATE}'] must be a 1-tuple (state,), "
                f"got {_describe(wrapped)}"
            )
        self.optimizer.load_dropgrad_state(wrapped[0])

    def __repr__(self) -> str:
        return f"DropGradStateful({type(self.optimizer).__name__}, step={getattr(self.optimizer, 'step_count', '?')})"


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    return f"{type(value).__name__} {value!r:.80}"
