"""Train one configuration and report its metrics epoch by epoch.

:func:`train` is a generator: it yields one dict of metrics per epoch and
returns the run's summary (early-stopped and final-epoch metrics, robustness),
so the caller can write each epoch to the results file as soon as it exists.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Generator

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from .checkpoints import EpochCheckpoint
from .config import RL_TASKS, RunConfig
from .models import build_image_model, build_lm
from .progress import bar

__all__ = ["train", "make_optimizer", "drop_rate_of", "is_language", "is_rl", "primary_metric"]


def is_language(cfg: RunConfig) -> bool:
    return cfg.task in D.TOKEN_TASKS


def is_rl(cfg: RunConfig) -> bool:
    return cfg.task in RL_TASKS


def primary_metric(cfg_or_task) -> tuple[str, bool]:
    """The test metric a suite is judged by, and whether higher is better."""
    task = cfg_or_task if isinstance(cfg_or_task, str) else cfg_or_task.task
    model = None if isinstance(cfg_or_task, str) else cfg_or_task.model
    if task in RL_TASKS:
        return ("return", True)
    if model == "vae":
        return ("nelbo", False)
    return ("ppl", False) if task in D.TOKEN_TASKS else ("acc", True)


@functools.lru_cache(maxsize=4)
def _load_images(task: str, data_dir: str) -> D.ImageData:
    return D.load_images(task, data_dir)


@functools.lru_cache(maxsize=2)
def _load_tokens(task: str, data_dir: str, vocab_size: int) -> D.TokenData:
    return D.load_tokens(task, data_dir, vocab_size)


# ---------------------------------------------------------------- optimizer


def drop_rate_of(cfg: RunConfig, total_steps: int):
    """The ``drop_rate`` argument for DropGrad: a number or a schedule from :mod:`dropgrad.schedules`."""
    p, q = cfg.drop_rate, cfg.schedule_final
    if cfg.schedule == "constant":
        return p
    from dropgrad import schedules as S

    n = max(total_steps, 1)
    if cfg.schedule == "linear":
        return S.LinearDropRateScheduler(p, q, n)
    if cfg.schedule == "cosine":
        return S.CosineAnnealingDropRateScheduler(p, q, n)
    if cfg.schedule == "step":  # p for the first third, p/2 for the second, then the final rate
        return S.StepDropRateScheduler(p, {n // 3: p / 2, (2 * n) // 3: q})
    if cfg.schedule == "cyclical":  # triangular cycles between the final (low) rate and p, four per run
        return S.CyclicalDropRateScheduler(min(p, q), max(p, q), period=max(2, n // 4))
    if cfg.schedule == "exponential":  # from p towards the final rate, halving the distance every n/4 steps
        return S.ExponentialDecayDropRateScheduler(p, 0.5, decay_steps=max(1, n // 4), final_drop_rate=q)
    if cfg.schedule == "warmup":  # linear from the final rate up to p over the first fifth, then p
        return S.LinearWarmupDropRateScheduler(p, max(1, n // 5), initial_drop_rate=q)
    # adaptive: starts at the final rate (default 0) and rises by adaptive_increment, up to p,
    # whenever the monitored validation quantity has not improved for adaptive_patience epochs
    return S.AdaptiveDropRateScheduler(
        min_drop_rate=min(p, q), max_drop_rate=p, monitor="gap" if cfg.adaptive_monitor == "gap" else "metric",
        patience=cfg.adaptive_patience, increment=cfg.adaptive_increment,
    )


def report_epoch(rate, train_loss: float, val_loss: float) -> None:
    """Tell an adaptive schedule (one with ``report``) how the epoch went; others ignore it."""
    report = getattr(rate, "report", None)
    if report is None:
        return
    if getattr(rate, "monitor", "metric") == "gap":
        report(val_loss=val_loss, train_loss=train_loss)
    else:
        report(val_loss)


def _parse_layer_rates(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"layer_rates entry {item!r} is not name=rate")
        k, v = item.split("=", 1)
        out[k.strip()] = float(v)
    return out


def make_optimizer(cfg: RunConfig, model: nn.Module, total_steps: int, rate=None) -> torch.optim.Optimizer:
    """The base optimizer, wrapped in :class:`dropgrad.DropGrad` when the config asks for it.

    ``rate`` is the drop rate or schedule to use (default: :func:`drop_rate_of`); pass it
    to keep a handle on an adaptive schedule.
    """
    lr = cfg.lr * cfg.lr_scale
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        base = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        base = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        base = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if not cfg.uses_dropgrad:
        return base
    from dropgrad import DropGrad

    rate = drop_rate_of(cfg, total_steps) if rate is None else rate
    layer = _parse_layer_rates(cfg.layer_rates)
    return DropGrad(
        base,
        drop_rate=rate if (cfg.drop_rate > 0 or not layer) else None,
        params=layer or None,
        full_update_drop=cfg.full_update_drop,
        seed=cfg.seed,
        rescale=cfg.rescale,
        model=model,
    )


class _GradNoise:
    """Control: ``g += eps * |g| * sqrt(p/(1-p))``, ``eps ~ N(0, 1)``: DropGrad's per-element variance, Gaussian."""

    def __init__(self, p: float, seed: int):
        self.factor = math.sqrt(p / (1.0 - p))
        self.gen = torch.Generator().manual_seed(seed + 7919)

    @torch.no_grad()
    def __call__(self, params) -> None:
        for prm in params:
            if prm.grad is not None:
                g = prm.grad
                noise = torch.randn(g.shape, generator=self.gen, dtype=g.dtype).to(g.device)
                g.add_(noise * g.abs() * self.factor)


def _lr_sched(cfg: RunConfig, opt, total_steps: int):
    if cfg.lr_decay == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps)))
    return None



def _update(loss, opt, params, clip_grad: float, noise, sched) -> None:
    """One optimizer step from ``loss``: backward, optional clipping and control noise, step, LR schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        nn.utils.clip_grad_norm_(params, clip_grad)
    if noise is not None:
        noise(params)
    opt.step()
    if sched is not None:
        sched.step()

def _current_rate(opt) -> float:
    rates = getattr(opt, "current_drop_rates", None)
    if rates is None:
        return 0.0
    r = rates()
    return float(max(r)) if r else 0.0


# ---------------------------------------------------------------- images


def _split_images(cfg: RunConfig, d: D.ImageData):
    n = len(d.y_train)
    fixed = torch.randperm(n, generator=torch.Generator().manual_seed(1234))
    val_size = min(cfg.val_size, n // 5)
    val_idx, pool = fixed[:val_size], fixed[val_size:]
    if cfg.train_subset:
        if cfg.train_subset > len(pool):
            raise ValueError(f"train_subset={cfg.train_subset} exceeds the {len(pool)} training examples")
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train_subset]
        pool = pool[pick]
    xtr, ytr = d.x_train[pool], d.y_train[pool].clone()
    xva, yva = d.x_train[val_idx], d.y_train[val_idx].clone()
    if cfg.label_noise > 0:
        # exactly label_noise of the training labels flipped to a different class;
        # validation labels stay clean (early stopping sees the true labels)
        ytr = D.flip_labels(ytr, cfg.label_noise, d.num_classes, torch.Generator().manual_seed(cfg.seed + 1))
    return xtr, ytr, xva, yva


@torch.no_grad()
def _eval_images(model, x, y, mean, std, bs=1000, noise=0.0, gen=None):
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), bs):
        xb = x[i : i + bs]
        if noise > 0:
            xb = (xb + noise * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
        out = model((xb - mean) / std)
        loss_sum += F.cross_entropy(out, y[i : i + bs], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + bs]).sum().item()
    model.train()
    return loss_sum / len(y), correct / len(y)


def _train_images(cfg: RunConfig, progress: bool) -> Generator[dict, None, dict]:
    d = _load_images(cfg.task, cfg.data_dir)
    xtr, ytr, xva, yva = _split_images(cfg, d)
    mean, std = xtr.mean(), xtr.std()
    torch.manual_seed(cfg.seed)
    model = build_image_model(cfg, tuple(xtr.shape[1:]), d.num_classes).to(cfg.device)
    steps_per_epoch = math.ceil(len(ytr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    rate_sched = drop_rate_of(cfg, total) if cfg.uses_dropgrad else None
    opt = make_optimizer(cfg, model, total, rate_sched)
    sched = _lr_sched(cfg, opt, total)
    noise = _GradNoise(cfg.grad_noise, cfg.seed) if cfg.grad_noise > 0 else None
    params = list(model.parameters())
    dev = cfg.device
    xte, yte = d.x_test, d.y_test
    if dev != "cpu":
        xtr, ytr, xva, yva, xte, yte = (t.to(dev) for t in (xtr, ytr, xva, yva, xte, yte))
        mean, std = mean.to(dev), std.to(dev)

    best = (-math.inf, -1)
    best_state = None
    history = []
    stale = 0
    for epoch in range(cfg.epochs):
        t0 = time.time()
        perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).to(dev)
        loss_sum, correct, seen = 0.0, 0, 0
        rate = _current_rate(opt)
        for i in bar(range(steps_per_epoch), progress and steps_per_epoch > 50, desc=f"epoch {epoch + 1}", leave=False):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb, yb = (xtr[idx] - mean) / std, ytr[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=cfg.label_smoothing)
            _update(loss, opt, params, cfg.clip_grad, noise, sched)
            loss_sum += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training loss became {loss_sum} in epoch {epoch + 1}")
        vl, va = _eval_images(model, xva, yva, mean, std)
        # the test set is only needed at the epochs the summary reads: a new best
        # validation accuracy and the last epoch (evaluation draws no random numbers,
        # so skipping it elsewhere changes nothing else)
        last = epoch == cfg.epochs - 1 or (cfg.patience and va <= best[0] and stale + 1 >= cfg.patience)
        if cfg.test_every_epoch or va > best[0] or last:
            tl, ta = _eval_images(model, xte, yte, mean, std)
        else:
            tl, ta = math.nan, math.nan
        m = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": vl,
            "val_acc": va,
            "test_loss": tl,
            "test_acc": ta,
            "drop_rate": rate,
            "lr": opt.param_groups[0]["lr"],
            "epoch_s": time.time() - t0,
        }
        history.append(m)
        yield m
        report_epoch(rate_sched, loss_sum / seen, vl)
        if va > best[0]:  # ties keep the earlier epoch
            best = (va, epoch)
            best_state = copy.deepcopy(model.state_dict())
            stale = 0
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                break

    final_state = copy.deepcopy(model.state_dict())
    summary = _summarize(history, best[1], "acc")
    # robustness: the same noise draws (fixed generator) for every run, on CPU
    model.cpu()
    gen = torch.Generator()
    for tag, state in (("best", best_state), ("final", final_state)):
        model.load_state_dict(state)
        for sigma in cfg.input_noise:
            gen.manual_seed(4321)
            _, acc = _eval_images(model, d.x_test, d.y_test, mean.cpu(), std.cpu(), noise=sigma, gen=gen)
            summary[f"robust_acc_{sigma:g}_{tag}"] = acc
    return summary


def _summarize(history: list[dict], best_epoch: int, metric: str) -> dict:
    b, f = history[best_epoch], history[-1]
    return {
        "best_epoch": best_epoch + 1,
        "epochs_run": len(history),
        f"val_{metric}_best": b[f"val_{metric}"],
        f"test_{metric}_best": b[f"test_{metric}"],
        f"test_{metric}_final": f[f"test_{metric}"],
        f"val_{metric}_final": f[f"val_{metric}"],
        "train_loss_final": f["train_loss"],
        "test_loss_best": b["test_loss"],
        "test_loss_final": f["test_loss"],
    }


# ---------------------------------------------------------------- language


def _batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    n = len(ids) // batch
    return ids[: n * batch].view(batch, n)


@torch.no_grad()
def _eval_lm(model, ids: torch.Tensor, bptt: int, batch: int = 10) -> float:
    model.eval()
    data = _batchify(ids, batch)
    state = None
    total, count = 0.0, 0
    for i in range(0, data.shape[1] - 1, bptt):
        x = data[:, i : i + bptt]
        y = data[:, i + 1 : i + 1 + bptt]
        x = x[:, : y.shape[1]]
        out, state = model(x, state)
        total += F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / max(count, 1)


def _detach(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state)


def _train_lm(cfg: RunConfig, progress: bool, checkpoint: EpochCheckpoint | None = None) -> Generator[dict, None, dict]:
    d = _load_tokens(cfg.task, cfg.data_dir, cfg.vocab_size)
    train_ids = d.train[: cfg.train_subset] if cfg.train_subset else d.train
    cap = cfg.eval_tokens or None
    valid_ids, test_ids = d.valid[:cap], d.test[:cap]
    torch.manual_seed(cfg.seed)
    model = build_lm(cfg, len(d.vocab)).to(cfg.device)
    data = _batchify(train_ids, cfg.batch_size).to(cfg.device)
    valid_ids, test_ids = valid_ids.to(cfg.device), test_ids.to(cfg.device)
    starts = list(range(0, data.shape[1] - 1, cfg.bptt))
    total = len(starts) * cfg.epochs
    rate_sched = drop_rate_of(cfg, total) if cfg.uses_dropgrad else None
    opt = make_optimizer(cfg, model, total, rate_sched)
    sched = _lr_sched(cfg, opt, total)
    noise = _GradNoise(cfg.grad_noise, cfg.seed) if cfg.grad_noise > 0 else None
    params = list(model.parameters())
    recurrent = cfg.model == "lstm"

    best = (math.inf, -1)
    history: list[dict] = []
    stale = 0
    t_start = time.time()
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])  # DropGrad's: seed, step count, schedule positions too
        if sched is not None:
            sched.load_state_dict(saved["lr_schedule"])
        if noise is not None:
            noise.gen.set_state(saved["noise_rng"])
        torch.set_rng_state(saved["torch_rng"])  # dropout's draws
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        history, best, stale = saved["history"], tuple(saved["best"]), saved["stale"]
        yield from history  # this attempt's records hold every epoch of the run
    for epoch in range(len(history), cfg.epochs):
        t0 = time.time()
        state = None
        loss_sum, count = 0.0, 0
        rate = _current_rate(opt)
        for i in bar(starts, progress, desc=f"epoch {epoch + 1}", leave=False):
            x = data[:, i : i + cfg.bptt]
            y = data[:, i + 1 : i + 1 + cfg.bptt]
            x = x[:, : y.shape[1]]
            out, state = model(x, _detach(state) if recurrent else None)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
            _update(loss, opt, params, cfg.clip_grad, noise, sched)
            loss_sum += loss.item() * y.numel()
            count += y.numel()
        train_loss = loss_sum / count
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch + 1}")
        vl = _eval_lm(model, valid_ids, cfg.bptt)
        tl = _eval_lm(model, test_ids, cfg.bptt)
        m = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_ppl": math.exp(min(train_loss, 50)),
            "val_loss": vl,
            "val_ppl": math.exp(min(vl, 50)),
            "test_loss": tl,
            "test_ppl": math.exp(min(tl, 50)),
            "drop_rate": rate,
            "lr": opt.param_groups[0]["lr"],
            "epoch_s": time.time() - t0,
        }
        history.append(m)
        report_epoch(rate_sched, train_loss, vl)
        if vl < best[0]:
            best = (vl, epoch)
            stale = 0
        else:
            stale += 1
        stop = bool(cfg.patience) and stale >= cfg.patience
        if checkpoint is not None and not stop and epoch + 1 < cfg.epochs:
            checkpoint.save({  # before the epoch is reported: its record never outruns the checkpoint
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "lr_schedule": None if sched is None else sched.state_dict(),
                "noise_rng": None if noise is None else noise.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if str(cfg.device).startswith("cuda") else None,
                "history": history, "best": best, "stale": stale,
                "wall_s": checkpoint.earlier_wall_s + time.time() - t_start,
            })
        yield m
        if stop:
            break
    return _summarize(history, best[1], "ppl")


def load_data(cfg: RunConfig) -> None:
    """Load (and keep cached) the data set ``cfg`` trains on: a missing one
    (:class:`~experiments.data.DatasetMissing`) is then reported before the harness records
    the run as started, not after."""
    if is_rl(cfg):
        return  # gymnasium's classic control needs no files
    if is_language(cfg):
        _load_tokens(cfg.task, cfg.data_dir, cfg.vocab_size)
    else:
        _load_images(cfg.task, cfg.data_dir)


def train(cfg: RunConfig, progress: bool = False, checkpoint: EpochCheckpoint | None = None) -> Generator[dict, None, dict]:
    """Yield per-epoch metrics of one run; the generator's return value is the summary.

    ``checkpoint``: where a language-model run saves its state after each epoch and
    resumes from (:mod:`experiments.checkpoints`); the other runs are short and ignore it.
    """
    torch.set_num_threads(cfg.threads)
    if is_rl(cfg):
        from .rl import train_rl

        return (yield from train_rl(cfg, progress))
    if cfg.model == "vae":
        from .generative import train_vae

        return (yield from train_vae(cfg, progress))
    if is_language(cfg):
        return (yield from _train_lm(cfg, progress, checkpoint))
    return (yield from _train_images(cfg, progress))


def run_to_end(cfg: RunConfig, on_epoch: Callable[[dict], None] | None = None, progress: bool = False,
               checkpoint: EpochCheckpoint | None = None) -> dict:
    gen = train(cfg, progress, checkpoint)
    while True:
        try:
            m = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_epoch is not None:
            on_epoch(m)
