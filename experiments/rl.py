"""Reinforcement learning with DropGrad: stable-baselines3 PPO/DQN on gymnasium classic control.

stable-baselines3 builds a policy's optimizer as ``optimizer_class(params, lr=..., **kwargs)``,
so DropGrad enters as a class: :func:`optimizer_class` returns the library's class form
``dropgrad.optim.Adam`` (the same masks as ``DropGrad(torch.optim.Adam(params, lr=lr, eps=...),
drop_rate=..., seed=...)``), plain ``torch.optim.Adam`` at p = 0, or, for the Gaussian-noise
control, an Adam that perturbs gradients with DropGrad's variance.

One run trains for ``cfg.env_steps`` environment steps, evaluating the deterministic policy
on ``cfg.eval_episodes`` fresh episodes at ``cfg.epochs`` evenly spaced points; each point is
one "epoch" record (``timesteps``, ``eval_return``). The summary's headline metric is the mean
return over the episodes of the last three evaluations (``test_return_final``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator

import numpy as np
import torch

from .config import RL_TASKS, RunConfig

__all__ = ["RL_TASKS", "optimizer_class", "train_rl", "iqm"]

_LAST_EVALS = 3


def iqm(values) -> float:
    """Interquartile mean: the mean of the middle 50% of the values (scipy's trim_mean at 25%)."""
    from scipy import stats

    v = np.asarray(list(values), dtype=float)
    return float("nan") if v.size == 0 else float(stats.trim_mean(v, 0.25))


class _NoisyAdam(torch.optim.Adam):
    """Control: Adam whose gradients get ``eps * |g| * sqrt(p/(1-p))`` added (DropGrad's variance, Gaussian)."""

    def __init__(self, params, lr: float = 1e-3, grad_noise: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        from .train import _GradNoise

        self._noise = _GradNoise(grad_noise, seed)

    @torch.no_grad()
    def step(self, closure=None):
        self._noise([p for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def optimizer_class(cfg: RunConfig) -> tuple[type, dict]:
    """The optimizer class and kwargs stable-baselines3 should build for ``cfg``."""
    if cfg.optimizer != "adam":
        raise ValueError(f"RL runs use Adam (as stable-baselines3 does); got optimizer={cfg.optimizer!r}")
    eps = {"eps": 1e-5}  # stable-baselines3's own Adam setting for PPO
    if cfg.grad_noise > 0:
        return _NoisyAdam, {**eps, "grad_noise": cfg.grad_noise, "seed": cfg.seed}
    if not cfg.uses_dropgrad:
        return torch.optim.Adam, eps
    import dropgrad.optim

    # the class form: stable-baselines3 builds it as cls(params, lr=..., **kwargs); the same masks
    # as DropGrad(torch.optim.Adam(params, lr, eps), drop_rate, seed) (tests/test_class_form.py)
    return dropgrad.optim.Adam, {**eps, "drop_rate": cfg.drop_rate, "seed": cfg.seed}


def _agent(cfg: RunConfig, env_id: str):
    import stable_baselines3 as sb3

    cls, kwargs = optimizer_class(cfg)
    policy_kwargs = {"optimizer_class": cls, "optimizer_kwargs": kwargs, "net_arch": [cfg.hidden] * cfg.layers}
    lr = cfg.lr * cfg.lr_scale
    if cfg.model == "ppo":
        from stable_baselines3.common.env_util import make_vec_env

        env = make_vec_env(env_id, n_envs=4, seed=cfg.seed)
        return sb3.PPO(
            "MlpPolicy", env, learning_rate=lr, n_steps=128, batch_size=64, n_epochs=4, gamma=0.99, gae_lambda=0.95,
            ent_coef=0.0, seed=cfg.seed, policy_kwargs=policy_kwargs, device="cpu", verbose=0,
        )
    if cfg.model == "dqn":
        import gymnasium as gym

        return sb3.DQN(
            "MlpPolicy", gym.make(env_id), learning_rate=lr, buffer_size=50_000, learning_starts=1000, batch_size=64,
            train_freq=4, target_update_interval=500, exploration_fraction=0.2, exploration_final_eps=0.05,
            seed=cfg.seed, policy_kwargs=policy_kwargs, device="cpu", verbose=0,
        )
    raise ValueError(f"RL model must be ppo or dqn, got {cfg.model!r}")


def _evaluate(model, env_id: str, episodes: int, seed: int) -> list[float]:
    import gymnasium as gym

    env = gym.make(env_id)
    out = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, r, term, trunc, _ = env.step(action)
            total += float(r)
            done = term or trunc
        out.append(total)
    env.close()
    return out


def train_rl(cfg: RunConfig, progress: bool = False) -> Generator[dict, None, dict]:
    """Yield one record per evaluation point; return the summary (mean return of the last evaluations)."""
    if cfg.task not in RL_TASKS:
        raise ValueError(f"unknown RL task {cfg.task!r}; known: {', '.join(RL_TASKS)}")
    if cfg.env_steps <= 0 or cfg.epochs <= 0:
        raise ValueError(f"RL runs need env_steps > 0 and epochs > 0 (evaluation points), got {cfg.env_steps}, {cfg.epochs}")
    env_id = RL_TASKS[cfg.task]
    torch.manual_seed(cfg.seed)
    model = _agent(cfg, env_id)
    chunk = math.ceil(cfg.env_steps / cfg.epochs)
    history = []
    for k in range(cfg.epochs):
        t0 = time.time()
        model.learn(total_timesteps=chunk, reset_num_timesteps=(k == 0))
        returns = _evaluate(model, env_id, cfg.eval_episodes, seed=10_000 + 100 * k)  # same episodes for every run
        m = {
            "epoch": k + 1,
            "timesteps": int(model.num_timesteps),
            "eval_return": float(np.mean(returns)),
            "eval_return_std": float(np.std(returns)),
            "val_return": float(np.mean(returns)),
            "train_loss": float("nan"),
            "val_loss": float("nan"),
            "epoch_s": time.time() - t0,
        }
        history.append(m)
        yield m
    last = [m["eval_return"] for m in history[-_LAST_EVALS:]]
    best = max(range(len(history)), key=lambda i: history[i]["eval_return"])
    return {
        "test_return_final": float(np.mean(last)),  # mean over the episodes of the last evaluations
        "test_return_best": history[best]["eval_return"],  # the best evaluation (optimistic; for reference)
        "best_epoch": best + 1,
        "epochs_run": len(history),
        "return_last_eval": history[-1]["eval_return"],
        "timesteps": history[-1]["timesteps"],
    }
