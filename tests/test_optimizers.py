"""Table-driven: every torch.optim optimizer (and its foreach/fused variants on CPU) x DropGrad.

For each one: wrapping works and the wrapped optimizer sees exactly the
hand-computed masked gradients; drop_rate=0 is bitwise identical to the bare
optimizer; a resume from a (weights_only) state dict continues bitwise
identically to an uninterrupted run.
"""

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch

from dropgrad import DropGrad, masks


def _fused_ok(cls):
    try:
        p = torch.nn.Parameter(torch.zeros(2))
        opt = cls([p], lr=0.1, fused=True)
        p.grad = torch.ones(2)
        opt.step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


OPTIMIZERS = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "SGD-foreach": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=True),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "Adam-foreach": lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=True),
    "Adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.01),
    "AdamW-foreach": lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True),
    "Adamax": lambda ps: torch.optim.Adamax(ps, lr=0.01),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=0.01),
    "RAdam": lambda ps: torch.optim.RAdam(ps, lr=0.01),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
    "Rprop": lambda ps: torch.optim.Rprop(ps, lr=0.01),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    "Adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0),
    "ASGD": lambda ps: torch.optim.ASGD(ps, lr=0.01, t0=1),
    "LBFGS": lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=3, history_size=5),
    "SparseAdam": lambda ps: torch.optim.SparseAdam(ps, lr=0.01),
}
for _name, _cls in [("SGD", torch.optim.SGD), ("Adam", torch.optim.Adam), ("AdamW", torch.optim.AdamW),
                    ("Adagrad", torch.optim.Adagrad)]:
    if _fused_ok(_cls):
        kw = {"momentum": 0.9} if _name == "SGD" else {}
        OPTIMIZERS[f"{_name}-fused"] = (lambda c, k: lambda ps: c(ps, lr=0.01, fused=True, **k))(_cls, kw)

NAMES = sorted(OPTIMIZERS)


class Net(torch.nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.sparse = sparse
        if sparse:
            self.emb = torch.nn.Embedding(20, 6, sparse=True)
        else:
            self.fc1 = torch.nn.Linear(6, 8)
            self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        if self.sparse:
            return self.emb(x).sum(1)
        return self.fc2(torch.tanh(self.fc1(x)))


def _batch(step: int, sparse: bool):
    g = torch.Generator().manual_seed(1000 + step)
    if sparse:
        return torch.randint(0, 20, (5, 4), generator=g), torch.randn(5, 6, generator=g)
    return torch.randn(7, 6, generator=g), torch.randn(7, 3, generator=g)


def _make(name: str, wrap: dict | None, model: torch.nn.Module | None = None):
    sparse = name == "SparseAdam"
    if model is None:
        torch.manual_seed(0)
        model = Net(sparse)
    opt = OPTIMIZERS[name](list(model.parameters()))
    if wrap is not None:
        opt = DropGrad(opt, **wrap)
    return model, opt


def _train(name, model, opt, steps, start=0, hand_mask=None):
    sparse = name == "SparseAdam"
    for step in range(start, start + steps):
        x, y = _batch(step, sparse)

        def closure(x=x, y=y, step=step):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if hand_mask is not None:
                hand_mask(step)
            return loss

        if name == "LBFGS":
            opt.step(closure)
        else:
            closure()
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_wrapped_step_equals_hand_masked_reference(name):
    p, seed = 0.4, 1234
    model, opt = _make(name, dict(drop_rate=p, seed=seed))
    ref_model, ref_opt = _make(name, None)
    ref_params = list(ref_model.parameters())

    def hand_mask(step):
        thr = masks.keep_threshold(p)
        scale = masks.survivor_scale(thr)
        for j, q in enumerate(ref_params):
            g = q.grad._values() if q.grad.is_sparse else q.grad
            keep = masks.keep_mask(g.numel(), masks.derive_key(seed, step, j), thr).view(g.shape)
            g.mul_(keep.to(g.dtype) * scale)

    if name == "LBFGS":  # each closure evaluation draws its own masks: checked in test_wrapper
        got = _train(name, model, opt, 3)
        untouched = _train(name, *_make(name, None), 3)
        assert any(not torch.equal(a, b) for a, b in zip(got, untouched))
        return
    got = _train(name, model, opt, 4)
    want = _train(name, ref_model, ref_opt, 4, hand_mask=hand_mask)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # and DropGrad did change the trajectory
    bare = _train(name, *_make(name, None), 4)
    assert any(not torch.equal(a, b) for a, b in zip(got, bare))


@pytest.mark.parametrize("name", NAMES)
def test_rate_zero_is_bitwise_identical_to_bare_optimizer(name):
    got = _train(name, *_make(name, dict(drop_rate=0.0, seed=1)), 5)
    want = _train(name, *_make(name, None), 5)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_state_dict_is_bitwise_identical(name):
    wrap = dict(drop_rate=0.3, full_update_drop=0.2, seed=77)
    model, opt = _make(name, wrap)
    _train(name, model, opt, 3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = _roundtrip(opt.state_dict())
    uninterrupted = _train(name, model, opt, 4, start=3)

    model2, opt2 = _make(name, dict(drop_rate=0.3, full_update_drop=0.2, seed=999))  # seed comes from the checkpoint
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    resumed = _train(name, model2, opt2, 4, start=3)
    for a, b in zip(uninterrupted, resumed):
        assert torch.equal(a, b)
    assert opt2.step_count == opt.step_count == 7


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
    name = "AdamW"
    model, opt = _make(name, dict(drop_rate=0.25, full_update_drop=0.1))  # unseeded: the seed is checkpointed
    _train(name, model, opt, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    uninterrupted = _train(name, model, opt, 5, start=3)
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_optimizers import _make, _train
        ck = torch.load({str(tmp_path / 'ckpt.pt')!r}, weights_only=True)
        model, opt = _make("AdamW", dict(drop_rate=0.25, full_update_drop=0.1))
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"])
        torch.save(_train("AdamW", model, opt, 5, start=3), {str(tmp_path / 'out.pt')!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    for a, b in zip(uninterrupted, resumed):
        assert torch.equal(a, b)
