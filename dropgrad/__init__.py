"""dropgrad: gradient dropout for any PyTorch optimizer.

>>> from dropgrad import DropGrad
>>> # opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-3), drop_rate=0.1)
"""

from . import functional, masks, schedules
from .functional import drop_grad_
from .schedules import (
    AdaptiveDropRateScheduler,
    ConstantDropRateScheduler,
    CosineAnnealingDropRateScheduler,
    CyclicalDropRateScheduler,
    DropRateScheduler,
    ExponentialDecayDropRateScheduler,
    LinearDropRateScheduler,
    LinearWarmupDropRateScheduler,
    SequentialDropRateScheduler,
    StepDropRateScheduler,
    constant_schedule,
    cosine_annealing_schedule,
    cyclical_schedule,
    exponential_decay_schedule,
    join_schedules,
    linear_schedule,
    linear_warmup_schedule,
    step_schedule,
)
from .wrapper import DropGrad

__version__ = "0.1.0"

__all__ = ["DropGrad", "drop_grad_", "functional", "masks", "schedules", "__version__"]
__all__ += schedules.__all__

# the class form (dropgrad.optim.AdamW, ..., dropgrad.wrap): optimizers built as cls(params, **kwargs)
from . import optim  # noqa: E402
from .optim import wrap  # noqa: E402

__all__ += ["optim", "wrap"]
