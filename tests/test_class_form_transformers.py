"""Hugging Face ``Trainer(optimizer_cls_and_kwargs=(dropgrad.optim.AdamW, {...}))``: the Trainer
builds the optimizer itself, from its decay/no-decay parameter groups, and gets a DropGrad."""

from __future__ import annotations

import pytest
import torch

from _compat import transformers_skip_reason

if transformers_skip_reason():
    pytest.skip(transformers_skip_reason(), allow_module_level=True)
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import dropgrad  # noqa: E402

from _class_form_helpers import MaskAudit  # noqa: E402

SEED, RATE, STEPS = 5, 0.3, 4


class Audit(TrainerCallback):
    """Hooks a MaskAudit on the optimizer the Trainer built, once training begins."""

    def __init__(self):
        self.audit = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.audit = MaskAudit(getattr(optimizer, "optimizer", optimizer))  # Accelerate wraps it


def test_trainer_builds_dropgrad_from_class_and_kwargs(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, weight_decay=0.1,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
    )
    audit = Audit()
    trainer = Trainer(
        model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids], callbacks=[audit],
        optimizer_cls_and_kwargs=(dropgrad.optim.AdamW, {"lr": 1e-2, "drop_rate": RATE, "seed": SEED}),
    )
    trainer.train()
    opt = audit.audit.opt
    assert type(opt) is dropgrad.optim.AdamW and opt.seed == SEED and opt.step_count == STEPS
    # the Trainer's own grouping reached the base AdamW: biases and norms without weight decay
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert opt.param_groups[0]["initial_lr"] == 1e-2
    audit.audit.check(RATE, min_steps=STEPS)
