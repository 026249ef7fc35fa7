"""DropGrad with Hugging Face Accelerate (no download; a few seconds on CPU).

``accelerator.prepare(model, DropGrad(...), dataloader, scheduler)`` and the usual loop:
``accumulate``, ``backward``, ``clip_grad_norm_`` (clip, then DropGrad masks inside
``step``), bf16 autocast, and ``save_state``/``load_state`` (DropGrad's state is part of
the optimizer's). ``--hook`` shows the alternative that leaves the optimizer alone:
:class:`dropgrad.integrations.DropGradHook` applied right before ``optimizer.step()``.

Run: python examples/accelerate_example.py [--hook] [--state-dir accelerate_state]
Multi-process: accelerate launch examples/accelerate_example.py (the seed is agreed across ranks).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from dropgrad import DropGrad
from dropgrad.integrations import DropGradHook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hook", action="store_true", help="DropGradHook instead of the DropGrad wrapper")
    parser.add_argument("--state-dir", default="accelerate_state")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16", gradient_accumulation_steps=2)
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = x @ torch.randn(16, 1) / 4 + 0.1 * torch.randn(512, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hook = None
    if args.hook:
        hook = DropGradHook(drop_rate=0.2, full_update_drop=0.05, seed=0)
    else:
        opt = DropGrad(opt, drop_rate=0.2, full_update_drop=0.05, seed=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(loader) // 2)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    if hook is not None:
        accelerator.register_for_checkpointing(hook)  # save_state/load_state carry its state

    for epoch in range(args.epochs):
        for xb, yb in loader:
            with accelerator.accumulate(model):
                loss = F.mse_loss(model(xb), yb)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    if hook is not None:
                        hook.apply(opt)  # unwraps Accelerate's optimizer; masks after clipping
                opt.step()
                sched.step()
                opt.zero_grad()
        stats = hook.stats() if hook is not None else opt.optimizer.stats()
        accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}, DropGrad step {stats['last_step']}, "
                          f"skipped last step: {stats['skipped']}, rate {stats['drop_rate']}")
    accelerator.save_state(args.state_dir)  # DropGrad's state: in the optimizer's, or the registered hook's
    accelerator.print(f"saved to {args.state_dir}")


if __name__ == "__main__":
    main()
