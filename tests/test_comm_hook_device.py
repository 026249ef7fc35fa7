"""The masked all-reduce hook's device path (the one CUDA buckets take) and the GPU check script.

The device path is checked on CPU tensors against the host path and against
plain loops; on a CUDA machine the same checks run on the GPU, and the host
syncs of one bucket are counted with ``torch.cuda.set_sync_debug_mode``.
``benchmarks/gpu_distributed_checks.py`` is run on CPU (gloo, 2 processes)
so that the script the GPU session will run cannot rot.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dropgrad import distributed as dgd

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_distributed_checks.py"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_dist = pytest.mark.skipif(
    not torch.distributed.is_available() or not sys.platform.startswith("linux"),
    reason="needs torch.distributed with gloo and a loopback interface named lo",
)


def _layout(gen: torch.Generator, numel: int):
    """Random entries (offset, length) in a bucket of ``numel``: gaps (rate-0 parameters) and adjacent entries."""
    entries, off = [], 0
    while off < numel:
        n = int(torch.randint(1, 40, (), generator=gen))
        n = min(n, numel - off)
        if bool(torch.rand((), generator=gen) < 0.7):  # else a gap: a parameter that is not masked
            entries.append((None, off, n, len(entries), 0.5))
        off += n
    return entries


def _case(seed: int, device: str, dtype=torch.float32, numel: int = 500):
    gen = torch.Generator().manual_seed(seed)
    entries = _layout(gen, numel)
    buffer = torch.randn(numel, generator=gen).to(dtype)
    keep = torch.rand(numel, generator=gen) < 0.5
    for pos in torch.randint(0, numel, (6,), generator=gen).tolist():  # NaN/inf, kept or dropped
        buffer[pos] = (math.nan, math.inf, -math.inf)[pos % 3]
    return entries, buffer.to(device), keep.to(device)


def _bounds(entries, device):
    starts = torch.tensor([off for _, off, _, _, _ in entries], device=device)
    ends = torch.tensor([off + n for _, off, n, _, _ in entries], device=device)
    return starts, ends


@pytest.mark.parametrize("device", DEVICES)
def test_device_flags_and_nan_fill_equal_a_loop(device):
    flagged_somewhere = unflagged_somewhere = False
    for seed in range(20):
        entries, buffer, keep = _case(seed, device)
        starts, ends = _bounds(entries, device)
        flags = torch.full((len(entries),), 7.0, device=device)  # must be overwritten, zeros included
        dgd._dropped_nonfinite_flags(buffer, keep, starts, ends, out=flags)
        want = [float((~torch.isfinite(buffer[o : o + n]) & ~keep[o : o + n]).any()) for _, o, n, _, _ in entries]
        assert flags.tolist() == want, (seed, flags.tolist(), want)
        flagged_somewhere |= 1.0 in want
        unflagged_somewhere |= 0.0 in want
        # the fill: dropped elements of flagged entries become NaN, nothing else changes
        reduced = torch.tensor(want, device=device) * 2  # as after an all-reduce of 2 ranks
        got = buffer.clone()
        dgd._fill_dropped_with_nan(got, keep, reduced, starts, ends)
        expect = buffer.clone()
        for (_, o, n, _, _), f in zip(entries, want):
            if f:
                expect[o : o + n].masked_fill_(~keep[o : o + n], math.nan)
        assert torch.equal(got.isnan(), expect.isnan()), seed
        same = ~expect.isnan()
        assert torch.equal(got[same], expect[same]), seed
    assert flagged_somewhere and unflagged_somewhere  # the cases exercise both outcomes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_device_compaction_equals_the_host_path(device, dtype, monkeypatch):
    _, buffer, keep = _case(3, "cpu", dtype, numel=4000)
    host = dgd._Compactor(keep, buffer)
    monkeypatch.setattr(dgd, "_NUMPY_ON_CPU", False)
    dev_buffer, dev_keep = buffer.to(device), keep.to(device)
    on_device = dgd._Compactor(dev_keep, dev_buffer)
    assert not on_device.on_host
    assert host.on_host == (dtype != torch.bfloat16)
    assert on_device.count == host.count == int(keep.sum())
    sent_host = torch.empty(host.count, dtype=dtype)
    sent_dev = torch.empty(on_device.count, dtype=dtype, device=device)
    host.gather(buffer, sent_host)
    on_device.gather(dev_buffer, sent_dev)
    assert torch.equal(sent_host.view(torch.uint8), sent_dev.cpu().view(torch.uint8))
    # the same bits scattered on both: arithmetic on each device would differ in its NaNs (CUDA's
    # float32 ops return the canonical NaN 0x7fffffff, the CPU keeps 0x7fc00000), and _case has NaNs
    values = sent_host * 3
    out_host, out_dev = torch.zeros_like(buffer), torch.zeros_like(dev_buffer)
    host.scatter(values, out_host)
    on_device.scatter(values.to(device), out_dev)
    assert torch.equal(out_host.view(torch.uint8), out_dev.cpu().view(torch.uint8))
    assert torch.equal(out_host[~keep], torch.zeros(int((~keep).sum()), dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_device_path_runs_under_deterministic_algorithms(device, monkeypatch):
    """No op of the device path is refused by torch.use_deterministic_algorithms(True)."""
    monkeypatch.setattr(dgd, "_NUMPY_ON_CPU", False)
    entries, buffer, keep = _case(7, device)
    starts, ends = _bounds(entries, device)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        compactor = dgd._Compactor(keep, buffer)
        send = torch.empty(compactor.count + len(entries), device=device)
        compactor.gather(buffer, send[: compactor.count])
        dgd._dropped_nonfinite_flags(buffer, keep, starts, ends, out=send[compactor.count :])
        out = torch.zeros_like(buffer)
        compactor.scatter(send[: compactor.count], out)
        dgd._fill_dropped_with_nan(out, keep, send[compactor.count :], starts, ends)
    finally:
        torch.use_deterministic_algorithms(before)
    kept_same = torch.equal(out[keep].isnan(), buffer[keep].isnan())
    assert kept_same and torch.equal(out[keep].nan_to_num(), buffer[keep].nan_to_num())
    assert bool(send[compactor.count :].any())  # this case has a flagged entry: the fill ran


def test_entry_bounds_are_cached_per_layout():
    state = dgd.MaskedAllreduceState.__new__(dgd.MaskedAllreduceState)  # no process group needed
    state._bounds = {}
    entries = [(None, 0, 6, 0, 0.5), (None, 6, 2, 1, 0.5)]
    like = torch.zeros(8)
    a = state._entry_bounds(entries, like)
    assert a[0].tolist() == [0, 6] and a[1].tolist() == [6, 8]
    assert state._entry_bounds(entries, like) is a  # no second upload
    b = state._entry_bounds(entries[:1], like)
    assert b is not a and b[1].tolist() == [6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA host syncs; no CUDA device here")
def test_cuda_bucket_has_one_host_sync():
    """One bucket's device work (compaction, flags, scatter, NaN fill) syncs the host once: the nonzero."""
    entries, buffer, keep = _case(5, "cuda", numel=100_000)
    starts, ends = _bounds(entries, "cuda")
    torch.cuda.synchronize()

    def count(fn) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    def bucket():
        compactor = dgd._Compactor(keep, buffer)
        send = torch.empty(compactor.count + len(entries), device="cuda")
        compactor.gather(buffer, send[: compactor.count])
        dgd._dropped_nonfinite_flags(buffer, keep, starts, ends, out=send[compactor.count :])
        out = torch.zeros_like(buffer)
        compactor.scatter(send[: compactor.count], out)
        dgd._fill_dropped_with_nan(out, keep, send[compactor.count :], starts, ends)

    assert count(lambda: int(torch.count_nonzero(keep))) >= 1  # negative control: the counter sees syncs
    assert count(bucket) == 1


def _run_script(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "checks.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--json", str(out), "--timeout", "100",
                           *extra], capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    return proc, (json.loads(out.read_text()) if out.exists() else {})


def _import_script():
    """benchmarks/gpu_distributed_checks.py as a module."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_distributed_checks as script
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return script


@needs_dist
def test_gpu_distributed_checks_script_runs_on_cpu(tmp_path):
    proc, report = _run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = {c["check"]: c for c in report["checks"]}
    assert set(checks) >= {"set_device", "seed_agreement", "ddp_dropgrad", "ddp_hook", "ddp_hook_device_path",
                           "hook_nonfinite", "fsdp2_dropgrad", "hook_host_syncs"}
    for name, c in checks.items():
        assert c["status"] in ("ok", "skipped"), (name, c)
        assert c["backend"] == "gloo" and c["world"] == 2, c
    cuda_only = {"set_device", "hook_host_syncs"}
    assert all(checks[n]["status"] == "skipped" for n in cuda_only)  # no CUDA here: nothing to set or count
    assert all(checks[n]["status"] == "ok" for n in checks if n not in cuda_only)
    assert checks["ddp_hook"]["bitwise"] is True and checks["ddp_hook_device_path"]["bitwise"] is True
    assert "| check |" in proc.stdout  # the summary table


def test_gpu_distributed_checks_summary_fails_on_any_failure():
    script = _import_script()
    ok = {"check": "a", "status": "ok", "backend": "gloo", "world": 2, "devices": ["cpu"], "detail": ""}
    skipped = {**ok, "check": "b", "status": "skipped"}
    assert script.exit_code([ok, skipped], expected=["a", "b"]) == 0
    assert script.exit_code([ok, {**ok, "check": "b", "status": "failed"}], expected=["a", "b"]) == 1
    assert script.exit_code([ok], expected=["a", "b"]) == 1  # a check that never reported is a failure
    assert script.exit_code([], expected=[]) == 1  # nothing ran at all


@needs_dist
@pytest.mark.parametrize("extra_syncs_per_bucket", [0, 1, 2])
def test_hook_host_syncs_check_compares_against_the_hook_pass_buckets(tmp_path, monkeypatch, extra_syncs_per_bucket):
    """The CUDA-only sync check's arithmetic, on CPU with a scripted sync counter: it must allow
    one extra sync per masked bucket of the hook's own pass and fail beyond that (it once read the
    bucket count after the control pass had reset it, and failed on every GPU)."""
    import torch.distributed as dist

    script = _import_script()
    from torch.nn.parallel import DistributedDataParallel as DDP

    monkeypatch.setattr(script, "ddp", lambda r, module, **kw: DDP(module, **kw))  # no device_ids on CPU
    seen_buckets = []
    real_hook = dgd.masked_allreduce_hook

    def hook(state, bucket):
        seen_buckets.append(bucket.index())
        return real_hook(state, bucket)

    monkeypatch.setattr(dgd, "masked_allreduce_hook", hook)
    calls = []

    def scripted_count(fn):  # order of calls: default, default_step, hook, hook_step, control, control_step, probe
        n_before = len(seen_buckets)
        fn()
        calls.append(len(seen_buckets) - n_before)
        k = len(calls)
        if k == 3:  # the hook's backward: this many syncs per bucket it masked
            return 5 + extra_syncs_per_bucket * calls[-1]
        return {1: 5, 5: 6, 7: 1}.get(k, 0)

    monkeypatch.setattr(script, "_count_syncs", scripted_count)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        r = script.Rank(0, 1, "gloo", "cpu", 800)
        r.cuda = True  # past the CUDA-only guard; the counter above stands in for set_sync_debug_mode
        if extra_syncs_per_bucket <= 1:
            result = script.check_hook_host_syncs(r)
            assert result["buckets"] == calls[2] >= 2  # the hook pass's own buckets (an 800x800 layer over 1 MB buckets)
            assert result["syncs"]["hook"] - result["syncs"]["default"] == extra_syncs_per_bucket * calls[2]
        else:
            with pytest.raises(AssertionError, match="extra host syncs"):
                script.check_hook_host_syncs(r)
    finally:
        dist.destroy_process_group()
