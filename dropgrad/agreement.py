"""Seed agreement and consistency checks across the ranks of a process group.

A leaf module (torch only; it works on any :class:`~dropgrad.DropGrad` through
its public members): :meth:`DropGrad.step <dropgrad.DropGrad.step>` calls
:func:`agree_seed_if_distributed` at its first step when no ``seed=`` was
given, and :mod:`dropgrad.distributed` re-exports :func:`agree_seed` and
:func:`check_consistency` for users.

How ranks compare themselves
----------------------------
Each rank builds a *fingerprint* of what decides its masks: per parameter, in
optimizer order, its name (where DropGrad knows it), global shape, dtype,
current drop rate and an identity (an exact checksum of the values of a plain
tensor; the placements and mesh shape of a DTensor, whose local shard
legitimately differs per rank); plus the seed, the step count, ``rescale`` and
``full_update_drop``. Only a digest travels first.

The exchange goes through the process group's key-value store (the default
store of ``torch.distributed``), never through a collective: a store operation
cannot be paired with someone else's collective (a DDP bucket's all-reduce), so
a rank that does not arrive makes the others raise after a timeout, naming it,
instead of hanging them. The protocol costs each rank a constant number of
store operations while the ranks agree (they compare with the group's first
rank and count arrivals); only on a mismatch are the full fingerprints of the
first rank and of up to four differing ranks exchanged, so that every rank
builds, and raises, the same readable message. When no store is available (a
torch build without ``torch.distributed.distributed_c10d._get_default_store``,
or a process group set up without one) the same comparison runs over
``all_gather_object``, where the process group's timeout applies.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import pickle
import time
import warnings
from typing import Any

import torch

__all__ = ["agree_seed", "check_consistency", "agree_seed_if_distributed", "process_group_size"]

TIMEOUT_ENV = "DROPGRAD_AGREE_TIMEOUT_S"
_ABANDON = 1 << 40  # added to a check's arrival counter by a rank that gives up waiting
_DETAILED_RANKS = 4  # differing ranks whose full fingerprints are fetched for the message
_MAX_ITEMS = 8  # differences listed in one message
_ROW = 1024  # words per row of the device checksum
_sequences: dict[str, int] = {}  # group tag -> checks begun on it by this process


# ---------------------------------------------------------------------- process group
def _dist():
    """``torch.distributed`` if this build has it, else None."""
    try:
        import torch.distributed as dist  # noqa: PLC0415 - not every torch build has it
    except ImportError:  # pragma: no cover
        return None
    return dist if dist.is_available() else None


def process_group_size(group: Any = None) -> int:
    """World size of ``group`` (1 when no process group is initialized)."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _default_store() -> Any:
    """The default process group's store, or None where this torch cannot give it."""
    try:
        from torch.distributed import distributed_c10d  # noqa: PLC0415

        store = distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private API: any failure means "no store", and the fallback runs
        return None
    needed = ("set", "get", "add", "wait", "check", "append", "delete_key")
    return store if all(hasattr(store, name) for name in needed) else None


# ---------------------------------------------------------------------- fingerprint
def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in row-major order, as a flat uint8 tensor on its device."""
    return t.detach().resolve_conj().resolve_neg().reshape(-1).contiguous().view(torch.uint8)


def _device_checksum(t: torch.Tensor) -> torch.Tensor:
    """Three exact integer sums of ``t``'s bytes, read as int32 words, computed on ``t``'s device.

    The words are laid out as rows of ``_ROW`` words: the plain sum, the sum of
    the row sums weighted by row index and the sum of the column sums weighted
    by column index. Integer sums do not depend on the order of the additions,
    so bitwise-equal replicas give equal sums whatever the device, the thread
    count or the reduction order; a changed value, or elements moved between
    rows or columns, changes them. No temporary of the tensor's size is made.
    """
    raw = _bytes(t)
    if raw.numel() % 4:
        raw = torch.cat([raw, raw.new_zeros(4 - raw.numel() % 4)])
    try:
        words = raw.view(torch.int32)
    except RuntimeError:  # a storage offset not aligned to the word
        words = raw.clone().view(torch.int32)
    n = words.numel()
    body, tail = words[: n - n % _ROW].view(-1, _ROW), words[n - n % _ROW :].to(torch.int64)
    rows = body.sum(1, dtype=torch.int64)  # int32 in, int64 accumulated: no int64 copy of the tensor
    cols = body.sum(0, dtype=torch.int64)
    row_weight = torch.arange(1, rows.numel() + 2, dtype=torch.int64, device=words.device)
    col_weight = torch.arange(1, _ROW + 1, dtype=torch.int64, device=words.device)
    return torch.stack([
        rows.sum() + tail.sum(),
        (rows * row_weight[:-1]).sum() + tail.sum() * row_weight[-1],
        (cols * col_weight).sum() + (tail * col_weight[: tail.numel()]).sum(),
    ])


@torch.no_grad()
def _identities(params: list[torch.Tensor]) -> list[tuple[Any, ...]]:
    """Per parameter: a digest of its values (plain tensors), or its layout (DTensor), or its type.

    A CPU tensor's bytes are hashed with SHA-256 (about 0.5 GB/s); a tensor on
    another device gets exact integer checksums computed there
    (:func:`_device_checksum`), one host transfer per device for all of them.
    """
    out: list[tuple[Any, ...]] = [()] * len(params)
    pending: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for j, p in enumerate(params):
        placements = getattr(p, "placements", None)
        mesh = getattr(p, "device_mesh", None)
        if placements is not None and mesh is not None:  # a DTensor: the local shard differs per rank by design
            out[j] = ("dtensor", repr(tuple(placements)), tuple(getattr(mesh, "shape", ())))
        elif type(p) not in (torch.Tensor, torch.nn.Parameter) or p.is_sparse or p.device.type == "meta":
            out[j] = ("unchecked", type(p).__name__, repr(p.layout), p.device.type)
        elif p.device.type == "cpu":
            out[j] = ("values", "sha256:" + hashlib.sha256(_bytes(p).numpy().data).hexdigest()[:32])
        else:
            pending.setdefault(p.device, []).append((j, _device_checksum(p)))
    for entries in pending.values():
        sums = torch.stack([s for _, s in entries]).tolist()
        for (j, _), words in zip(entries, sums):
            out[j] = ("values", "sums:" + "".join(f"{w & (2**64 - 1):016x}" for w in words))
    return out


def _current(rate: Any, step: int) -> Any:
    """A rate setting as it stands at ``step``: a number, or a schedule's kind and current value."""
    if rate is None or rate is True or rate is False:
        return "drop_rate" if rate is True else rate
    if isinstance(rate, (int, float)):
        return float(rate)
    if callable(getattr(rate, "get_drop_rate", None)):
        return (type(rate).__name__, float(rate.get_drop_rate()))
    if callable(rate):
        return (type(rate).__name__, float(rate(step)))
    return type(rate).__name__


def _fingerprint(optimizer: Any) -> dict[str, Any]:
    """What must be equal on every rank for the masks to be equal (small, picklable)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names_of = getattr(optimizer, "param_names", None)
    names = list(names_of()) if callable(names_of) else [None] * len(params)
    rates = optimizer.current_drop_rates()
    step = int(optimizer.step_count)
    return {
        "seed": int(optimizer.seed),
        "step": step,
        "rescale": optimizer.rescale,
        "drop_rate": _current(optimizer.drop_rate, step),
        "full_update_drop": _current(optimizer.full_update_drop, step),
        "parameters": [
            (name, tuple(p.shape), str(p.dtype).replace("torch.", ""), float(rate), identity)
            for name, p, rate, identity in zip(names, params, rates, _identities(params))
        ],
    }


def _digest(fp: dict[str, Any], with_seed: bool) -> str:
    body = {k: v for k, v in fp.items() if with_seed or k != "seed"}
    return hashlib.sha256(repr(sorted(body.items())).encode()).hexdigest()


# ---------------------------------------------------------------------- readable differences
def _rank_list(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"


def _name(name: str | None) -> str:
    return repr(name) if name is not None else "(unknown: built without model= or named_parameters=)"


def _label(j: int, entry: tuple[Any, ...]) -> str:
    name, shape = entry[0], entry[1]
    return f"parameter {j} ({name!r}, shape {shape})" if name is not None else f"parameter {j} (shape {shape})"


def _differences(ref: dict[str, Any], other: dict[str, Any], r0: int, rb: int, with_seed: bool) -> list[str]:
    """What differs between the fingerprints of rank ``rb`` and the reference rank ``r0``, in words."""
    items = []
    if with_seed and other["seed"] != ref["seed"]:
        items.append(f"seed {other['seed']} on rank {rb}, {ref['seed']} on rank {r0}")
    if other["step"] != ref["step"]:
        items.append(
            f"step count {other['step']} on rank {rb}, {ref['step']} on rank {r0} "
            "(a rank skipped or repeated a step() call)"
        )
    for key in ("rescale", "drop_rate", "full_update_drop"):
        if other[key] != ref[key]:
            items.append(f"{key} {other[key]!r} on rank {rb}, {ref[key]!r} on rank {r0}")
    mine, theirs = other["parameters"], ref["parameters"]
    if len(mine) != len(theirs):
        items.append(f"{len(mine)} parameters on rank {rb}, {len(theirs)} on rank {r0}")
    where_values = {e[4]: k for k, e in enumerate(theirs) if e[4][0] == "values"}
    for j, (a, b) in enumerate(zip(mine, theirs)):
        label = _label(j, b)
        if a[0] != b[0]:
            items.append(f"parameter {j}: named {_name(a[0])} on rank {rb}, {_name(b[0])} on rank {r0}")
        if a[1] != b[1]:
            items.append(f"parameter {j}: shape {a[1]} on rank {rb}, {b[1]} on rank {r0}")
        if a[2] != b[2]:
            items.append(f"{label}: dtype {a[2]} on rank {rb}, {b[2]} on rank {r0}")
        if a[3] != b[3]:
            items.append(f"{label}: drop rate {a[3]!r} on rank {rb}, {b[3]!r} on rank {r0}")
        if a[4] != b[4]:
            if a[4][0] == b[4][0] == "values":
                k = where_values.get(a[4])
                hint = (
                    f" (rank {rb}'s parameter {j} holds the values of rank {r0}'s parameter {k}: "
                    "are the parameters in a different order?)"
                    if k is not None and k != j else ""
                )
                items.append(f"{label}: values differ between rank {rb} and rank {r0}{hint}")
            else:
                items.append(f"{label}: layout {a[4]} on rank {rb}, {b[4]} on rank {r0}")
    return items


def _mismatch_message(ref_rank: int, bad: list[int], fps: dict[int, dict[str, Any]], size: int,
                      with_seed: bool) -> str:
    items: list[str] = []
    for rb in bad[:_DETAILED_RANKS]:
        found = _differences(fps[ref_rank], fps[rb], ref_rank, rb, with_seed)
        items.extend(found or [f"rank {rb}'s fingerprint differs from rank {ref_rank}'s"])
    shown = items[:_MAX_ITEMS]
    more = len(items) - len(shown)
    detailed = "" if len(bad) <= _DETAILED_RANKS else f" (the first {_DETAILED_RANKS} are described)"
    values_only = all("values differ" in item for item in items)
    return (
        "DropGrad is configured differently across ranks, so the ranks would draw different masks "
        f"and the replicas would drift apart: {_rank_list(bad)} ({len(bad)} of {size}) "
        f"{'differs' if len(bad) == 1 else 'differ'} from rank "
        f"{ref_rank}{detailed}: " + "; ".join(shown) + (f"; ... ({more} more differences)" if more else "")
        + ". Build DropGrad identically on every rank (same parameters in the same order, rates, "
        "step count; an explicit seed= must be the same number on every rank, not seed + rank)"
        + (
            ". The parameters' values differ: every replica must hold the same values (DDP broadcasts "
            "rank 0's at construction; a rank-dependent initialisation or parameter order shows here); "
            "ranks that train different models on purpose must pass seed= (nothing is then compared)"
            if values_only else ""
        )
        + ". If the ranks hold different models on purpose (pipeline stages), agree within each "
        "data-parallel group instead: dropgrad.distributed.agree_seed(opt, group=dp_group) before the "
        "first step."
    )


# ---------------------------------------------------------------------- exchanges
class _StoreExchange:
    """One check over the store: constant store traffic per rank while the ranks agree."""

    def __init__(self, store: Any, base: str, ranks: list[int], me: int, timeout_s: float, what: str) -> None:
        self.store, self.base, self.ranks, self.me = store, base, ranks, me
        self.size = len(ranks)
        self.timeout_s = timeout_s
        self.what = what
        self.deadline = time.monotonic() + timeout_s
        self.full_ranks: list[int] = []

    def _key(self, *parts: object) -> str:
        return "/".join([self.base, *map(str, parts)])

    def _wait(self, keys: list[str]) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            return bool(self.store.check(keys))
        try:
            self.store.wait(keys, datetime.timedelta(seconds=left))
        except RuntimeError:  # DistStoreError: the timeout
            return bool(self.store.check(keys))
        return True

    def _give_up(self, arrived: bool) -> None:
        """Past the deadline: raise on this rank (and make late arrivals raise), unless all arrived."""
        value = self.store.add(self._key("arrived"), _ABANDON)
        if arrived and value == _ABANDON + self.size:
            # the last rank arrived just before: it saw no abandonment and sets "all"
            self.deadline = time.monotonic() + self.timeout_s
            if self._wait([self._key("all")]):
                return
        missing = [self.ranks[r] for r in range(self.size) if not self.store.check([self._key("p", r)])]
        seconds = f"{self.timeout_s:g} s"
        who = (f"{_rank_list(missing)} did not reach {self.what} within {seconds}" if missing
               else f"not every rank finished {self.what} within {seconds}")
        raise RuntimeError(
            f"{who}. Every rank must call step() every step (the first step agrees DropGrad's seed across the "
            "ranks), and check_consistency() at the same points on every rank. A rank that skipped its step is "
            "probably waiting in another collective (DDP's gradient all-reduce): it fails when this rank exits "
            "or at the process group's timeout. If only some ranks step this optimizer, give it seed= "
            "(nothing is then communicated). The timeout is the process group's by default; set it with "
            f"timeout= or, for the automatic first-step agreement, the environment variable {TIMEOUT_ENV}."
        )

    def first_round(self, payload: dict[str, Any], key: str) -> tuple[dict[str, Any], list[int]]:
        """Publish ``payload``; return the first rank's and the (sorted) group ranks whose ``key`` differs."""
        store = self.store
        store.set(self._key("p", self.me), pickle.dumps(payload))
        if self.me == 0:
            ref = payload
        else:
            if not self._wait([self._key("p", 0)]):
                self._give_up(arrived=False)
            ref = pickle.loads(store.get(self._key("p", 0)))
        if payload[key] != ref[key]:
            store.append(self._key("bad"), f"{self.me},")
        value = store.add(self._key("arrived"), 1)
        if value >= _ABANDON:
            raise RuntimeError(
                f"{self.what}: this rank arrived after another rank had stopped waiting for it "
                f"({self.timeout_s:g} s); see that rank's error. Every rank must call step() every step "
                "and check_consistency() at the same points."
            )
        if value == self.size:
            store.set(self._key("all"), b"1")
        elif not self._wait([self._key("all")]):
            self._give_up(arrived=True)
        bad: list[int] = []
        if store.check([self._key("bad")]):
            bad = sorted({int(r) for r in store.get(self._key("bad")).decode().split(",") if r})
        return ref, bad

    def full(self, mine: dict[str, Any], needed: list[int]) -> dict[int, dict[str, Any]]:
        """The full fingerprints of the group ranks ``needed`` (published by those ranks only)."""
        self.full_ranks = needed
        if self.me in needed:
            self.store.set(self._key("f", self.me), pickle.dumps(mine))
        self.deadline = time.monotonic() + self.timeout_s
        keys = [self._key("f", r) for r in needed]
        if not self._wait(keys):
            raise RuntimeError(f"{self.what}: ranks {needed} did not publish their fingerprints in time")
        return {r: pickle.loads(self.store.get(k)) for r, k in zip(needed, keys)}

    def finish(self) -> None:
        """The last rank to finish deletes the check's keys (best effort: a store may not delete)."""
        if self.store.add(self._key("done"), 1) != self.size:
            return
        keys = [self._key("p", r) for r in range(self.size)] + [self._key("f", r) for r in self.full_ranks]
        keys += [self._key(k) for k in ("bad", "arrived", "all", "done")]
        for k in keys:
            try:
                self.store.delete_key(k)
            except RuntimeError:  # noqa: PERF203 - a store without deletion keeps them; sequences never repeat
                return


class _CollectiveExchange:
    """The same check over ``all_gather_object`` (no store): the process group's timeout applies."""

    def __init__(self, dist: Any, group: Any, size: int) -> None:
        self.dist, self.group, self.size = dist, group, size

    def _gather(self, obj: Any) -> list[Any]:
        everyone: list[Any] = [None] * self.size
        self.dist.all_gather_object(everyone, obj, group=self.group)
        return everyone

    def first_round(self, payload: dict[str, Any], key: str) -> tuple[dict[str, Any], list[int]]:
        everyone = self._gather(payload)
        return everyone[0], [r for r, p in enumerate(everyone) if p[key] != everyone[0][key]]

    def full(self, mine: dict[str, Any], needed: list[int]) -> dict[int, dict[str, Any]]:
        everyone = self._gather(mine)
        return {r: everyone[r] for r in needed}

    def finish(self) -> None:
        pass


# ---------------------------------------------------------------------- the check
def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be a number of seconds or a datetime.timedelta, got {timeout!r}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
    return seconds


def _env_timeout() -> float | None:
    """The first-step agreement's timeout from ``DROPGRAD_AGREE_TIMEOUT_S`` (None: unset)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return seconds


def _group_ranks(dist: Any, group: Any) -> list[int]:
    world = dist.GroupMember.WORLD
    if group is None or group is world:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def _synchronize(optimizer: Any, group: Any, adopt_seed: bool, timeout: Any, what: str) -> None:
    timeout_s = _check_timeout(timeout)
    dist = _dist()
    size = process_group_size(group)
    if size == 1:
        return
    me = dist.get_rank(group)
    if me < 0 or size < 1:
        raise ValueError(f"{what}: this process (rank {dist.get_rank()}) is not a member of group {group!r}")
    ranks = _group_ranks(dist, group)
    tag = "-".join(map(str, ranks))
    if len(tag) > 64:
        tag = f"{len(ranks)}r-" + hashlib.sha256(tag.encode()).hexdigest()[:16]
    sequence = _sequences.get(tag, 0)
    _sequences[tag] = sequence + 1

    store = _default_store()
    exchange: _StoreExchange | _CollectiveExchange
    if store is not None:
        if timeout_s is None:
            store_timeout = getattr(store, "timeout", None)
            timeout_s = store_timeout.total_seconds() if isinstance(store_timeout, datetime.timedelta) else 1800.0
        exchange = _StoreExchange(store, f"dropgrad/check/{tag}/{sequence}", ranks, me, timeout_s, what)
    else:
        if timeout_s is not None:
            warnings.warn(
                f"{what}: no process group store is available, so the check runs as a collective "
                f"(all_gather_object) and timeout={timeout!r} cannot apply: the process group's timeout does",
                UserWarning,
                stacklevel=3,
            )
        exchange = _CollectiveExchange(dist, group, size)

    mine = _fingerprint(optimizer)
    payload = {"digest": _digest(mine, with_seed=not adopt_seed), "seed": mine["seed"]}
    ref, bad = exchange.first_round(payload, "digest")
    if bad:
        needed = [0, *bad[:_DETAILED_RANKS]]
        fps = exchange.full(mine, needed)
        exchange.finish()
        global_fps = {ranks[r]: fp for r, fp in fps.items()}
        # every rank holds the same first-rank payload, list and fingerprints: the same message everywhere
        raise RuntimeError(_mismatch_message(ranks[0], [ranks[r] for r in bad], global_fps, size, not adopt_seed))
    exchange.finish()
    optimizer.set_seed(int(ref["seed"]))


def agree_seed(optimizer: Any, group: Any = None, *, timeout: float | datetime.timedelta | None = None) -> None:
    """Adopt the group's first rank's seed on every rank and check that the rest of DropGrad's setup agrees.

    Every rank of ``group`` (default: the world) must call it, at the same
    point: checks on a group are matched by their order in each process (the
    n-th check on one rank meets the n-th check on the others), so ranks must
    agree and check in the same order. :meth:`DropGrad.step` calls it by itself
    at its first step inside an initialized process group when no ``seed=`` was
    given, so users rarely need it; call it yourself to agree on a sub-group.

    It communicates through the process group's store, not a collective, so it
    cannot be paired with another collective (such as DDP's gradient
    all-reduce on a rank that skipped its step): ranks that do not arrive within
    ``timeout`` are named in the error the others raise.

    Args:
        optimizer: the :class:`~dropgrad.DropGrad` to agree on.
        group: the process group (default: the world).
        timeout: seconds (or a ``timedelta``) to wait for the other ranks;
            default: the store's timeout, i.e. the process group's.

    Raises:
        RuntimeError: on every rank, when the parameters (names where known,
            order, shapes, dtypes, values of plain tensors, layouts of
            DTensors), their rates, the step count, ``rescale`` or
            ``full_update_drop`` differ between ranks; the message names the
            parameters, ranks and values that differ. Also when a rank does not
            arrive within ``timeout`` (naming it).
        ValueError, TypeError: an invalid ``timeout``, or a process that is not
            in ``group``.
    """
    _synchronize(optimizer, group, adopt_seed=True, timeout=timeout, what="dropgrad.distributed.agree_seed")


def check_consistency(optimizer: Any, group: Any = None, *,
                      timeout: float | datetime.timedelta | None = None) -> None:
    """Check that every rank would draw the same masks; raise on every rank if not.

    Like :func:`agree_seed`, but the seeds must already be equal: call it after
    building ``DropGrad(..., seed=s)`` to catch a rank-dependent seed or
    parameter list, which DropGrad cannot detect without communicating, and
    every N steps (on every rank, at the same step) to catch a rank that skipped
    or repeated a ``step()`` call, or replicas whose values drifted apart. It
    reads every parameter once (an exact integer checksum of plain tensors, on
    their device) and exchanges a digest through the process group's store.
    Checks on a group are matched by their order in each process: call it at
    the same points on every rank.

    Args:
        optimizer: the :class:`~dropgrad.DropGrad` to check.
        group: the process group (default: the world).
        timeout: seconds (or a ``timedelta``) to wait for the other ranks;
            default: the store's timeout, i.e. the process group's.

    Raises:
        RuntimeError: on every rank, naming the ranks, parameters and values
            that differ (seed, step count, names, shapes, rates, values), or the
            ranks that did not arrive within ``timeout``.
        ValueError, TypeError: an invalid ``timeout``, or a process that is not
            in ``group``.
    """
    _synchronize(optimizer, group, adopt_seed=False, timeout=timeout,
                 what="dropgrad.distributed.check_consistency")


def agree_seed_if_distributed(optimizer: Any) -> None:
    """Called by ``DropGrad.step`` while the seed is not agreed: agree when it matters.

    Inside an initialized process group of more than one rank this is
    :func:`agree_seed` on the world, with the timeout taken from the
    environment variable ``DROPGRAD_AGREE_TIMEOUT_S`` (seconds) when it is set.
    """
    dist = _dist()
    if dist is not None and dist.is_initialized() and dist.get_world_size() > 1:
        step = optimizer.step_count
        what = "DropGrad's first step" if step == 0 else f"DropGrad's step {step} (where the seed is agreed)"
        _synchronize(optimizer, None, adopt_seed=True, timeout=_env_timeout(), what=what)
