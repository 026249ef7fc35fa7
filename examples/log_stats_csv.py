"""Log DropGrad's per-step statistics to CSV (and TensorBoard, if installed).

Trains a small MLP on synthetic regression data (no download, a few seconds on CPU)
with a linearly decaying drop rate and occasional full update drops, and writes one
row per optimizer step: loss, learning rate, the drop rate in force, the expected and
the exact share of dropped gradient elements, and whether the step was skipped.

Run: python examples/log_stats_csv.py [--out dropgrad_stats.csv] [--steps 200] [--tensorboard DIR]
"""

from __future__ import annotations

import argparse
import csv

import torch
import torch.nn.functional as F

from dropgrad import DropGrad, LinearDropRateScheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="dropgrad_stats.csv")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tensorboard", default=None, help="also write TensorBoard events to this folder")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = x @ torch.randn(16, 1) + 0.1 * torch.randn(512, 1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = DropGrad(
        torch.optim.AdamW(model.parameters(), lr=3e-3),
        drop_rate=LinearDropRateScheduler(0.5, 0.1, num_steps=args.steps),
        full_update_drop=0.05,
        seed=0,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional: pip install tensorboard)

        writer = SummaryWriter(args.tensorboard)

    fields = ["step", "loss", "lr", "drop_rate", "expected_dropped_fraction", "dropped_fraction", "skipped"]
    with open(args.out, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=fields)
        out.writeheader()
        for step in range(args.steps):
            idx = torch.randint(0, len(x), (32,))
            loss = F.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            # exact=True recounts the dropped elements from the counter-based masks:
            # one pass over the gradients; leave it off for big models
            stats = opt.stats(exact=True)
            opt.zero_grad()
            sched.step()
            row = {"step": step, "loss": loss.item(), "lr": lr, **{k: stats[k] for k in fields[3:]}}
            out.writerow(row)
            if writer is not None:
                for key in ("loss", "lr", "drop_rate", "expected_dropped_fraction", "dropped_fraction"):
                    if row[key] is not None:
                        writer.add_scalar(f"dropgrad/{key}", row[key], step)
                writer.add_scalar("dropgrad/skipped", float(row["skipped"]), step)
    if writer is not None:
        writer.close()
    with open(args.out) as f:
        skipped = sum(1 for line in f if line.rstrip().endswith("True"))
    print(f"wrote {args.steps} rows to {args.out}; final loss {loss.item():.4f}; skipped steps: {skipped}")


if __name__ == "__main__":
    main()
