"""Optional framework integrations: DropGrad without touching the optimizer.

- :class:`DropGradHook`: masks an optimizer's gradients from any "before the
  optimizer step" hook (a custom loop, Accelerate); needs only torch.
- :mod:`dropgrad.integrations.lightning`: a Lightning ``Callback``.
- :mod:`dropgrad.integrations.transformers`: a ``transformers`` ``TrainerCallback``.
- :mod:`dropgrad.integrations.timm`: ``dropgrad_<name>`` entries in timm's optimizer registry.

Each framework submodule imports its framework; this package imports neither, so
``import dropgrad`` (and ``import dropgrad.integrations``) stays free of them.
"""

from .hook import DropGradHook, base_optimizer

__all__ = ["DropGradHook", "base_optimizer"]
