"""dropgrad: gradient dropout for any PyTorch optimizer.

>>> from dropgrad import DropGrad
>>> # opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-3), drop_rate=0.1)
"""

from . import functional, masks
from .functional import drop_grad_
from .wrapper import DropGrad

__version__ = "0.1.0"

__all__ = ["DropGrad", "drop_grad_", "functional", "masks", "__version__"]
