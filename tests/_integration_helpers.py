"""Shared pieces of the integration tests (not collected by pytest).

The proof that DropGrad took effect inside a framework is always one of:
- the gradients the *wrapped* optimizer receives equal a hand-masked copy of the
  gradients the wrapper received (same seed and step: masks are pure functions of
  ``(seed, step, parameter index, element index)``), or
- a trajectory equals a bare-optimizer run whose gradients were masked by hand with
  :func:`dropgrad.functional.drop_grad_`, and differs from the run without DropGrad.
"""

from __future__ import annotations

import torch

from dropgrad import masks
from dropgrad.functional import drop_grad_

_TWO32 = 1 << 32


def tiny_mlp(seed: int = 0, d_in: int = 8, hidden: int = 16, d_out: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d_out))


def batches(n: int, seed: int = 1, batch: int = 4, d_in: int = 8, d_out: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g)) for _ in range(n)]


def hand_mask_(params, rate: float, seed: int, step: int) -> None:
    """Mask ``p.grad`` of every parameter as DropGrad would at ``step`` (all must have grads, in optimizer order)."""
    drop_grad_([p.grad for p in params], rate, seed=seed, step=step)


def hand_masked(grads, rate: float, seed: int, step: int) -> list[torch.Tensor]:
    """Masked clones of a list of gradients (in optimizer order) as DropGrad would mask them at ``step``."""
    clones = [g.clone() for g in grads]
    drop_grad_(clones, rate, seed=seed, step=step)
    return clones


def coin_skips(seed: int, step: int, q: float) -> bool:
    """DropGrad's full-update-drop coin at ``step`` for skip probability ``q``."""
    if q == 0.0:
        return False
    key = masks.derive_key(seed, step, 0, masks.FULL_UPDATE_STREAM)
    return masks.hash32(key, 0) < int(round(q * _TWO32))


class GradRecorder:
    """Records clones of the gradients an optimizer steps with.

    A step *post*-hook by default: with ``step(closure)`` (Lightning) the pre-hooks
    run before the closure computes the gradients; after the step, the gradients
    the optimizer used are still in ``.grad``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params=None, when: str = "post"):
        self.params = params
        self.seen: list[list[torch.Tensor | None]] = []
        if when == "post":
            self.handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._hook(opt, args, kwargs))
        else:
            self.handle = optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs):
        params = self.params if self.params is not None else [p for g in optimizer.param_groups for p in g["params"]]
        self.seen.append([None if p.grad is None else p.grad.detach().clone() for p in params])


def zero_share(grads) -> float:
    """Share of exact zeros over a list of gradient tensors (None entries are left out)."""
    total = sum(g.numel() for g in grads if g is not None)
    zeros = sum(int((g == 0).sum()) for g in grads if g is not None)
    return zeros / total


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]
