"""Tensor parallelism and FSDP2 + TP: shards masked at their true offsets in the full parameter.

The multi-process part launches ``tests/_tp_worker.py`` once on 4 gloo processes
(a 2x2 ``("dp", "tp")`` mesh and a 1-D mesh of 4): ``parallelize_module`` with
Colwise/RowwiseParallel, then ``fully_shard`` on the dp mesh (so that
``_StridedShard`` really appears; the worker asserts it), and hand-made
DTensors with strided placements whose shards hold several separate runs of
rows. Masks are compared bitwise with single-process DropGrad on the full
tensors, training runs to float rounding with a single-process run. The
single-process part checks the index mapping against torch's own offset helper
and the pieces' coverage of the full tensor.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

from dropgrad import sharding

WORKER = Path(__file__).with_name("_tp_worker.py")
SCENARIOS = ["strided_layouts", "partial_refused", "tp_masks", "tp_train", "fsdp2_tp_masks", "fsdp2_tp_train",
             # FSDP1 (FullyShardedDataParallel on CPU) refused on every rank: see test_flat_buffers.py
             "fsdp1_flat_refused", "fsdp1_orig_params_refused"]
LAUNCH_TIMEOUT_S = 240

_TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
needs_dist = pytest.mark.skipif(
    not torch.distributed.is_available() or not sys.platform.startswith("linux") or _TORCH < (2, 6),
    reason="needs torch.distributed with gloo, a loopback interface named lo, and torch >= 2.6 "
    "(FSDP2 on CPU, torch.distributed.tensor.parallel with _StridedShard)",
)

if torch.distributed.is_available():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import Partial

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - older torch
        _StridedShard = None


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    from _flat_launch import launch

    return launch(WORKER, 4, SCENARIOS, tmp_path_factory.mktemp("tp4"), LAUNCH_TIMEOUT_S)


@needs_dist
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_four_processes(world4, scenario):
    assert world4[scenario] == "ok", world4[scenario]


# ---------------------------------------------------------------------- single process
def _layouts():
    if not torch.distributed.is_available() or _StridedShard is None:
        return []
    ss = _StridedShard
    return [
        ((4,), [ss(0, split_factor=2)]),
        ((3,), [ss(1, split_factor=2)]),
        ((2, 2), [ss(0, split_factor=2), Shard(0)]),
        ((2, 2), [ss(0, split_factor=2), Shard(1)]),
        ((2, 2), [Shard(1), ss(0, split_factor=3)]),
        ((2, 3), [Replicate(), ss(2, split_factor=2)]),
        ((2, 2), [Shard(0), Shard(0)]),
        ((3, 2), [Shard(2), Shard(0)]),
    ]


@pytest.mark.skipif(not _layouts(), reason="needs torch.distributed.tensor with _StridedShard")
@pytest.mark.parametrize("shape", [(8, 8, 4), (7, 5, 3), (3, 2, 9)])
@pytest.mark.parametrize("mesh_shape,placements", _layouts())
def test_held_indices_agree_with_torch_and_pieces_cover_the_tensor(shape, mesh_shape, placements):
    """Per coordinate: shape and first offset as torch computes them; together, every element once per replica."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    full = torch.arange(torch.Size(shape).numel()).view(shape)
    replicas = 1
    for size, pl in zip(mesh_shape, placements):
        replicas *= size if pl.is_replicate() else 1
    seen = torch.zeros(full.numel(), dtype=torch.int64)
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        indices = sharding.held_indices(shape, mesh_shape, list(coord), placements)
        want_shape, want_offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        assert tuple(len(i) for i in indices) == tuple(want_shape), (coord, indices)
        for d, idx in enumerate(indices):
            if len(idx):
                assert int(idx[0]) == want_offset[d], (coord, d, indices)
        local = full[torch.meshgrid(*indices, indexing="ij")] if all(len(i) for i in indices) else full[:0]
        for piece, offset in sharding._index_pieces(local, shape, indices):
            # a piece is a contiguous range of the full tensor, starting at its offset
            assert torch.equal(piece.reshape(-1), torch.arange(offset, offset + piece.numel())), (coord, offset)
            seen[offset:offset + piece.numel()] += 1
    assert torch.equal(seen, torch.full_like(seen, replicas))


@pytest.mark.skipif(not _layouts(), reason="needs torch.distributed.tensor")
def test_held_indices_refuse_partial_naming_it():
    with pytest.raises(ValueError, match=r"Partial\(sum\) on mesh dim 1.*Redistribute"):
        sharding.held_indices((4, 4), (2, 2), [0, 0], [Shard(0), Partial()])


@pytest.mark.skipif(not _layouts(), reason="needs torch.distributed.tensor")
def test_held_indices_outside_the_mesh_is_empty():
    assert [len(i) for i in sharding.held_indices((4, 3), (2,), None, [Shard(0)])] == [0, 0]
