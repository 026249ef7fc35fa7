"""Generative models with DropGrad: a VAE on Fashion-MNIST (or digits), scored by test negative ELBO.

The VAE is Kingma & Welling's MLP: encoder 784-``hidden``-2x``latent``, decoder
``latent``-``hidden``-784 with a Bernoulli likelihood on grey levels in [0, 1] (binary cross
entropy on the pixel intensities, as in the PyTorch example). The metric is the negative
ELBO in nats per image (reconstruction + KL, one posterior sample; lower is better),
on the test set at the best-validation epoch and at the last epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator

import torch
import torch.nn.functional as F
from torch import nn

from .config import RunConfig

__all__ = ["VAE", "negative_elbo", "train_vae"]


class VAE(nn.Module):
    """MLP VAE with a diagonal Gaussian posterior and a Bernoulli decoder."""

    def __init__(self, pixels: int, hidden: int = 400, latent: int = 20, dropout: float = 0.0):
        super().__init__()
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, pixels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec(z), mu, logvar


def negative_elbo(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """Per-image negative ELBO in nats (one posterior sample), summed over the batch."""
    logits, mu, logvar = model(x)
    rec = F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return rec + kl


@torch.no_grad()
def _eval(model: VAE, x: torch.Tensor, seed: int, bs: int = 1000) -> float:
    model.eval()
    torch.manual_seed(seed)  # the same posterior noise for every evaluation of every run
    total = sum(negative_elbo(model, x[i : i + bs]).item() for i in range(0, len(x), bs))
    model.train()
    return total / len(x)


def train_vae(cfg: RunConfig, progress: bool = False) -> Generator[dict, None, dict]:
    """Yield per-epoch train/val/test negative ELBO; return best-validation and final test values."""
    from .train import (
        _GradNoise,
        _load_images,
        _lr_sched,
        _split_images,
        _update,
        drop_rate_of,
        make_optimizer,
    )

    d = _load_images(cfg.task, cfg.data_dir)
    xtr, _, xva, _ = _split_images(cfg.replace(label_noise=0.0), d)
    xte = d.x_test
    torch.manual_seed(cfg.seed)
    model = VAE(int(xtr[0].numel()), cfg.hidden, cfg.latent, cfg.dropout)
    steps = math.ceil(len(xtr) / cfg.batch_size)
    total = steps * cfg.epochs
    rate = drop_rate_of(cfg, total) if cfg.uses_dropgrad else None
    opt = make_optimizer(cfg, model, total, rate)
    sched = _lr_sched(cfg, opt, total)
    noise = _GradNoise(cfg.grad_noise, cfg.seed) if cfg.grad_noise > 0 else None
    params = list(model.parameters())
    best, history = (math.inf, -1), []
    for epoch in range(cfg.epochs):
        t0 = time.time()
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        loss_sum = 0.0
        for i in range(steps):
            xb = xtr[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
            loss = negative_elbo(model, xb) / len(xb)
            _update(loss, opt, params, cfg.clip_grad, noise, sched)
            loss_sum += loss.item() * len(xb)
        train = loss_sum / len(xtr)
        if not math.isfinite(train):
            raise FloatingPointError(f"training loss became {train} in epoch {epoch + 1}")
        val = _eval(model, xva, 99)
        test = _eval(model, xte, 98)
        m = {"epoch": epoch + 1, "train_loss": train, "val_loss": val, "val_nelbo": val, "test_nelbo": test,
             "test_loss": test, "lr": opt.param_groups[0]["lr"], "epoch_s": time.time() - t0}
        history.append(m)
        yield m
        if val < best[0]:
            best = (val, epoch)
        elif cfg.patience and epoch - best[1] >= cfg.patience:
            break
    b, f = history[best[1]], history[-1]
    return {
        "best_epoch": best[1] + 1, "epochs_run": len(history), "val_nelbo_best": b["val_nelbo"],
        "test_nelbo_best": b["test_nelbo"], "test_nelbo_final": f["test_nelbo"], "train_loss_final": f["train_loss"],
    }
