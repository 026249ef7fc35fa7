"""DropGrad with PyTorch Lightning, two ways (no download; about 20 s on CPU).

1. ``configure_optimizers`` returns a DropGrad (with a step-wise LR scheduler built
   on it), trained in ``bf16-mixed`` with gradient accumulation and clipping;
2. ``--callback``: the optimizer is left alone and
   :class:`dropgrad.integrations.lightning.DropGradCallback` applies DropGrad.

Both checkpoint DropGrad's state with the run; ``--resume`` continues from the last
checkpoint of a previous run in the same ``--dir``.

Run: python examples/lightning_example.py [--callback] [--dir lightning_runs] [--resume]
"""

from __future__ import annotations

import argparse
import glob
import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dropgrad import DropGrad
from dropgrad.integrations.lightning import DropGradCallback


class Regressor(pl.LightningModule):
    def __init__(self, use_wrapper: bool):
        super().__init__()
        self.use_wrapper = use_wrapper
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x).float(), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=2e-2)
        if self.use_wrapper:
            opt = DropGrad(opt, drop_rate=0.2, full_update_drop=0.05, seed=0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)  # built on what we return
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_epoch_end(self):
        opt = self.trainer.optimizers[0]
        if isinstance(opt, DropGrad):
            self.print(f"epoch {self.current_epoch}: DropGrad step {opt.step_count}, last stats {opt.stats()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callback", action="store_true", help="use DropGradCallback instead of the wrapper")
    parser.add_argument("--dir", default="lightning_runs")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 1) / 4 + 0.1 * torch.randn(256, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)

    callbacks = [DropGradCallback(drop_rate=0.2, full_update_drop=0.05, seed=0)] if args.callback else []
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        default_root_dir=args.dir,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    ckpt = None
    if args.resume:
        found = sorted(glob.glob(os.path.join(args.dir, "**", "*.ckpt"), recursive=True), key=os.path.getmtime)
        ckpt = found[-1] if found else None
        print(f"resuming from {ckpt}")
    trainer.fit(Regressor(use_wrapper=not args.callback), loader, ckpt_path=ckpt)
    print("logged:", {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})


if __name__ == "__main__":
    main()
