"""One rank of the checkpoint/restart tests in ``test_dcp.py``, launched by ``torchrun`` (not collected by pytest).

Run as ``python -m torch.distributed.run --nproc_per_node=2 ... tests/_elastic_worker.py MODE OUTDIR SCENARIO[,...]``.

MODE ``ref``: every scenario trains 20 steps uninterrupted (checkpoints every 5 steps
under ``OUTDIR/<scenario>/ckpt``), then, for FSDP2, a negative control resumes the step-10
checkpoint *without* :class:`~dropgrad.distributed.DropGradStateful`.
MODE ``kill``: every scenario resumes from its latest checkpoint, if any; rank 1 SIGKILLs
itself before step 12 the first time a scenario runs (a marker file says it did), so the
elastic agent restarts both workers (``--max-restarts`` = number of scenarios) and the
restarted workers resume from step 10. A finished scenario leaves ``OUTDIR/<scenario>/done``
and is skipped by later attempts.

Each scenario writes ``OUTDIR/<scenario>/<mode>.pt`` (rank 0): the gathered full
parameters, the step count, and what each rank saw; every rank writes
``OUTDIR/<scenario>/<mode>-rank<R>.json`` with its outcome ("ok" or a traceback).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from dropgrad import DropGrad, LinearDropRateScheduler  # noqa: E402
from dropgrad.distributed import DropGradStateful  # noqa: E402

torch.set_num_threads(1)
STEPS, EVERY, KILL_AT, BATCH = 20, 5, 12, 8
RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


# ---------------------------------------------------------------------- shared pieces
def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))  # 7 rows: uneven FSDP2 shards


def make_opt(model: nn.Module) -> DropGrad:
    # unseeded (the agreed seed must survive the restart), a schedule (its position must) and the
    # full-update coin; rank-dependent draw so that a lost agreement shows
    torch.manual_seed(1000 + RANK)
    return DropGrad(torch.optim.Adam(model.parameters(), lr=0.05),
                    drop_rate=LinearDropRateScheduler(0.1, 0.6, num_steps=STEPS), full_update_drop=0.15)


def batch(step: int, rank: int | None = None, world: int | None = None):
    """The global batch of ``step`` (deterministic), or this rank's share of it."""
    g = torch.Generator().manual_seed(10_000 + step)
    x, y = torch.randn(BATCH, 5, generator=g), torch.randn(BATCH, 3, generator=g)
    if rank is None:
        return x, y
    n = BATCH // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def loss_of(model, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def maybe_die(name: str, mode: str, step: int) -> None:
    """In kill mode, rank 1 SIGKILLs itself before step KILL_AT the first time ``name`` runs."""
    marker = OUT / name / "killed"
    if mode == "kill" and step == KILL_AT and not marker.exists():
        dist.barrier()  # both ranks reached the kill point: the restart must come from this SIGKILL
        if RANK == 1:
            marker.write_text(f"attempt {ATTEMPT}\n")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def latest(ckpt: Path) -> int:
    """The step of the newest complete checkpoint under ``ckpt`` (0 if none)."""
    done = [int(p.name[4:]) for p in ckpt.glob("step*") if (p / "complete").exists()]
    return max(done, default=0)


def mark_complete(path: Path) -> None:
    dist.barrier()  # every rank has written its part
    if RANK == 0:
        (path / "complete").write_text("ok\n")
    dist.barrier()


def record(name: str, mode: str, full: torch.Tensor, opt_step: int, extra: dict | None = None) -> None:
    if RANK == 0:
        torch.save({"params": full, "step_count": opt_step, "attempt": ATTEMPT, **(extra or {})},
                   OUT / name / f"{mode}.pt")


# ---------------------------------------------------------------------- FSDP2 + DCP
class AppState:
    """Model and optimizer through DCP's get_state_dict/set_state_dict, as torchtitan does."""

    def __init__(self, model, opt, flatten: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        self.model, self.opt = model, opt
        self.options = StateDictOptions(flatten_optimizer_state_dict=flatten)

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=self.options)


def _fsdp2_setup():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, make_opt(model)


def _fsdp2_train(model, opt, start: int, name: str, mode: str, ckpt: Path | None, stateful: bool = True) -> None:
    import torch.distributed.checkpoint as dcp

    for s in range(start, STEPS):
        maybe_die(name, mode, s)
        loss_of(model, *batch(s, RANK, WORLD)).backward()
        opt.step()
        opt.zero_grad()
        if ckpt is not None and (s + 1) % EVERY == 0:
            path = ckpt / f"step{s + 1}"
            state = {"app": AppState(model, opt)}
            if stateful:
                state["dropgrad"] = DropGradStateful(opt)
            dcp.save(state, checkpoint_id=str(path))
            mark_complete(path)


def fsdp2(mode: str) -> None:
    import torch.distributed.checkpoint as dcp

    name = "fsdp2"
    ckpt = OUT / name / f"ckpt-{mode}"
    model, opt = _fsdp2_setup()
    start = latest(ckpt) if mode == "kill" else 0
    caught: list[str] = []
    if start:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            dcp.load({"app": AppState(model, opt), "dropgrad": DropGradStateful(opt)},
                     checkpoint_id=str(ckpt / f"step{start}"))
        caught = [str(w.message) for w in seen if "DropGrad" in str(w.message)]
        assert opt.step_count == start, (opt.step_count, start)
        assert opt.seed_agreed
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fsdp2_train(model, opt, start, name, mode, ckpt)
    caught += [str(w.message) for w in seen if "DropGrad" in str(w.message)]
    assert not caught, caught  # a resume through DropGradStateful is silent
    full = flat([p.full_tensor() for p in model.parameters()])
    extra = {"resumed_from": start, "seed": opt.seed}
    if mode == "ref":
        # negative control: resume the step-10 checkpoint without DropGradStateful
        model2, opt2 = _fsdp2_setup()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            dcp.load({"app": AppState(model2, opt2)}, checkpoint_id=str(ckpt / "step10"))
            assert opt2.step_count == 0  # DCP's initialising step did not move it
            _fsdp2_train(model2, opt2, 10, name, mode, None)
        lost = [str(w.message) for w in seen if "DropGradStateful" in str(w.message)]
        assert len(lost) == 1, [str(w.message) for w in seen]  # warned once, at the first step, on this rank
        extra["without_stateful"] = flat([p.full_tensor() for p in model2.parameters()])
        extra["without_stateful_step_count"] = opt2.step_count
    record(name, mode, full, opt.step_count, extra)


# ---------------------------------------------------------------------- DDP + torch.save
def ddp(mode: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    name = "ddp"
    ckpt = OUT / name / f"ckpt-{mode}"
    ddp_model = DDP(make_model())
    opt = make_opt(ddp_model)
    start = latest(ckpt) if mode == "kill" else 0
    if start:
        saved = torch.load(ckpt / f"step{start}" / "state.pt", weights_only=True)
        ddp_model.module.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        assert opt.step_count == start and opt.seed_agreed
    for s in range(start, STEPS):
        maybe_die(name, mode, s)
        loss_of(ddp_model, *batch(s, RANK, WORLD)).backward()
        opt.step()
        opt.zero_grad()
        if (s + 1) % EVERY == 0:
            path = ckpt / f"step{s + 1}"
            if RANK == 0:
                path.mkdir(parents=True, exist_ok=True)
                torch.save({"model": ddp_model.module.state_dict(), "opt": opt.state_dict()}, path / "state.pt")
            mark_complete(path)
    record(name, mode, flat(ddp_model.parameters()), opt.step_count, {"resumed_from": start})


# ---------------------------------------------------------------------- Accelerate save_state/load_state
def accelerate(mode: str) -> None:
    from accelerate import Accelerator

    name = "accelerate"
    ckpt = OUT / name / f"ckpt-{mode}"
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == WORLD, accelerator.state
    model = make_model()
    opt = make_opt(model)
    pmodel, popt = accelerator.prepare(model, opt)
    start = latest(ckpt) if mode == "kill" else 0
    if start:
        accelerator.load_state(str(ckpt / f"step{start}"))
        assert opt.step_count == start and opt.seed_agreed
    for s in range(start, STEPS):
        maybe_die(name, mode, s)
        accelerator.backward(loss_of(pmodel, *batch(s, RANK, WORLD)))
        popt.step()
        popt.zero_grad()
        if (s + 1) % EVERY == 0:
            path = ckpt / f"step{s + 1}"
            accelerator.save_state(str(path))
            mark_complete(path)
    record(name, mode, flat(accelerator.unwrap_model(pmodel).parameters()), opt.step_count, {"resumed_from": start})


# ---------------------------------------------------------------------- Lightning (DDP strategy, DropGradCallback)
def lightning(mode: str) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from dropgrad.integrations.lightning import DropGradCallback

    name = "lightning"
    ckpt = OUT / name / f"ckpt-{mode}"
    # the batch is a function of the global step, not of the loader's position: Lightning restarts a
    # plain DataLoader from its beginning when it resumes mid-epoch
    steps = TensorDataset(torch.arange(STEPS * WORLD))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, _batch, _index):
            return loss_of(self.net, *batch(self.trainer.global_step, RANK, WORLD))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)

    class Killer(pl.Callback):
        def on_train_batch_start(self, trainer, *_):
            maybe_die(name, mode, trainer.global_step)

    torch.manual_seed(1000 + RANK)  # the callback draws its seed here: agreed at the first step
    callback = DropGradCallback(drop_rate=LinearDropRateScheduler(0.1, 0.6, num_steps=STEPS), log=False)
    saver = pl.callbacks.ModelCheckpoint(dirpath=str(ckpt), every_n_train_steps=EVERY, save_top_k=-1,
                                         filename="{step}")
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=STEPS, callbacks=[callback,
                         saver, Killer()], logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, deterministic=True)
    module = Module()
    found = sorted(ckpt.glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1])) if mode == "kill" else []
    resume = str(found[-1]) if found else None
    loader = DataLoader(steps, batch_size=1, shuffle=False)
    trainer.fit(module, loader, ckpt_path=resume)
    assert trainer.global_step == STEPS, trainer.global_step
    slots = callback.hook.state_dict()["slots"]
    record(name, mode, flat(module.net.parameters()), slots["0"]["dropgrad"]["step"] if slots else -1,
           {"resumed_from": resume and Path(resume).name, "seed": callback.hook.state_dict()["seed"]})


SCENARIOS = {"fsdp2": fsdp2, "ddp": ddp, "accelerate": accelerate, "lightning": lightning}
OUT = Path(".")


def main() -> None:
    global OUT
    mode, outdir, names = sys.argv[1:4]
    OUT = Path(outdir)
    if list(OUT.glob("*/failed")):
        sys.exit(4)  # a scenario failed in an earlier attempt: a restart must not retry (and hide) it
    # a fresh key space per attempt: the agent's store keeps the previous attempt's gloo addresses
    timeout = datetime.timedelta(seconds=60)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), WORLD,
                          is_master=not agent_store and RANK == 0, timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{ATTEMPT}/", store), rank=RANK,
                            world_size=WORLD, timeout=timeout)
    for name in names.split(","):
        (OUT / name).mkdir(parents=True, exist_ok=True)
        if (OUT / name / f"{mode}-done").exists():
            continue  # finished in an earlier attempt
        result_path = OUT / name / f"{mode}-rank{RANK}.json"
        try:
            SCENARIOS[name](mode)
            dist.barrier()
            result = "ok"
        except Exception:
            killed = OUT / name / "killed"
            if killed.exists() and killed.read_text() == f"attempt {ATTEMPT}\n":
                sys.exit(1)  # the peer's SIGKILL broke this rank's collective: the agent restarts both
            result = traceback.format_exc()
        result_path.write_text(json.dumps({"attempt": ATTEMPT, "result": result}))
        if result != "ok":
            (OUT / name / "failed").write_text(f"rank {RANK}\n")
            sys.stdout.flush()
            os._exit(3)  # later attempts see the marker and stop at once
        dist.barrier()
        if RANK == 0:
            (OUT / name / f"{mode}-done").write_text("ok\n")
        dist.barrier()
    dist.destroy_process_group()
    # no interpreter teardown: torch 2.13's DDP keeps gloo's worker threads alive past
    # destroy_process_group, and one releasing a collective's Python tensors while Python
    # finalizes aborts the process (see examples/ddp_example.py); _flat_launch does the same
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
