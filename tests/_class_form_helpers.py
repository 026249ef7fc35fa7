"""The check every class-form framework test makes (not collected by pytest).

:class:`MaskAudit` records, for each step of a DropGrad optimizer a framework built,
the gradients DropGrad received and the ones its base optimizer stepped with. Then
:meth:`MaskAudit.check` proves that the masks took effect (the share of zeroed
elements is near ``p``) and that they are exactly the masks the wrapper
``DropGrad(torch.optim.SGD(...), drop_rate=p, seed=seed)`` draws for the same
parameters, seed and steps: a twin wrapper is stepped on the recorded gradients.
"""

from __future__ import annotations

import torch

from dropgrad import DropGrad


def grads_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]]


class MaskAudit:
    """Hooks on a DropGrad optimizer ``opt``: raw gradients before its masks, masked ones after.

    ``raw="pre"`` reads the raw gradients in a step pre-hook of ``opt`` (frameworks that
    call ``step()`` without a closure); ``raw="manual"`` leaves it to the caller to
    call :meth:`record_raw` once the gradients exist (closures: Lightning).
    """

    def __init__(self, opt: DropGrad, raw: str = "pre"):
        assert isinstance(opt, DropGrad), f"the framework built {type(opt).__qualname__}, not a DropGrad"
        self.opt = opt
        self.raw: list[list[torch.Tensor | None]] = []
        self.masked: list[list[torch.Tensor | None]] = []
        if raw == "pre":
            opt.register_step_pre_hook(lambda o, args, kwargs: self.record_raw())
        # after the base optimizer's step its .grad still holds what it stepped with
        opt.optimizer.register_step_post_hook(lambda o, args, kwargs: self.masked.append(grads_of(o)))

    def record_raw(self) -> None:
        self.raw.append(grads_of(self.opt))

    def wrapper_masks(self, rate: float) -> list[list[torch.Tensor | None]]:
        """What the wrapper makes of the recorded raw gradients, step by step, with the same seed."""
        groups = [{"params": [torch.zeros_like(p, requires_grad=True) for p in g["params"]]} for g in self.opt.param_groups]
        twin = DropGrad(torch.optim.SGD(groups, lr=0.0), drop_rate=rate, seed=self.opt.seed)
        params = [p for g in twin.param_groups for p in g["params"]]
        out = []
        for raw in self.raw:
            for p, g in zip(params, raw, strict=True):
                p.grad = None if g is None else g.clone()
            twin.step()
            out.append(grads_of(twin))
        return out

    def check(self, rate: float, min_steps: int = 2) -> float:
        """Assert masks equal the wrapper's and dropped about ``rate``; return the zero share seen."""
        assert len(self.raw) == len(self.masked) >= min_steps, (len(self.raw), len(self.masked))
        assert self.opt.step_count == len(self.raw)
        expected = self.wrapper_masks(rate)
        zeros = total = 0
        for step, (raw, got, want) in enumerate(zip(self.raw, self.masked, expected, strict=True)):
            for r, g, w in zip(raw, got, want, strict=True):
                assert (g is None) == (w is None)
                if g is None:
                    continue
                assert torch.equal(g, w), f"step {step}: masks differ from the wrapper's"
                live = r != 0
                zeros += int((g[live] == 0).sum())
                total += int(live.sum())
        share = zeros / total
        sigma = (rate * (1 - rate) / total) ** 0.5
        assert abs(share - rate) < 6 * sigma + 1e-12, f"zero share {share:.4f} vs p={rate} ({total} elements)"
        return share
