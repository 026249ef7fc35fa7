"""Reproducible DropGrad experiments on real data (beside the package, not part of it).

Run ``python -m experiments --help``; see ``experiments/README.md`` and ``docs/results.md``.
"""
