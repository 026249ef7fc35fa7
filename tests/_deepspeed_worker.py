"""One rank of the DeepSpeed checks in ``test_deepspeed.py`` (not collected by pytest).

Run as ``python tests/_deepspeed_worker.py RANK WORLD PORT OUTDIR SCENARIO[,SCENARIO...]``
with ``DS_ACCELERATOR=cpu``. DeepSpeed on its CPU accelerator over gloo, 2 ranks
(without its JIT-built shared-memory op, which serves inference only: see ``main``).
ZeRO stage 0 in fp32 steps the client optimizer on the original parameters after
all-reducing the gradients (like DDP): DropGrad is exact there, compared with a
single-process run of the global batch. ZeRO stages 1 and 2 and the bf16
optimizer hand the client optimizer flat partitions: DropGrad must refuse them at
the first step, on every rank, naming DeepSpeed.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from _flat_launch import run_scenarios  # noqa: E402  (this directory is sys.path[0])
from torch import nn  # noqa: E402

from dropgrad import DropGrad  # noqa: E402

torch.set_num_threads(1)
RANK = WORLD = 0
BATCH = 8  # global batch
STEPS = 4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(STEPS, BATCH, 5, generator=g), torch.randn(STEPS, BATCH, 3, generator=g)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def config(stage: int, **extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": BATCH // WORLD,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **extra,
    }


def ds_run(cfg: dict, dtype=torch.float32):
    import deepspeed

    model = make_model()
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=0.05), drop_rate=0.5, seed=7)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    x, y = data()
    n = BATCH // WORLD
    for s in range(STEPS):
        xs, ys = x[s, RANK * n:(RANK + 1) * n].to(dtype), y[s, RANK * n:(RANK + 1) * n].to(dtype)
        loss = ((engine(xs) - ys) ** 2).mean()
        engine.backward(loss)
        engine.step()
    return engine, opt


def reference(drop: bool = True) -> torch.Tensor:
    model = make_model()
    inner = torch.optim.Adam(model.parameters(), lr=0.05)
    opt = DropGrad(inner, drop_rate=0.5, seed=7) if drop else inner
    x, y = data()
    for s in range(STEPS):
        ((model(x[s]) - y[s]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def stage0_fp32_exact():
    import torch.distributed as dist

    engine, opt = ds_run(config(0))
    if opt.step_count != STEPS:
        raise AssertionError(f"DeepSpeed stepped DropGrad {opt.step_count} times, not {STEPS}")
    got = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
    gathered = [torch.empty_like(got) for _ in range(WORLD)]
    dist.all_gather(gathered, got)
    for r, other in enumerate(gathered):
        if not torch.equal(bits(other), bits(got)):
            raise AssertionError(f"rank {r} differs from rank {RANK}")
    want = reference()
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise AssertionError(f"DeepSpeed stage 0 vs single process: max diff {(got - want).abs().max():.3e}")
    print(f"stage 0 vs single process: max diff {(got - want).abs().max():.3e}, bitwise {torch.equal(bits(got), bits(want))}", flush=True)
    undropped = reference(drop=False)
    if torch.allclose(undropped, want, rtol=1e-5, atol=1e-6):
        raise AssertionError("dropout changed nothing: the comparison would be blind")


def _expect_refusal(cfg: dict, what: str, dtype=torch.float32) -> None:
    try:
        ds_run(cfg, dtype)
    except ValueError as exc:
        text = str(exc)
        for needed in ("no longer hold the parameters", "DeepSpeed is loaded", "ZeRO stage 0 in fp32"):
            if needed not in text:
                raise AssertionError(f"{what}: {needed!r} missing from the error: {text}") from exc
    else:
        raise AssertionError(f"{what}: DropGrad stepped flat partitions instead of refusing them")


def stage1_refused():
    _expect_refusal(config(1), "ZeRO stage 1")


def stage2_refused():
    _expect_refusal(config(2), "ZeRO stage 2")


def stage0_bf16_refused():
    _expect_refusal(config(0, bf16={"enabled": True}), "stage 0 with bf16", torch.bfloat16)


SCENARIOS = {f.__name__: f for f in (stage0_fp32_exact, stage1_refused, stage2_refused, stage0_bf16_refused)}


def main() -> None:
    global RANK, WORLD
    rank, world, port, outdir, names = sys.argv[1:6]
    RANK, WORLD = int(rank), int(world)
    os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401

    # by sys.modules: the attribute deepspeed.comm.torch is torch itself (a star import)
    ds_comm_torch = sys.modules["deepspeed.comm.torch"]
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce (g++/ninja, minutes on a busy
    # machine) that only its inference_all_reduce uses; training goes through torch.distributed.
    # Skipping it keeps the test independent of a compiler and of ~/.cache/torch_extensions.
    ds_comm_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    run_scenarios(SCENARIOS, names, RANK, outdir)


if __name__ == "__main__":
    main()
