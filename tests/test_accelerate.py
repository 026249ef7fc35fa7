"""DropGrad under Hugging Face Accelerate: ``accelerator.prepare(model, DropGrad(...),
dataloader, scheduler)`` with bf16 autocast, ``accumulate``, ``clip_grad_norm_``, a
full-update-dropped step, the ``prepare`` state-dict round trip, and
``save_state``/``load_state``; plus :class:`~dropgrad.integrations.DropGradHook` on an
``AcceleratedOptimizer``, checkpointed with ``register_for_checkpointing``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from dropgrad import DropGrad  # noqa: E402
from dropgrad.integrations import DropGradHook  # noqa: E402

from _integration_helpers import GradRecorder, hand_masked, same, snapshot, tiny_mlp  # noqa: E402

SEED, RATE, MAX_NORM, ACCUM = 7, 0.5, 0.05, 2


def _skip_step_1(step):
    return 1.0 if step == 1 else 0.0


def _accelerator():
    AcceleratorState._reset_state(True)  # Accelerate keeps process-wide singletons
    GradientState._reset_state()
    return Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=ACCUM)


def _loader():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(16, 8, generator=g), torch.randn(16, 3, generator=g))
    return DataLoader(ds, batch_size=2, shuffle=False)


def _train(mode, save_dir=None, load_dir=None, split=4):
    """One epoch: 8 micro-batches, 4 optimizer steps. save_dir: save_state after ``split`` micro-batches;
    load_dir: load_state and go on from there."""
    accelerator = _accelerator()
    model = tiny_mlp()
    dtypes = []
    model[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    hook = None
    opt = inner
    if mode == "wrapper":
        opt = DropGrad(inner, drop_rate=RATE, seed=SEED, full_update_drop=_skip_step_1)
    elif mode == "hook":
        hook = DropGradHook(drop_rate=RATE, seed=SEED, full_update_drop=_skip_step_1)
    given = GradRecorder(opt, when="pre") if mode == "wrapper" else None
    seen = GradRecorder(inner)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    before_prepare = opt.dropgrad_state() if mode == "wrapper" else None
    model, popt, loader, psched = accelerator.prepare(model, opt, _loader(), sched)
    if mode == "wrapper":
        assert popt.optimizer is opt and opt.dropgrad_state() == before_prepare  # prepare's round trip
    if hook is not None:
        accelerator.register_for_checkpointing(hook)  # save_state/load_state carry the hook's state
    if load_dir is not None:
        accelerator.load_state(str(load_dir))
    for k, (x, y) in enumerate(loader):
        if load_dir is not None and k < split:
            continue  # done before the checkpoint
        with accelerator.accumulate(model):
            out = model(x)
            assert dtypes.pop() == torch.bfloat16  # autocast inside the prepared model
            accelerator.backward(F.mse_loss(out.float(), y))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
                if hook is not None:
                    hook.apply(popt)
            popt.step()
            psched.step()
            popt.zero_grad()
        if save_dir is not None and k + 1 == split:
            accelerator.save_state(str(save_dir))
    return snapshot(accelerator.unwrap_model(model)), opt, given, seen, popt


def test_prepare_accumulate_clip_and_dropgrad():
    params, opt, given, seen, popt = _train("wrapper")
    steps = 16 // (2 * ACCUM)
    assert opt.step_count == steps  # one DropGrad step (one mask draw) per accumulated step
    assert len(given.seen) == steps and len(seen.seen) == steps - 1  # step 1 dropped whole
    taken = [s for s in range(steps) if s != 1]
    for s, got in zip(taken, seen.seen):
        clipped = given.seen[s]
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped])) <= MAX_NORM * (1 + 1e-5)
        assert same(got, hand_masked(clipped, RATE, SEED, s))
    hook_params, *_ = _train("hook")
    assert same(hook_params, params)  # DropGradHook on the AcceleratedOptimizer: the wrapper's run
    bare_params, *_ = _train("bare")
    assert not same(bare_params, params)


def test_flags_survive_prepare_and_save_load_state_continues(tmp_path):
    # a DropGrad mid-run (last step skipped, seed not yet agreed) keeps every flag through prepare()
    accelerator = _accelerator()
    model = tiny_mlp()
    opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-2), drop_rate=RATE, full_update_drop=1.0)
    F.mse_loss(model(torch.randn(2, 8)), torch.randn(2, 3)).backward()
    opt.step()
    state = opt.dropgrad_state()
    assert state["last_step_skipped"] and state["step"] == 1 and state["seed_agreed"] is False
    accelerator.prepare(opt)
    assert opt.dropgrad_state() == state

    full, *_ = _train("wrapper", save_dir=tmp_path / "ckpt")
    resumed, opt, *_ = _train("wrapper", load_dir=tmp_path / "ckpt")
    assert opt.step_count == 4
    assert same(resumed, full)
    hooked, *_ = _train("hook", save_dir=tmp_path / "hook-ckpt")
    resumed, *_ = _train("hook", load_dir=tmp_path / "hook-ckpt")
    assert same(resumed, hooked) and same(hooked, full)
