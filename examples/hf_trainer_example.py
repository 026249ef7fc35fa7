"""DropGrad with the Hugging Face Trainer on a tiny GPT-2 built from a config (no download;
under a minute on CPU).

Default: ``Trainer(optimizers=(DropGrad(AdamW(...)), scheduler))``. With ``--callback``:
the Trainer builds its own optimizer and
:class:`dropgrad.integrations.transformers.DropGradTrainerCallback` applies DropGrad.
Checkpoints every ``--save-steps``; ``--resume`` continues from the last checkpoint in
``--out`` (DropGrad's state comes back bitwise: optimizer.pt for the wrapper,
trainer_state.json for the callback).

Run: python examples/hf_trainer_example.py [--callback] [--out hf_runs] [--resume]
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, get_linear_schedule_with_warmup

from dropgrad import DropGrad
from dropgrad.integrations.transformers import DropGradTrainerCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callback", action="store_true", help="use DropGradTrainerCallback instead of the wrapper")
    parser.add_argument("--out", default="hf_runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    # a learnable toy language: each sequence counts up modulo the vocabulary
    starts = torch.randint(0, 32, (128, 1))
    ids = (starts + torch.arange(16)) % 32
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=3e-3, max_grad_norm=1.0, save_steps=args.save_steps, logging_steps=5, disable_tqdm=True,
        report_to=[], use_cpu=True, seed=0,
    )
    callbacks, optimizers = [], (None, None)
    if args.callback:
        callbacks = [DropGradTrainerCallback(drop_rate=0.1, full_update_drop=0.05, seed=0)]
    else:
        opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=3e-3), drop_rate=0.1, full_update_drop=0.05, seed=0)
        optimizers = (opt, get_linear_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=args.steps))
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, optimizers=optimizers,
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if not args.callback:
        print("DropGrad steps:", optimizers[0].step_count, "last step stats:", optimizers[0].stats())


if __name__ == "__main__":
    main()
