"""Distributed DropGrad on GPUs: DDP, the masked all-reduce hook, FSDP2 and seed agreement vs a single process.

Launches its own processes (fresh interpreters, 127.0.0.1 only) and checks,
each against a single-process run computed in the same processes on the same
device (bitwise where the arithmetic is the same, else to float rounding, with
the largest difference reported):

- ``set_device``: every rank calls ``torch.cuda.set_device`` and works on its
  own device (distinct devices under NCCL), a device all-reduce adds up;
- ``seed_agreement``: unseeded DropGrad (a different drawn seed per rank,
  ``full_update_drop``) adopts rank 0's seed at the first step; DDP replicas
  bitwise identical and equal to a single process with rank 0's seed;
- ``ddp_dropgrad``: DDP + ``DropGrad(Adam)`` with per-parameter rates vs a
  single process (and a negative control: the undropped run ends elsewhere);
- ``ddp_hook``: DDP + ``masked_allreduce_hook`` vs DDP's default all-reduce +
  ``DropGrad.step`` (bitwise up to 2 ranks), one and many buckets and
  ``gradient_as_bucket_view``, and the bytes it sent;
- ``ddp_hook_device_path``: on CPU, the same with the NumPy compaction turned
  off, so the device path CUDA buckets take runs here too (on CUDA ``ddp_hook``
  is that path already);
- ``hook_nonfinite``: a hand-made bucket with an inf in a dropped element on
  one rank: that parameter's dropped elements are NaN, the other's are 0, the
  kept elements are the sums (on CPU through both the NumPy and the device path);
- ``hook_host_syncs`` (CUDA only): host syncs counted with
  ``torch.cuda.set_sync_debug_mode("warn")`` in backward with the hook and
  without, at most one more per masked bucket; counter checked for blindness;
- ``fsdp2_dropgrad``: ``fully_shard`` + unseeded ``DropGrad(Adam)`` (agreement
  through DTensor gradients) vs a single process with the agreed seed.

Backends: with several GPUs, NCCL with one process per GPU. With one GPU, NCCL
refuses two ranks on it ("Duplicate GPU detected"), so the checks run with
2 processes on cuda:0 over gloo (gloo moves the CUDA tensors through the host),
then once more as a single NCCL process (the hook's futures and collectives on
NCCL; the cross-rank checks need 2 ranks and are skipped there). ``--device cpu``
runs everything on CPU with gloo and small sizes (the test suite does this).

Prints a summary table, writes a JSON report, exits non-zero on any failure.

Run: python benchmarks/gpu_distributed_checks.py [--device cuda|cpu] [--json PATH] [--nproc N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

CHECKS = ["set_device", "seed_agreement", "ddp_dropgrad", "ddp_hook", "ddp_hook_device_path", "hook_nonfinite",
          "hook_host_syncs", "fsdp2_dropgrad"]  # FSDP2 last: the likeliest to be unsupported (gloo + CUDA)
STEPS = 4
# Adam's default eps=1e-8 turns a rounding difference in a gradient that cancels to ~1e-8
# into a visible step difference; a w x w layer on CUDA has millions of gradients, some that
# small, and more than 2 ranks add in another order than one process. eps=1e-4 bounds that
# amplification below the comparison's tolerance (2 ranks: bitwise either way).
ADAM = {"lr": 0.05, "eps": 1e-4}


class Skip(Exception):  # noqa: N818 - a check that does not apply here
    """Raised by a check that does not apply to this backend or device."""


# ---------------------------------------------------------------------- one rank
class Rank:
    """What a check needs: rank, world, backend and this rank's device."""

    def __init__(self, rank: int, world: int, backend: str, device: str, width: int) -> None:
        self.rank, self.world, self.backend, self.device, self.width = rank, world, backend, device, width
        self.cuda = device.startswith("cuda")


def _torch():
    import torch  # noqa: PLC0415 - imported where needed: the launcher only counts GPUs

    return torch


def make_model(r: Rank, width: int | None = None):
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(0)
    w = width or r.width
    # a w x w layer for bucket-sized gradients; 7 and 3 rows: FSDP2 shards them unevenly
    return nn.Sequential(nn.Linear(5, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 7), nn.Tanh(),
                         nn.Linear(7, 3)).to(r.device)


def data(r: Rank, steps: int):
    torch = _torch()
    g = torch.Generator().manual_seed(123)
    batch = 4 * r.world
    return torch.randn(steps, batch, 5, generator=g).to(r.device), torch.randn(steps, batch, 3, generator=g).to(r.device)


def chunk(r: Rank, t, rank: int):
    n = t.shape[0] // r.world
    return t[rank * n : (rank + 1) * n]


def flat(params):
    torch = _torch()
    return torch.cat([p.detach().reshape(-1) for p in params])


def bits(t):
    torch = _torch()
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def gather(r: Rank, t) -> list:
    torch = _torch()
    import torch.distributed as dist  # noqa: PLC0415

    out = [torch.empty_like(t) for _ in range(r.world)]
    dist.all_gather(out, t.contiguous())
    return out


def replicas_identical(r: Rank, t, what: str) -> None:
    torch = _torch()
    for other_rank, other in enumerate(gather(r, t)):
        if not torch.equal(bits(other), bits(t)):
            raise AssertionError(f"{what}: rank {other_rank} differs from rank {r.rank} "
                                 f"(max diff {(other - t).abs().max():.3e})")


def compare(a, b, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> tuple[float, bool]:
    """(max abs diff, bitwise equal); raises unless equal to float rounding."""
    torch = _torch()
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: max diff {diff:.3e} (rtol {rtol}, atol {atol})")
    return diff, bool(torch.equal(bits(a), bits(b)))


def rates_fn(model):
    named = dict(model.named_parameters())
    prefix = "module." if any(n.startswith("module.") for n in named) else ""
    return {named[prefix + "6.bias"]: 0.0, named[prefix + "0.weight"]: 0.9}  # a rate-0 parameter, a high one


def adam_dropgrad(seed=7, **kw):
    def build(model):
        torch = _torch()
        from dropgrad import DropGrad  # noqa: PLC0415

        return DropGrad(torch.optim.Adam(model.parameters(), **ADAM), drop_rate=0.5, params=rates_fn(model),
                        seed=seed, **kw)

    return build


def reference_run(r: Rank, opt_fn, width: int | None = None):
    """One process, the same global batch: the mean of the per-rank losses, as DDP averages gradients."""
    model = make_model(r, width)
    opt = opt_fn(model)
    x, y = data(r, STEPS)
    for s in range(STEPS):
        total = 0
        for k in range(r.world):
            total = total + ((model(chunk(r, x[s], k)) - chunk(r, y[s], k)) ** 2).mean()
        (total / r.world).backward()
        opt.step()
        opt.zero_grad()
    return flat(model.parameters())


def ddp(r: Rank, module, **kw):
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    if r.cuda:
        kw.setdefault("device_ids", [_torch().cuda.current_device()])
    return DDP(module, **kw)


def ddp_run(r: Rank, opt_fn, hook: bool = False, width: int | None = None, **ddp_kw):
    from dropgrad.distributed import register_masked_allreduce_hook  # noqa: PLC0415

    model = ddp(r, make_model(r, width), **ddp_kw)
    opt = opt_fn(model)
    state = register_masked_allreduce_hook(model, opt) if hook else None
    x, y = data(r, STEPS)
    for s in range(STEPS):
        ((model(chunk(r, x[s], r.rank)) - chunk(r, y[s], r.rank)) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, state


# ---------------------------------------------------------------------- checks
def check_set_device(r: Rank) -> dict:
    torch = _torch()
    import torch.distributed as dist  # noqa: PLC0415

    if not r.cuda:
        raise Skip("CPU run: no CUDA device to set")
    want = torch.device(r.device).index
    if torch.cuda.current_device() != want:
        raise AssertionError(f"rank {r.rank}: current device {torch.cuda.current_device()}, expected {want}")
    if make_model(r)[0].weight.device != torch.device(r.device):
        raise AssertionError(f"rank {r.rank}: model landed on {make_model(r)[0].weight.device}, expected {r.device}")
    devices = [None] * r.world
    dist.all_gather_object(devices, (r.rank, torch.cuda.current_device(), torch.cuda.get_device_name()))
    if r.backend == "nccl" and len({d[1] for d in devices}) != r.world:
        raise AssertionError(f"NCCL ranks share a device: {devices}")
    t = torch.full((3,), float(r.rank + 1), device=r.device)
    dist.all_reduce(t)
    want_sum = r.world * (r.world + 1) / 2
    if not torch.equal(t.cpu(), torch.full((3,), want_sum)):
        raise AssertionError(f"device all-reduce gave {t.tolist()}, expected {want_sum}")
    return {"detail": "; ".join(f"rank {rk} -> cuda:{i} ({name})" for rk, i, name in devices)}


def check_seed_agreement(r: Rank) -> dict:
    torch = _torch()
    from dropgrad import DropGrad  # noqa: PLC0415

    if r.world == 1:
        raise Skip("one rank: nothing to agree with")

    def unseeded(model):
        torch.manual_seed(1000 + r.rank)  # a different drawn seed on every rank
        return DropGrad(torch.optim.Adam(model.parameters(), **ADAM), drop_rate=0.5, params=rates_fn(model),
                        full_update_drop=0.3)

    model, opt, _ = ddp_run(r, unseeded)
    if not opt.seed_agreed:
        raise AssertionError("seed not marked agreed after the first step")
    seeds = gather(r, torch.tensor([opt.seed], device=r.device))
    if len({int(s) for s in seeds}) != 1:
        raise AssertionError(f"seeds differ after agreement: {[int(s) for s in seeds]}")
    torch.manual_seed(1000)  # rank 0's draw, in this process
    ref_seed = DropGrad(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), drop_rate=0.5).seed
    if opt.seed != ref_seed:
        raise AssertionError(f"agreed seed {opt.seed} is not rank 0's {ref_seed}")
    got = flat(model.parameters())
    replicas_identical(r, got, "unseeded DDP params")
    diff, bitwise = compare(got, reference_run(r, adam_dropgrad(seed=ref_seed, full_update_drop=0.3)),
                            "unseeded DDP vs single process with rank 0's seed")
    return {"max_diff": diff, "bitwise": bitwise, "detail": f"agreed on rank 0's seed {ref_seed}"}


def check_ddp_dropgrad(r: Rank) -> dict:
    torch = _torch()
    _, opt, _ = ddp_run(r, adam_dropgrad())
    got = flat(opt.optimizer.param_groups[0]["params"])
    replicas_identical(r, got, "DDP params")
    diff, bitwise = compare(got, reference_run(r, adam_dropgrad()), "DDP vs single process")
    undropped = reference_run(r, lambda m: torch.optim.Adam(m.parameters(), **ADAM))
    if torch.allclose(got, undropped, rtol=1e-3, atol=1e-4):
        raise AssertionError("DropGrad gave the parameters of no dropout: the comparison is blind")
    return {"max_diff": diff, "bitwise": bitwise}


def _hook_vs_default(r: Rank) -> dict:
    torch = _torch()
    small = 0.05 if not r.cuda else 1.0  # MB: several buckets
    variants = [{}, {"bucket_cap_mb": small}, {"gradient_as_bucket_view": True}]
    worst, all_bitwise, ratios = 0.0, True, []
    for kw in variants:
        ref_model, _, _ = ddp_run(r, adam_dropgrad(), **kw)
        model, _, state = ddp_run(r, adam_dropgrad(), hook=True, **kw)
        got, want = flat(model.parameters()), flat(ref_model.parameters())
        replicas_identical(r, got, f"hook params ({kw})")
        bitwise = bool(torch.equal(bits(got), bits(want)))
        if r.world <= 2 and not bitwise:  # one addition per element: the same bits
            raise AssertionError(f"hook vs default all-reduce ({kw}): not bitwise equal, "
                                 f"max diff {(got - want).abs().max():.3e}")
        diff, _ = compare(got, want, f"hook vs default all-reduce ({kw})")
        worst, all_bitwise = max(worst, diff), all_bitwise and bitwise
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        kept = sum(sizes.values()) - 0.9 * sizes["module.0.weight"] - 0.5 * (
            sum(sizes.values()) - sizes["module.0.weight"] - sizes["module.6.bias"])
        expected = kept / sum(sizes.values())
        ratio = state.bytes_sent / state.bytes_dense
        if abs(ratio - expected) > 0.03:
            raise AssertionError(f"hook sent {ratio:.3f} of the bytes, expected ~{expected:.3f} ({kw})")
        ratios.append(ratio)
    diff, _ = compare(got, reference_run(r, adam_dropgrad()), "hook vs single process")
    return {"max_diff": max(worst, diff), "bitwise": all_bitwise,
            "detail": f"bytes sent / dense {min(ratios):.3f}-{max(ratios):.3f}; {len(variants)} bucket layouts"}


def check_ddp_hook(r: Rank) -> dict:
    return _hook_vs_default(r)


def check_ddp_hook_device_path(r: Rank) -> dict:
    from dropgrad import distributed as dgd  # noqa: PLC0415

    if r.cuda:
        raise Skip("CUDA buckets take the device path: ddp_hook checked it")
    dgd._NUMPY_ON_CPU = False
    try:
        return _hook_vs_default(r)
    finally:
        dgd._NUMPY_ON_CPU = True


class _Bucket:
    def __init__(self, buffer, params) -> None:
        self._buffer, self._params = buffer, params

    def buffer(self):
        return self._buffer

    def parameters(self):
        return self._params


def check_hook_nonfinite(r: Rank) -> dict:
    from dropgrad import distributed as dgd  # noqa: PLC0415

    if r.cuda:
        return _hook_nonfinite(r)
    result = _hook_nonfinite(r)  # the NumPy path
    dgd._NUMPY_ON_CPU = False  # and the device path, on CPU
    try:
        device_path = _hook_nonfinite(r)
    finally:
        dgd._NUMPY_ON_CPU = True
    return {**result, "bitwise": result["bitwise"] and device_path["bitwise"],
            "max_diff": max(result["max_diff"], device_path["max_diff"]),
            "detail": result["detail"] + "; NumPy and device paths"}


def _hook_nonfinite(r: Rank) -> dict:
    torch = _torch()
    from dropgrad import DropGrad, masks  # noqa: PLC0415
    from dropgrad import distributed as dgd  # noqa: PLC0415

    model = make_model(r)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=3)
    params = [model[0].weight, model[2].weight]  # both at rate 0.5; the inf goes into the first
    index = {id(p): i for i, p, _ in opt.drop_plan()}
    keeps = [masks.keep_mask(p.numel(), masks.derive_key(opt.seed, opt.step_count, index[id(p)]),
                             masks.keep_threshold(0.5), device=r.device) for p in params]
    keep = torch.cat(keeps)
    n0 = params[0].numel()
    dropped_in_first = int((~keeps[0]).nonzero()[0])
    grads = [torch.randn(keep.numel(), generator=torch.Generator().manual_seed(20 + k)).to(r.device)
             for k in range(r.world)]
    mine = grads[r.rank].clone()
    if r.rank == r.world - 1:
        mine[dropped_in_first] = float("inf")
    out = dgd.masked_allreduce_hook(dgd.MaskedAllreduceState(opt), _Bucket(mine, params)).wait()
    want = torch.zeros_like(out)
    for g in grads:  # what each rank hands over, summed in rank order
        want += g / r.world
    want = torch.where(keep, want, torch.zeros_like(want))
    want[:n0] = torch.where(keeps[0], want[:n0], torch.full_like(want[:n0], float("nan")))
    if not torch.equal(out.isnan(), want.isnan()):
        raise AssertionError(f"NaN pattern differs: {int(out.isnan().sum())} NaN, expected {int(want.isnan().sum())}")
    finite = ~want.isnan()
    if bool((out[n0:][~keeps[1]] != 0).any()):
        raise AssertionError("the unflagged parameter's dropped elements are not 0")
    diff, bitwise = compare(out[finite], want[finite], "kept sums")
    if r.world <= 2 and not bitwise:
        raise AssertionError(f"kept sums not bitwise equal (max diff {diff:.3e})")
    return {"max_diff": diff, "bitwise": bitwise,
            "detail": f"{int(out.isnan().sum())} NaN (the flagged parameter's dropped elements)"}


def _count_syncs(fn) -> int:
    torch = _torch()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def check_hook_host_syncs(r: Rank) -> dict:
    torch = _torch()
    from dropgrad import distributed as dgd  # noqa: PLC0415

    if not r.cuda:
        raise Skip("no CUDA: nothing to count")
    x, y = data(r, 1)
    xb, yb = chunk(r, x[0], r.rank), chunk(r, y[0], r.rank)
    counts, buckets = {}, {"n": 0}

    def counting_hook(state, bucket):  # noqa: ANN001, ANN202 - annotations would be compared by DDP
        buckets["n"] += 1
        return dgd.masked_allreduce_hook(state, bucket)

    for name in ("default", "hook", "control"):
        model = ddp(r, make_model(r), bucket_cap_mb=1.0)
        opt = adam_dropgrad()(model)
        if name == "hook":
            model.register_comm_hook(dgd.MaskedAllreduceState(opt), counting_hook)

        def backward(model=model, name=name):
            out = model(xb)
            if name == "control":  # a deliberate sync inside backward: the counter must see it
                out.register_hook(lambda g: g * float(g.sum() * 0 + 1))
            ((out - yb) ** 2).mean().backward()

        for _ in range(2):  # warm-up: DDP rebuilds its buckets after the first iteration; Triton compiles
            backward()
            opt.step()
            opt.zero_grad()
        buckets["n"] = 0
        counts[name] = _count_syncs(backward)
        if name == "hook":  # the control pass below resets the counter: keep the hook pass's count
            hook_buckets = buckets["n"]
        counts[name + "_step"] = _count_syncs(opt.step)
        opt.zero_grad()
    if counts["control"] <= counts["default"] or _count_syncs(lambda: int(torch.zeros(1, device=r.device))) < 1:
        raise AssertionError(f"the sync counter is blind in backward: {counts}")
    extra = counts["hook"] - counts["default"]
    if hook_buckets == 0 or extra > hook_buckets:
        raise AssertionError(f"{extra} extra host syncs in backward for {hook_buckets} masked buckets: {counts}")
    return {"detail": f"backward: {counts['hook']} syncs with the hook ({hook_buckets} buckets), "
                      f"{counts['default']} without; step: {counts['hook_step']} / {counts['default_step']}",
            "syncs": counts, "buckets": hook_buckets}


def check_fsdp2_dropgrad(r: Rank) -> dict:
    torch = _torch()
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    from dropgrad import DropGrad  # noqa: PLC0415

    try:
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard  # noqa: PLC0415
    mesh = init_device_mesh("cuda" if r.cuda else "cpu", (r.world,))
    model = make_model(r)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(1000 + r.rank)  # unseeded: agreement through the DTensor path
    opt = DropGrad(torch.optim.Adam(model.parameters(), **ADAM), drop_rate=0.5, params=rates_fn(model))
    x, y = data(r, STEPS)
    for s in range(STEPS):
        ((model(chunk(r, x[s], r.rank)) - chunk(r, y[s], r.rank)) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    full = flat([p.full_tensor() for p in model.parameters()])
    replicas_identical(r, full, "FSDP2 gathered params")
    diff, bitwise = compare(full, reference_run(r, adam_dropgrad(seed=opt.seed)), "FSDP2 vs single process")
    return {"max_diff": diff, "bitwise": bitwise}


def worker(args: argparse.Namespace) -> None:
    torch = _torch()
    import torch.distributed as dist  # noqa: PLC0415

    torch.set_num_threads(1)
    r = Rank(args._rank, args._world, args._backend, args._devices.split(",")[args._rank], args._width)
    if r.cuda:
        torch.cuda.set_device(torch.device(r.device))
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    kw = {"device_id": torch.device(r.device)} if r.backend == "nccl" else {}
    dist.init_process_group(r.backend, init_method=f"tcp://127.0.0.1:{args._port}", rank=r.rank,
                            world_size=r.world, timeout=datetime.timedelta(seconds=args.pg_timeout), **kw)
    if r.rank == 0:  # the parent imports no torch: rank 0 describes the machine
        (Path(args._outdir) / "machine.json").write_text(json.dumps(machine_info(r)))
    results = []
    path = Path(args._outdir) / f"rank{r.rank}.json"
    names = args.checks.split(",")
    for name in names:
        t0 = time.perf_counter()
        entry = {"check": name, "device": r.device}
        try:
            entry.update(globals()[f"check_{name}"](r))
            entry["status"] = "ok"
        except Skip as exc:
            entry.update(status="skipped", detail=str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded, the parent reports it
            entry.update(status="failed", detail=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(entry)
        path.write_text(json.dumps(results))
        # every rank learns every rank's outcome: a failure on one rank ends the run on all
        # (the next check's collectives would not match); a hang ends at the process-group timeout
        outcomes = [None] * r.world
        dist.all_gather_object(outcomes, entry["status"])
        if "failed" in outcomes and set(outcomes) != {"failed"}:
            break  # failed on some ranks only: the others may be a collective behind
        # failed on every rank (a symmetric assertion): the collectives still match, go on
    dist.destroy_process_group()
    # no interpreter teardown: torch 2.13's DDP keeps gloo's worker threads alive past
    # destroy_process_group, and one still releasing a collective's Python tensors while
    # Python finalizes aborts the process (see examples/ddp_example.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------- the launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phases_for(device: str, nproc: int | None) -> list[dict]:
    """The (backend, devices) combinations to run: see the module docstring."""
    if device == "cpu":
        world = nproc or 2
        return [{"backend": "gloo", "devices": ["cpu"] * world}]
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    n = torch.cuda.device_count()
    if n == 0:
        raise SystemExit("--device cuda: no CUDA device visible (use --device cpu for the CPU run)")
    nccl = dist.is_nccl_available()
    if n >= 2:
        world = min(nproc or n, n)
        return [{"backend": "nccl" if nccl else "gloo", "devices": [f"cuda:{i}" for i in range(world)]}]
    phases = [{"backend": "gloo", "devices": ["cuda:0"] * (nproc or 2),
               "why": "one GPU: NCCL refuses two ranks on one device, so gloo carries the CUDA tensors"}]
    if nccl:
        phases.append({"backend": "nccl", "devices": ["cuda:0"], "why": "one GPU: the NCCL paths on a single rank"})
    return phases


def run_phase(phase: dict, args: argparse.Namespace, outdir: Path) -> list[dict]:
    world = len(phase["devices"])
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    port = _free_port()
    width = args.width or (2048 if phase["devices"][0].startswith("cuda") else 64)
    cmd = [sys.executable, os.path.abspath(__file__), "--pg-timeout", str(args.pg_timeout), "--checks", args.checks,
           "--_world", str(world), "--_port", str(port), "--_backend", phase["backend"],
           "--_devices", ",".join(phase["devices"]), "--_outdir", str(outdir), "--_width", str(width)]
    deadline, timed_out = time.monotonic() + args.timeout, False
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(outdir / f"rank{r}.log", "w")) for r in range(world)]
        procs = [subprocess.Popen([*cmd, "--_rank", str(r)], stdout=logs[r], stderr=subprocess.STDOUT, env=env)
                 for r in range(world)]
        try:
            while any(p.poll() is None for p in procs):
                if any(p.returncode not in (None, 0) for p in procs):
                    time.sleep(2)  # let the others write their results, then end them
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait(timeout=30)
    per_rank = []
    for r in range(world):
        path = outdir / f"rank{r}.json"
        per_rank.append({e["check"]: e for e in json.loads(path.read_text())} if path.exists() else {})
    rows = []
    for name in args.checks.split(","):
        entries = [res.get(name) for res in per_rank]
        row = {"check": name, "backend": phase["backend"], "world": world, "devices": phase["devices"],
               "phase": f"{phase['backend']} x{world} on {','.join(sorted(set(phase['devices'])))}"}
        if any(e is None for e in entries):
            if all(e is None for e in entries) and any(r and "failed" in [e["status"] for e in r.values()]
                                                       for r in per_rank):
                row.update(status="not run", detail="an earlier check failed")
            else:
                codes = [p.returncode for p in procs]
                tails = " | ".join(f"rank {r}: " + (outdir / f"rank{r}.log").read_text()[-600:].replace("\n", " ")
                                   for r in range(world))
                row.update(status="failed", detail=f"not finished on every rank ({'timed out' if timed_out else 'a rank died'}"
                                                   f", exit codes {codes}): {tails}")
            rows.append(row)
            continue
        statuses = {e["status"] for e in entries}
        status = "failed" if "failed" in statuses else ("skipped" if statuses == {"skipped"} else "ok")
        if statuses == {"ok", "skipped"}:
            status = "failed"  # a check that ran on some ranks only
        failing = [f"rank {k}: {e['detail']}" for k, e in enumerate(entries) if e["status"] == "failed"]
        row.update(status=status, seconds=max(e["seconds"] for e in entries),
                   detail="; ".join(failing) if failing else entries[0].get("detail", ""))
        if any("max_diff" in e for e in entries):
            row["max_diff"] = max(e.get("max_diff", 0.0) for e in entries)
            row["bitwise"] = all(e.get("bitwise", False) for e in entries)
        for key in ("syncs", "buckets"):
            if key in entries[0]:
                row[key] = [e.get(key) for e in entries]
        tracebacks = [e["traceback"] for e in entries if "traceback" in e]
        if tracebacks:
            row["traceback"] = tracebacks[0]
        rows.append(row)
    return rows


def exit_code(rows: list[dict], expected: list[str]) -> int:
    """0 when every expected check reported ``ok`` or ``skipped`` in every phase, else 1 (nothing run: 1)."""
    if not rows or not expected:
        return 1
    reported = {row["check"] for row in rows}
    if set(expected) - reported:
        return 1
    return 0 if all(row["status"] in ("ok", "skipped") for row in rows) else 1


def machine_info(r: Rank) -> dict:
    torch = _torch()
    info = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "host": platform.machine(),
            "cpus": os.cpu_count()}
    if r.cuda:
        info.update(cuda=torch.version.cuda, gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:  # noqa: BLE001 - informational
            info["nccl"] = f"unknown ({exc})"
    try:
        import dropgrad  # noqa: PLC0415

        info["dropgrad"] = dropgrad.__version__
    except Exception as exc:  # noqa: BLE001 - informational
        info["dropgrad"] = f"not importable ({exc})"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--json", default="gpu_distributed_checks.json", help="where to write the report")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes (default: one per GPU with several GPUs, else 2)")
    parser.add_argument("--width", type=int, default=None, help="hidden width (default 2048 on CUDA, 64 on CPU)")
    parser.add_argument("--timeout", type=float, default=200.0, help="seconds per phase before its processes are killed")
    parser.add_argument("--pg-timeout", type=float, default=60.0, help="process-group timeout in seconds")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of " + ",".join(CHECKS))
    for name, kind in (("_rank", int), ("_world", int), ("_port", int), ("_backend", str), ("_devices", str),
                       ("_outdir", str), ("_width", int)):
        parser.add_argument(f"--{name}", type=kind, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.checks.split(",")) - set(CHECKS)
    if unknown:
        parser.error(f"--checks: unknown {sorted(unknown)}; known: {CHECKS}")
    if args._rank is not None:
        worker(args)
        return
    if args.nproc is not None and args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    t0 = time.monotonic()
    try:
        phases = phases_for(args.device, args.nproc)
    except SystemExit as exc:  # no GPU: say so in the report too
        Path(args.json).write_text(json.dumps({"device": args.device, "ok": False, "error": str(exc), "checks": []}))
        raise
    rows = []
    for phase in phases:
        print(f"# phase: {phase['backend']} with {len(phase['devices'])} process(es) on {phase['devices']}"
              + (f" ({phase['why']})" if "why" in phase else ""), flush=True)
        with tempfile.TemporaryDirectory(prefix="dropgrad-gpu-checks-") as tmp:
            rows += run_phase(phase, args, Path(tmp))
            machine_file = Path(tmp) / "machine.json"
            if machine_file.exists():
                phase["machine"] = json.loads(machine_file.read_text())
    code = exit_code(rows, args.checks.split(","))
    print("\n| phase | check | status | max diff vs reference | bitwise | s | detail |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        diff = f"{row['max_diff']:.2e}" if "max_diff" in row else "-"
        bitwise = {True: "yes", False: "no"}.get(row.get("bitwise"), "-")
        print(f"| {row['phase']} | {row['check']} | {row['status']} | {diff} | {bitwise} | {row.get('seconds', '-')} "
              f"| {row['detail'][:300]} |")
    report = {"device": args.device, "phases": phases, "checks": rows, "ok": code == 0,
              "seconds": round(time.monotonic() - t0, 1)}
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\n{'all checks passed' if code == 0 else 'FAILED'} in {report['seconds']} s; report: {args.json}")
    sys.exit(code)


if __name__ == "__main__":
    main()
