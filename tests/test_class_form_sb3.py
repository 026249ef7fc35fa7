"""stable-baselines3 builds its policy's optimizer as ``optimizer_class(params, lr=..., **optimizer_kwargs)``:
``policy_kwargs=dict(optimizer_class=dropgrad.optim.Adam, optimizer_kwargs={...})`` gives DropGrad,
for PPO (on-policy) and DQN (off-policy) on CartPole-v1; a PPO save/load round trip keeps it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gymnasium")
sb3 = pytest.importorskip("stable_baselines3")

import dropgrad  # noqa: E402

from _class_form_helpers import MaskAudit  # noqa: E402

SEED, RATE = 13, 0.2


def _policy_kwargs():
    return dict(
        net_arch=[32],
        optimizer_class=dropgrad.optim.Adam,
        optimizer_kwargs={"drop_rate": RATE, "seed": SEED, "eps": 1e-5},
    )


def test_ppo_policy_optimizer_is_dropgrad(tmp_path):
    torch.manual_seed(0)
    model = sb3.PPO(
        "MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=2, seed=0, device="cpu",
        policy_kwargs=_policy_kwargs(),
    )
    opt = model.policy.optimizer
    audit = MaskAudit(opt)
    model.learn(total_timesteps=128)  # 2 rollouts x 2 epochs x 2 minibatches = 8 steps
    assert type(opt) is dropgrad.optim.Adam and opt.param_groups[0]["eps"] == 1e-5
    audit.check(RATE, min_steps=8)
    model.save(tmp_path / "ppo")
    loaded = sb3.PPO.load(tmp_path / "ppo", device="cpu")
    assert type(loaded.policy.optimizer) is dropgrad.optim.Adam
    assert loaded.policy.optimizer.step_count == opt.step_count and loaded.policy.optimizer.seed == SEED


def test_dqn_q_network_optimizer_is_dropgrad():
    torch.manual_seed(0)
    model = sb3.DQN(
        "MlpPolicy", "CartPole-v1", learning_starts=100, train_freq=4, gradient_steps=1, batch_size=32,
        buffer_size=1000, target_update_interval=50, seed=0, device="cpu", policy_kwargs=_policy_kwargs(),
    )
    opt = model.policy.optimizer
    audit = MaskAudit(opt)
    model.learn(total_timesteps=300)  # (300 - 100) / 4 = 50 gradient steps
    assert type(opt) is dropgrad.optim.Adam
    audit.check(RATE, min_steps=40)
