"""timm's optimizer registry: after ``register_timm_optimizers()``,
``create_optimizer_v2(model, opt="dropgrad_adamw", ...)`` is a DropGrad over timm's own
parameter groups (no weight decay for biases, norms and ``no_weight_decay()``).

timm imports torchvision, which has no build beside the CPU torch CI uses; CI installs
timm with ``--no-deps`` and, where torchvision cannot be imported, these tests import
timm through ``_torchvision_stub`` (timm's optimizer code never calls torchvision).
"""

from __future__ import annotations

import pytest
import torch

from _torchvision_stub import import_timm_optim

timm_optim = import_timm_optim()
if timm_optim is None:
    pytest.skip("timm is not installed (CI installs it: pip install --no-deps timm)", allow_module_level=True)

import dropgrad  # noqa: E402
from dropgrad.integrations.timm import register_timm_optimizers  # noqa: E402

from _class_form_helpers import MaskAudit  # noqa: E402

SEED, RATE, STEPS = 4, 0.3, 4


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pos = torch.nn.Parameter(torch.randn(1, 16) * 0.1)  # 2-D, but listed in no_weight_decay()
        self.fc1 = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.fc2 = torch.nn.Linear(32, 4)

    def no_weight_decay(self):
        return {"pos"}

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x + self.pos)))


def _train(model, opt, steps=STEPS):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        opt.step()


def test_without_registration_timm_silently_builds_a_plain_optimizer():
    """The problem the helper solves: timm keeps only the name's last '_' token. Checked on a fresh registry."""
    registry = timm_optim.OptimizerRegistry()
    registry.register(timm_optim.OptimInfo(name="adamw", opt_class=torch.optim.AdamW, has_betas=True))
    opt = registry.create_optimizer(Net(), opt="dropgrad_adamw", lr=1e-3)
    assert type(opt) is torch.optim.AdamW


def test_dropgrad_adamw_keeps_timms_weight_decay_groups():
    added = register_timm_optimizers()
    assert "dropgrad_adamw" in added and "dropgrad_lamb" in added and "dropgrad_sgd" in added
    assert "dropgrad_adamw" in timm_optim.list_optimizers()
    model = Net()
    opt = timm_optim.create_optimizer_v2(model, opt="dropgrad_adamw", lr=1e-2, weight_decay=0.05, drop_rate=RATE, seed=SEED)
    assert type(opt) is dropgrad.optim.AdamW and opt.seed == SEED
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert groups == {
        0.0: ["fc1.bias", "fc2.bias", "norm.bias", "norm.weight", "pos"],
        0.05: ["fc1.weight", "fc2.weight"],
    }
    audit = MaskAudit(opt)
    _train(model, opt)
    audit.check(RATE, min_steps=STEPS)


def test_timm_only_optimizer_and_entry_defaults():
    """A timm optimizer (Lamb) and an entry with defaults (nesterov: SGD with nesterov=True, momentum 0.9)."""
    register_timm_optimizers(["lamb", "nesterov"])
    model = Net()
    lamb = timm_optim.create_optimizer_v2(model, opt="dropgrad_lamb", lr=1e-3, drop_rate=RATE, seed=SEED)
    assert isinstance(lamb, dropgrad.DropGrad) and type(lamb.optimizer) is timm_optim.Lamb
    audit = MaskAudit(lamb)
    _train(model, lamb)
    audit.check(RATE, min_steps=STEPS)
    sgd = timm_optim.create_optimizer_v2(model, opt="dropgrad_nesterov", lr=0.1, drop_rate=RATE)
    assert type(sgd) is dropgrad.optim.SGD
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["momentum"] == 0.9


def test_lookahead_goes_around_dropgrad():
    register_timm_optimizers(["adamw"])
    opt = timm_optim.create_optimizer_v2(Net(), opt="lookahead_dropgrad_adamw", lr=1e-3, drop_rate=RATE)
    assert type(opt) is timm_optim.Lookahead
    inner = [v for v in vars(opt).values() if isinstance(v, dropgrad.DropGrad)]
    assert len(inner) == 1 and type(inner[0]) is dropgrad.optim.AdamW


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="not found"):
        register_timm_optimizers(["no_such_optimizer"])
    with pytest.raises(ValueError, match="already a DropGrad entry"):
        register_timm_optimizers(["dropgrad_adamw"])
