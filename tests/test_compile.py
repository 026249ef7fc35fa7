"""A training step compiled with torch.compile: DropGrad's masking inside the graph, compiled once.

Counted with torch._dynamo's counters. DropGrad's own bookkeeping (rates, clock,
keys) runs inside the custom op ``dropgrad::mask_step_``, so no graph break comes
from dropgrad's code and nothing recompiles from one step to the next; the masks
are bitwise those of an eager DropGrad step.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dropgrad import DropGrad, compiled

pytestmark = [pytest.mark.compile, pytest.mark.skipif(not compiled.SUPPORTED, reason="needs torch.library.custom_op")]
BACKEND = os.environ.get("DROPGRAD_TEST_COMPILE_BACKEND", "aot_eager")
STEPS = 5


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _run(mode: str, schedule: bool = False):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rate = (lambda step: 0.1 + 0.05 * step) if schedule else 0.3
    opt = inner if mode == "bare" else DropGrad(inner, drop_rate=rate, seed=3)
    seen = []

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step = train_step if mode == "eager" else torch.compile(train_step, backend=BACKEND)
    gen = torch.Generator().manual_seed(1)
    graphs_after_first = None
    for k in range(STEPS):
        x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen)
        step(x, y)
        seen.append([p.detach().clone() for p in model.parameters()])
        if k == 1:
            graphs_after_first = counters["stats"]["unique_graphs"]
    breaks = dict(counters["graph_break"])
    return seen, opt, breaks, graphs_after_first, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("schedule", [False, True])
def test_compiled_step_masks_like_eager_and_compiles_once(schedule):
    eager, eager_opt, _, _, _ = _run("eager", schedule)
    got, opt, breaks, graphs_early, graphs_late = _run("compiled", schedule)
    bare, _, _, _, _ = _run("bare")
    for a, b, c in zip(got, eager, bare):
        for x, y in zip(a, b):
            # the same masks: equal to the eager DropGrad run up to the compiled AdamW's rounding,
            # and far from the compiled run without DropGrad
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        assert max((x - z).abs().max().item() for x, z in zip(a, c)) > 1e-4
    assert opt.step_count == eager_opt.step_count == STEPS  # the clock ran inside the op
    assert graphs_late == graphs_early  # new steps, rates and keys: nothing recompiled
    assert opt.stats()["last_step"] == STEPS - 1


def test_no_graph_break_comes_from_dropgrad():
    _, _, bare_breaks, _, _ = _run("bare")
    _, _, breaks, _, _ = _run("compiled")
    # every break reason is one the bare optimizer has too (backward, zero_grad, torch.optim's own
    # user-inserted breaks around the wrapped step); none names dropgrad code
    assert set(breaks) <= set(bare_breaks), set(breaks) - set(bare_breaks)
    assert not any("dropgrad" in reason or "DropGrad" in reason for reason in breaks), breaks
    # and no more of them: DropGrad.step adds no frame that meets the wrapped step's own
    # user-inserted breaks a second time (no profile wrapper, no is_compiling branch above it)
    assert sum(breaks.values()) <= sum(bare_breaks.values()), (breaks, bare_breaks)


def test_step_hooks_run_and_take_the_general_path():
    # with a step hook DropGrad leaves the in-graph path (hooks run eagerly around the step),
    # and the hooks see DropGrad, eager or compiled, with the same masks
    calls = []
    results = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        model = _model()
        opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.3, seed=5)
        opt.register_step_pre_hook(lambda o, args, kwargs, mode=mode: calls.append(("pre", mode, o.step_count)))
        opt.register_step_post_hook(lambda o, args, kwargs, mode=mode: calls.append(("post", mode, o.step_count)))

        def train_step(x, y, model=model, opt=opt):
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()

        step = train_step if mode == "eager" else torch.compile(train_step, backend=BACKEND)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            step(torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen))
        results[mode] = [p.detach().clone() for p in model.parameters()]
        assert opt.step_count == 3
    for mode in ("eager", "compiled"):
        assert [c for c in calls if c[1] == mode] == [
            (kind, mode, k + (kind == "post")) for k in range(3) for kind in ("pre", "post")
        ]
    for a, b in zip(results["eager"], results["compiled"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_full_update_drop_and_closures_still_work_compiled():
    # these take the eager bookkeeping path (graph breaks at DropGrad's boundaries), with the same results
    torch._dynamo.reset()
    model = _model()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.3, full_update_drop=0.5, seed=0)

    def train_step(x, y):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    step = torch.compile(train_step, backend=BACKEND)
    for _ in range(4):
        step(torch.randn(4, 8), torch.randn(4, 4))
    assert opt.step_count == 4
