"""Draw every built-in drop-rate schedule into docs/schedules.png.

Run from the repository root: ``python docs/make_schedule_figure.py``.
The adaptive schedule is driven by a simulated validation loss that plateaus.
"""

from __future__ import annotations

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dropgrad.schedules import (  # noqa: E402
    AdaptiveDropRateScheduler,
    ConstantDropRateScheduler,
    CosineAnnealingDropRateScheduler,
    CyclicalDropRateScheduler,
    ExponentialDecayDropRateScheduler,
    LinearDropRateScheduler,
    LinearWarmupDropRateScheduler,
    SequentialDropRateScheduler,
    StepDropRateScheduler,
)

STEPS = 1000
OUT = pathlib.Path(__file__).resolve().parent / "schedules.png"

PANELS = [
    ("LinearDropRateScheduler(0.5, 0.0, 800)", LinearDropRateScheduler(0.5, 0.0, 800)),
    ("CosineAnnealingDropRateScheduler(0.5, 0.0, 800)", CosineAnnealingDropRateScheduler(0.5, 0.0, 800)),
    ("StepDropRateScheduler(0.5, {300: 0.3, 600: 0.1})", StepDropRateScheduler(0.5, {300: 0.3, 600: 0.1})),
    ("ExponentialDecayDropRateScheduler(0.5, 0.5, 150)",
     {"continuous": ExponentialDecayDropRateScheduler(0.5, 0.5, 150),
      "staircase=True": ExponentialDecayDropRateScheduler(0.5, 0.5, 150, staircase=True)}),
    ("CyclicalDropRateScheduler(0.05, 0.4, 250)",
     {"mode='triangular'": CyclicalDropRateScheduler(0.05, 0.4, 250),
      "mode='cosine'": CyclicalDropRateScheduler(0.05, 0.4, 250, mode="cosine")}),
    ("CyclicalDropRateScheduler(0.05, 0.4, 250,\namplitude_decay=0.5)",
     CyclicalDropRateScheduler(0.05, 0.4, 250, amplitude_decay=0.5)),
    ("LinearWarmupDropRateScheduler(0.3, 200)", LinearWarmupDropRateScheduler(0.3, 200)),
    ("ConstantDropRateScheduler(0.2)", ConstantDropRateScheduler(0.2)),
    ("SequentialDropRateScheduler: warm-up 100,\nhold 0.4 to 300, cosine to 0 by 1000",
     SequentialDropRateScheduler(
         [LinearWarmupDropRateScheduler(0.4, 100), ConstantDropRateScheduler(0.4),
          CosineAnnealingDropRateScheduler(0.4, 0.0, 700)], [100, 300])),
]


def adaptive_curve():
    """Rates of an AdaptiveDropRateScheduler fed a val loss that stops improving at step 300."""
    sched = AdaptiveDropRateScheduler(0.0, 0.3, patience=2, increment=0.05, cooldown=2)
    steps, rates, losses = [], [], []
    for t in range(STEPS):
        if t % 50 == 0:  # an evaluation every 50 steps
            loss = 1.0 / (1 + t / 100) if t < 300 else 0.25 + 0.0004 * (t - 300)
            sched.report(loss)
            losses.append((t, loss))
        steps.append(t)
        rates.append(sched.get_drop_rate())
        sched.step()
    return steps, rates, losses


def main() -> None:
    fig, axes = plt.subplots(4, 3, figsize=(13, 12), sharex=True)
    axes = axes.ravel()
    steps = list(range(STEPS))
    for ax, (title, scheds) in zip(axes, PANELS):
        scheds = scheds if isinstance(scheds, dict) else {None: scheds}
        for k, (label, sched) in enumerate(scheds.items()):
            ax.plot(steps, [sched(t) for t in steps], lw=2, ls="-" if k == 0 else "--", label=label)
        if len(scheds) > 1:
            ax.legend(fontsize=8, loc="upper right")
        ax.set_title(title, fontsize=9)
    ax = axes[len(PANELS)]
    t, rates, losses = adaptive_curve()
    ax.plot(t, rates, lw=2, label="drop rate")
    ax2 = ax.twinx()
    ax2.plot(*zip(*losses), "o", ms=3, color="gray", label="reported val loss")
    ax2.set_ylabel("val loss", fontsize=8, color="gray")
    ax2.tick_params(labelsize=7, colors="gray")
    ax.set_title("AdaptiveDropRateScheduler(0.0, 0.3, patience=2,\nincrement=0.05, cooldown=2), eval every 50",
                 fontsize=9)
    for ax in axes[: len(PANELS) + 1]:
        ax.set_ylim(-0.02, 0.55)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[len(PANELS) + 1:]:
        ax.axis("off")
    for ax in axes[::3]:
        ax.set_ylabel("drop rate")
    for ax in axes[7:10]:
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle("dropgrad drop-rate schedules (rate used at each DropGrad.step())", fontsize=12)
    fig.tight_layout()
    fig.savefig(OUT, dpi=90)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
