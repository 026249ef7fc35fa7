"""The class form (``dropgrad.optim.AdamW(params, lr=..., drop_rate=...)``, ``dropgrad.wrap``)
is the wrapper ``DropGrad(torch.optim.AdamW(params, lr=...), drop_rate=...)``: same masks
bit for bit, same state dicts, same trajectories, for every ``torch.optim`` optimizer."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import dropgrad
from dropgrad import DropGrad
from dropgrad.optim import DROPGRAD_KWARGS, DropGradOptimizer, wrap

from _compat import requires_named_optimizers
from _integration_helpers import GradRecorder, hand_masked, same, zero_share

SEED, RATE = 3, 0.3
TORCH_OPTIMIZERS = [
    name
    for name in sorted(vars(torch.optim))
    if isinstance(getattr(torch.optim, name), type)
    and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
    and getattr(torch.optim, name) is not torch.optim.Optimizer
]
# what each optimizer needs to run on CPU here (Muon: 2-D parameters only; SparseAdam: sparse gradients)
KWARGS = {"SGD": {"lr": 0.1, "momentum": 0.9}, "LBFGS": {"lr": 0.5}, "Muon": {"lr": 0.02}}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "SparseAdam":
        return torch.nn.Embedding(10, 6, sparse=True)
    if name == "Muon":
        return torch.nn.Linear(6, 5, bias=False)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    if isinstance(model, torch.nn.Embedding):
        return model(torch.randint(0, 10, (8,), generator=g)).pow(2).sum()
    return model(torch.randn(8, 6, generator=g)).pow(2).mean()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 4) -> None:
    for s in range(steps):

        def closure(s=s):
            opt.zero_grad()
            loss = _loss(model, s)
            loss.backward()
            return loss

        if isinstance(opt.optimizer, torch.optim.LBFGS):
            opt.step(closure)
        else:
            closure()
            opt.step()


def _states_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_there_is_a_class_for_every_torch_optimizer():
    assert len(TORCH_OPTIMIZERS) >= 12
    for name in TORCH_OPTIMIZERS:
        cls = getattr(dropgrad.optim, name)
        assert cls is wrap(getattr(torch.optim, name))
        assert issubclass(cls, DropGrad) and issubclass(cls, torch.optim.Optimizer)
        assert (cls.__module__, cls.__qualname__, cls.__name__) == ("dropgrad.optim", name, name)
        assert cls.base_optimizer is getattr(torch.optim, name)
        assert name in dropgrad.optim.__all__


@pytest.mark.parametrize("name", TORCH_OPTIMIZERS)
def test_class_form_equals_the_wrapper(name):
    """Same parameters after training, same state dict (DropGrad's part included)."""
    kwargs = KWARGS.get(name, {})
    model_a, model_b = _model(name), _model(name)
    a = getattr(dropgrad.optim, name)(model_a.parameters(), drop_rate=RATE, seed=SEED, **kwargs)
    b = DropGrad(getattr(torch.optim, name)(model_b.parameters(), **kwargs), drop_rate=RATE, seed=SEED)
    _train(model_a, a)
    _train(model_b, b)
    assert same(list(model_a.parameters()), list(model_b.parameters()))
    assert _states_equal(a.state_dict(), b.state_dict())
    assert a.state_dict()["dropgrad"]["step"] == 4


def test_masks_are_bitwise_the_wrappers_and_take_effect():
    rate = 0.4
    model = torch.nn.Linear(64, 32)
    opt = dropgrad.optim.AdamW(model.parameters(), lr=1e-3, drop_rate=rate, seed=SEED)
    before = GradRecorder(opt, when="pre")  # the class form's own hook: before its masks
    after = GradRecorder(opt.optimizer, when="pre")  # the base optimizer's: after them
    for s in range(3):
        opt.zero_grad()
        _loss_big(model, s).backward()
        opt.step()
    shares = []
    for s, (raw, masked) in enumerate(zip(before.seen, after.seen, strict=True)):  # steps count from 0
        assert same(masked, hand_masked(raw, rate, SEED, s))
        shares.append(zero_share(masked))
    n = 3 * (64 * 32 + 32)
    assert abs(sum(shares) / 3 - rate) < 6 * (rate * (1 - rate) / n) ** 0.5


def _loss_big(model, step):
    g = torch.Generator().manual_seed(step)
    return model(torch.randn(16, 64, generator=g)).pow(2).mean()


def test_config_style_kwargs_reach_both_sides():
    """One flat dict of keyword arguments, as a config file gives it."""
    model = torch.nn.Linear(3, 2)
    config = {"lr": 0.05, "betas": (0.8, 0.9), "drop_rate": 0.2, "seed": 11, "full_update_drop": 0.1, "rescale": False}
    opt = dropgrad.optim.Adam(model.parameters(), **config)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert (opt.drop_rate, opt.seed, opt.full_update_drop, opt.rescale) == (0.2, 11, 0.1, False)
    assert opt.param_groups is opt.optimizer.param_groups


def test_positional_arguments_go_to_the_base_optimizer():
    opt = dropgrad.optim.SGD(torch.nn.Linear(3, 2).parameters(), 0.25, drop_rate=0.1)
    assert opt.param_groups[0]["lr"] == 0.25


def test_unknown_keyword_is_an_error_naming_it():
    with pytest.raises(TypeError, match=r"'lrr'.*AdamW takes \[.*'lr'.*DropGrad takes \[.*'drop_rate'"):
        dropgrad.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lrr=1e-3, drop_rate=0.1)
    with pytest.raises(TypeError, match="'momentum'"):
        dropgrad.optim.Adam(torch.nn.Linear(3, 2).parameters(), momentum=0.9, drop_rate=0.1)


def test_dropgrad_errors_still_name_the_argument():
    with pytest.raises(ValueError, match="drop_rate"):
        dropgrad.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)  # neither drop_rate nor param_drop_rates
    with pytest.raises(ValueError, match="drop_rate"):
        dropgrad.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, drop_rate=1.5)


def test_wrap_rejects_what_is_not_an_optimizer_class():
    with pytest.raises(TypeError, match="optimizer_class must be a torch.optim.Optimizer subclass"):
        wrap(torch.optim.AdamW(torch.nn.Linear(2, 1).parameters()))
    with pytest.raises(TypeError, match="already a DropGrad class"):
        wrap(dropgrad.optim.AdamW)
    with pytest.raises(TypeError, match="concrete optimizer"):
        wrap(torch.optim.Optimizer)
    with pytest.raises(TypeError, match="abstract"):
        DropGradOptimizer(torch.nn.Linear(2, 1).parameters(), drop_rate=0.1)


class _MyAdam(torch.optim.Adam):
    """A user optimizer class, importable from this test module."""


def test_wrap_any_optimizer_class_with_defaults():
    cls = wrap(_MyAdam)
    assert cls is wrap(_MyAdam) and cls.__name__ == "_MyAdam" and issubclass(cls, DropGrad)
    assert getattr(dropgrad.optim, cls.__qualname__) is cls  # importable by its qualified name
    with_defaults = wrap(torch.optim.AdamW, drop_rate=0.2, lr=0.01)
    opt = with_defaults(torch.nn.Linear(3, 2).parameters(), seed=1)
    assert (opt.drop_rate, opt.param_groups[0]["lr"]) == (0.2, 0.01)
    assert isinstance(opt, dropgrad.optim.AdamW)
    assert with_defaults(torch.nn.Linear(3, 2).parameters(), drop_rate=0.5).drop_rate == 0.5  # call overrides
    with pytest.raises(TypeError, match="'nesterov'"):
        wrap(torch.optim.AdamW, nesterov=True)


def test_readable_name_and_repr():
    opt = dropgrad.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3, drop_rate=0.1, seed=5)
    text = repr(opt)
    assert text.startswith("dropgrad.optim.AdamW(drop_rate=0.1") and "seed=5" in text and "lr: 0.001" in text
    assert repr(dropgrad.optim.AdamW) == "<class 'dropgrad.optim.AdamW'>"


@pytest.mark.parametrize("cls", [dropgrad.optim.AdamW, wrap(_MyAdam)])
def test_pickle_round_trip_continues_identically(cls):
    model = torch.nn.Linear(5, 3)
    opt = cls(model.parameters(), lr=1e-2, drop_rate=RATE, seed=SEED)
    for s in range(2):
        opt.zero_grad()
        _loss_generic(model, s).backward()
        opt.step()
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert type(opt2) is cls and opt2.step_count == 2
    assert pickle.loads(pickle.dumps(cls)) is cls
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        _loss_generic(m, 5).backward()
        o.step()
    assert same(list(model.parameters()), list(model2.parameters()))


def _loss_generic(model, step):
    g = torch.Generator().manual_seed(step)
    return model(torch.randn(4, 5, generator=g)).pow(2).mean()


def test_state_dict_loads_into_the_wrapper_and_back():
    model = torch.nn.Linear(5, 3)
    opt = dropgrad.optim.AdamW(model.parameters(), lr=1e-2, drop_rate=RATE, seed=SEED)
    opt.zero_grad()
    _loss_generic(model, 0).backward()
    opt.step()
    twin = copy.deepcopy(model)
    wrapper = DropGrad(torch.optim.AdamW(twin.parameters(), lr=1e-2), drop_rate=RATE, seed=SEED)
    wrapper.load_state_dict(opt.state_dict())
    assert _states_equal(wrapper.state_dict(), opt.state_dict())
    back = dropgrad.optim.AdamW(model.parameters(), lr=1e-2, drop_rate=RATE, seed=0)
    back.load_state_dict(wrapper.state_dict())
    assert back.seed == SEED and back.step_count == 1


@requires_named_optimizers
def test_names_from_named_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(40, 40))
    model.add_module("head", torch.nn.Linear(40, 2))
    opt = dropgrad.optim.SGD(model.named_parameters(), lr=0.1, drop_rate=0.0, param_drop_rates={"encoder": 0.5}, seed=1)
    _check_encoder_only(model, opt)


def test_names_from_model_kwarg():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(40, 40))
    model.add_module("head", torch.nn.Linear(40, 2))
    opt = dropgrad.optim.SGD(model.parameters(), lr=0.1, drop_rate=0.0, param_drop_rates={"encoder": 0.5}, model=model)
    _check_encoder_only(model, opt)


def _check_encoder_only(model, opt):
    after = GradRecorder(opt.optimizer, when="pre")
    model(torch.randn(8, 40)).pow(2).sum().backward()
    opt.step()
    enc_w, enc_b, head_w, head_b = after.seen[0]
    assert 0.4 < zero_share([enc_w, enc_b]) < 0.6  # 1640 elements: 0.5 +- 5 sigma
    assert zero_share([head_w, head_b]) == 0.0


def test_every_dropgrad_keyword_is_accepted():
    model = torch.nn.Linear(3, 2)
    kwargs = {
        "drop_rate": None, "param_drop_rates": {model.weight: 0.1}, "full_update_drop": 0.0, "seed": 0,
        "rescale": True, "model": model, "named_parameters": list(model.named_parameters()),
        "drop_rate_scheduler": dropgrad.linear_schedule(0.0, 0.2, 10), "impl": "reference", "capturable": False,
    }
    assert set(kwargs) == set(DROPGRAD_KWARGS)
    opt = dropgrad.optim.SGD(model.parameters(), lr=0.1, **kwargs)
    assert opt.impl == "reference" and len(opt.current_drop_rates()) == 2 and not opt.capturable
