"""DropGrad as a Hugging Face ``TrainerCallback``: gradient dropout with the Trainer's own optimizer.

>>> from dropgrad.integrations.transformers import DropGradTrainerCallback  # doctest: +SKIP
>>> trainer = Trainer(model=model, args=args, train_dataset=ds,
...                   callbacks=[DropGradTrainerCallback(drop_rate=0.1, seed=0)])  # doctest: +SKIP

Requires ``transformers`` (``pip install transformers accelerate``, or ``pip install -e ".[transformers]"`` in a dropgrad checkout). ``import dropgrad``
never imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        "dropgrad.integrations.transformers needs Hugging Face transformers: "
        "pip install transformers accelerate (or, in a dropgrad checkout, pip install -e '.[transformers]')"
    ) from exc

from .hook import DropGradHook

__all__ = ["DropGradTrainerCallback"]


class DropGradTrainerCallback(TrainerCallback):
    r"""Apply DropGrad in ``on_pre_optimizer_step``: ``g <- g * m / (1 - p)``, ``m ~ Bernoulli(1 - p)``.

    The Trainer calls the hook once per optimizer step, after gradient
    accumulation and after gradient clipping (``max_grad_norm``), right before
    ``optimizer.step()``: the same place as the DropGrad wrapper, and the masks
    are the wrapper's for the same ``seed`` and step.

    Full update drop sets every gradient to ``None`` for that step, which every
    ``torch.optim`` optimizer except LBFGS treats as "leave this parameter
    alone" (the wrapper's skip); the LR scheduler still steps. Optimizers that do
    not skip parameters without gradients (some fused or sharded ones, DeepSpeed)
    are not supported by this callback's full update drop.

    Checkpoints: the callback's state (step count, seed, schedules, skip count)
    is kept in ``TrainerState.stateful_callbacks["dropgrad"]``, so it is written to
    ``trainer_state.json`` in every checkpoint folder and restored by
    ``trainer.train(resume_from_checkpoint=...)``. (It is not a
    ``transformers.ExportableState``: rebuilding the callback from JSON arguments
    would lose schedules and callables. With
    ``restore_callback_states_from_checkpoint=True`` the Trainer warns that it
    ignores the "dropgrad" entry; the callback restores it itself.)

    Logging: at each Trainer log event (``logging_steps``) the callback adds
    ``dropgrad/drop_rate``, ``dropgrad/expected_dropped_fraction``,
    ``dropgrad/skipped`` (of the last step), ``dropgrad/skipped_steps`` (running
    count) and, with ``log_exact=True``, ``dropgrad/dropped_fraction`` to the logs
    dict and to ``state.log_history``. Reporting callbacks that run before this one
    (the Trainer puts ``report_to`` integrations first) do not see the keys;
    ``trainer.callback_handler.callbacks.insert(0, callback)`` puts it first.

    Args:
        drop_rate, params, full_update_drop, seed, rescale, impl: as for
            :class:`~dropgrad.DropGrad` (``params`` name keys use the model's names).
        log: add the statistics above to the Trainer's logs.
        log_exact: also log the exact share of dropped elements (one pass over them).
    """

    state_key = "dropgrad"

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
        self.hook = DropGradHook(drop_rate, params, full_update_drop, seed, rescale, impl=impl)
        self.log = log
        self.log_exact = log_exact
        self._last_stats: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(self.state_key)
        if saved is not None:  # resuming: trainer_state.json of the checkpoint was loaded
            self.hook.load_state_dict(saved)
        else:  # a fresh run starts the masks at step 0
            self.hook.reset()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        if optimizer is None:
            raise RuntimeError("DropGradTrainerCallback needs the Trainer to pass optimizer= to its callbacks")
        self.hook.apply(optimizer, model=model)
        if self.log:
            self._last_stats = self.hook.stats(exact=self.log_exact)

    def on_step_end(self, args, state, control, **kwargs):
        # before the Trainer decides to save this step, so the checkpoint's trainer_state.json has it
        state.stateful_callbacks[self.state_key] = self.hook.state_dict()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log or self._last_stats is None or logs is None:
            return
        stats = self._last_stats
        values = {
            "dropgrad/drop_rate": stats.get("drop_rate"),
            "dropgrad/expected_dropped_fraction": stats.get("expected_dropped_fraction"),
            "dropgrad/skipped": float(stats["skipped"]),
            "dropgrad/skipped_steps": float(stats["skipped_steps"]),
        }
        if self.log_exact:
            values["dropgrad/dropped_fraction"] = stats.get("dropped_fraction")
        values = {k: v for k, v in values.items() if v is not None}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
