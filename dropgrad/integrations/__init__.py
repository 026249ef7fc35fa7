"""Optional framework integrations: DropGrad without touching the optimizer.

- :mod:`dropgrad.integrations.lightning`: a Lightning ``Callback``.
- :mod:`dropgrad.integrations.transformers`: a ``transformers`` ``TrainerCallback``.

Each submodule imports its framework; this package imports neither, so
``import dropgrad`` (and ``import dropgrad.integrations``) stays free of them.
"""
