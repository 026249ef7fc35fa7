"""DropGrad under the Hugging Face ``Trainer``: ``optimizers=(DropGrad(...), scheduler)`` on a
tiny GPT-2 built from a config (no downloads), with bf16 autocast, gradient accumulation, clipping, a
full-update-dropped step, ``save_steps`` and ``resume_from_checkpoint`` (the Trainer
reads ``optimizer.pt`` with ``weights_only=True``); and the
:class:`~dropgrad.integrations.transformers.DropGradTrainerCallback`."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from _compat import transformers_skip_reason  # noqa: E402

if transformers_skip_reason():
    pytest.skip(transformers_skip_reason(), allow_module_level=True)
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from dropgrad import DropGrad  # noqa: E402
from dropgrad.integrations.transformers import DropGradTrainerCallback  # noqa: E402

from _integration_helpers import GradRecorder, hand_masked, same, snapshot, zero_share  # noqa: E402

SEED, RATE, STEPS = 7, 0.5, 6  # 24 sequences, batch 4, accumulation 2: 3 steps per epoch


def _skip_step_1(step):
    return 1.0 if step == 1 else 0.0


def _model():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _dataset():
    ids = torch.randint(0, 32, (24, 8), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


class Before(TrainerCallback):
    """Records the gradients at on_pre_optimizer_step (clipped; before DropGrad's masks)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.grads.append([p.grad.detach().clone() for p in params])


def _train(out_dir, mode, resume=None):
    model = _model()
    dtypes = set()
    model.lm_head.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    seen = GradRecorder(inner)
    before = Before()
    callbacks = [before]
    opt = inner
    if mode == "wrapper":
        opt = DropGrad(inner, drop_rate=RATE, seed=SEED, full_update_drop=_skip_step_1)
    else:
        callbacks.append(DropGradTrainerCallback(drop_rate=RATE, seed=SEED, full_update_drop=_skip_step_1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_grad_norm=0.5, save_strategy="steps", save_steps=3, logging_steps=1, report_to=[],
        use_cpu=True, bf16=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), optimizers=(opt, sched), callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert dtypes == {torch.bfloat16}  # bf16 autocast (bf16=True) was on
    return model, trainer, opt, before, seen, callbacks[-1]


@pytest.fixture(scope="module")
def wrapper_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("hf-wrapper"), "wrapper")


def test_trainer_with_dropgrad_masks_clipped_gradients(wrapper_run):
    model, trainer, opt, before, seen, _ = wrapper_run
    assert opt.step_count == STEPS and trainer.state.global_step == STEPS
    assert len(before.grads) == STEPS and len(seen.seen) == STEPS - 1  # step 1 dropped whole
    names = [n for n, _ in model.named_parameters()]
    dense = [i for i, n in enumerate(names) if "wte" not in n and "wpe" not in n]  # embeddings: zeros by nature
    taken = [s for s in range(STEPS) if s != 1]
    for s, got in zip(taken, seen.seen):
        assert same(got, hand_masked(before.grads[s], RATE, SEED, s))
        assert abs(zero_share([got[i] for i in dense]) - RATE) < 0.05
    assert trainer.lr_scheduler.optimizer is opt  # the Trainer kept our scheduler on our wrapper


def test_save_steps_and_resume_from_checkpoint(wrapper_run, tmp_path):
    model, trainer, *_ = wrapper_run
    ckpt = os.path.join(trainer.args.output_dir, "checkpoint-3")
    saved = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    assert saved["dropgrad"]["step"] == 3
    resumed, _, opt, *_ = _train(tmp_path, "wrapper", resume=ckpt)
    assert opt.step_count == STEPS
    assert same(snapshot(resumed), snapshot(model))


def test_trainer_callback_equals_the_wrapper_and_resumes(wrapper_run, tmp_path):
    wrapped, *_ = wrapper_run
    model, trainer, opt, before, seen, cb = _train(tmp_path / "full", "callback")
    assert same(snapshot(model), snapshot(wrapped))  # clip -> mask -> step, skip included: bitwise the wrapper
    assert cb.hook.step_count() == STEPS
    assert all(g is None for g in seen.seen[1])  # AdamW stepped with no gradients: it left every parameter alone
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["dropgrad/skipped"] for entry in logged] == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert logged[-1]["dropgrad/skipped_steps"] == 1.0 and logged[-1]["dropgrad/drop_rate"] == RATE
    ckpt = os.path.join(trainer.args.output_dir, "checkpoint-3")
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        assert json.load(f)["stateful_callbacks"]["dropgrad"]["slots"]["0"]["dropgrad"]["step"] == 3
    resumed, _, _, _, _, resumed_cb = _train(tmp_path / "resumed", "callback", resume=ckpt)
    assert resumed_cb.hook.step_count() == STEPS
    assert same(snapshot(resumed), snapshot(model))
