"""What the installed torch supports, for tests that need newer torch features."""

from __future__ import annotations

import pytest
import torch


def _optimizers_take_names() -> bool:
    try:
        torch.optim.SGD([("w", torch.nn.Parameter(torch.zeros(1)))], lr=0.1)
    except TypeError:
        return False
    return True


OPTIMIZERS_TAKE_NAMES = _optimizers_take_names()

requires_named_optimizers = pytest.mark.skipif(
    not OPTIMIZERS_TAKE_NAMES,
    reason=f"torch {torch.__version__} optimizers cannot be built from named_parameters() (needs a newer torch)",
)


def transformers_skip_reason() -> str | None:
    """Why the Hugging Face tests cannot run here (None: they can)."""
    try:
        import transformers  # noqa: PLC0415
        from transformers.utils import is_torch_available  # noqa: PLC0415
    except ImportError:
        return "transformers is not installed"
    if not is_torch_available():  # e.g. transformers 5 needs torch >= 2.6 and disables its models otherwise
        return f"transformers {transformers.__version__} cannot use torch {torch.__version__}"
    return None
