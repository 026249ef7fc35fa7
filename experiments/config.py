"""Typed run configuration with type-checked ``key=value`` overrides.

One flat dataclass describes one training run (task, model, optimizer,
regularizers, DropGrad settings, controls, seed). Suites are lists of these;
a single run is the defaults plus overrides. A flat config keeps overrides
one ``key=value`` each and makes the run id a hash of every field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, fields

__all__ = [
    "RunConfig", "ConfigError", "apply_overrides", "parse_overrides", "run_id", "describe_fields", "TOKEN_TASKS",
    "RL_TASKS",
]


class ConfigError(ValueError):
    """A bad override: unknown key, or a value of the wrong type."""


# The task families, here (torch-free) so that the report and the suites read the same names as
# the loaders (data.TOKEN_TASKS) and the RL trainer (rl.RL_TASKS: task -> gymnasium id).
TOKEN_TASKS = ("brown", "ptb", "wikitext2", "shakespeare")
RL_TASKS = {"cartpole": "CartPole-v1", "acrobot": "Acrobot-v1"}

SCHEDULES = ("constant", "linear", "cosine", "step", "cyclical", "exponential", "warmup", "adaptive")


@dataclass(frozen=True)
class RunConfig:
    # what the run belongs to (used by the report, not by training)
    suite: str = "adhoc"
    group: str = "default"  # runs compared with each other in one table
    name: str = "none"  # the setting's label inside its group
    baseline: str = "none"  # the setting of the group every other one is tested against

    # data
    task: str = "digits"  # digits | fashion_mnist | mnist | cifar10 | brown | ptb | wikitext2 | shakespeare
    data_dir: str = "data"  # root holding one folder per data set (see experiments/get_data.sh)
    train_subset: int = 0  # 0: all training examples; else this many (images) or tokens (language)
    val_size: int = 5000  # images held out of the training set for early stopping
    label_noise: float = 0.0  # exact share of training labels flipped to a different class (validation stays clean)
    input_noise: tuple[float, ...] = (0.1, 0.2, 0.4)  # Gaussian noise std (in [0,1] pixel units) for robustness
    eval_tokens: int = 0  # language: cap on validation/test tokens (0: all)
    vocab_size: int = 10000  # word-level language: vocabulary including <unk> and <eos>

    # model
    model: str = "mlp"  # mlp | cnn | resnet | lstm | transformer
    hidden: int = 256
    layers: int = 2
    width: int = 16  # cnn/resnet base channels
    emb: int = 128  # language: embedding size (transformer: model width)
    heads: int = 4
    dropout: float = 0.0
    bptt: int = 35
    tie_weights: bool = False
    latent: int = 20  # vae: latent dimensions

    # optimization
    optimizer: str = "adam"  # sgd | adam | adamw
    lr: float = 1e-3
    lr_scale: float = 1.0  # control: multiplies lr (e.g. sqrt(1-p) to match DropGrad's effective Adam step)
    momentum: float = 0.9
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    batch_size: int = 128
    epochs: int = 10
    patience: int = 0  # stop after this many epochs without validation improvement (0: never)
    clip_grad: float = 0.0  # max global gradient norm (0: no clipping)
    lr_decay: str = "none"  # none | cosine (per step, to 0 at the end)

    # DropGrad
    drop_rate: float = 0.0
    schedule: str = "constant"  # constant | linear | cosine | step | cyclical | exponential | warmup | adaptive
    schedule_final: float = 0.0  # rate a decaying schedule ends at / a cycle's low point / adaptive's starting (lowest) rate
    adaptive_monitor: str = "gap"  # adaptive: "gap" (val_loss - train_loss) or "val_loss"; drop_rate is its cap
    adaptive_patience: int = 2  # adaptive: epochs without improvement before the rate rises
    adaptive_increment: float = 0.1  # adaptive: added to the rate on each rise
    full_update_drop: float = 0.0
    layer_rates: str = ""  # per-name rates, e.g. "classifier=0.2,*.bias=0.0" (names not listed get drop_rate)
    rescale: bool = True

    # control: additive Gaussian gradient noise with DropGrad's variance g^2 p/(1-p) at this p
    grad_noise: float = 0.0

    # reinforcement learning (task cartpole | acrobot, model ppo | dqn): epochs = evaluation points
    env_steps: int = 0  # environment steps in total
    eval_episodes: int = 10  # deterministic-policy episodes per evaluation point

    # run
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch.set_num_threads (1 leaves the other cores to other work)
    test_every_epoch: bool = True  # images: False evaluates the test set only at a new best validation epoch and the last one (same results, less time)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), _field_type(f))
        for name in ("label_noise", "drop_rate", "schedule_final", "full_update_drop", "dropout"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {v!r}")
        if not 0.0 <= self.grad_noise < 1.0:  # the matched variance p/(1-p) is infinite at p = 1
            raise ConfigError(f"grad_noise must be in [0, 1), got {self.grad_noise!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.adaptive_monitor not in ("gap", "val_loss"):
            raise ConfigError(f"adaptive_monitor must be gap or val_loss, got {self.adaptive_monitor!r}")
        if self.adaptive_patience < 0 or not 0.0 < self.adaptive_increment <= 1.0:
            raise ConfigError(
                f"adaptive_patience must be >= 0 and adaptive_increment in (0, 1], got "
                f"{self.adaptive_patience!r} and {self.adaptive_increment!r}"
            )
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"optimizer must be sgd, adam or adamw, got {self.optimizer!r}")
        if self.lr_decay not in ("none", "cosine"):
            raise ConfigError(f"lr_decay must be none or cosine, got {self.lr_decay!r}")

    @property
    def uses_dropgrad(self) -> bool:
        return self.drop_rate > 0 or bool(self.layer_rates) or self.full_update_drop > 0

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)


# Fields that do not change what a run computes: where the data is, how many
# threads, and the labels a suite gives it. Two suites (or two groups of one
# suite) that contain the same computation share one run, so it is done once.
_NOT_IN_ID = ("data_dir", "threads", "device", "suite", "group", "name", "baseline", "test_every_epoch")


# Fields added after results were published: left out of the hash while they have their
# default value, so every earlier run keeps its id (and is not run again).
_OMIT_IF_DEFAULT = ("adaptive_monitor", "adaptive_patience", "adaptive_increment", "env_steps", "eval_episodes", "latent")
_DEFAULTS: dict = {}


def run_id(cfg: RunConfig) -> str:
    """A stable id of what a run computes: the hash of every field that affects its result."""
    if not _DEFAULTS:
        _DEFAULTS.update(dataclasses.asdict(RunConfig()))
    d = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in _NOT_IN_ID and not (k in _OMIT_IF_DEFAULT and v == _DEFAULTS[k])
    }
    if cfg.label_noise > 0:
        # noise is now "exactly this share flipped to another class, clean validation"; runs of
        # the old definition (redraw over all classes, noisy validation) keep their old ids
        d["label_noise_def"] = "flip-exact/clean-val"
    blob = json.dumps(d, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_HINTS = typing.get_type_hints(RunConfig)


def _field_type(f: dataclasses.Field) -> type:
    return _HINTS[f.name]


def _check_type(name: str, value: object, typ: object) -> None:
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif typ is str:
        ok = isinstance(value, str)
    elif typing.get_origin(typ) is tuple:
        ok = isinstance(value, tuple) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    else:  # pragma: no cover - every field has one of the types above
        raise TypeError(f"unsupported field type {typ!r} for {name}")
    if not ok:
        raise ConfigError(f"{name} must be of type {getattr(typ, '__name__', typ)}, got {value!r}")


def _parse_value(name: str, text: str, typ: object) -> object:
    try:
        if typ is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typ is str:
            return text
        if typing.get_origin(typ) is tuple:
            return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        pass
    raise ConfigError(f"{name} expects a value of type {getattr(typ, '__name__', typ)}, got {text!r}")


def parse_overrides(items: list[str]) -> dict[str, object]:
    """Turn ``["lr=0.01", "model=cnn"]`` into typed values; unknown keys are an error, and so is
    a key given twice with different values (which one was meant is not ours to guess)."""
    known = {f.name: f for f in fields(RunConfig)}
    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in known:
            close = [k for k in known if k.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; see `python -m experiments config`")
        value = _parse_value(key, text, _field_type(known[key]))
        if key in out and out[key] != value:
            raise ConfigError(f"config key {key!r} is given twice, as {out[key]!r} and as {value!r}; give it once")
        out[key] = value
    return out


def apply_overrides(cfg: RunConfig, items: list[str] | dict[str, object]) -> RunConfig:
    values = parse_overrides(items) if isinstance(items, list) else dict(items)
    known = {f.name for f in fields(RunConfig)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key {key!r}")
    return dataclasses.replace(cfg, **values)


def describe_fields() -> str:
    """The fields, types and defaults, one per line (for ``--help``-style listings)."""
    lines = []
    default = RunConfig()
    for f in fields(RunConfig):
        typ = _field_type(f)
        tname = getattr(typ, "__name__", str(typ)) if typing.get_origin(typ) is not tuple else "floats (a,b,c)"
        lines.append(f"  {f.name:<17} {tname:<15} = {getattr(default, f.name)!r}")
    return "\n".join(lines)

