"""A stand-in ``torchvision`` so that ``import timm`` works where torchvision cannot be installed.

timm imports torchvision at import time (``timm.layers`` takes ``FrozenBatchNorm2d``
from it, ``timm.data`` its datasets and transforms), but ``timm.optim``'s registry and
``create_optimizer_v2``, which the timm tests exercise, never call into it. torchvision
has no build for every torch (none beside the CPU torch 2.13.0 CI uses), and installing
it pulls another torch, so CI installs ``timm`` with ``--no-deps`` and the tests import
it through this stub: every ``torchvision.*`` module exists and every attribute is an
inert ``nn.Module`` subclass. Only used when a real torchvision cannot be imported.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import types

import torch


class _Inert(type):
    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(name)

    def __call__(cls, *args, **kwargs):
        return super().__call__()

    def __or__(cls, other):
        return cls

    __ror__ = __or__

    def __getitem__(cls, item):
        return cls


def _inert(name: str) -> type:
    return _Inert(name, (torch.nn.Module,), {})


class _Module(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _inert(name)
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def torchvision_stub():
    """Within the block ``import torchvision...`` gives stubs; afterwards they are gone from ``sys.modules``."""
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            if isinstance(sys.modules[name], _Module):
                del sys.modules[name]


def import_timm_optim():
    """``timm.optim``, through a real torchvision if one imports, else through the stub; None without timm."""
    try:
        import torchvision  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - missing, or built for another torch
        with torchvision_stub():
            try:
                import timm.optim  # noqa: PLC0415
            except ImportError:
                return None
        return timm.optim
    try:
        import timm.optim  # noqa: PLC0415
    except ImportError:
        return None
    return timm.optim
