"""DropGrad as a Lightning ``Callback``: gradient dropout without touching ``configure_optimizers``.

>>> from dropgrad.integrations.lightning import DropGradCallback  # doctest: +SKIP
>>> trainer = lightning.Trainer(callbacks=[DropGradCallback(drop_rate=0.1, seed=0)])  # doctest: +SKIP

Requires ``lightning`` (``pip install lightning``, or ``pip install -e ".[lightning]"`` in a dropgrad checkout); ``pytorch_lightning``
works too. ``import dropgrad`` never imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package name
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment,unused-ignore]
    except ImportError as exc:
        raise ImportError(
            "dropgrad.integrations.lightning needs Lightning: pip install lightning "
            "(or, in a dropgrad checkout, pip install -e '.[lightning]')"
        ) from exc

from .hook import DropGradHook, base_optimizer

__all__ = ["DropGradCallback"]


class DropGradCallback(Callback):
    r"""Apply DropGrad in ``on_before_optimizer_step``: ``g <- g * m / (1 - p)``, ``m ~ Bernoulli(1 - p)``.

    The masks are those of a :class:`~dropgrad.DropGrad` wrapper with the same
    ``seed`` on the same optimizer (step ``k`` of the callback is step ``k`` of the
    wrapper). The callback's progress (step count, seed, schedules' state, skip
    count) is saved in Lightning checkpoints and restored on resume.

    Where it sits in Lightning's step: after backward (the accumulated gradient
    of all micro-batches, once per optimizer step) and after AMP unscaling, but
    *before* Lightning's gradient clipping (``gradient_clip_val``), which
    therefore bounds the masked gradient. The DropGrad wrapper, returned from
    ``configure_optimizers``, masks after clipping instead.

    Full update drop sets every gradient to ``None`` for that step, which every
    ``torch.optim`` optimizer except LBFGS treats as "leave this parameter alone"
    (no moment update, no weight decay): the same as the wrapper's skip. The LR
    scheduler still steps, as with the wrapper.

    Logged each step (``log=True``, through ``pl_module.log``): ``dropgrad/drop_rate``
    (the default rate in force), ``dropgrad/expected_dropped_fraction``,
    ``dropgrad/skipped`` (0/1), ``dropgrad/skipped_steps`` (running count) and,
    with ``log_exact=True``, ``dropgrad/dropped_fraction`` (a recount of the
    masks: one pass over the gradient elements). With several optimizers the
    keys get an ``_opt{i}`` suffix for ``i > 0``.

    Args:
        drop_rate, params, full_update_drop, seed, rescale, impl: as for
            :class:`~dropgrad.DropGrad` (``params`` name keys use
            ``pl_module.named_parameters()`` names).
        log: log the statistics above.
        log_exact: also log the exact share of dropped elements.
    """

    def __init__(
        self,
        drop_rate: Any = None,
        params: Mapping[Any, Any] | None = None,
        full_update_drop: Any = False,
        seed: int | None = None,
        rescale: bool = True,
        *,
        log: bool = True,
        log_exact: bool = False,
        impl: str | None = None,
    ) -> None:
        super().__init__()
        self.hook = DropGradHook(drop_rate, params, full_update_drop, seed, rescale, impl=impl)
        self.log = log
        self.log_exact = log_exact

    @staticmethod
    def _slot(trainer: Any, optimizer: Any) -> int:
        base = base_optimizer(optimizer)
        for i, opt in enumerate(getattr(trainer, "optimizers", None) or []):
            if opt is optimizer or base_optimizer(opt) is base:
                return i
        return 0

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        slot = self._slot(trainer, optimizer)
        self.hook.apply(optimizer, model=pl_module, slot=slot)
        if not self.log:
            return
        stats = self.hook.stats(slot, exact=self.log_exact)
        suffix = f"_opt{slot}" if slot else ""
        values = {
            "drop_rate": stats["drop_rate"],
            "expected_dropped_fraction": stats["expected_dropped_fraction"],
            "skipped": float(stats["skipped"]),
            "skipped_steps": float(stats["skipped_steps"]),
        }
        if self.log_exact:
            values["dropped_fraction"] = stats["dropped_fraction"]
        metrics = {f"dropgrad/{k}{suffix}": float(v) for k, v in values.items() if v is not None}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return self.hook.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.hook.load_state_dict(state_dict)
