"""What the installed torch supports, for tests that need newer torch features."""

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
