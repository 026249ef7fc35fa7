"""DropGrad through torch.distributed.checkpoint (DCP), elastic restarts and framework checkpoints.

Single process: DCP's initialising step (``_init_optim_state``) passes through DropGrad
without moving its clock, at save time (stateless SGD) and at load time (fresh Adam);
:class:`~dropgrad.distributed.DropGradStateful` round-trips DropGrad's state in either
dict order and with flattened optimizer state dicts; a DCP load without it warns once.

Multi-process (``_elastic_worker.py`` under ``torchrun``, 2 ranks on gloo, 127.0.0.1):
one uninterrupted launch, and one launch in which rank 1 SIGKILLs itself before step 12
of each scenario so that the elastic agent restarts both workers, which resume from the
step-10 checkpoint: FSDP2 + DCP, DDP + ``torch.save``, Accelerate ``save_state``/
``load_state``, Lightning (``strategy="ddp"``, :class:`DropGradCallback`). Final
parameters are compared bitwise. Resharding: the 2-rank step-10 DCP checkpoint is loaded
into one process and continued.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from dropgrad import DropGrad, LinearDropRateScheduler
from dropgrad.distributed import DropGradStateful

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

WORKER = Path(__file__).with_name("_elastic_worker.py")
ROOT = WORKER.parent.parent
_TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
SCENARIOS = [name for name, ok in [
    ("fsdp2", _TORCH >= (2, 6)),  # FSDP2 on CPU/gloo
    ("ddp", True),
    ("accelerate", importlib.util.find_spec("accelerate") is not None),
    ("lightning", importlib.util.find_spec("lightning") is not None),
] if ok]
ALL = ["fsdp2", "ddp", "accelerate", "lightning"]
LAUNCH_TIMEOUT_S = {"ref": 300, "kill": 480}  # a shared 2-core machine; every start imports torch

needs_dist = pytest.mark.skipif(
    not torch.distributed.is_available() or not sys.platform.startswith("linux"),
    reason="needs torch.distributed with gloo and a loopback interface named lo",
)


# ---------------------------------------------------------------------- single process
class App:
    """Model and optimizer through DCP's get_state_dict/set_state_dict (a plain module: no process group)."""

    def __init__(self, model, opt, flatten=False):
        self.model, self.opt = model, opt
        self.options = StateDictOptions(flatten_optimizer_state_dict=flatten)

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.opt, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd):
        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=self.options)


def _setup(inner="adam", seed=None, draw=0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    torch.manual_seed(100 + draw)  # what an unseeded DropGrad draws its seed from
    base = (torch.optim.Adam(model.parameters(), lr=0.05) if inner == "adam"
            else torch.optim.SGD(model.parameters(), lr=0.1))
    opt = DropGrad(base, drop_rate=LinearDropRateScheduler(0.1, 0.6, num_steps=10), full_update_drop=0.2,
                   seed=seed)
    return model, opt


def _train(model, opt, start, stop):
    for s in range(start, stop):
        g = torch.Generator().manual_seed(s)
        ((model(torch.randn(6, 4, generator=g)) - torch.randn(6, 2, generator=g)) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _quiet(fn, *args, **kwargs):
    """Run ``fn`` and return DropGrad's warnings (DCP's own 'single process' notes left out)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in seen if "DropGrad" in str(w.message)]


def _count_inner_steps(opt):
    calls = []
    opt.optimizer.register_step_post_hook(lambda *_: calls.append(1))
    return calls


def test_dcp_initialising_step_at_save_moves_nothing(tmp_path):
    # plain SGD has no state, so DCP's get_state_dict steps it on zero gradients at every save
    model, opt = _setup("sgd", seed=3)
    _train(model, opt, 0, 3)
    calls = _count_inner_steps(opt)
    before = (opt.step_count, opt.current_drop_rates(), opt.stats(), opt.last_step_skipped, _flat(model))
    dcp.save({"app": App(model, opt), "dropgrad": DropGradStateful(opt)}, checkpoint_id=str(tmp_path / "c"))
    assert calls == [1]  # DCP did step the optimizer (the check below is not blind) ...
    after = (opt.step_count, opt.current_drop_rates(), opt.stats(), opt.last_step_skipped, _flat(model))
    assert before[:4] == after[:4] and before[0] == 3  # ... and DropGrad's clock, schedule, stats stayed
    assert torch.equal(before[4], after[4])


@pytest.mark.parametrize("order", ["optimizer_first", "dropgrad_first"])
@pytest.mark.parametrize("flatten", [False, True])
def test_stateful_resume_equals_uninterrupted(tmp_path, order, flatten):
    full_model, full_opt = _setup()
    _train(full_model, full_opt, 0, 8)
    model, opt = _setup()
    _train(model, opt, 0, 4)
    ckpt = str(tmp_path / "c")
    dcp.save({"app": App(model, opt, flatten), "dropgrad": DropGradStateful(opt)}, checkpoint_id=ckpt)

    model2, opt2 = _setup(draw=1)  # fresh: Adam has no state, DCP's load steps it once on zero gradients
    assert opt2.seed != opt.seed
    calls = _count_inner_steps(opt2)
    entries = [("app", App(model2, opt2, flatten)), ("dropgrad", DropGradStateful(opt2))]
    state = dict(entries if order == "optimizer_first" else entries[::-1])
    assert _quiet(dcp.load, state, checkpoint_id=ckpt) == []
    assert calls == [1]
    assert opt2.step_count == 4 and opt2.seed == opt.seed and opt2.seed_agreed == opt.seed_agreed
    assert opt2.current_drop_rates() == opt.current_drop_rates()
    assert _quiet(_train, model2, opt2, 4, 8) == []  # silent: nothing was lost
    assert opt2.step_count == 8
    assert torch.equal(_flat(model2), _flat(full_model))


def test_dcp_load_without_stateful_warns_once_at_the_next_step(tmp_path):
    model, opt = _setup(seed=5)
    _train(model, opt, 0, 4)
    ckpt = str(tmp_path / "c")
    dcp.save({"app": App(model, opt)}, checkpoint_id=ckpt)
    model2, opt2 = _setup(seed=5)
    assert _quiet(dcp.load, {"app": App(model2, opt2)}, checkpoint_id=ckpt) == []  # no wrong "starts at 0"
    assert opt2.step_count == 0  # the initialising step did not move it to 1
    lost = _quiet(_train, model2, opt2, 4, 6)
    assert len(lost) == 1 and "DropGradStateful(opt)" in lost[0] and "step count 0" in lost[0], lost
    # DropGrad's state loaded after DCP's load of the optimizer, before the next step: silent
    model3, opt3 = _setup(seed=5)
    dcp.load({"app": App(model3, opt3)}, checkpoint_id=ckpt)
    opt3.load_dropgrad_state(opt.dropgrad_state())
    assert _quiet(_train, model3, opt3, 4, 5) == []
    # a plain (non-DCP) load of a bare optimizer's state keeps its immediate warning
    with pytest.warns(UserWarning, match="no DropGrad state"):
        opt2.load_state_dict(opt2.optimizer.state_dict())


def test_stateful_value_is_plain_and_carries_a_full_range_seed(tmp_path):
    model, opt = _setup(seed=2**64 - 1)
    _train(model, opt, 0, 3)
    path = tmp_path / "state.pt"
    torch.save(DropGradStateful(opt).state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded["dropgrad_state"], tuple)  # a terminal value for DCP's planner
    _, opt2 = _setup(seed=1)
    with pytest.warns(UserWarning, match="seed"):  # the constructor's seed is replaced, as documented
        DropGradStateful(opt2).load_state_dict(loaded)
    assert opt2.seed == 2**64 - 1 and opt2.step_count == 3 and opt2.dropgrad_state() == opt.dropgrad_state()


def test_stateful_refuses_bad_input():
    model, opt = _setup(seed=0)
    with pytest.raises(TypeError, match="DropGradStateful needs the DropGrad optimizer"):
        DropGradStateful(opt.optimizer)
    stateful = DropGradStateful(opt)
    with pytest.raises(TypeError, match="expects \\{'dropgrad_state': \\(state,\\)\\}"):
        stateful.load_state_dict({"state": 1})
    with pytest.raises(TypeError, match="must be a 1-tuple"):
        stateful.load_state_dict({"dropgrad_state": opt.dropgrad_state()})
    bad = {**opt.dropgrad_state(), "step": -1}
    with pytest.raises(ValueError, match="step"):
        stateful.load_state_dict({"dropgrad_state": (bad,)})
    assert opt.step_count == 0  # a rejected state changes nothing


# ---------------------------------------------------------------------- multi-process
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, outdir: Path) -> dict[str, object]:
    """Run every scenario under torchrun (``kill``: one restart per scenario); returns timing and the log."""
    restarts = len(SCENARIOS) if mode == "kill" else 0
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--max-restarts={restarts}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", f"--rdzv-id=dropgrad-{mode}",
           str(WORKER), mode, str(outdir), ",".join(SCENARIOS)]
    log_path = outdir / f"{mode}.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT_S[mode])
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the agent and its workers: nothing is left behind
                proc.wait(timeout=30)
    return {"rc": proc.returncode, "seconds": time.monotonic() - start, "log": log_path.read_text()[-3000:]}


def _outcome(outdir: Path, name: str, mode: str, launch: dict) -> dict:
    results = []
    for r in range(2):
        path = outdir / name / f"{mode}-rank{r}.json"
        results.append(json.loads(path.read_text())["result"] if path.exists() else None)
    if results != ["ok", "ok"]:
        why = [f"rank {r}: {res}" for r, res in enumerate(results) if res != "ok"]
        pytest.fail(f"{name} ({mode}) did not finish on both ranks (launch rc {launch['rc']}, "
                    f"{launch['seconds']:.0f} s):\n" + "\n".join(why) + f"\nlog tail:\n{launch['log']}")
    return torch.load(outdir / name / f"{mode}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("elastic")
    ref = _launch("ref", outdir)
    kill = _launch("kill", outdir)
    return outdir, ref, kill


def _params():
    return [name if name in SCENARIOS else pytest.param(name, marks=pytest.mark.skip(reason=f"{name} unavailable"))
            for name in ALL]


@needs_dist
@pytest.mark.parametrize("name", _params())
def test_killed_and_restarted_run_equals_uninterrupted_bitwise(runs, name):
    outdir, ref_launch, kill_launch = runs
    ref = _outcome(outdir, name, "ref", ref_launch)
    resumed = _outcome(outdir, name, "kill", kill_launch)
    assert (outdir / name / "killed").read_text() == "attempt " + str(SCENARIOS.index(name)) + "\n"
    assert int(resumed["attempt"]) == SCENARIOS.index(name) + 1  # finished in the restarted attempt ...
    assert resumed["resumed_from"] in (10, "step=10.ckpt")  # ... from the step-10 checkpoint
    assert ref["step_count"] == resumed["step_count"] == 20
    if "seed" in ref:
        assert resumed["seed"] == ref["seed"]  # the agreed (unseeded) seed survived
    assert torch.equal(ref["params"].view(torch.int32), resumed["params"].view(torch.int32)), (
        f"max diff {(ref['params'] - resumed['params']).abs().max():.3e}")


@needs_dist
@pytest.mark.skipif("fsdp2" not in SCENARIOS, reason="FSDP2 runs on CPU from torch 2.6")
def test_fsdp2_resume_without_stateful_differs_and_warns(runs):
    outdir, ref_launch, _ = runs
    ref = _outcome(outdir, "fsdp2", "ref", ref_launch)  # each rank asserted its one warning
    assert ref["without_stateful_step_count"] == 10  # started again from 0: the clock was lost
    assert not torch.equal(ref["without_stateful"], ref["params"])  # the bitwise comparison is not blind


@needs_dist
@pytest.mark.skipif("fsdp2" not in SCENARIOS, reason="FSDP2 runs on CPU from torch 2.6")
def test_fsdp2_checkpoint_reshards_to_one_process(runs):
    outdir, ref_launch, _ = runs
    ref = _outcome(outdir, "fsdp2", "ref", ref_launch)
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _elastic_worker as w
    finally:
        sys.path.remove(str(WORKER.parent))
    model = w.make_model()  # plain module, no process group: the 2-rank FSDP2 shards load whole
    opt = w.make_opt(model)
    state = {"app": w.AppState(model, opt), "dropgrad": DropGradStateful(opt)}
    assert _quiet(dcp.load, state, checkpoint_id=str(outdir / "fsdp2" / "ckpt-ref" / "step10")) == []
    assert opt.step_count == 10 and opt.seed == ref["seed"]
    for s in range(10, w.STEPS):
        w.loss_of(model, *w.batch(s)).backward()  # the global batch in one process
        opt.step()
        opt.zero_grad()
    got = _flat(model)
    # the 2-rank gradient is the mean of two half-batch means (reduce-scatter): float rounding only
    # (measured: 6.0e-8 after 10 steps)
    diff = (got - ref["params"]).abs().max().item()
    assert torch.allclose(got, ref["params"], rtol=0, atol=1e-6), f"max diff {diff:.3e}"
    assert not torch.equal(got, ref["without_stateful"])
