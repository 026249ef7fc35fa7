"""DropGrad inside plain PyTorch training machinery: every built-in LR scheduler (on the
wrapper or the wrapped optimizer, across a resume), autocast + GradScaler with the order
unscale -> clip -> DropGrad -> step, clipping, gradient accumulation and torch.compile.

Each test trains a few steps and proves DropGrad took effect: the trajectory equals a
bare optimizer whose gradients were masked by hand (:func:`dropgrad.functional.drop_grad_`
with the same seed and step) and differs from the run without DropGrad, or the wrapped
optimizer received exactly the hand-masked gradients.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler as L

import dropgrad.wrapper as wrapper_module
from dropgrad import DropGrad

from _integration_helpers import (
    GradRecorder,
    batches,
    coin_skips,
    hand_mask_,
    hand_masked,
    same,
    snapshot,
    tiny_mlp,
    zero_share,
)

SEED = 7
RATE = 0.5

SCHEDULERS = {
    "StepLR": lambda o: L.StepLR(o, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=6),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=0.5, total_steps=12),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "LambdaLR": lambda o: L.LambdaLR(o, lambda s: 0.8**s),
    "SequentialLR": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, start_factor=0.2, total_iters=2), L.ExponentialLR(o, gamma=0.8)], milestones=[2]
    ),
    "ChainedScheduler": lambda o: L.ChainedScheduler(
        [L.ConstantLR(o, factor=0.5, total_iters=2), L.ExponentialLR(o, gamma=0.8)]
    ),
}


def _skip_steps_0_and_3(step):
    # deterministic full update drop: the very first step is skipped, the case where a
    # scheduler on the wrapped optimizer would think it was stepped before the optimizer
    return 1.0 if step in (0, 3) else 0.0


def _sched_step(sched, loss):
    if isinstance(sched, L.ReduceLROnPlateau):
        sched.step(1.0)  # a flat metric: the LR is cut after every step
    else:
        sched.step()


def _train_with_scheduler(name, attach, steps, mode, resume_at=None):
    """Train ``steps`` steps; mode 'dropgrad', 'hand' (bare optimizer, masks by hand) or 'bare'."""
    data = batches(steps)

    def build(model):
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = inner
        if mode == "dropgrad":
            opt = DropGrad(inner, drop_rate=RATE, seed=SEED, full_update_drop=_skip_steps_0_and_3)
        sched = SCHEDULERS[name](opt if attach == "wrapper" else inner)
        return model, inner, opt, sched

    model, inner, opt, sched = build(tiny_mlp())
    lrs = []
    for k, (x, y) in enumerate(data):
        if k == resume_at:  # a new model, optimizer and scheduler, as in a new process
            ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
            model, inner, opt, sched = build(tiny_mlp(seed=123))
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            sched.load_state_dict(ckpt["sched"])
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if mode == "dropgrad":
            opt.step()
            assert opt.last_step_skipped == (k in (0, 3))
        elif mode == "hand":
            if k not in (0, 3):
                hand_mask_(model.parameters(), RATE, SEED, k)
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
        _sched_step(sched, loss)
        lrs.append(opt.param_groups[0]["lr"])
    return snapshot(model), lrs


@pytest.mark.parametrize("attach", ["wrapper", "wrapped"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_scheduler_drives_the_lr_and_masks_apply(name, attach):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, lrs = _train_with_scheduler(name, attach, 7, "dropgrad")
        resumed_params, resumed_lrs = _train_with_scheduler(name, attach, 7, "dropgrad", resume_at=4)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "lr_scheduler" in m or "optimizer.step()" in m], messages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the by-hand reference really skips optimizer.step()
        hand_params, hand_lrs = _train_with_scheduler(name, attach, 7, "hand")
        bare_params, _ = _train_with_scheduler(name, attach, 7, "bare")
    assert lrs == hand_lrs and len(set(lrs)) > 1  # the schedule moved the LR the optimizer used
    assert same(params, hand_params)  # masks applied with the scheduled LR
    assert not same(params, bare_params)
    assert resumed_lrs == lrs and same(resumed_params, params)  # resume continues identically


def test_no_scheduler_order_warning_when_the_first_step_is_skipped():
    model = tiny_mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DropGrad(inner, drop_rate=RATE, seed=SEED, full_update_drop=1.0)
    scheds = [L.StepLR(opt, 1), L.StepLR(inner, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        for s in scheds:
            s.step()
    assert opt.last_step_skipped


# ------------------------------------------------------------------ AMP: GradScaler
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["adam", "adam-fused"])
def test_grad_scaler_unscale_clip_dropgrad_step(fused, dtype):
    """The documented order; the scaler skips step 4 (inf), full update drop skips DropGrad step 2."""
    max_norm = 0.05
    model = tiny_mlp()
    inner = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
    opt = DropGrad(inner, drop_rate=RATE, seed=SEED, full_update_drop=lambda s: 1.0 if s == 2 else 0.0)
    # the wrapper must not claim the fused base's in-step unscaling, or the scaler would
    # hand it grad_scale and the base would step with scaled gradients
    assert getattr(opt, "_step_supports_amp_scaling", False) is False
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    given = GradRecorder(opt, when="pre")  # what DropGrad receives: unscaled and clipped
    seen = GradRecorder(inner)  # what Adam receives: masked
    for k, (x, y) in enumerate(batches(7)):
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        assert out.dtype == dtype
        scaler.scale(F.mse_loss(out.float(), y)).backward()
        if k == 4:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        before, count, scale = snapshot(model), opt.step_count, scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if k == 4:  # the scaler skipped: DropGrad never ran, its clock did not move
            assert opt.step_count == count and same(snapshot(model), before)
            assert scaler.get_scale() == scale / 2
        elif count == 2:  # DropGrad skipped: Adam never ran
            assert opt.last_step_skipped and opt.step_count == 3 and same(snapshot(model), before)
        else:
            assert not same(snapshot(model), before)
    assert opt.step_count == 6 and len(given.seen) == 6 and len(seen.seen) == 5
    masked_norms = []
    taken = [s for s in range(6) if s != 2]
    for s, got in zip(taken, seen.seen):
        grads = given.seen[s]
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= max_norm * (1 + 1e-5)
        assert same(got, hand_masked(grads, RATE, SEED, s))
        masked_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in got]))))
        assert 0.3 < zero_share(got) < 0.7
    # the 1/(1-p) factor raises the norm after clipping (E||m*g/(1-p)||^2 = ||g||^2/(1-p))
    assert max(masked_norms) > max_norm


def test_clipping_after_dropgrad_bounds_the_norm_with_a_step_pre_hook():
    """If the bound must hold for the masked gradient, clip in a pre-hook of the wrapped optimizer."""
    max_norm = 0.05
    model = tiny_mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DropGrad(inner, drop_rate=RATE, seed=SEED)

    def clip(optimizer, args, kwargs):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    inner.register_step_pre_hook(clip)
    seen = GradRecorder(inner)  # after the step: the clipped, masked gradients it used
    for x, y in batches(3):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for got in seen.seen:
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in got])) <= max_norm * (1 + 1e-5)
        assert 0.3 < zero_share(got) < 0.7


# ------------------------------------------------------------------ accumulation
def test_accumulation_draws_masks_once_per_optimizer_step(monkeypatch):
    calls = []
    real = wrapper_module.apply_masks_

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(wrapper_module, "apply_masks_", counting)  # the step's one call to the dispatcher
    micro, steps = 4, 3
    data = batches(micro * steps)

    def run(mode):
        model = tiny_mlp()
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = DropGrad(inner, drop_rate=RATE, seed=SEED) if mode == "dropgrad" else inner
        seen = GradRecorder(inner)
        for k, (x, y) in enumerate(data):
            (F.mse_loss(model(x), y) / micro).backward()
            if (k + 1) % micro == 0:
                if mode == "hand":
                    hand_mask_(model.parameters(), RATE, SEED, k // micro)
                opt.step()
                opt.zero_grad()
        return snapshot(model), seen.seen, opt

    params, seen, opt = run("dropgrad")
    assert calls == [4] * steps  # one mask draw over the 4 parameters per optimizer step
    assert opt.step_count == steps
    hand_params, hand_seen, _ = run("hand")
    bare_params, _, _ = run("bare")
    assert same(params, hand_params) and all(same(a, b) for a, b in zip(seen, hand_seen))
    assert not same(params, bare_params)


# ------------------------------------------------------------------ torch.compile
# Compiling costs seconds per test: these are few and tiny. The model test uses the
# default backend (inductor); the whole-step test uses aot_eager, which runs the same
# Dynamo tracing and AOTAutograd as inductor, minus C++ codegen. Set
# DROPGRAD_TEST_COMPILE_BACKEND=inductor to run both with inductor.
_STEP_BACKEND = os.environ.get("DROPGRAD_TEST_COMPILE_BACKEND", "aot_eager")
_MODEL_BACKEND = os.environ.get("DROPGRAD_TEST_COMPILE_BACKEND", "inductor")


@pytest.mark.compile
def test_compiled_model():
    torch._dynamo.reset()
    model = tiny_mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend=_MODEL_BACKEND)
    data = batches(4)

    def run(mode):
        model.load_state_dict(init)
        inner = torch.optim.Adam(model.parameters(), lr=0.01)
        opt = DropGrad(inner, drop_rate=RATE, seed=SEED) if mode == "dropgrad" else inner
        for k, (x, y) in enumerate(data):
            F.mse_loss(compiled(x), y).backward()
            if mode == "hand":
                hand_mask_(model.parameters(), RATE, SEED, k)
            opt.step()
            opt.zero_grad()
        return snapshot(model)

    params = run("dropgrad")
    assert same(params, run("hand"))
    assert not same(params, run("bare"))


@pytest.mark.compile
def test_compiled_whole_train_step():
    """forward + backward + DropGrad.step (with full update drop) + zero_grad in one torch.compile."""
    torch._dynamo.reset()
    data = batches(6)
    fud = 0.3
    skips = [coin_skips(SEED, k, fud) for k in range(len(data))]
    assert any(skips) and not all(skips)

    def run(mode):
        model = tiny_mlp()
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = DropGrad(inner, drop_rate=RATE, seed=SEED, full_update_drop=fud) if mode != "eager-hand" else inner

        def train_step(x, y):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        step = torch.compile(train_step, backend=_STEP_BACKEND) if mode == "compiled" else train_step
        flags = []
        for k, (x, y) in enumerate(data):
            if mode == "eager-hand":
                F.mse_loss(model(x), y).backward()
                if not skips[k]:
                    hand_mask_(model.parameters(), RATE, SEED, k)
                    inner.step()
                inner.zero_grad()
                flags.append(skips[k])
            else:
                step(x, y)
                flags.append(opt.last_step_skipped)
        result = snapshot(model), flags, getattr(opt, "step_count", None)
        if mode == "compiled":  # new step counts, coins and masks, but nothing recompiles
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            for x, y in data:
                step(x, y)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
            assert opt.step_count == 2 * len(data)
        return result

    params, flags, count = run("compiled")
    hand_params, hand_flags, _ = run("eager-hand")
    assert flags == skips == hand_flags and count == len(data)  # the clock and the coin ran every step
    for a, b in zip(params, hand_params):
        torch.testing.assert_close(a, b)
    # and it is not the run without DropGrad
    model = tiny_mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        F.mse_loss(model(x), y).backward()
        inner.step()
        inner.zero_grad()
    assert max((a - b).abs().max().item() for a, b in zip(params, snapshot(model))) > 1e-3


# ------------------------------------------------------------------ observability
def test_stats_report_rates_the_exact_dropped_share_and_skips():
    model = tiny_mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DropGrad(inner, drop_rate=lambda s: 0.2 + 0.1 * s, params={model[2].bias: 0.0}, seed=SEED,
                   full_update_drop=lambda s: 1.0 if s == 1 else 0.0)
    assert opt.stats()["last_step"] is None
    seen = GradRecorder(inner)
    numel = sum(p.numel() for p in model.parameters())
    for k, (x, y) in enumerate(batches(3)):
        F.mse_loss(model(x), y).backward()
        opt.step()
        stats = opt.stats(exact=True)
        assert stats["last_step"] == k and stats["skipped"] == (k == 1)
        assert stats["drop_rate"] == pytest.approx(0.2 + 0.1 * k)
        assert stats["min_drop_rate"] == 0.0 and stats["max_drop_rate"] == pytest.approx(0.2 + 0.1 * k)
        assert stats["expected_dropped_fraction"] == pytest.approx((numel - 3) * (0.2 + 0.1 * k) / numel)
        if k == 1:
            assert stats["dropped_fraction"] is None  # no masks on a skipped step
        else:
            assert stats["dropped_fraction"] == zero_share(seen.seen[-1])  # recounted = what SGD saw
        opt.zero_grad()
