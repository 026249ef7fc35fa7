"""``DropGrad(capturable=True)``: the step count on the device, for steps captured in CUDA graphs.

What a CPU can check: the capturable mode gives bitwise the masks of the default
mode (eager), resumes exactly, keeps its count where a replay would advance it,
and refuses what a captured graph would freeze (schedules, full update drop,
host-derived keys inside a capture, a first step inside a capture). The capture
itself and its replays are checked on a GPU in ``tests/test_cuda.py``; the
Triton kernel that reads the clock, under Triton's interpreter there too.
"""

from __future__ import annotations

import pickle

import pytest
import torch

import dropgrad
from dropgrad import DropGrad, masks
from dropgrad.functional import apply_masks_
from dropgrad.schedules import LinearDropRateScheduler


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _train(capturable, steps=6, opt=None, model=None, start=0):
    if model is None:
        model = _model()
    if opt is None:
        opt = DropGrad(
            torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "drop_rate": 0.5}],
                             lr=1e-2),
            drop_rate=0.3, params={model[2].bias: 0.1}, seed=21, capturable=capturable,
        )
    gen = torch.Generator().manual_seed(start)
    for _ in range(steps):
        x = torch.randn(10, 8, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _same(a, b):
    return all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a.parameters(), b.parameters()))


def test_capturable_gives_the_masks_of_the_default_mode_bitwise():
    plain, plain_opt = _train(False)
    cap, cap_opt = _train(True)
    assert _same(plain, cap)
    assert cap_opt.capturable and not plain_opt.capturable
    assert cap_opt.step_count == plain_opt.step_count == 6
    assert cap_opt.state_dict()["dropgrad"] == plain_opt.state_dict()["dropgrad"]


def test_the_device_clock_is_the_count_a_replay_advances():
    # a replay of a captured step runs only device work: the mask kernels read the clock and the
    # step advances it. Here the clock is advanced the same way, with no host step in between
    model, opt = _train(True, steps=2)
    # no public handle on purpose: only a replay (device work) advances the clock behind the host's back
    (clock,) = opt._clocks.clocks.values()
    assert clock.tolist() == [21, 2]
    clock[1:].add_(1)  # what a replay's captured clock advance does
    assert opt.step_count == 3  # read from the device
    assert opt.state_dict()["dropgrad"]["step"] == 3
    stats = opt.stats(exact=True)  # the step a replay took: index 2, its masks recounted
    assert stats["last_step"] == 2
    kept = 0
    total = 0
    for j, p in enumerate(model.parameters()):
        rate = opt.current_drop_rates()[j]
        key = masks.derive_key(21, 2, j)
        kept += int(masks.keep_mask(p.numel(), key, masks.keep_threshold(rate)).sum())
        total += p.numel()
    assert stats["dropped_fraction"] == pytest.approx(1 - kept / total, abs=1e-12)
    # the next eager step uses step 3's masks: the same as a default-mode optimizer that took 3 steps
    ref_model = _model()
    ref_model.load_state_dict(model.state_dict())
    ref_opt = DropGrad(torch.optim.SGD(ref_model.parameters(), lr=1.0), drop_rate=0.3, seed=21)
    ref_opt.load_state_dict({**ref_opt.state_dict(), "dropgrad": {**ref_opt.dropgrad_state(), "step": 3}})
    cap_sgd = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.3, seed=21, capturable=True)
    cap_sgd.load_dropgrad_state({**cap_sgd.dropgrad_state(), "step": 3})
    for m, o in ((ref_model, ref_opt), (model, cap_sgd)):
        m(torch.ones(4, 8)).sum().backward()
        o.step()
    assert _same(ref_model, model)
    assert cap_sgd.step_count == 4


def test_capturable_resumes_exactly_from_a_checkpoint():
    whole, _ = _train(True, steps=6)
    first, opt = _train(True, steps=3)
    state = pickle.loads(pickle.dumps((first.state_dict(), opt.state_dict())))
    model = _model()
    resumed = DropGrad(
        torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "drop_rate": 0.5}],
                         lr=1e-2),
        drop_rate=0.3, params={model[2].bias: 0.1}, seed=99, capturable=True,
    )
    _train(True, steps=1, opt=resumed, model=model, start=7)  # its clock is at step 1, seed 99
    model.load_state_dict(state[0])
    resumed.load_state_dict(state[1])
    assert resumed.step_count == 3  # the host's loaded count, not the stale device clock
    # the remaining three steps with the batches the uninterrupted run saw
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(10, 8, generator=gen) for _ in range(6)]
    for x in batches[3:]:
        model(x).square().mean().backward()
        resumed.step()
        resumed.zero_grad()
    assert _same(whole, model)
    assert resumed.step_count == 6 and resumed.seed == 21  # the count read back from the rewritten clock


def test_capturable_survives_pickling():
    _, opt = _train(True, steps=2)
    again = pickle.loads(pickle.dumps(opt))
    assert again.capturable and again.step_count == 2


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"drop_rate": LinearDropRateScheduler(0.3, 0.0, 10)}, r"drop_rate is LinearDropRateScheduler"),
        ({"drop_rate": lambda step: 0.1}, r"drop_rate is <function"),
        ({"drop_rate": 0.1, "full_update_drop": 0.2}, r"full_update_drop \(got 0.2\)"),
        ({"drop_rate": 0.1, "full_update_drop": True}, r"full_update_drop \(got True\)"),
    ],
)
def test_capturable_refuses_what_a_graph_would_freeze(kwargs, needle):
    model = _model()
    with pytest.raises(ValueError, match=r"capturable=True.*" + needle):
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), capturable=True, **kwargs)


def test_a_schedule_set_after_construction_is_refused_at_the_step_before_anything_changes():
    model, opt = _train(True, steps=1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[1]["drop_rate"] = LinearDropRateScheduler(0.5, 0.0, 10)
    model(torch.ones(2, 8)).sum().backward()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['drop_rate'\] is LinearDropRateScheduler"):
        opt.step()
    assert opt.step_count == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_capturable_must_be_a_bool_and_rejects_the_comm_hooks_premasking():
    model = _model()
    with pytest.raises(TypeError, match="capturable must be a bool, got 1"):
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1, capturable=1)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1, capturable=True)
    with pytest.raises(RuntimeError, match="capturable=True.*masked all-reduce hook"):
        opt.mark_premasked(model.parameters())


def _fake_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_inside_a_capture_the_first_step_and_host_keyed_kernels_are_refused(monkeypatch):
    model = _model()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.3, seed=1, capturable=True)
    model(torch.ones(2, 8)).sum().backward()
    with monkeypatch.context() as m:
        _fake_capture(m)
        with pytest.raises(RuntimeError, match="take at least one eager step"):
            opt.step()
    opt.step()  # the warm-up step puts the clock on the (here: CPU) device
    assert opt.step_count == 1
    model(torch.ones(2, 8)).sum().backward()
    with monkeypatch.context() as m:
        _fake_capture(m)
        # CPU tensors take the C or reference kernel, which derive keys on the host: refused in a capture
        with pytest.raises(RuntimeError, match=r"cannot mask grads\[0\] inside a CUDA graph capture: it is on device cpu"):
            opt.step()
    # after set_seed (or a load), one eager step must come before the next capture
    opt.set_seed(5)
    with monkeypatch.context() as m:
        _fake_capture(m)
        with pytest.raises(RuntimeError, match="one more after load_state_dict"):
            opt.step()


def test_the_dispatcher_takes_a_clock_in_place_of_the_prefix():
    for seed, step in ((0, 0), (7, 3), (2**64 - 1, 2**63 + 9)):
        a = [torch.randn(1000), torch.randn(33, dtype=torch.float64)]
        b = [t.clone() for t in a]
        args = ([0, 5], [masks.keep_threshold(0.3), masks.keep_threshold(0.7)], [1 / 0.7, 1 / 0.3], [0, 2**33])
        apply_masks_(a, *args, prefix=masks.step_prefix(seed, step))
        apply_masks_(b, *args, prefix=masks.clock_tensor(seed, step))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(TypeError, match=r"prefix must be an int .* or a clock .*dtype torch.int32 and shape \(2,\)"):
        apply_masks_([torch.ones(3)], [0], [1 << 31], [2.0], prefix=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"grads\[0\] is on cpu but the clock on meta"):
        apply_masks_([torch.ones(3)], [0], [1 << 31], [2.0], prefix=torch.zeros(2, dtype=torch.int64, device="meta"))


def test_int64_bits_keeps_the_bit_pattern_of_the_value_mod_2_64():
    for v in (0, 1, 2**63 - 1, 2**63, 2**64 - 1, -1, 2**64 + 5, -(2**63)):
        bits = masks.int64_bits(v)
        assert -(2**63) <= bits < 2**63 and (bits - v) % 2**64 == 0
    assert masks.int64_bits(2**63) == -(2**63) and masks.int64_bits(2**64 - 1) == -1
    assert masks.clock_tensor(2**64 - 1, 2**63).tolist() == [-1, -(2**63)]


def test_the_class_form_passes_capturable_to_the_base_optimizer_too():
    model = _model()
    adam = dropgrad.optim.Adam(model.parameters(), lr=1e-3, drop_rate=0.1, capturable=True)
    assert adam.capturable and adam.optimizer.defaults["capturable"] is True
    sgd = dropgrad.optim.SGD(model.parameters(), lr=1e-3, drop_rate=0.1, capturable=True)  # SGD has no such flag
    assert sgd.capturable and "capturable" not in sgd.optimizer.defaults
    import inspect

    for cls in (dropgrad.optim.Adam, dropgrad.optim.RMSprop, dropgrad.optim.SGD):
        names = list(inspect.signature(cls.__init__).parameters)
        assert names.count("capturable") == 1, (cls, names)


def test_a_compiled_capturable_step_gives_the_compiled_default_steps_bitwise():
    # under torch.compile the masks go through the custom op (dropgrad.compiled), which runs the same
    # eager planning, so the clock path must give what the default mode gives in the same graph
    def run(capturable):
        model = _model()
        opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-2), drop_rate=0.3, seed=4, capturable=capturable)

        @torch.compile
        def step(x):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            step(torch.randn(10, 8, generator=gen))
        return model, opt

    plain, _ = run(False)
    captured, opt = run(True)
    assert _same(plain, captured)
    assert opt.step_count == 4  # read from the clock
