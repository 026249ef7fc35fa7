"""Checkpoint loads are validated first and assigned after (issue 12, items 3, 4, 5, 8)."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from dropgrad import DropGrad
from dropgrad.schedules import LinearDropRateScheduler as LinearSchedule


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _train(opt, model, steps=2):
    for _ in range(steps):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        opt.zero_grad()


def _snapshot(opt):
    sd = opt.state_dict()
    return copy.deepcopy(sd), [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def _assert_same(a, b):
    (sa, ga), (sb, gb) = a, b
    assert ga == gb
    assert sa["dropgrad"] == sb["dropgrad"]
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name]), (k, name)


@pytest.fixture
def saved():
    model = _model()
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-2), drop_rate=0.2, seed=3)
    _train(opt, model, 3)
    return opt.state_dict()


def _fresh():
    model = _model()
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-2), drop_rate=0.2, seed=5)
    _train(opt, model, 1)  # has its own Adam state, step and seed to lose
    return opt


TAMPER = [
    ("step", -1, ValueError), ("step", 2**80, ValueError), ("step", 3.7, TypeError), ("step", "12", TypeError),
    ("step", True, TypeError), ("step", torch.tensor(7.5), TypeError), ("step", float("nan"), TypeError),
    ("step", None, TypeError), ("seed", 1.5, TypeError), ("seed", None, TypeError), ("seed", "abc", TypeError),
    ("seed", float("nan"), TypeError), ("rescale", "yes", TypeError), ("rescale", None, TypeError),
    ("format", -1, ValueError), ("format", 99, ValueError), ("format", "1", TypeError),
    ("last_step_skipped", 1, TypeError), ("seed_agreed", "no", TypeError),
    ("drop_rate", float("nan"), ValueError), ("drop_rate", "0.1", TypeError), ("drop_rate", 1.5, ValueError),
    ("full_update_drop", None, TypeError), ("full_update_drop", -0.1, ValueError),
    ("param_rates", None, TypeError), ("param_rates", {99: 0.1}, ValueError), ("param_rates", {0: "x"}, TypeError),
    ("param_rates", {True: 0.1}, ValueError), ("schedules", None, TypeError), ("schedules", {"default": {}}, ValueError),
]


@pytest.mark.parametrize("key,value,error", TAMPER, ids=[f"{k}={v!r}" for k, v, _ in TAMPER])
def test_tampered_field_is_refused_naming_the_key_and_changes_nothing(saved, key, value, error):
    opt = _fresh()
    before = _snapshot(opt)
    bad = copy.deepcopy(saved)
    bad["dropgrad"][key] = value
    with pytest.raises(error, match=key):
        opt.load_state_dict(bad)
    _assert_same(before, _snapshot(opt))


@pytest.mark.parametrize("group_rate", [float("nan"), -0.5, "<live LinearDropRateScheduler>", "x"])
def test_bad_group_rate_is_refused_before_the_inner_state_is_loaded(saved, group_rate):
    opt = _fresh()
    before = _snapshot(opt)
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["drop_rate"] = group_rate
    with pytest.raises((TypeError, ValueError), match=r"param_groups'\]\[0\]\['drop_rate"):
        opt.load_state_dict(bad)
    _assert_same(before, _snapshot(opt))


def test_bad_schedule_state_is_refused_and_the_live_schedule_keeps_its_position():
    model = _model()
    sched = LinearSchedule(0.0, 0.5, 10)
    opt = DropGrad(torch.optim.Adam(model.parameters()), drop_rate=sched, seed=0)
    _train(opt, model, 2)
    sd = opt.state_dict()
    sched2 = LinearSchedule(0.0, 0.5, 10)
    other = DropGrad(torch.optim.Adam(model.parameters()), drop_rate=sched2, seed=0)
    _train(other, model, 1)
    before = _snapshot(other)
    position = sched2.state_dict()
    for bad_state in ({"step_count": -3}, {"nothing": 1}, {"step_count": 1.5}):
        bad = copy.deepcopy(sd)
        bad["dropgrad"]["schedules"]["default"] = bad_state
        with pytest.raises((TypeError, ValueError), match="schedules"):
            other.load_state_dict(bad)
        assert sched2.state_dict() == position
        _assert_same(before, _snapshot(other))
    missing = copy.deepcopy(sd)
    del missing["dropgrad"]["schedules"]["default"]
    with pytest.raises(ValueError, match="no entry 'default'"):
        other.load_state_dict(missing)
    _assert_same(before, _snapshot(other))
    other.load_state_dict(sd)
    assert sched2.state_dict() == sched.state_dict() and other.step_count == 2


def test_wrong_inner_state_is_refused_and_dropgrad_state_not_assigned(saved):
    opt = DropGrad(torch.optim.Adam(torch.nn.Linear(4, 3).parameters()), drop_rate=0.2, seed=5)
    before = _snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(saved)  # other parameter count
    _assert_same(before, _snapshot(opt))


def test_integer_like_fields_are_accepted(saved):
    sd = copy.deepcopy(saved)
    sd["dropgrad"]["seed"] = np.int64(7)
    sd["dropgrad"]["step"] = torch.tensor(3)
    opt = _fresh()
    opt.load_state_dict(sd)
    assert opt.seed == 7 and type(opt.seed) is int and opt.step_count == 3 and type(opt.step_count) is int


# ---------------------------------------------------------------- what wins on resume
def _ckpt(**kwargs):
    model = _model()
    if "params" in kwargs:
        kwargs["model"] = model
    opt = DropGrad(torch.optim.Adam(model.parameters()), **kwargs)
    _train(opt, model, 2)
    return opt.state_dict()


def _load_warns(opt, sd, *needles):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(sd)
    text = " | ".join(str(w.message) for w in caught if issubclass(w.category, UserWarning))
    for needle in needles:
        assert needle in text, (needle, text)
    return text


def test_per_param_rates_into_a_plain_dropgrad_win_with_a_warning():
    sd = _ckpt(drop_rate=0.1, params={"0.bias": 0.5}, seed=0)
    opt = DropGrad(torch.optim.Adam(_model().parameters()), drop_rate=0.1, seed=0)
    _load_warns(opt, sd, "params rate of parameter 1", "None", "0.5")
    assert opt.current_drop_rates() == [0.1, 0.5, 0.1, 0.1]


def test_constructor_params_replaced_by_a_plain_checkpoint_with_a_warning():
    sd = _ckpt(drop_rate=0.1, seed=0)
    model = _model()
    opt = DropGrad(torch.optim.Adam(model.parameters()), drop_rate=0.1, params={"0.bias": 0.5}, model=model, seed=0)
    _load_warns(opt, sd, "params rate of parameter 1", "0.5", "None")
    assert opt.current_drop_rates() == [0.1] * 4


@pytest.mark.parametrize("saved_fud,live_fud", [(True, False), (False, True), (0.3, 0.0)])
def test_full_update_drop_follows_the_checkpoint_both_ways(saved_fud, live_fud):
    sd = _ckpt(drop_rate=0.1, full_update_drop=saved_fud, seed=0)
    opt = DropGrad(torch.optim.Adam(_model().parameters()), drop_rate=0.1, full_update_drop=live_fud, seed=0)
    _load_warns(opt, sd, "full_update_drop")
    assert opt.full_update_drop == saved_fud or (saved_fud is False and opt.full_update_drop == 0.0)


@pytest.mark.parametrize("setting,live,saved", [("drop_rate", 0.3, 0.1), ("rescale", False, True), ("seed", 9, 0)])
def test_changed_constructor_setting_is_replaced_with_a_warning_naming_both_values(setting, live, saved):
    base = {"drop_rate": 0.1, "seed": 0, "rescale": True}
    sd = _ckpt(**{**base, setting: saved})
    opt = DropGrad(torch.optim.Adam(_model().parameters()), **{**base, setting: live})
    _load_warns(opt, sd, setting, repr(live), repr(saved))
    assert getattr(opt, setting) == saved


def test_schedule_checkpoint_into_a_number_config_is_an_error_naming_the_key():
    sd = _ckpt(drop_rate=LinearSchedule(0.0, 0.5, 10), seed=0)
    opt = DropGrad(torch.optim.Adam(_model().parameters()), drop_rate=0.1, seed=0)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"\['drop_rate'\].*schedule"):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt))


def test_number_checkpoint_into_a_schedule_config_wins_with_a_warning():
    sd = _ckpt(drop_rate=0.1, seed=0)
    opt = DropGrad(torch.optim.Adam(_model().parameters()), drop_rate=LinearSchedule(0.0, 0.5, 10), seed=0)
    _load_warns(opt, sd, "drop_rate", "LinearDropRateScheduler", "0.1")
    assert opt.drop_rate == 0.1


def test_same_config_resume_gives_no_warning():
    sd = _ckpt(drop_rate=0.1, seed=0, params={"1.weight": 0.3})
    model = _model()
    opt = DropGrad(torch.optim.Adam(model.parameters()), drop_rate=0.1, seed=0, params={"1.weight": 0.3}, model=model)
    assert _load_warns(opt, sd) == ""


# ---------------------------------------------------------------- attributes (item 8)
def test_public_attributes_are_validated_on_assignment():
    opt = DropGrad(torch.optim.SGD(_model().parameters(), lr=0.1), drop_rate=0.1, seed=0)
    with pytest.raises(TypeError, match="rescale"):
        opt.rescale = "no"
    with pytest.raises(ValueError, match="impl.*'reference'.*'fused'"):
        opt.impl = "bogus"
    with pytest.raises(TypeError, match="seed"):
        opt.seed = "abc"
    with pytest.raises(TypeError, match="seed"):
        opt.seed = True
    assert opt.rescale is True and opt.impl is None and opt.seed == 0
    opt.seed = np.int32(4)
    opt.rescale = False
    opt.impl = "reference"
    assert (opt.seed, opt.rescale, opt.impl) == (4, False, "reference")
    assert not math.isnan(opt.current_drop_rates()[0])


def test_model_and_named_parameters_are_validated_without_params():
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model"):
        DropGrad(sgd, drop_rate=0.1, model="not a module")
    with pytest.raises(TypeError, match="named_parameters"):
        DropGrad(sgd, drop_rate=0.1, named_parameters=[1, 2])
