"""The GPU member of the kernel family: Triton on CUDA against the reference, the CPU and the wrapper.

Two layers:

* ``test_triton_kernel_in_the_interpreter`` runs the Triton kernel's own code on
  CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, in a
  subprocess) and compares it bit for bit with the reference kernel. It needs
  Triton installed, not a GPU.
* The other tests need CUDA (and skip cleanly without it): parity of the Triton
  kernel with the reference kernel running on the same GPU, with the CPU kernels
  (same masks on CPU and GPU), dispatch and fallbacks, the wrapper on a CUDA
  model, ``torch.compile`` and AMP.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from test_kernels import FLOATS, _assert_same_bits, _grad

from dropgrad import DropGrad, masks
from dropgrad.functional import apply_masks_
from dropgrad.kernels import cuda, reference

TWO32 = 1 << 32
HERE = os.path.dirname(os.path.abspath(__file__))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _triton_version() -> tuple[int, ...] | None:
    if importlib.util.find_spec("triton") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(part) for part in version("triton").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return None


# Triton's interpreter runs kernels on CPU tensors from 3.6 on (checked: 3.6.0, 3.9.0); 3.0's
# (the one torch 2.4 pins) does not write CPU tensors back
needs_triton = pytest.mark.skipif(
    (_triton_version() or (0,)) < (3, 6), reason=f"needs Triton >= 3.6 installed (found {_triton_version()})"
)


def _triton_or_skip():
    if not cuda.available():
        pytest.skip(f"Triton kernel unavailable: {cuda.unavailable_reason()}")
    return cuda


def _reference(grads, indices, thresholds, scales, offsets, prefix, stream=0):
    """The reference kernel on copies of ``grads`` (on their device)."""
    out = [g.clone() for g in grads]
    reference.mask_(out, list(indices), thresholds, scales, offsets, prefix, stream)
    return out


# ------------------------------------------------------- interpreter (no GPU)


@needs_triton
def test_triton_kernel_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    res = subprocess.run(
        [sys.executable, os.path.join(HERE, "_triton_interpret_worker.py")],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "checked" in res.stdout, res.stdout


@needs_triton
@pytest.mark.parametrize("dtype", FLOATS)
def test_both_triton_kernels_compile_to_a_gpu_binary_without_a_gpu(dtype):
    # the interpreter runs the kernels' arithmetic in numpy; compiling them for an H100/H200
    # (sm_90, Triton's own ptxas) checks what only the real compiler checks: types, casts and
    # constexpr branches of both the table kernel and the clocked (capturable) one
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dropgrad.kernels import triton_source as ts

    ptr = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    consts = {"OUT_DTYPE": ts._TYPES[dtype], "WIDE": dtype == torch.float64, "CHUNK": ts.CHUNK, "BLOCK": ts.BLOCK}
    scalars = dict.fromkeys(["prefix_lo", "prefix_hi", "stream_lo", "stream_hi", "thr_arg", "bits_lo", "bits_hi"], "i64")
    kernels = {
        "table": (ts._masks_kernel, {"table_ptr": "*i64", "chunks_ptr": "*i64", **scalars, **dict.fromkeys(
            ["OUT_DTYPE", "WIDE", "UNIFORM", "COLS", "CHUNK", "BLOCK"], "constexpr")}, {**consts, "COLS": ts.COLS}),
        "clocked": (ts._clocked_kernel, {"x_ptr": ptr, "clock_ptr": "*i64", **dict.fromkeys(
            ["numel_arg", "index_lo", "index_hi", "stream_lo", "stream_hi", "off_lo", "off_hi", "thr_arg", "bits_lo",
             "bits_hi"], "i64"), **dict.fromkeys(["OUT_DTYPE", "WIDE", "CHUNK", "BLOCK"], "constexpr")}, consts),
    }
    for name, (fn, signature, constexprs) in kernels.items():
        for uniform in ((False, True) if name == "table" else (None,)):
            extra = {} if uniform is None else {"UNIFORM": uniform}
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs={**constexprs, **extra}),
                                      target=GPUTarget("cuda", 90, 32))
            assert compiled.asm.get("cubin"), f"{name} kernel ({dtype}, uniform={uniform}): no cubin"


# ------------------------------------------------------------ CUDA parity

CHUNK_EDGES = [0, 1, 7, 1023, 1024, 4095, 4096, 4097, 16383, 16384, 16385, 100_003]


def _masked_pair(grads, indices, thr, scales, offsets, prefix, stream=0):
    """The reference kernel and the dispatcher with impl="fused" (Triton for servable CUDA tensors)."""
    ref = _reference(grads, indices, thr, scales, offsets, prefix, stream)
    fast = [g.clone() for g in grads]
    apply_masks_(fast, indices, thr, scales, offsets, prefix=prefix, stream=stream, impl="fused")
    return ref, fast


@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_triton_matches_reference_on_the_gpu(dtype):
    _triton_or_skip()
    prefix = masks.step_prefix(11, 3)
    for p in (0.0, 0.05, 0.5, 0.9, 1.0):
        for rescale in (True, False):
            thr = masks.keep_threshold(p)
            for scale in {masks.survivor_scale(thr, rescale), (0.0 if p == 1 else 1 / (1 - p)) if rescale else 1.0}:
                for off in (0, TWO32 - 20_000, 5 * TWO32 + 3):
                    grads = [_grad(n, dtype, seed=n).cuda() for n in CHUNK_EDGES]
                    n = len(grads)
                    ref, fast = _masked_pair(grads, range(n), [thr] * n, [scale] * n, [off] * n, prefix)
                    for a, b in zip(ref, fast):
                        _assert_same_bits(a, b)
    # per-tensor rates (the table's own columns) and any indices
    grads = [_grad(n, dtype, seed=n).cuda() for n in CHUNK_EDGES]
    n = len(grads)
    thr = [masks.keep_threshold(q) for q in torch.linspace(0, 1, n).tolist()]
    indices = [j * 2**33 + 5 for j in range(n)]
    ref, fast = _masked_pair(grads, indices, thr, [masks.survivor_scale(t) for t in thr], [0] * n, prefix, 3)
    for a, b in zip(ref, fast):
        _assert_same_bits(a, b)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_every_half_bit_pattern(dtype):
    _triton_or_skip()
    g = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).cuda()
    for scale in (1.0, 1 / 0.9, 2.0, 1 / 0.3, 0.0, 1e-5, 3e4):
        ref, fast = _masked_pair([g], [3], [masks.keep_threshold(0.4)], [scale], [0], masks.step_prefix(1, 2))
        _assert_same_bits(ref[0], fast[0])


@needs_cuda
def test_triton_random_float_bit_patterns():
    _triton_or_skip()
    gen = torch.Generator().manual_seed(5)
    for dtype, itype in ((torch.float32, torch.int32), (torch.float64, torch.int64)):
        info = torch.iinfo(itype)
        g = torch.randint(info.min, info.max, (100_000,), dtype=itype, generator=gen).view(dtype).cuda()
        ref, fast = _masked_pair([g], [9], [masks.keep_threshold(0.2)], [1 / 0.8], [0], masks.step_prefix(9, 9))
        _assert_same_bits(ref[0], fast[0])


@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_masks_equal_cpu_masks(dtype):
    # the same counters give the same masks on CPU (C kernel) and GPU (Triton kernel)
    prefix, thr = masks.step_prefix(8, 8), masks.keep_threshold(0.3)
    key = masks.key_from_prefix(prefix, 8)
    for off in (0, TWO32 - 10, 7 * TWO32):
        g = _grad(300_007, dtype)
        cpu, gpu = g.clone(), g.cuda()
        apply_masks_([cpu], [8], [thr], [1 / 0.7], [off], prefix=prefix)
        apply_masks_([gpu], [8], [thr], [1 / 0.7], [off], prefix=prefix)
        a, b = cpu, gpu.cpu()
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a == 0, b == 0)  # the same elements dropped
        a[a.isnan()] = 0  # NaN payloads: each device's own conversion
        b[b.isnan()] = 0
        _assert_same_bits(a, b)
        if dtype == torch.float32:  # and the bare mask, from the reference hash on the GPU
            assert torch.equal(masks.keep_mask(300_007, key, thr, off, "cuda").cpu(), masks.keep_mask(300_007, key, thr, off))


@needs_cuda
def test_dispatch_mixes_devices_and_falls_back(monkeypatch):
    _triton_or_skip()
    calls = []
    real = cuda.mask_
    monkeypatch.setattr(cuda, "mask_", lambda grads, *a: (calls.append(list(grads)), real(grads, *a)))
    base = torch.randn(64, 33, device="cuda")
    grads = [
        torch.randn(1000, device="cuda"),
        torch.randn(1000),  # CPU: the C kernel
        base.t(),  # non-contiguous: the reference kernel, on the device
        torch.randn(10, device="cuda", dtype=torch.complex64),  # complex: reference
        torch.randn(5000, device="cuda", dtype=torch.bfloat16),
    ]
    n = len(grads)
    thr, scales, offs = [masks.keep_threshold(0.5)] * n, [2.0] * n, [0] * n
    prefix = masks.step_prefix(4, 5)
    ref = _reference(grads, range(n), thr, scales, offs, prefix)
    fast = [g.clone() for g in grads]
    apply_masks_(fast, range(n), thr, scales, offs, prefix=prefix)
    assert [[id(g) for g in c] for c in calls] == [[id(fast[0]), id(fast[4])]]  # one Triton call, both dtypes
    for a, b in zip(ref, fast):
        assert torch.equal(torch.view_as_real(a) if a.is_complex() else a, torch.view_as_real(b) if b.is_complex() else b)
    with pytest.raises(RuntimeError, match=r"grads\[2\].*not contiguous"):
        apply_masks_([g.clone() for g in grads], range(n), thr, scales, offs, prefix=prefix, impl="fused")


@needs_cuda
def test_without_triton_cuda_takes_the_reference(monkeypatch):
    monkeypatch.setattr(cuda, "_launch", None)
    monkeypatch.setattr(cuda, "_reason", "disabled for this test")
    g = _grad(50_000, torch.float32).cuda()
    args = ([1], [masks.keep_threshold(0.25)], [4 / 3], [0])
    prefix = masks.step_prefix(1, 1)
    a = _reference([g], *args, prefix)[0]
    b = g.clone()
    apply_masks_([b], *args, prefix=prefix)
    _assert_same_bits(a, b)
    with pytest.raises(RuntimeError, match="disabled for this test"):
        apply_masks_([b], *args, prefix=prefix, impl="fused")


@needs_cuda
def test_the_kernel_derives_the_keys_on_the_gpu():
    # keys from (prefix, index, stream) on the device, for any index; what Triton cannot serve takes the reference
    _triton_or_skip()
    prefix, stream = masks.step_prefix(2**63 + 11, 5), 2
    grads = [_grad(n, d, seed=j).cuda() for j, (n, d) in
             enumerate(((5000, torch.float32), (300, torch.bfloat16), (70_000, torch.float16), (10, torch.float64)))]
    grads.append(torch.randn(8, 8, device="cuda").t())  # non-contiguous: the reference kernel
    indices = [0, 1, 7, 2**40, 4]
    thr = [masks.keep_threshold(r) for r in (0.1, 0.5, 0.9, 0.3, 0.2)]
    scales = [masks.survivor_scale(t) for t in thr]
    ref = _reference(grads, indices, thr, scales, [0] * 5, prefix, stream)
    fast = [g.clone() for g in grads]
    apply_masks_(fast, indices, thr, scales, prefix=prefix, stream=stream)
    for a, b in zip(ref, fast):
        _assert_same_bits(a, b)
    before = [g.clone() for g in grads]
    with pytest.raises(RuntimeError, match=r"grads\[4\].*not contiguous"):
        apply_masks_(grads, indices, thr, scales, prefix=prefix, stream=stream, impl="fused")
    for a, b in zip(grads, before):  # refused before anything was written
        _assert_same_bits(a, b)


@needs_cuda
def test_cuda_graph_capture_is_refused(monkeypatch):
    # a captured launch would replay one step's keys forever: refused with a clear error
    model = _model("cuda")
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=0)
    model(torch.randn(4, 32, device="cuda")).sum().backward()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"CUDA graph capture.*capturable=True"):
        opt.step()
    for impl in (None, "fused", "reference"):
        with pytest.raises(RuntimeError, match="CUDA graph capture"):
            apply_masks_([torch.zeros(10, device="cuda")], [0], [1 << 31], [2.0], prefix=0, impl=impl)


@needs_cuda
def test_capturable_step_replays_fresh_masks_in_a_cuda_graph():
    # DropGrad(capturable=True): the step count lives on the GPU, so a captured step draws the
    # masks of a new step at every replay; each replay's update is compared with the reference
    _triton_or_skip()
    seed, rate, n = 3, 0.5, 300_001
    p = torch.nn.Parameter(torch.zeros(n, device="cuda"))
    p.grad = torch.zeros_like(p)
    opt = DropGrad(torch.optim.SGD([p], lr=1.0), drop_rate=rate, seed=seed, capturable=True)
    thr = masks.keep_threshold(rate)
    scale = masks.survivor_scale(thr)

    def expected(step):
        ones = torch.ones(n, device="cuda")
        reference.mask_([ones], [0], [thr], [scale], [0], masks.step_prefix(seed, step), 0)
        return ones

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps (eager): steps 0 and 1
        for step in range(2):
            before = p.detach().clone()
            p.grad.fill_(1.0)
            opt.step()
            _assert_same_bits(before - p.detach(), expected(step))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        p.grad.fill_(1.0)
        opt.step()
    for step in range(2, 6):  # each replay: the next step's masks
        before = p.detach().clone()
        graph.replay()
        torch.cuda.synchronize()
        _assert_same_bits(before - p.detach(), expected(step))
    assert opt.step_count == 6
    assert opt.state_dict()["dropgrad"]["step"] == 6
    opt.step()  # an eager step after the replays continues the device's count
    assert opt.step_count == 7


@needs_cuda
def test_capturable_training_step_in_a_cuda_graph_matches_eager_steps():
    # the whole step (forward, backward, DropGrad(Adam(capturable=True))) captured and replayed,
    # against the same capturable optimizer stepped eagerly
    _triton_or_skip()

    def build():
        torch.manual_seed(0)
        model = _model("cuda")
        opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True), drop_rate=0.3, seed=5,
                       capturable=True)
        return model, opt

    x = torch.randn(16, 32, device="cuda")
    eager_model, eager_opt = build()
    for _ in range(8):
        eager_opt.zero_grad(set_to_none=False)
        eager_model(x).square().mean().backward()
        eager_opt.step()
    model, opt = build()
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=False)
            model(static_x).square().mean().backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        model(static_x).square().mean().backward()
        opt.step()
    for _ in range(5):
        opt.zero_grad(set_to_none=False)  # the captured backward accumulates into the same .grad tensors
        graph.replay()
    torch.cuda.synchronize()
    assert opt.step_count == 8
    for a, b in zip(eager_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # cuBLAS may pick other kernels under capture


@needs_cuda
def test_plan_steps_reuse_the_device_table_and_never_synchronize():
    _triton_or_skip()
    model = _model("cuda")
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.25, seed=1)
    x = torch.randn(16, 32, device="cuda")
    cuda._tables.clear()
    for step in range(6):
        opt.zero_grad(set_to_none=False)  # gradients stay where they are
        model(x).square().mean().backward()
        if step == 3:
            torch.cuda.set_sync_debug_mode("error")  # any host-device synchronization raises
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(cuda._tables) == 1


@needs_cuda
@pytest.mark.parametrize("impl", [None, "fused", "reference"])
def test_wrapper_on_the_gpu_matches_the_reference_bitwise(impl):
    # the same gradients masked by DropGrad on the GPU with each kernel choice, and by hand
    if impl != "reference":
        _triton_or_skip()
    model = _model("cuda")
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), params={"0": 0.3, "2": 0.6}, model=model, seed=42, impl=impl)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).cuda()
    for step in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        raw = [p.grad.clone() for p in model.parameters()]
        opt.step()
        thr = [masks.keep_threshold(r) for r in (0.3, 0.3, 0.6, 0.6)]
        expect = _reference(raw, range(4), thr, [masks.survivor_scale(t) for t in thr], [0] * 4,
                            masks.step_prefix(42, step))
        for p, g in zip(model.parameters(), expect):
            _assert_same_bits(p.grad, g)


# -------------------------------------------------------------- the wrapper


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).to(device)


def _masked_grads(device, steps=3, p=0.3):
    model = _model(device)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), drop_rate=p, seed=123)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen).to(device)
        opt.zero_grad()
        model(x).square().mean().backward()
        # the gradients must agree before masking for the comparison to mean anything
        out.append([p.grad.detach().cpu().clone() for p in model.parameters()])
        opt.step()
        out.append([p.grad.detach().cpu().clone() for p in model.parameters()])
    return out


@needs_cuda
def test_wrapper_masks_the_same_elements_on_cpu_and_gpu():
    cpu, gpu = _masked_grads("cpu"), _masked_grads("cuda")
    for step, (a_list, b_list) in enumerate(zip(cpu, gpu)):
        for a, b in zip(a_list, b_list):
            if step % 2 == 0:
                continue  # unmasked gradients: CPU and GPU matmuls round differently
            assert torch.equal(a == 0, b == 0), f"different drop pattern at record {step}"
    # with identical inputs the masked values are identical too
    g = torch.randn(10_000)
    a, b = g.clone(), g.cuda()
    from dropgrad import drop_grad_

    drop_grad_(a, 0.3, seed=7, step=2)
    drop_grad_(b, 0.3, seed=7, step=2)
    _assert_same_bits(a, b.cpu())


@needs_cuda
def test_wrapper_trains_with_amp_and_resumes_exactly():
    batches = [torch.randn(64, 32, generator=torch.Generator().manual_seed(100 + i)) for i in range(20)]

    def run(start, steps, state=None):
        model = _model("cuda")
        opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), drop_rate=0.2, seed=3)
        scaler = torch.amp.GradScaler("cuda")
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            scaler.load_state_dict(state["scaler"])
        losses = []
        for x in batches[start : start + steps]:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x.cuda()).float().square().mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        return model, opt, scaler, losses

    _, opt, _, losses = run(0, 20)
    assert losses[-1] < losses[0]
    assert all(math.isfinite(v) for v in losses)
    assert 0 < opt.step_count <= 20
    # resume bitwise: 5 steps, save, 5 more, against 10 straight
    m1, o1, s1, _ = run(0, 5)
    state = {"model": m1.state_dict(), "opt": o1.state_dict(), "scaler": s1.state_dict()}
    straight, *_ = run(0, 10)
    resumed, *_ = run(5, 5, state)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.compile
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_train_step_on_the_gpu(backend):
    # the mask runs inside the compiled step (dropgrad.compiled's custom op) with the eager step's masks:
    # the result is the eager step's, bit for bit with the eager backend and to rounding with Inductor's kernels
    _triton_or_skip()

    def make():
        model = _model("cuda")
        return model, DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=0)

    def step(model, opt, x):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    torch._dynamo.reset()
    m_eager, o_eager = make()
    m_comp, o_comp = make()
    compiled = torch.compile(step, backend=backend)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, 32, generator=gen).cuda()
        step(m_eager, o_eager, x)
        compiled(m_comp, o_comp, x)
    assert o_comp.step_count == o_eager.step_count == 3
    for a, b in zip(m_eager.parameters(), m_comp.parameters()):
        if backend == "eager":
            assert torch.equal(a, b)
        else:  # Inductor fuses the forward/backward differently: same masks, rounding-level differences
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            # the same drop pattern (independent masks at p=0.5 would disagree on half the elements)
            assert ((a.grad == 0) != (b.grad == 0)).float().mean() < 1e-3
