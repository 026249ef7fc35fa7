"""Hydra configs name the optimizer by ``_target_``: ``hydra.utils.instantiate`` builds the class
form directly, or with ``_partial_: true`` an optimizer factory that the training code calls
with the parameters (the torchtune / lightning-hydra-template pattern)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hydra")
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import dropgrad  # noqa: E402

from _class_form_helpers import MaskAudit  # noqa: E402

SEED, RATE, STEPS = 21, 0.35, 5

CONFIG = f"""
optimizer:
  _target_: dropgrad.optim.SGD
  lr: 0.05
  momentum: 0.9
  drop_rate: {RATE}
  seed: {SEED}
"""


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def _train(model, opt):
    audit = MaskAudit(opt)
    g = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        opt.zero_grad()
        model(torch.randn(16, 8, generator=g)).pow(2).mean().backward()
        opt.step()
    return audit


def test_instantiate_target():
    model = _model()
    opt = instantiate(OmegaConf.create(CONFIG).optimizer, params=model.parameters())
    assert type(opt) is dropgrad.optim.SGD and opt.param_groups[0]["momentum"] == 0.9
    _train(model, opt).check(RATE, min_steps=STEPS)


def test_instantiate_partial_optimizer_factory():
    config = OmegaConf.create(CONFIG)
    config.optimizer._partial_ = True
    factory = instantiate(config.optimizer)
    model = _model()
    opt = factory(model.parameters())
    assert type(opt) is dropgrad.optim.SGD and opt.seed == SEED
    _train(model, opt).check(RATE, min_steps=STEPS)


def test_instantiate_with_per_parameter_rates_by_name():
    """Name keys need names: the config passes the model itself as ``model``."""
    config = OmegaConf.create(
        {"_target_": "dropgrad.optim.AdamW", "lr": 1e-3, "drop_rate": 0.0, "param_drop_rates": {"0": RATE}, "seed": SEED}
    )
    model = _model()
    opt = instantiate(config, params=model.parameters(), model=model)
    assert opt.current_drop_rates() == [RATE, RATE, 0.0, 0.0]
