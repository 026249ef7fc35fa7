"""DropGrad under PyTorch Lightning: a DropGrad returned from ``configure_optimizers`` (with
a step-wise LR scheduler, ``precision="bf16-mixed"``, ``accumulate_grad_batches``, a
full-update-dropped step and a checkpoint resume that continues identically), and the
:class:`~dropgrad.integrations.lightning.DropGradCallback` (same masks as the wrapper,
mask -> clip order, logged statistics, resume)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from dropgrad import DropGrad  # noqa: E402
from dropgrad.integrations.lightning import DropGradCallback  # noqa: E402

from _integration_helpers import GradRecorder, hand_masked, same, snapshot, tiny_mlp  # noqa: E402

SEED, RATE, LR, GAMMA = 7, 0.5, 0.1, 0.7
STEPS_PER_EPOCH = 3  # 12 samples, batch 2, accumulate 2


def _skip_step_1(step):
    return 1.0 if step == 1 else 0.0


def _data():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(12, 8, generator=g), torch.randn(12, 3, generator=g))
    return DataLoader(ds, batch_size=2, shuffle=False)


class Net(pl.LightningModule):
    def __init__(self, mode: str, precision: str = "bf16-mixed"):
        super().__init__()
        self.mode = mode
        self.autocast_dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
        self.net = tiny_mlp()
        self.before = []  # gradients when Lightning calls on_before_optimizer_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        assert out.dtype == self.autocast_dtype  # mixed-precision autocast is on
        return F.mse_loss(out.float(), y)

    def on_before_optimizer_step(self, optimizer):
        self.before.append([None if p.grad is None else p.grad.detach().clone() for p in self.net.parameters()])

    def configure_optimizers(self):
        inner = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
        self.seen = GradRecorder(inner)
        opt = inner
        if self.mode == "wrapper":
            opt = DropGrad(inner, drop_rate=RATE, seed=SEED, full_update_drop=_skip_step_1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=GAMMA)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(tmp_path, mode, epochs, callbacks=(), ckpt_path=None, clip=None, name="run", precision="bf16-mixed"):
    model = Net(mode, precision)
    amp = {"precision": precision}
    if precision == "16-mixed":  # Lightning only offers fp16 AMP on GPUs; the plugin itself runs on CPU
        from lightning.pytorch.plugins.precision import MixedPrecision

        amp = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]}
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        **amp,
        accumulate_grad_batches=2,
        gradient_clip_val=clip,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path / name),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _data(), ckpt_path=ckpt_path)
    bad = [str(w.message) for w in caught if "lr_scheduler" in str(w.message) or "closure" in str(w.message)]
    assert not bad, bad
    return model, trainer


@pytest.fixture(scope="module")
def wrapper_run(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("wrapper"), "wrapper", epochs=2)


def test_configure_optimizers_returning_dropgrad(wrapper_run):
    model, trainer = wrapper_run
    opt = trainer.optimizers[0]
    assert isinstance(opt, DropGrad) and trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    steps = 2 * STEPS_PER_EPOCH
    assert opt.step_count == steps and trainer.global_step == steps
    # the skipped step still ran Lightning's closure (no "closure hasn't been executed")
    assert len(model.before) == steps and len(model.seen.seen) == steps - 1
    taken = [s for s in range(steps) if s != 1]
    for s, got in zip(taken, model.seen.seen):
        assert same(got, hand_masked(model.before[s], RATE, SEED, s))  # accumulated grads, masked once
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * GAMMA**steps)  # scheduler stepped on the wrapper


def test_checkpoint_holds_a_flat_dropgrad_state_and_resume_continues_identically(wrapper_run, tmp_path):
    model, trainer = wrapper_run
    first, t1 = _fit(tmp_path, "wrapper", epochs=1, name="first")
    ckpt = t1.checkpoint_callback.best_model_path
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert set(saved) == {"state", "param_groups", "dropgrad"}  # not nested in another state dict
    assert saved["dropgrad"]["step"] == STEPS_PER_EPOCH
    resumed, t2 = _fit(tmp_path, "wrapper", epochs=2, ckpt_path=ckpt, name="second")
    assert t2.optimizers[0].step_count == 2 * STEPS_PER_EPOCH
    assert same(snapshot(resumed), snapshot(model))
    bare, _ = _fit(tmp_path, "bare", epochs=2, name="bare")
    assert not same(snapshot(bare), snapshot(model))


def test_16_mixed_grad_scaler_path(tmp_path):
    """With "16-mixed" Lightning runs the closure, unscales, then scaler.step(DropGrad): no closure reaches us."""
    model, trainer = _fit(tmp_path, "wrapper", epochs=1, precision="16-mixed")
    opt = trainer.optimizers[0]
    assert opt.step_count == STEPS_PER_EPOCH and len(model.seen.seen) == STEPS_PER_EPOCH - 1
    for s, got in zip([0, 2], model.seen.seen):
        assert same(got, hand_masked(model.before[s], RATE, SEED, s))  # unscaled gradients, masked


# ------------------------------------------------------------------ the callback
class Recorder(pl.Callback):
    """Placed before DropGradCallback: sees the gradients it is given."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for p in pl_module.net.parameters()])


def test_callback_draws_the_wrappers_masks(wrapper_run, tmp_path):
    wrapped, _ = wrapper_run
    cb = DropGradCallback(drop_rate=RATE, seed=SEED, full_update_drop=_skip_step_1)
    model, trainer = _fit(tmp_path, "bare", epochs=2, callbacks=[cb])
    assert same(snapshot(model), snapshot(wrapped))  # bitwise the wrapper's run, skip included
    metrics = trainer.callback_metrics
    assert metrics["dropgrad/drop_rate"] == RATE and metrics["dropgrad/skipped_steps"] == 1
    assert metrics["dropgrad/skipped"] == 0 and metrics["dropgrad/expected_dropped_fraction"] == pytest.approx(RATE)
    assert cb.hook.step_count() == 2 * STEPS_PER_EPOCH


def test_callback_masks_before_lightning_clips_and_resumes(tmp_path):
    clip = 0.05
    rec = Recorder()
    cb = DropGradCallback(drop_rate=RATE, seed=SEED, log_exact=True)
    model, trainer = _fit(tmp_path, "bare", epochs=2, callbacks=[rec, cb], clip=clip, name="full")
    for s, (given, got) in enumerate(zip(rec.grads, model.seen.seen)):
        stand_ins = [torch.nn.Parameter(torch.zeros_like(g)) for g in given]
        for p, g in zip(stand_ins, hand_masked(given, RATE, SEED, s)):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(stand_ins, clip)  # mask, then Lightning's clip
        assert same(got, [p.grad for p in stand_ins])
    assert 0.3 < trainer.callback_metrics["dropgrad/dropped_fraction"] < 0.7

    first_cb = DropGradCallback(drop_rate=RATE, seed=SEED, log_exact=True)
    _, t1 = _fit(tmp_path, "bare", epochs=1, callbacks=[Recorder(), first_cb], clip=clip, name="first")
    ckpt = t1.checkpoint_callback.best_model_path
    assert torch.load(ckpt, weights_only=False)["callbacks"]  # the callback's state is in the checkpoint
    resumed_cb = DropGradCallback(drop_rate=RATE, seed=SEED, log_exact=True)
    resumed, _ = _fit(tmp_path, "bare", epochs=2, callbacks=[Recorder(), resumed_cb], clip=clip, ckpt_path=ckpt,
                      name="second")
    assert resumed_cb.hook.step_count() == 2 * STEPS_PER_EPOCH
    assert same(snapshot(resumed), snapshot(model))


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers (a GAN-like alternation)."""

    def __init__(self, wrap: bool):
        super().__init__()
        self.automatic_optimization = False
        self.wrap = wrap
        self.net = tiny_mlp()

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(F.mse_loss(self.net(x).float(), y))
            opt.step()

    def configure_optimizers(self):
        first = torch.optim.SGD(self.net[0].parameters(), lr=LR, momentum=0.9)
        second = torch.optim.Adam(self.net[2].parameters(), lr=1e-2)
        if not self.wrap:
            return [first, second]
        slot_seeds = DropGradCallback(drop_rate=RATE, seed=SEED).hook
        return [DropGrad(first, drop_rate=RATE, seed=slot_seeds._slot_seed(0)),
                DropGrad(second, drop_rate=RATE, seed=slot_seeds._slot_seed(1))]


def test_manual_optimization_with_two_optimizers(tmp_path):
    def fit(wrap, callbacks, name):
        model = TwoOptimizers(wrap)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", callbacks=callbacks, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path / name))
        trainer.fit(model, _data())
        return model, trainer

    wrapped, _ = fit(True, [], "wrapped")
    cb = DropGradCallback(drop_rate=RATE, seed=SEED)
    hooked, trainer = fit(False, [cb], "callback")
    assert same(snapshot(hooked), snapshot(wrapped))  # each optimizer gets its own seed, as two wrappers would
    assert cb.hook.step_count(0) == cb.hook.step_count(1) == 6
    assert "dropgrad/drop_rate_opt1" in trainer.callback_metrics
    bare, _ = fit(False, [], "bare")
    assert not same(snapshot(bare), snapshot(wrapped))
