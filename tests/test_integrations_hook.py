""":class:`dropgrad.integrations.DropGradHook`, the framework-free core of the callbacks:
the wrapper's masks and skips on every torch.optim optimizer, a checkpoint that is plain
JSON, a resume that continues identically, and ``import dropgrad`` free of frameworks."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dropgrad import DropGrad
from dropgrad.integrations import DropGradHook, base_optimizer

from _integration_helpers import batches, same, snapshot, tiny_mlp

O = torch.optim  # noqa: E741 (short for the long table below)
SEED, RATE = 5, 0.4


def _skips_1_and_3(step):
    return 1.0 if step in (1, 3) else 0.0


OPTIMIZERS = [
    (O.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    (O.Adam, dict(weight_decay=0.1)),
    (O.AdamW, {}),
    (O.Adamax, {}),
    (O.NAdam, {}),
    (O.RAdam, {}),
    (O.RMSprop, dict(momentum=0.5)),
    (O.Rprop, {}),
    (O.Adagrad, {}),
    (O.Adadelta, {}),
    (O.ASGD, {}),
]
CASES = [(cls, {**kw, "foreach": fe}) for cls, kw in OPTIMIZERS for fe in (False, True)]
CASES += [(cls, {"fused": True}) for cls in (O.SGD, O.Adam, O.AdamW, O.Adagrad)]


def _run(cls, kwargs, kind, steps=6, resume_at=None, **dg):
    model = tiny_mlp()
    opt = cls(model.parameters(), **kwargs)
    conf = dict(drop_rate=RATE, seed=SEED, full_update_drop=_skips_1_and_3, **dg)
    wrapped = DropGrad(opt, **conf) if kind == "wrapper" else opt
    hook = DropGradHook(**conf) if kind == "hook" else None
    for k, (x, y) in enumerate(batches(steps)):
        if k == resume_at:  # new optimizer and hook, restored from JSON, as in a new process
            text = json.dumps({"opt": None, "hook": hook.state_dict()})
            state = opt.state_dict()
            opt = cls(model.parameters(), **kwargs)
            opt.load_state_dict(state)
            hook = DropGradHook(**conf)
            hook.load_state_dict(json.loads(text)["hook"])
            wrapped = opt
        F.mse_loss(model(x), y).backward()
        if hook is not None:
            hook.apply(opt)
        wrapped.step()
        wrapped.zero_grad()
    return snapshot(model), hook


@pytest.mark.parametrize("cls,kwargs", CASES, ids=[f"{c.__name__}-{next(iter(k.items()))}" for c, k in CASES])
def test_hook_equals_the_wrapper_including_skipped_steps(cls, kwargs):
    # a dropped update sets grads to None: every torch.optim optimizer then leaves the
    # parameters and its state alone, exactly like the wrapper's skip
    wrapped, _ = _run(cls, kwargs, "wrapper")
    hooked, hook = _run(cls, kwargs, "hook")
    assert same(hooked, wrapped)
    assert hook.skipped_steps == {0: 2} and hook.step_count() == 6


def test_hook_state_is_plain_json_and_resumes_identically():
    full, hook = _run(O.Adam, {}, "hook")
    resumed, resumed_hook = _run(O.Adam, {}, "hook", resume_at=3)
    assert same(resumed, full)
    assert resumed_hook.state_dict() == json.loads(json.dumps(hook.state_dict()))
    buffer = io.BytesIO()
    torch.save(hook.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["slots"]["0"]["dropgrad"]["step"] == 6


def test_hook_stats_and_name_keys():
    model = tiny_mlp()
    opt = O.SGD(model.parameters(), lr=0.1)
    hook = DropGradHook(drop_rate=0.2, params={"2": 0.6}, seed=SEED)  # '2' is the second Linear
    F.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 3)).backward()
    assert hook.apply(opt, model=model) is False
    stats = hook.stats(exact=True)
    assert stats["min_drop_rate"] == 0.2 and stats["max_drop_rate"] == 0.6
    zeros = sum(int((p.grad == 0).sum()) for p in model.parameters())
    assert stats["dropped_fraction"] == zeros / sum(p.numel() for p in model.parameters())
    assert stats["skipped_steps"] == 0 and stats["last_step"] == 0


def test_several_optimizers_get_distinct_masks():
    model = tiny_mlp()
    a = O.SGD(model[0].parameters(), lr=0.1)
    b = O.SGD(model[2].parameters(), lr=0.1)
    hook = DropGradHook(drop_rate=0.5, seed=SEED)
    model[0].weight.grad = torch.ones(16, 8)
    model[2].weight.grad = torch.ones(3, 16)
    model[0].bias.grad, model[2].bias.grad = torch.ones(16), torch.ones(3)
    hook.apply(a, slot=0)
    hook.apply(b, slot=1)
    assert not torch.equal(model[0].weight.grad[:3], model[2].weight.grad[:, :8])
    assert hook.step_count(0) == hook.step_count(1) == 1


def test_hook_refuses_a_dropgrad_and_bad_arguments():
    model = tiny_mlp()
    dg = DropGrad(O.SGD(model.parameters(), lr=0.1), drop_rate=0.1)
    with pytest.raises(ValueError, match="masked twice"):
        base_optimizer(dg)
    with pytest.raises(ValueError, match="drop_rate or params"):
        DropGradHook()
    with pytest.raises(ValueError, match="drop_rate"):
        DropGradHook(drop_rate=1.5)
    with pytest.raises(TypeError, match="seed"):
        DropGradHook(drop_rate=0.1, seed="x")


def test_import_dropgrad_does_not_import_frameworks():
    code = (
        "import sys, dropgrad, dropgrad.integrations\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'transformers', 'accelerate', 'tensorboard')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
