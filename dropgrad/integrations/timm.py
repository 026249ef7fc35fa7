"""DropGrad in timm's optimizer registry: ``create_optimizer_v2(model, opt="dropgrad_adamw", ...)``.

>>> from dropgrad.integrations.timm import register_timm_optimizers
>>> register_timm_optimizers()                                        # doctest: +SKIP
>>> opt = timm.optim.create_optimizer_v2(model, opt="dropgrad_adamw", lr=1e-3,
...                                      weight_decay=0.05, drop_rate=0.1, seed=0)  # doctest: +SKIP

After :func:`register_timm_optimizers`, every optimizer timm has registered as a
class (``adamw``, ``sgd``, ``lamb``, ``lion``, ...) also exists as
``dropgrad_<name>``: timm builds its parameter groups as usual (no weight decay
for biases, norm weights and ``model.no_weight_decay()``; layer decay), applies
the entry's defaults (``momentum``, ``nesterov``, ...), and constructs the
class :func:`dropgrad.wrap` gives for the base optimizer, so the result *is* a
:class:`~dropgrad.DropGrad` whose masks equal ``DropGrad(<base>(groups, ...))``'s
for the same seed. DropGrad's keyword arguments (``drop_rate``, ``seed``,
``param_drop_rates``, ``model``, ...; see :data:`dropgrad.optim.DROPGRAD_KWARGS`)
pass through ``create_optimizer_v2``'s ``**kwargs``; ``lookahead_dropgrad_adamw``
puts timm's ``Lookahead`` around it.

Why a patch is needed: timm reads an optimizer name as ``"<prefix>_..._<name>"``
and uses only the last ``_``-separated token, so ``opt="dropgrad_adamw"`` on a
plain timm silently builds a plain ``AdamW``. Registration therefore also adds
each entry under ``dropgrad-<name>`` (a single token, which unpatched timm
resolves) and makes the registry's ``create_optimizer`` translate
``dropgrad_<name>`` to it. The patch is on the registry *instance* only, is
idempotent, and changes nothing for names without the ``dropgrad`` token.

Needs ``timm`` (``pip install timm``, or ``pip install -e ".[timm]"`` in a dropgrad checkout); ``import dropgrad``
never imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from ..optim import DropGradOptimizer, wrap

__all__ = ["PREFIX", "register_timm_optimizers"]

PREFIX = "dropgrad"
"""The token that selects DropGrad in a timm optimizer name (``dropgrad_adamw``)."""
_PATCH_MARK = "_dropgrad_patched"


def _default_registry() -> Any:
    from timm.optim import _optim_factory  # noqa: PLC0415 - timm is optional

    return _optim_factory.default_registry


def register_timm_optimizers(names: Iterable[str] | None = None, registry: Any = None) -> list[str]:
    """Add ``dropgrad_<name>`` entries to timm's optimizer registry; return the names added.

    Args:
        names: the timm optimizer names to add DropGrad versions of (e.g.
            ``["adamw", "sgd"]``). ``None``: every entry whose class is already
            imported (entries that timm keeps as import strings, such as apex or
            bitsandbytes ones, are left out; name them to add them).
        registry: the ``timm.optim.OptimizerRegistry`` to extend; ``None`` is
            timm's default registry, the one ``create_optimizer_v2`` uses.

    Raises:
        ValueError: for a name timm does not know or that is a DropGrad entry already.
        TypeError: for a named entry whose class cannot be wrapped.
    """
    registry = _default_registry() if registry is None else registry
    explicit = names is not None
    wanted = list(names) if names is not None else [n for n in registry.list_optimizers() if not _is_ours(n)]
    added = []
    for name in wanted:
        name = name.lower()
        if _is_ours(name):
            raise ValueError(f"names must be timm's base optimizer names, got {name!r} (already a DropGrad entry)")
        info = registry.get_optimizer_info(name)  # raises ValueError naming an unknown optimizer
        cls = info.opt_class
        if isinstance(cls, str):
            if not explicit:
                continue
            cls = registry.get_optimizer_class(info, bind_defaults=False)
        try:
            wrapped: type[DropGradOptimizer] = wrap(cls)
        except TypeError:
            if explicit:
                raise
            continue
        description = f"DropGrad over {name}: {info.description}".rstrip(": ")
        ours = dataclasses.replace(info, name=f"{PREFIX}_{name}", opt_class=wrapped, description=description)
        _quiet_register(registry, ours)
        registry._optimizers[f"{PREFIX}-{name}"] = ours  # the one-token spelling timm's parser keeps whole
        added.append(ours.name)
    _patch_create(registry)
    return added


def _is_ours(name: str) -> bool:
    return name.startswith((f"{PREFIX}_", f"{PREFIX}-"))


def _quiet_register(registry: Any, info: Any) -> None:
    # registering twice (a second call) is fine: the entry is the same class
    registry._optimizers.pop(info.name, None)
    registry.register(info)


def _patch_create(registry: Any) -> None:
    if getattr(registry, _PATCH_MARK, False):
        return
    original = registry.create_optimizer

    def create_optimizer(model_or_params: Any, opt: str, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return original(model_or_params, _one_token(opt), *args, **kwargs)

    create_optimizer.__doc__ = original.__doc__
    registry.create_optimizer = create_optimizer
    setattr(registry, _PATCH_MARK, True)


def _one_token(opt: str) -> str:
    """``"dropgrad_adamw"`` -> ``"dropgrad-adamw"``, ``"lookahead_dropgrad_adamw"`` -> ``"lookahead_dropgrad-adamw"``."""
    if not isinstance(opt, str):
        return opt
    tokens = opt.lower().split("_")
    if PREFIX in tokens[:-1]:
        i = tokens.index(PREFIX)
        tokens[i : i + 2] = [f"{PREFIX}-{tokens[i + 1]}"]
        return "_".join(tokens)
    return opt
