"""Device clocks for ``DropGrad(..., capturable=True)``: the step count where the masks are drawn.

A captured CUDA graph replays only device work, so mask keys derived on the host
(``masks.step_prefix(seed, step)`` from Python ints) would repeat at every
replay. A capturable DropGrad keeps, per gradient device, a *clock*: the int64
tensor ``[seed, step]`` of :func:`dropgrad.masks.clock_tensor`. It passes the
clock to :func:`dropgrad.functional.apply_masks_` as ``prefix=``, where the
Triton kernel derives the keys on the GPU, and advances it at the end of every
step with ``clock[1:].add_(1)``, which a capture records as well. So each replay
masks with the next step's keys.

The device count is the authority once replays may have run: the wrapper reads
it back (:meth:`DeviceClocks.step`) for ``step_count``, ``state_dict()`` and
``stats()``. Host-side writes (``set_seed``, ``load_state_dict``) mark the
clocks stale, and the next eager step rewrites them. Inside a capture, nothing
may be written from the host, so a capture before the first eager step, or
after a stale-making write, is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .kernels import cuda
from .masks import clock_tensor

__all__ = ["DeviceClocks", "refuse_uncapturable"]


def refuse_uncapturable(rates: Iterable[tuple[str, Any]], full_update_drop: Any) -> None:
    """Raise unless every rate (``(source, rate)`` pairs) is a number and full update drop is off."""
    for name, rate in rates:
        if rate is not None and not isinstance(rate, (int, float)):
            raise ValueError(
                f"capturable=True needs constant drop rates, but {name} is {rate!r}: a captured CUDA graph "
                "replays the rates it was captured with. Give a number, or use capturable=False"
            )
    if full_update_drop not in (0, 0.0, False):
        raise ValueError(
            f"capturable=True does not support full_update_drop (got {full_update_drop!r}): its coin is "
            "drawn on the host, so a captured CUDA graph would replay one outcome forever"
        )


class DeviceClocks:
    """One clock per device, and whether the host's seed or step changed since they were written."""

    def __init__(self) -> None:
        self.clocks: dict[torch.device, torch.Tensor] = {}
        self.stale = False

    def __bool__(self) -> bool:
        return bool(self.clocks)

    def mark_stale(self) -> None:
        """The host's seed or step changed: the next eager step writes them to every clock."""
        self.stale = True

    def step(self) -> int | None:
        """The step count on the devices (a synchronization on a GPU), or None where the host's is current."""
        if self.clocks and not self.stale and not cuda.capturing():
            return int(next(iter(self.clocks.values()))[1])
        return None

    def prepare(self, seed: int, step: int, seed_agreed: bool, world_size: int) -> None:
        """At the start of a step: write stale clocks (eagerly), or check that a capture may read them."""
        if cuda.capturing():
            if self.stale or not self.clocks:
                raise RuntimeError(
                    "DropGrad(capturable=True): take at least one eager step() before capturing it in a CUDA graph, "
                    "and one more after load_state_dict() or set_seed() (CUDA graphs want warm-up steps anyway): "
                    "the eager step puts the seed and step count on the device, where the captured masks read them"
                )
            if not seed_agreed and world_size > 1:
                raise RuntimeError("DropGrad(capturable=True): the ranks agree on the seed at the first eager step; "
                                   "take one before capturing")
            return
        if self.stale:
            value = clock_tensor(seed, step)
            for clock in self.clocks.values():
                clock.copy_(value)
            self.stale = False

    def get(self, device: torch.device, seed: int, step: int) -> torch.Tensor:
        """The clock of ``device``, made from ``(seed, step)`` the first time (never inside a capture)."""
        clock = self.clocks.get(device)
        if clock is None:
            if cuda.capturing():
                raise RuntimeError(
                    f"DropGrad(capturable=True): a gradient on {device} appeared inside a CUDA graph capture; take an "
                    "eager step with every parameter's gradient on its device before capturing"
                )
            clock = self.clocks[device] = clock_tensor(seed, step, device)
        return clock

    def advance(self) -> None:
        """The step is over: every clock moves to the next step (device work, recorded by a capture)."""
        for clock in self.clocks.values():
            clock[1:].add_(1)
