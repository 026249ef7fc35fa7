"""DropGrad inside ``torch.compile``: a step's masking as one registered custom op.

Traced by Dynamo, the Python bookkeeping of a DropGrad step (rates, the step
counter, the full-update coin, SplitMix64 keys on Python ints) would either
become guarded constants (a recompile every step, a frozen clock) or need a
graph break. Instead :meth:`DropGrad.step <dropgrad.DropGrad.step>`, when it is
being compiled, hands the gradients to ``torch.ops.dropgrad.mask_step_``: an
opaque op that mutates them in place (``mutates_args``), with a fake
implementation that does nothing, so it sits inside the compiled graph like any
in-place op. At run time the op calls back into its DropGrad (registered here
by handle, weakly) which plans the step's rates, masks, and advances its clock
eagerly, exactly as an eager step would. A compiled training step therefore
has no more graph breaks than with the bare optimizer, and compiles once.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable

import torch

__all__ = ["register", "mask_step_", "SUPPORTED"]

_callbacks: dict[int, weakref.WeakMethod] = {}
_handles = itertools.count(1)


def register(callback: Callable[[list[torch.Tensor], list[int]], None]) -> int:
    """Register a bound method ``callback(grads, indices)`` (held weakly); returns its handle for the op."""
    handle = next(_handles)
    def forget(_ref: object, h: int = handle) -> None:
        _callbacks.pop(h, None)

    _callbacks[handle] = weakref.WeakMethod(callback, forget)
    return handle


def _call(grads: list[torch.Tensor], handle: int, indices: list[int]) -> None:
    ref = _callbacks.get(handle)
    callback = None if ref is None else ref()
    if callback is None:
        raise RuntimeError(f"dropgrad::mask_step_: the DropGrad of handle {handle} no longer exists")
    callback(grads, indices)


#: whether this torch has ``torch.library.custom_op`` (2.4+); without it a compiled step graph-breaks
SUPPORTED = hasattr(torch.library, "custom_op")


def _mask_step(grads: list[torch.Tensor], handle: int, indices: list[int]) -> None:
    """Mask ``grads`` (those of parameters ``indices``) for the coming step of DropGrad ``handle``, in place."""
    _call(grads, handle, indices)


def _mask_step_fake(grads: list[torch.Tensor], handle: int, indices: list[int]) -> None:
    return None


mask_step_: Callable[[list[torch.Tensor], int, list[int]], None] = _mask_step
if SUPPORTED:
    _op = torch.library.custom_op("dropgrad::mask_step_", mutates_args=("grads",))(_mask_step)
    _op.register_fake(_mask_step_fake)
    mask_step_ = _op
