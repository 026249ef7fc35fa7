"""Progress bars: tqdm when it is installed, otherwise a plain line every few seconds."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

try:  # optional: `pip install tqdm` for live bars
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None

__all__ = ["bar"]


def _plain(it: Iterable, desc: str, total: int | None, every: float = 10.0) -> Iterator:
    start = last = time.time()
    for i, x in enumerate(it):
        yield x
        now = time.time()
        if now - last >= every:
            last = now
            of = f"/{total}" if total else ""
            print(f"{desc}: {i + 1}{of} ({now - start:.0f}s)", file=sys.stderr, flush=True)


def bar(it: Iterable, enabled: bool = True, desc: str = "", total: int | None = None, leave: bool = True) -> Iterable:
    """Wrap ``it`` in a progress bar when ``enabled`` (redrawn at most every 0.5 s, or 10 s off a terminal)."""
    if not enabled:
        return it
    if total is None and hasattr(it, "__len__"):
        total = len(it)  # type: ignore[arg-type]
    if _tqdm is not None:
        tty = sys.stderr.isatty()
        return _tqdm(it, desc=desc, total=total, leave=leave, mininterval=0.5 if tty else 10.0, dynamic_ncols=True)
    return _plain(it, desc, total)
