"""The named suites: each is a list of :class:`RunConfig`, grouped for comparison.

A *group* is one table of the report: settings run on the same data with the
same seeds, each tested against the group's ``baseline`` setting (paired by
seed). Sizes are chosen so that every published suite together runs in about
two hours on a 2-core CPU machine with one thread per run (see
``docs/results.md`` for the measured times); ``GPU_SUITES`` documents larger
configurations for users with a GPU.

Identical computations in different groups (the 5k-image "none" run is also the
drop-rate ablation's ``p=0``) have the same run id and run once.
"""

from __future__ import annotations

import math

from .config import RL_TASKS, RunConfig

__all__ = ["SUITES", "GPU_SUITES", "get_suite", "suite_names", "DESCRIPTIONS", "PUBLISHED"]

IMAGE_SEEDS = 5
LM_SEEDS = 3
P = 0.1  # DropGrad's rate in the main comparisons (the spec's default example)


def _methods(p: float = P, wd: dict | None = None, dropout: float = 0.2, ls: float = 0.1) -> dict[str, dict]:
    wd = wd if wd is not None else {"optimizer": "adamw", "weight_decay": 0.1}
    base = {"none": {}, "wd": wd, "dropout": {"dropout": dropout}, "ls": {"label_smoothing": ls}}
    out = dict(base)
    out["dg"] = {"drop_rate": p}
    for k, v in base.items():
        if k != "none":
            out[f"dg+{k}"] = {**v, "drop_rate": p}
    return out


def _group(base: RunConfig, group: str, settings: dict[str, dict], seeds: int, baseline: str = "none") -> list[RunConfig]:
    return [
        base.replace(group=group, name=name, baseline=baseline, seed=s, **over)
        for s in range(seeds)
        for name, over in settings.items()
    ]


def _pick(d: dict[str, dict], *names: str) -> dict[str, dict]:
    return {n: d[n] for n in names}


# ------------------------------------------------------------------ quick (digits, < 5 min)

QUICK = RunConfig(
    suite="quick", task="digits", model="mlp", hidden=128, layers=2, epochs=40, batch_size=64, val_size=250, lr=1e-3
)


def quick() -> list[RunConfig]:
    m = _methods(p=0.1, dropout=0.2)
    settings = _pick(m, "none", "wd", "dropout", "ls", "dg", "dg+dropout")
    settings["dg p=0.3"] = {"drop_rate": 0.3}
    settings["lr x sqrt(0.7)"] = {"lr_scale": math.sqrt(0.7)}
    settings["gauss noise p=0.3"] = {"grad_noise": 0.3}
    return _group(QUICK, "digits-mlp", settings, IMAGE_SEEDS)


# ------------------------------------------------------------------ images (Fashion-MNIST)

FMNIST_MLP = RunConfig(suite="image", task="fashion_mnist", model="mlp", hidden=256, layers=2, lr=1e-3, batch_size=256, epochs=6)
FMNIST_5K = FMNIST_MLP.replace(train_subset=5000, batch_size=128, epochs=15)
FMNIST_CNN = RunConfig(
    suite="image", task="fashion_mnist", model="cnn", width=8, hidden=64, lr=1e-3, batch_size=128, epochs=5, train_subset=10000
)


def image() -> list[RunConfig]:
    m = _methods()
    regime = _pick(m, "none", "wd", "dropout", "ls", "dg")
    runs = _group(FMNIST_MLP, "fmnist-mlp full", m, IMAGE_SEEDS)
    runs += _group(FMNIST_MLP.replace(train_subset=1000, batch_size=128, epochs=40), "fmnist-mlp 1k", regime, IMAGE_SEEDS)
    runs += _group(FMNIST_5K, "fmnist-mlp 5k", regime, IMAGE_SEEDS)
    noisy = FMNIST_MLP.replace(train_subset=10000, batch_size=128, epochs=10)
    for eta in (0.2, 0.4):
        runs += _group(noisy.replace(label_noise=eta), f"fmnist-mlp 10k noise{int(eta * 100)}", regime, IMAGE_SEEDS)
    runs += _group(FMNIST_CNN, "fmnist-cnn 10k", _pick(m, "none", "dg"), IMAGE_SEEDS)
    return runs


# ------------------------------------------------------------------ ablations (Fashion-MNIST 5k, MLP)


def ablations() -> list[RunConfig]:
    b = FMNIST_5K.replace(suite="ablations")
    runs = _group(b, "ablation: drop rate", {f"p={p:g}": {"drop_rate": p} for p in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)}, IMAGE_SEEDS, "p=0")
    runs += _group(
        b,
        "ablation: schedule",
        {
            "none": {},
            "constant 0.1": {"drop_rate": 0.1},
            "linear 0.2->0": {"drop_rate": 0.2, "schedule": "linear"},
            "cosine 0.2->0": {"drop_rate": 0.2, "schedule": "cosine"},
            "step 0.2/0.1/0": {"drop_rate": 0.2, "schedule": "step"},
            "cyclical 0-0.2": {"drop_rate": 0.2, "schedule": "cyclical"},
        },
        IMAGE_SEEDS,
    )
    runs += _group(
        b,
        "ablation: full update drop",
        {"none": {}, "fud 0.1": {"full_update_drop": 0.1}, "fud 0.3": {"full_update_drop": 0.3}, "dg 0.1": {"drop_rate": 0.1}},
        IMAGE_SEEDS,
    )
    runs += _group(
        b,
        "ablation: per-layer rates",
        {
            "none": {},
            "all 0.1": {"drop_rate": 0.1},
            "classifier 0.3": {"layer_rates": "classifier=0.3"},
            "hidden layers 0.1": {"layer_rates": "features=0.1"},
            "weights only 0.1": {"drop_rate": 0.1, "layer_rates": "*.bias=0.0"},
        },
        IMAGE_SEEDS,
    )
    for opt, over in (
        ("sgd", {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}),
        ("adam", {}),
        ("adamw", {"optimizer": "adamw", "weight_decay": 0.1}),
    ):
        runs += _group(b.replace(**over), f"ablation: optimizer {opt}", {"none": {}, "dg 0.3": {"drop_rate": 0.3}}, IMAGE_SEEDS)
    for p in (0.1, 0.3):
        runs += _group(
            b,
            f"controls p={p:g}",
            {
                "none": {},
                f"dg {p:g}": {"drop_rate": p},
                f"lr x sqrt(1-{p:g})": {"lr_scale": math.sqrt(1 - p)},
                f"gauss noise {p:g}": {"grad_noise": p},
            },
            IMAGE_SEEDS,
        )
    return runs


# ------------------------------------------------------------------ overfitting regimes (issue 15, item 1-2)

OVERFIT_SEEDS = 10
OVERFIT_RATES = (0.1, 0.3, 0.5)
# 784-512-512-10 MLP, Adam 1e-3, batch 64, clean 5,000-image validation split; epochs long
# enough that 1k images are memorized (train acc 100% by epoch ~45 at 40% noise). The 5k
# runs are cut at 40 epochs to fit one CPU core (train acc ~92% at 40% noise then; the
# best-validation epoch is ~6, long before the cut).
OVERFIT_1K = RunConfig(
    suite="overfit", task="fashion_mnist", model="mlp", hidden=512, layers=2, lr=1e-3, batch_size=64,
    train_subset=1000, epochs=50, test_every_epoch=False,
)
OVERFIT_5K = OVERFIT_1K.replace(train_subset=5000, epochs=40)


def overfit_settings(rates: tuple[float, ...] = OVERFIT_RATES) -> dict[str, dict]:
    """Baseline, DropGrad at each rate with both controls at that rate, dropout 0.2, AdamW wd 0.1."""
    s: dict[str, dict] = {"none": {}}
    for p in rates:
        s[f"dg {p:g}"] = {"drop_rate": p}
        s[f"lr x sqrt(1-{p:g})"] = {"lr_scale": math.sqrt(1 - p)}
        s[f"gauss noise {p:g}"] = {"grad_noise": p}
    s["dropout 0.2"] = {"dropout": 0.2}
    s["wd 0.1 (adamw)"] = {"optimizer": "adamw", "weight_decay": 0.1}
    return s


ADAPTIVE_SETTINGS = {
    "adaptive gap <=0.5": {"drop_rate": 0.5, "schedule": "adaptive", "adaptive_monitor": "gap"},
    "adaptive val-loss <=0.5": {"drop_rate": 0.5, "schedule": "adaptive", "adaptive_monitor": "val_loss"},
}


def _seed_major(runs: list[RunConfig]) -> list[RunConfig]:
    """Every setting of seed 0, then of seed 1, ...: a cut-off suite stays balanced."""
    return sorted(runs, key=lambda c: c.seed)


def overfit() -> list[RunConfig]:
    """Fashion-MNIST 1k/5k x label noise 0/20/40%: the rate grid with both controls at every rate.

    Ordered by importance, since a one-core session may not finish it: 1k at 40% and 20% noise,
    the adaptive schedule in those two regimes, 1k clean, then 5k (noisiest first).
    """
    runs: list[RunConfig] = []
    for base, size in ((OVERFIT_1K, "1k"), (OVERFIT_5K, "5k")):
        grid = {eta: _seed_major(_group(base.replace(label_noise=eta), f"fmnist-mlp512 {size} noise{int(eta * 100)}",
                                        overfit_settings(), OVERFIT_SEEDS)) for eta in (0.4, 0.2, 0.0)}
        runs += grid[0.4] + grid[0.2]
        if size == "1k":  # the adaptive schedule in the noisy regimes, before the clean one
            for eta in (0.4, 0.2):
                b = base.replace(label_noise=eta)
                sett = {"none": {}, **{f"dg {p:g}": {"drop_rate": p} for p in OVERFIT_RATES}, **ADAPTIVE_SETTINGS}
                runs += _seed_major(_group(b, f"adaptive {size} noise{int(eta * 100)}", sett, OVERFIT_SEEDS))
        runs += grid[0.0]
    return runs


# ------------------------------------------------------------------ reinforcement learning (item 3)

RL_SEEDS = 10
RL_BASE = RunConfig(suite="rl", model="ppo", hidden=64, layers=2, lr=3e-4, env_steps=50_000, epochs=10, eval_episodes=10)


def _rate_and_controls(rates: tuple[float, ...]) -> tuple[dict[str, dict], dict[str, dict]]:
    grid = {"p=0": {}, **{f"dg {p:g}": {"drop_rate": p} for p in rates}}
    controls = {}
    for p in rates:
        controls[f"lr x sqrt(1-{p:g})"] = {"lr_scale": math.sqrt(1 - p)}
        controls[f"gauss noise {p:g}"] = {"grad_noise": p}
    return grid, controls


def rl() -> list[RunConfig]:
    """PPO (stable-baselines3) on CartPole-v1 and Acrobot-v1, 50k steps: p 0/0.1/0.3, then both controls."""
    grid, controls = _rate_and_controls((0.1, 0.3))
    runs: list[RunConfig] = []
    for part in (grid, controls):  # the rate grid of both tasks first, the controls after
        for task in RL_TASKS:  # cartpole, then acrobot
            b = RL_BASE.replace(task=task)
            settings = part if part is grid else {"p=0": {}, **part}
            runs += _seed_major(_group(b, f"ppo {task}", settings, RL_SEEDS, "p=0"))
    return runs


# ------------------------------------------------------------------ generative models (item 4)

GEN_SEEDS = 5
VAE_BASE = RunConfig(
    suite="generative", task="fashion_mnist", model="vae", hidden=400, latent=20, lr=1e-3, batch_size=128,
    train_subset=20000, epochs=20, input_noise=(),
)
CHAR_BASE = RunConfig(
    suite="generative", task="shakespeare", model="lstm", emb=64, hidden=256, layers=1, batch_size=32, bptt=100, lr=2e-3,
    clip_grad=5.0, epochs=4, train_subset=400_000, eval_tokens=100_000, patience=1,
)


def generative() -> list[RunConfig]:
    """VAE on Fashion-MNIST (test -ELBO, nats) and a char-level Shakespeare LSTM (held-out ppl)."""
    grid, controls = _rate_and_controls((0.1, 0.3))
    settings = {**grid, **controls, "dropout 0.2": {"dropout": 0.2}}
    runs = _seed_major(_group(VAE_BASE, "vae fmnist 20k", settings, GEN_SEEDS, "p=0"))
    runs += _seed_major(_group(CHAR_BASE, "char-lstm shakespeare 400k", settings, GEN_SEEDS, "p=0"))
    return runs


# ------------------------------------------------------------------ PTB-scale language models (item 5)

# The whole Brown corpus (~1.16M tokens with <eos>, PTB-sized), Zaremba et al.'s small LSTM
# (2 x 200, bptt 35, batch 20) and a small transformer, trained until validation perplexity
# stops improving (patience 2, at most 20 epochs). 30 to 90 minutes per run on this machine's
# two cores (a transformer run about 30 as one two-thread process): run them in the background;
# the harness resumes by run id.
BROWN_ZAREMBA = RunConfig(
    suite="lm-full", task="brown", model="lstm", emb=200, hidden=200, layers=2, batch_size=20, bptt=35, lr=1e-3,
    clip_grad=5.0, epochs=20, patience=2, train_subset=0, eval_tokens=0,
)
BROWN_TF_SMALL = BROWN_ZAREMBA.replace(model="transformer", emb=256, heads=4, layers=4, bptt=128, clip_grad=1.0, lr=5e-4)


def lm_full() -> list[RunConfig]:
    grid, controls = _rate_and_controls((0.1, 0.3))
    runs: list[RunConfig] = []
    for base, name, drop in ((BROWN_ZAREMBA, "brown-full zaremba-small lstm", 0.3), (BROWN_TF_SMALL, "brown-full transformer", 0.1)):
        settings = {**grid, f"dropout {drop:g}": {"dropout": drop}, **controls}
        runs += _seed_major(_group(base, name, settings, LM_SEEDS, "p=0"))
    return runs


# ------------------------------------------------------------------ language models

BROWN_LSTM = RunConfig(
    suite="lm", task="brown", model="lstm", emb=128, hidden=128, layers=2, batch_size=20, bptt=35, lr=2e-3,
    clip_grad=5.0, epochs=2, train_subset=80000, eval_tokens=20000,
)
BROWN_TF = BROWN_LSTM.replace(model="transformer", heads=4, layers=2, bptt=64, lr=1e-3, clip_grad=1.0)
SHAKESPEARE = RunConfig(
    suite="lm", task="shakespeare", model="lstm", emb=64, hidden=256, layers=1, batch_size=32, bptt=100, lr=2e-3,
    clip_grad=5.0, epochs=2, train_subset=200000, eval_tokens=50000,
)


def lm() -> list[RunConfig]:
    lstm = {"none": {}, "dropout": {"dropout": 0.3}, "dg": {"drop_rate": P}, "dg+dropout": {"dropout": 0.3, "drop_rate": P}}
    wd = {"optimizer": "adamw", "weight_decay": 0.1}
    brown = {"none": {}, "wd": wd, "dropout": {"dropout": 0.3}, "dg": {"drop_rate": P}, "dg+wd": {**wd, "drop_rate": P},
             "dg+dropout": {"dropout": 0.3, "drop_rate": P}}
    runs = _group(BROWN_LSTM, "brown-lstm 80k", brown, LM_SEEDS)
    runs += _group(BROWN_LSTM, "brown-lstm 80k drop rate", {f"p={p:g}": {"drop_rate": p} for p in (0.0, 0.1, 0.3)}, LM_SEEDS, "p=0")
    controls = {"none": {}, "dg 0.3": {"drop_rate": 0.3}, "lr x sqrt(1-0.3)": {"lr_scale": math.sqrt(0.7)}, "gauss noise 0.3": {"grad_noise": 0.3}}
    runs += _group(BROWN_LSTM, "brown-lstm 80k controls p=0.3", controls, LM_SEEDS)
    tf = {"none": {}, "dropout": {"dropout": 0.1}, "dg": {"drop_rate": P}, "dg+dropout": {"dropout": 0.1, "drop_rate": P}}
    runs += _group(BROWN_TF, "brown-transformer 80k", tf, LM_SEEDS)
    runs += _group(SHAKESPEARE, "shakespeare-char-lstm 200k", lstm, LM_SEEDS)
    return runs


# ------------------------------------------------------------------ GPU-scale (documented, not run here)


def cifar10_resnet() -> list[RunConfig]:
    b = RunConfig(
        suite="gpu-cifar10", task="cifar10", model="resnet", width=16, layers=3, optimizer="sgd", lr=0.1, momentum=0.9,
        weight_decay=5e-4, batch_size=128, epochs=100, lr_decay="cosine", val_size=5000, device="cuda",
    )
    # with SGD the expected step is unchanged (docs/analysis.md), so the control is the matched Gaussian noise
    s = {"none": {}, "dg": {"drop_rate": 0.1}, "dg 0.3": {"drop_rate": 0.3}, "gauss noise 0.3": {"grad_noise": 0.3}}
    return _group(b, "cifar10-resnet20", s, IMAGE_SEEDS)


def brown_full() -> list[RunConfig]:
    b = BROWN_LSTM.replace(suite="gpu-lm", emb=200, hidden=200, batch_size=20, epochs=13, train_subset=0, eval_tokens=0, lr=1e-3, device="cuda")
    s = {"none": {}, "dropout": {"dropout": 0.3}, "dg": {"drop_rate": P}, "dg+dropout": {"dropout": 0.3, "drop_rate": P}}
    runs = _group(b, "brown-lstm full", s, LM_SEEDS)
    tf = BROWN_TF.replace(suite="gpu-lm", emb=256, heads=4, layers=4, bptt=128, epochs=10, train_subset=0, eval_tokens=0, device="cuda")
    return runs + _group(tf, "brown-transformer full", s, LM_SEEDS)


def gpu_short() -> list[RunConfig]:
    """What one GPU does in a short loan (``experiments/gpu_short.sh`` runs them in parallel).

    ResNet-20 on all of Fashion-MNIST (55k training images, SGD + cosine, 15 epochs), and the
    whole Brown corpus with the Zaremba-small LSTM (p 0/0.1/0.3 and both controls at 0.3) and
    with ``lm-full``'s small transformer (every setting of its group), 3 seeds.
    The LM runs are ``lm-full``'s (early stopping, patience 2, at most 20 epochs; the device
    is not part of a run id), so a GPU loan also fills those rows of ``lm-full``.
    Ordered as a queue: setting by setting (p=0, then p=0.3 and its two controls, so a loan cut
    short leaves a complete comparison, then p=0.1 and the rest), each for every group and seed.
    """
    grid, controls = _rate_and_controls((0.1, 0.3))
    order = ("p=0", "dg 0.3", "lr x sqrt(1-0.3)", "gauss noise 0.3", "dg 0.1", "dropout 0.1", "lr x sqrt(1-0.1)",
             "gauss noise 0.1")
    every = {**grid, **controls, "dropout 0.1": {"dropout": 0.1}}
    short = {k: every[k] for k in order[:5]}
    resnet = RunConfig(
        suite="gpu-short", task="fashion_mnist", model="resnet", width=16, layers=3, optimizer="sgd", lr=0.1, momentum=0.9,
        weight_decay=5e-4, batch_size=128, epochs=15, lr_decay="cosine", device="cuda", test_every_epoch=False,
    )
    # with SGD the expected step is unchanged by DropGrad; the lr control still shows what a smaller step does
    runs = _group(resnet, "gpu fmnist-full resnet20", short, IMAGE_SEEDS, "p=0")
    runs += _group(BROWN_ZAREMBA.replace(suite="gpu-short", device="cuda"), "gpu brown-full zaremba-small lstm", short,
                   LM_SEEDS, "p=0")
    runs += _group(BROWN_TF_SMALL.replace(suite="gpu-short", device="cuda"), "gpu brown-full transformer",
                   {k: every[k] for k in order}, LM_SEEDS, "p=0")
    return sorted(runs, key=lambda c: order.index(c.name))  # stable: group, then seed, within a setting


SUITES = {
    "quick": quick, "image": image, "ablations": ablations, "lm": lm, "overfit": overfit, "rl": rl,
    "generative": generative, "lm-full": lm_full, "gpu-short": gpu_short,
}
GPU_SUITES = {"gpu-cifar10": cifar10_resnet, "gpu-lm": brown_full}
PUBLISHED = ("quick", "image", "ablations", "lm", "overfit", "rl", "generative", "lm-full", "gpu-short")
RUN_BY_ALL = ("quick", "image", "ablations", "lm")  # `suite all`; the newer suites run one by one
DESCRIPTIONS = {
    "quick": "digits MLP: baselines, DropGrad, controls (5 seeds); no download, < 5 min",
    "image": "Fashion-MNIST MLP (full, 1k, 5k, 20%/40% label noise) and CNN; baselines x DropGrad (5 seeds)",
    "ablations": "Fashion-MNIST 5k MLP: drop rate, schedules, full update drop, per-layer, optimizers, controls",
    "overfit": "Fashion-MNIST 1k/5k x 0/20/40% label noise, MLP 784-512-512: p 0.1/0.3/0.5 with both controls, dropout, wd, adaptive (10 seeds)",
    "gpu-short": "one GPU, < 10 min: ResNet-20 on all of Fashion-MNIST, Zaremba-small LSTM and small transformer on the whole Brown corpus (lm-full's runs; 3 seeds; experiments/gpu_short.sh)",
    "rl": "stable-baselines3 PPO on CartPole-v1 and Acrobot-v1, 50k steps: p 0/0.1/0.3 and both controls (10 seeds)",
    "generative": "VAE on Fashion-MNIST 20k (test -ELBO) and char-level Shakespeare LSTM: p 0/0.1/0.3, controls, dropout (5 seeds)",
    "lm-full": "whole Brown corpus, Zaremba-small LSTM and 4-layer transformer, early stopping: p 0/0.1/0.3, dropout, controls (3 seeds; 30 to 90 minutes per run on CPU)",
    "lm": "Brown word-level LSTM (with a drop-rate sweep) and transformer, Shakespeare char-level LSTM (3 seeds)",
    "all": "quick + image + ablations + lm, ordered so that 3 seeds of everything come first",
    "gpu-cifar10": "CIFAR-10 ResNet-20, 100 epochs, SGD+cosine (needs a GPU and the CIFAR-10 python batches)",
    "gpu-lm": "Brown LSTM (Zaremba small size) and transformer on the full corpus (needs a GPU)",
}


def suite_names() -> list[str]:
    return [*SUITES, "all", *GPU_SUITES]


def get_suite(name: str) -> list[RunConfig]:
    """The configs of a suite; ``all`` puts the first three seeds of every published suite first."""
    if name == "all":
        runs = [c for s in RUN_BY_ALL for c in SUITES[s]()]

        def priority(c: RunConfig) -> tuple[bool, int]:
            # seeds 0-2 of everything first, so partial results stay balanced; inside each
            # block: the main comparisons, language models, other regimes, ablations, the CNN
            order = 0 if c.suite == "quick" else 1 if c.group == "fmnist-mlp full" else 2 if c.suite == "lm" else 5 if c.model == "cnn" else 4 if c.suite == "ablations" else 3
            return (c.seed >= LM_SEEDS, order)

        return sorted(runs, key=priority)  # stable: suite order inside each class
    if name in SUITES:
        return SUITES[name]()
    if name in GPU_SUITES:
        return GPU_SUITES[name]()
    raise KeyError(f"unknown suite {name!r}; known: {', '.join(suite_names())}")
