"""Train a small MLP on scikit-learn's bundled digits with and without DropGrad.

Needs no download. Prints the test accuracy of each run (mean over seeds).
Run: python examples/digits_demo.py [--epochs N] [--seeds K] [--drop-rate P]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dropgrad import DropGrad


def load(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    as_t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return as_t(x_tr, torch.float32), as_t(y_tr, torch.long), as_t(x_te, torch.float32), as_t(y_te, torch.long)


def train(drop_rate: float | None, seed: int, epochs: int, data) -> float:
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if drop_rate is not None:
        opt = DropGrad(opt, drop_rate=drop_rate, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_tr), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (model(x_te).argmax(1) == y_te).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--drop-rate", type=float, default=0.2)
    args = ap.parse_args(argv)
    data = load()
    results: dict[str, list[float]] = {}
    for label, rate in (("Adam", None), (f"DropGrad(Adam, p={args.drop_rate})", args.drop_rate)):
        results[label] = [train(rate, s, args.epochs, data) for s in range(args.seeds)]
        accs = results[label]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{label:<28} test accuracy {statistics.mean(accs):.4f} +- {spread:.4f} over {len(accs)} seeds")
    return results


if __name__ == "__main__":
    main()
