"""DropGrad in class form: optimizer classes built as ``cls(params, **kwargs)``.

Most frameworks build the optimizer themselves from a class and keyword
arguments (Hugging Face ``Trainer(optimizer_cls_and_kwargs=...)``, LightningCLI's
``--optimizer``, stable-baselines3's ``optimizer_class``, Hydra's ``_target_``,
timm's registry). This module gives DropGrad that shape:

>>> import torch, dropgrad
>>> model = torch.nn.Linear(4, 2)
>>> opt = dropgrad.optim.AdamW(model.parameters(), lr=1e-3, drop_rate=0.1, seed=0)
>>> isinstance(opt, dropgrad.DropGrad), isinstance(opt, torch.optim.Optimizer)
(True, True)

``dropgrad.optim.AdamW(params, lr=..., drop_rate=..., seed=...)`` is exactly
``DropGrad(torch.optim.AdamW(params, lr=...), drop_rate=..., seed=...)``: the same
masks for the same seed, the same ``state_dict()``. There is one ready-made class
per ``torch.optim`` optimizer (``Adam``, ``AdamW``, ``SGD``, ``LBFGS``, ...), so a
class path such as ``"dropgrad.optim.AdamW"`` works in any config, and
:func:`wrap` makes one for any other optimizer class.

The DropGrad keyword arguments are those of :class:`~dropgrad.DropGrad`, with one
renamed: the per-parameter rates are ``param_drop_rates=`` (``params`` is the
optimizer's first argument here). Parameter names for name keys come from
``named_parameters()`` passed as ``params`` (where torch's optimizers accept
them), from param groups' ``"param_names"``, or from ``model=``.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .wrapper import DropGrad

__all__ = ["DROPGRAD_KWARGS", "SHARED_KWARGS", "DropGradOptimizer", "wrap"]

DROPGRAD_KWARGS = (
    "drop_rate",
    "param_drop_rates",
    "full_update_drop",
    "seed",
    "rescale",
    "model",
    "named_parameters",
    "drop_rate_scheduler",
    "impl",
    "capturable",
)
"""The keyword arguments the class form takes for DropGrad itself; the rest go to the base optimizer."""

SHARED_KWARGS = ("capturable",)
"""DropGrad's keyword arguments that also go to the base optimizer where it takes them."""

_TORCH_OPTIMIZERS = tuple(
    name
    for name in sorted(vars(torch.optim))
    if isinstance(getattr(torch.optim, name), type)
    and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
    and getattr(torch.optim, name) is not torch.optim.Optimizer
)

# base optimizer class -> its DropGrad class (one class per base, so pickles and isinstance agree)
_REGISTRY: dict[type, type[DropGradOptimizer]] = {}


def _base_keywords(base: type[torch.optim.Optimizer]) -> tuple[set[str], bool]:
    """The keyword names ``base.__init__`` takes after ``params``, and whether it takes ``**kwargs``."""
    try:
        signature = inspect.signature(base.__init__)
    except (TypeError, ValueError):  # a C-level or otherwise opaque __init__: trust the caller
        return set(), True
    names: set[str] = set()
    takes_any = False
    for i, (name, parameter) in enumerate(signature.parameters.items()):
        if i < 2:  # self, params
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            takes_any = True
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.add(name)
    return names, takes_any


def _split_names(params: Any) -> tuple[Any, list[tuple[str, torch.Tensor]] | None]:
    """Materialize ``params``; if it is ``(name, tensor)`` pairs, also return the pairs.

    torch versions whose optimizers take ``named_parameters()`` get the pairs as they
    are (they keep the names in ``param_groups[i]["param_names"]``); older ones get
    the bare tensors, and the names reach DropGrad as ``named_parameters=``.
    """
    if isinstance(params, torch.Tensor | Mapping):
        return params, None  # let the base optimizer raise its own error
    items = list(params)
    if items and all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in items):
        if _optimizers_take_names():
            return items, None
        return [p for _, p in items], items
    return items, None


@functools.cache
def _optimizers_take_names() -> bool:
    """Whether this torch's optimizers accept ``(name, parameter)`` pairs (torch >= 2.6)."""
    try:
        torch.optim.SGD([("w", torch.nn.Parameter(torch.zeros(1)))], lr=0.1)
    except TypeError:
        return False
    return True


class DropGradOptimizer(DropGrad):
    """Base of the class form: a :class:`~dropgrad.DropGrad` that builds its own base optimizer.

    Subclasses set :attr:`base_optimizer`; use :func:`wrap` or the ready-made
    classes of this module (``dropgrad.optim.AdamW``, ...) rather than subclassing.

    Args:
        params: what the base optimizer takes first: parameters, param groups, or
            ``(name, parameter)`` pairs from ``named_parameters()``.
        *args: positional arguments of the base optimizer after ``params``.
        drop_rate: default drop rate (see :class:`~dropgrad.DropGrad`).
        param_drop_rates: per-parameter rates (``DropGrad``'s ``params=``): keys are
            parameters, names, dotted prefixes or globs.
        full_update_drop: as in :class:`~dropgrad.DropGrad`.
        seed: as in :class:`~dropgrad.DropGrad`.
        rescale: as in :class:`~dropgrad.DropGrad`.
        model: as in :class:`~dropgrad.DropGrad` (a module to take parameter names from).
        named_parameters: as in :class:`~dropgrad.DropGrad`.
        drop_rate_scheduler: as in :class:`~dropgrad.DropGrad`.
        impl: as in :class:`~dropgrad.DropGrad`.
        capturable: as in :class:`~dropgrad.DropGrad`; passed on to the base optimizer
            too where it takes ``capturable`` (Adam, AdamW, SGD, ...), so one flag makes
            the whole step capturable in a CUDA graph.
        **kwargs: keyword arguments of the base optimizer (``lr``, ``betas``, ...).

    Raises:
        TypeError: for a keyword argument that neither the base optimizer nor
            DropGrad takes (the message names it and what is allowed).
    """

    base_optimizer: type[torch.optim.Optimizer] = torch.optim.Optimizer
    """The torch optimizer class this class builds (``torch.optim.AdamW`` for ``dropgrad.optim.AdamW``)."""

    def __init__(
        self,
        params: Any,
        *args: Any,
        drop_rate: Any = None,
        param_drop_rates: Mapping[Any, Any] | None = None,
        full_update_drop: Any = False,
        seed: int | None = None,
        rescale: bool = True,
        model: torch.nn.Module | None = None,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
        drop_rate_scheduler: Any = None,
        impl: str | None = None,
        capturable: bool = False,
        **kwargs: Any,
    ) -> None:
        base = type(self).base_optimizer
        if base is torch.optim.Optimizer:
            raise TypeError("DropGradOptimizer is abstract: use dropgrad.wrap(OptimizerClass) or dropgrad.optim.AdamW etc.")
        accepted, takes_any = _base_keywords(base)
        unknown = sorted(set(kwargs) - accepted) if not takes_any else []
        if unknown:
            raise TypeError(
                f"{type(self).__qualname__}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: "
                f"{base.__name__} takes {sorted(accepted)} and DropGrad takes {list(DROPGRAD_KWARGS)}"
            )
        if "params" in kwargs:  # only reachable for a base that takes **kwargs
            raise TypeError("the per-parameter rates are param_drop_rates=..., not params=... (params is the first argument)")
        params, pairs = _split_names(params)
        if pairs is not None:
            named_parameters = pairs if named_parameters is None else [*pairs, *named_parameters]
        if "capturable" in accepted:
            kwargs["capturable"] = capturable
        optimizer = base(params, *args, **kwargs)
        super().__init__(
            optimizer,
            drop_rate=drop_rate,
            params=param_drop_rates,
            full_update_drop=full_update_drop,
            seed=seed,
            rescale=rescale,
            model=model,
            named_parameters=named_parameters,
            drop_rate_scheduler=drop_rate_scheduler,
            impl=impl,
            capturable=capturable,
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        # rebuilt through wrap(base), so classes made by wrap() for any importable base unpickle too
        return (_new_instance, (type(self).base_optimizer,), self.__getstate__())

    def __repr__(self) -> str:
        text = super().__repr__()
        cls, base = type(self), type(self).base_optimizer
        if cls.__qualname__ == cls.__name__:  # a ready-made class: dropgrad.optim.AdamW
            title = f"{cls.__module__}.{cls.__qualname__}"
        else:
            title = f"dropgrad.wrap({base.__module__}.{base.__qualname__})"
        return title + text[len("DropGrad") :]


def _new_instance(base: type[torch.optim.Optimizer]) -> DropGradOptimizer:
    """Unpickling helper: an empty instance of ``wrap(base)`` (``__setstate__`` fills it)."""
    cls = wrap(base)
    return cls.__new__(cls)


def _identifier(base: type) -> str:
    return "_" + re.sub(r"\W", "_", f"{base.__module__}.{base.__qualname__}")


def wrap(optimizer_class: type[torch.optim.Optimizer], **defaults: Any) -> type[DropGradOptimizer]:
    """The DropGrad class for ``optimizer_class``: ``wrap(AdamW)(params, lr=..., drop_rate=...)``.

    The result is a subclass of :class:`~dropgrad.DropGrad` (hence of
    ``torch.optim.Optimizer``) whose instances are built as ``cls(params, **kwargs)``:
    keyword arguments named in :data:`DROPGRAD_KWARGS` go to DropGrad, the rest to
    ``optimizer_class``. Calling ``wrap`` twice with the same class returns the same
    class; the ``torch.optim`` ones are the ready-made classes of this module.

    Args:
        optimizer_class: a ``torch.optim.Optimizer`` subclass.
        **defaults: default keyword arguments (DropGrad's or the base optimizer's,
            e.g. ``drop_rate=0.1``); with any, the result is a new subclass named
            after the base (not cached; its instances unpickle as instances of
            ``wrap(optimizer_class)``, with the same state).

    Example:
        >>> AdamW = wrap(torch.optim.AdamW)
        >>> opt = AdamW(torch.nn.Linear(2, 1).parameters(), lr=1e-3, drop_rate=0.1, seed=0)
        >>> type(opt).__name__
        'AdamW'
    """
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, DropGrad):
        raise TypeError(f"optimizer_class is already a DropGrad class ({optimizer_class.__qualname__}); wrap the base optimizer")
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    if optimizer_class is torch.optim.Optimizer:
        raise TypeError("optimizer_class must be a concrete optimizer, got torch.optim.Optimizer itself")
    cls = _REGISTRY.get(optimizer_class)
    if cls is None:
        cls = _make_class(optimizer_class)
        _REGISTRY[optimizer_class] = cls
    if defaults:
        return _with_defaults(cls, defaults)
    return cls


def _make_class(base: type[torch.optim.Optimizer]) -> type[DropGradOptimizer]:
    is_torch = getattr(torch.optim, base.__name__, None) is base
    name = base.__name__
    # torch's optimizers become dropgrad.optim.<Name>; others get a unique module-level name
    qualname = name if is_torch else _identifier(base)
    doc = (
        f"DropGrad over :class:`{base.__module__}.{base.__qualname__}`, built as ``{name}(params, **kwargs)``.\n\n"
        f"Keyword arguments: those of ``{base.__name__}`` and DropGrad's "
        f"({', '.join(DROPGRAD_KWARGS)}); see :class:`~dropgrad.optim.DropGradOptimizer`."
    )
    namespace = {"base_optimizer": base, "__doc__": doc, "__module__": __name__, "__init__": _init_with_signature(base)}
    cls = type(name, (DropGradOptimizer,), namespace)
    cls.__qualname__ = qualname
    setattr(sys.modules[__name__], qualname, cls)
    return cls


# DropGrad's own keyword arguments as they appear in the class form's signature (types a config
# parser such as jsonargparse can read; schedules and callables are still accepted at run time)
_DROPGRAD_PARAMETERS = [
    inspect.Parameter("drop_rate", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Any),
    inspect.Parameter("param_drop_rates", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=dict | None),
    inspect.Parameter("full_update_drop", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Any),
    inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=int | None),
    inspect.Parameter("rescale", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool),
    inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=torch.nn.Module | None),
    inspect.Parameter("named_parameters", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Any),
    inspect.Parameter("drop_rate_scheduler", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Any),
    inspect.Parameter("impl", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=str | None),
    inspect.Parameter("capturable", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool),
]
assert tuple(p.name for p in _DROPGRAD_PARAMETERS) == DROPGRAD_KWARGS


def _init_with_signature(base: type[torch.optim.Optimizer]) -> Any:
    """An ``__init__`` whose signature is the base optimizer's plus DropGrad's keyword arguments.

    Config systems read it (LightningCLI/jsonargparse list ``--optimizer.lr`` and
    ``--optimizer.drop_rate`` from it); the work is done by :class:`DropGradOptimizer`.
    """

    def __init__(self: DropGradOptimizer, params: Any, *args: Any, **kwargs: Any) -> None:
        DropGradOptimizer.__init__(self, params, *args, **kwargs)

    try:
        base_signature = inspect.signature(base.__init__)
    except (TypeError, ValueError):
        return __init__
    head, keyword_only, var_keyword = [], [], []
    after_shared = False
    for parameter in base_signature.parameters.values():
        if parameter.name in SHARED_KWARGS:  # DropGrad's own parameter stands for both
            after_shared = parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            continue
        if after_shared and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            # past a shared parameter the base's arguments are keyword arguments here
            parameter = parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        if parameter.name in DROPGRAD_KWARGS:
            raise TypeError(
                f"{base.__qualname__} takes an argument named {parameter.name!r}, which is also DropGrad's; "
                f"wrap it by hand: DropGrad({base.__name__}(...), ...)"
            )
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            keyword_only.append(parameter)
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword.append(parameter)
        else:
            head.append(parameter)
    __init__.__signature__ = base_signature.replace(  # type: ignore[attr-defined]
        parameters=[*head, *keyword_only, *_DROPGRAD_PARAMETERS, *var_keyword], return_annotation=None
    )
    return __init__


def _with_defaults(cls: type[DropGradOptimizer], defaults: dict[str, Any]) -> type[DropGradOptimizer]:
    accepted, takes_any = _base_keywords(cls.base_optimizer)
    unknown = sorted(k for k in defaults if k not in DROPGRAD_KWARGS and k not in accepted and not takes_any)
    if unknown:
        raise TypeError(
            f"wrap() got unexpected default(s) {', '.join(map(repr, unknown))}: "
            f"{cls.base_optimizer.__name__} takes {sorted(accepted)} and DropGrad takes {list(DROPGRAD_KWARGS)}"
        )
    frozen = dict(defaults)

    def __init__(self: DropGradOptimizer, params: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, params, *args, **{**frozen, **kwargs})

    sub = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__, "__doc__": cls.__doc__})
    sub.__qualname__ = cls.__qualname__
    return sub


ASGD: type[DropGradOptimizer]
Adadelta: type[DropGradOptimizer]
Adafactor: type[DropGradOptimizer]
Adagrad: type[DropGradOptimizer]
Adam: type[DropGradOptimizer]
AdamW: type[DropGradOptimizer]
Adamax: type[DropGradOptimizer]
LBFGS: type[DropGradOptimizer]
Muon: type[DropGradOptimizer]
NAdam: type[DropGradOptimizer]
RAdam: type[DropGradOptimizer]
RMSprop: type[DropGradOptimizer]
Rprop: type[DropGradOptimizer]
SGD: type[DropGradOptimizer]
SparseAdam: type[DropGradOptimizer]

for _name in _TORCH_OPTIMIZERS:
    wrap(getattr(torch.optim, _name))
    __all__.append(_name)
del _name
