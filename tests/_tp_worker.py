"""One rank of the tensor-parallel tests in ``test_tensor_parallel.py`` (not collected by pytest).

Run as ``python tests/_tp_worker.py RANK WORLD PORT OUTDIR SCENARIO[,SCENARIO...]``
(4 ranks: a 2x2 ``("dp", "tp")`` mesh and a 1-D mesh of 4). Also FSDP1's refusal
(``test_flat_buffers.py``'s subject, here to save a launch). Joins a gloo group
on 127.0.0.1, runs the scenarios in order and writes ``OUTDIR/rank<RANK>.json``
after each one. Every check ends in a comparison with a single-process run that
each rank computes itself: masks bitwise, training to float rounding.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _flat_launch import run_scenarios  # noqa: E402  (this directory is sys.path[0])
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402
from torch.distributed.tensor.placement_types import Partial, _StridedShard  # noqa: E402

from dropgrad import DropGrad  # noqa: E402

torch.set_num_threads(1)
RANK = WORLD = 0
BATCH = 8
STEPS = 3


def make_model(width: int = 7) -> nn.Module:
    torch.manual_seed(0)
    # 7 hidden units (the mask checks): TP splits the column-parallel rows 4/3, FSDP2 splits those
    # again 2/2 and 2/1. Training uses widths whose TP split is even (DTensor's sharding
    # propagation does not run a forward on uneven TP shards) and FSDP2's is not (6 = 2 x (2 + 1)).
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3))


def data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(STEPS, BATCH, 5, generator=g), torch.randn(STEPS, BATCH, 3, generator=g)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def tp_plan():
    return {"0": ColwiseParallel(), "2": RowwiseParallel()}


def build_2d(model: nn.Module):
    """FSDP2 on top of TP, torchtitan-style: parallelize on "tp", then fully_shard on "dp"."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], tp_plan())
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return mesh


def assert_strided(model: nn.Module) -> None:
    kinds = {type(pl).__name__ for p in model.parameters() for pl in p.placements}
    if "_StridedShard" not in kinds:
        raise AssertionError(f"FSDP2 + TP produced no _StridedShard placement (got {kinds}): the test would be blind")


def reference_masks(steps: int, rate: float = 0.5, seed: int = 3) -> list[list[torch.Tensor]]:
    """Single process: a gradient of ones, masked by DropGrad, per step and parameter."""
    model = make_model()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), drop_rate=rate, seed=seed)
    out = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.mask_gradients()
        out.append([p.grad.clone() for p in model.parameters()])
    return out


def check_masks(model: nn.Module, what: str, steps: int = 2) -> None:
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), drop_rate=0.5, seed=3)
    want = reference_masks(steps)
    for s in range(steps):
        for p in model.parameters():
            p.grad = torch.ones_like(p)  # a DTensor with p's placements
        opt.mask_gradients()
        for j, (p, ref) in enumerate(zip(model.parameters(), want[s])):
            got = p.grad.full_tensor()
            if not torch.equal(bits(got), bits(ref)):
                raise AssertionError(f"{what}: step {s} parameter {j} ({p.placements}): masks differ from the "
                                     f"single-process masks in {(got != ref).sum()} of {ref.numel()} elements")
    # not blind: consecutive steps' masks differ, and the masks drop something
    if torch.equal(want[0][0], want[1][0]) or bool((want[0][0] != 0).all()):
        raise AssertionError("reference masks are degenerate")


def reference_train(seed: int, width: int) -> list[torch.Tensor]:
    model = make_model(width)
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=0.05), drop_rate=0.5, seed=seed)
    x, y = data()
    for s in range(STEPS):
        ((model(x[s]) - y[s]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def compare_train(model: nn.Module, opt: DropGrad, what: str, width: int) -> None:
    got = [p.full_tensor() for p in model.parameters()]
    want = reference_train(opt.seed, width)
    for j, (g, w) in enumerate(zip(got, want)):
        if not torch.allclose(g, w, rtol=1e-5, atol=1e-6):
            raise AssertionError(f"{what}: parameter {j} differs from single process by {(g - w).abs().max():.3e}")
    # not blind: the same run without dropout ends elsewhere
    model0 = make_model(width)
    opt0 = torch.optim.Adam(model0.parameters(), lr=0.05)
    x, y = data()
    for s in range(STEPS):
        ((model0(x[s]) - y[s]) ** 2).mean().backward()
        opt0.step()
        opt0.zero_grad()
    if torch.allclose(model0[0].weight.detach(), want[0], rtol=1e-5, atol=1e-6):
        raise AssertionError("dropout changed nothing: the comparison would be blind")


# ---------------------------------------------------------------------- scenarios
def fsdp2_tp_masks():
    model = make_model()
    build_2d(model)
    assert_strided(model)
    check_masks(model, "FSDP2 + TP")


def fsdp2_tp_train():
    model = make_model(6)
    mesh = build_2d(model)
    assert_strided(model)
    torch.manual_seed(1000 + RANK)  # unseeded: the agreement runs through the DTensor path too
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=0.05), drop_rate=0.5)
    x, y = data()
    dp = mesh["dp"].get_local_rank()
    half = BATCH // 2
    for s in range(STEPS):
        xs, ys = x[s, dp * half:(dp + 1) * half], y[s, dp * half:(dp + 1) * half]  # same data across tp
        ((model(xs) - ys) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    compare_train(model, opt, "FSDP2 + TP training", 6)


def tp_masks():
    model = make_model()
    parallelize_module(model, init_device_mesh("cpu", (WORLD,)), tp_plan())
    check_masks(model, "TP on a 1-D mesh of 4")


def tp_train():
    model = make_model(8)
    parallelize_module(model, init_device_mesh("cpu", (WORLD,)), tp_plan())
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=0.05), drop_rate=0.5, seed=11)
    x, y = data()
    for s in range(STEPS):
        ((model(x[s]) - y[s]) ** 2).mean().backward()  # every rank the whole batch (TP only)
        opt.step()
        opt.zero_grad()
    compare_train(model, opt, "TP training", 8)


def strided_layouts():
    """Hand-made DTensors, strided shards included, some holding non-contiguous runs of rows."""
    mesh1 = init_device_mesh("cpu", (WORLD,))
    mesh2 = init_device_mesh("cpu", (2, 2))
    layouts = [
        (mesh1, [_StridedShard(0, split_factor=2)]),  # every rank: two separate runs of rows
        (mesh1, [_StridedShard(1, split_factor=2)]),
        (mesh2, [_StridedShard(0, split_factor=2), Shard(0)]),  # FSDP2 + TP's layout
        (mesh2, [_StridedShard(0, split_factor=2), Shard(1)]),  # runs of rows, half the columns
        (mesh2, [Shard(1), _StridedShard(0, split_factor=2)]),
        (mesh2, [_StridedShard(2, split_factor=2), Replicate()]),
        (mesh2, [Replicate(), _StridedShard(1, split_factor=2)]),
    ]
    shape = (8, 8, 4)  # _StridedShard's distribute_tensor needs even splits
    full_grad = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    ref = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(shape))]
    ref[0].grad = torch.ones(4)
    ref[1].grad = full_grad.clone()
    DropGrad(torch.optim.SGD(ref, lr=1.0), drop_rate=0.5, seed=3).step()
    for mesh, placements in layouts:
        p = nn.Parameter(distribute_tensor(torch.zeros(shape), mesh, placements))
        p.grad = distribute_tensor(full_grad, mesh, placements)
        plain = nn.Parameter(torch.zeros(4))
        plain.grad = torch.ones(4)
        DropGrad(torch.optim.SGD([plain, p], lr=1.0, foreach=False), drop_rate=0.5, seed=3).step()
        got = p.full_tensor()
        if not torch.equal(bits(got), bits(ref[1].detach())):
            raise AssertionError(f"{placements} on {mesh}: shard masks differ from the full mask")


def partial_refused():
    mesh2 = init_device_mesh("cpu", (2, 2))
    for placements in ([Partial(), _StridedShard(0, split_factor=2)], [_StridedShard(0, split_factor=2), Partial()]):
        p = nn.Parameter(distribute_tensor(torch.zeros(8, 4), mesh2, [Replicate(), Replicate()]))
        p.grad = DTensor.from_local(torch.ones(2, 4), mesh2, placements, shape=(8, 4), stride=(4, 1))
        try:
            DropGrad(torch.optim.SGD([p], lr=1.0, foreach=False), drop_rate=0.5, seed=3).step()
        except ValueError as exc:
            if "Partial" not in str(exc) or "Redistribute" not in str(exc):
                raise AssertionError(f"unclear error: {exc}") from exc
        else:
            raise AssertionError(f"a gradient with {placements} was masked instead of refused")


# ---------------------------------------------------------------------- FSDP1 (test_flat_buffers.py's subject,
# run in this launch to save one: every rank must refuse its parameters, saying why and what to use)
def _fsdp1(use_orig_params: bool) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: N817

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's deprecation and CPU notices
        return FSDP(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"))


def _expect_refusal(model: nn.Module, kind: str) -> None:
    params = list(model.parameters())
    if not any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise AssertionError("FSDP1 did not mark its parameters: the check would be blind")
    try:
        DropGrad(torch.optim.Adam(params, lr=0.05), drop_rate=0.5, seed=3)
    except ValueError as exc:
        text = str(exc)
        for needed in (kind, "FSDP1", "world size", "fully_shard"):
            if needed not in text:
                raise AssertionError(f"{needed!r} missing from the error: {text}") from exc
    else:
        raise AssertionError(f"DropGrad accepted FSDP1's parameters ({kind})")


def fsdp1_flat_refused():
    model = _fsdp1(use_orig_params=False)
    from torch.distributed.fsdp._flat_param import FlatParameter

    if not any(isinstance(p, FlatParameter) for p in model.parameters()):
        raise AssertionError("no FlatParameter with use_orig_params=False")
    _expect_refusal(model, "a FlatParameter")


def fsdp1_orig_params_refused():
    _expect_refusal(_fsdp1(use_orig_params=True), "a view into a FlatParameter")


SCENARIOS = {f.__name__: f for f in (fsdp2_tp_masks, fsdp2_tp_train, tp_masks, tp_train, strided_layouts,
                                     partial_refused, fsdp1_flat_refused, fsdp1_orig_params_refused)}


def main() -> None:
    global RANK, WORLD
    rank, world, port, outdir, names = sys.argv[1:6]
    RANK, WORLD = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=RANK, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    run_scenarios(SCENARIOS, names, RANK, outdir)


if __name__ == "__main__":
    main()
