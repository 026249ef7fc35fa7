"""The DropGrad wrapper's contract: API, rates by parameter/name/group, full update drop,
seeds, closures, checkpoints, and clear errors."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch

from dropgrad import DropGrad

from _compat import requires_named_optimizers


def _linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(50, 40)


def _grads_seen(params, grads, **wrap):
    """Gradients the wrapped optimizer sees for one step, given raw gradients."""
    seen = {}

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    seen[p] = None if p.grad is None else p.grad.clone()
            return super().step(closure)

    opt = DropGrad(Spy(params, lr=0.0), **wrap)
    for p, g in zip([p for grp in opt.param_groups for p in grp["params"]], grads):
        p.grad = None if g is None else g.clone()
    opt.step()
    return opt, seen


class EncDec(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(30, 30), torch.nn.Linear(30, 30))
        self.decoder = torch.nn.Linear(30, 30)
        self.head = torch.nn.Linear(30, 1)


def _drop_fraction(g):
    return (g == 0).float().mean().item()


# ---------------------------------------------------------------- it is an optimizer
def test_is_an_optimizer_sharing_groups_and_state():
    model = _linear()
    base = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = DropGrad(base, drop_rate=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is base
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.defaults is base.defaults
    assert opt.drop_rate == 0.1
    model(torch.randn(2, 50)).sum().backward()
    opt.step()
    assert len(base.state) == 2  # the wrapped optimizer stepped
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_hooks_run():
    model = _linear()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=0)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    model(torch.randn(2, 50)).sum().backward()
    opt.step()
    assert calls == ["pre", "post"]


def test_add_param_group_with_drop_rate():
    a, b = torch.nn.Parameter(torch.zeros(100_000)), torch.nn.Parameter(torch.zeros(100_000))
    opt = DropGrad(torch.optim.SGD([a], lr=0.0), drop_rate=0.1, seed=3)
    opt.add_param_group({"params": [b], "drop_rate": 0.7})
    assert opt.optimizer.param_groups[1]["drop_rate"] == 0.7
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert abs(_drop_fraction(a.grad) - 0.1) < 0.01
    assert abs(_drop_fraction(b.grad) - 0.7) < 0.01
    with pytest.raises(ValueError, match=r"drop_rate.*\[0, 1\].*1.5"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "drop_rate": 1.5})


def test_pickle_and_deepcopy_keep_working():
    model = _linear()
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-3), drop_rate=0.2, seed=8)
    model(torch.randn(2, 50)).sum().backward()
    opt.step()
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.seed == 8 and clone.step_count == 1
    assert clone.param_groups is clone.optimizer.param_groups
    twin = copy.deepcopy(opt)
    assert twin.step_count == 1 and twin.param_groups is twin.optimizer.param_groups
    calls = []
    twin.register_step_pre_hook(lambda *a: calls.append(1))
    for p in twin.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    twin.step()
    assert calls == [1]


# ---------------------------------------------------------------- rates
def test_rate_one_zeros_gradients_without_nan():
    p = torch.nn.Parameter(torch.ones(1000))
    opt, seen = _grads_seen([p], [torch.randn(1000)], drop_rate=1.0, seed=0)
    assert torch.equal(seen[p], torch.zeros(1000))


def test_rescale_false_keeps_survivors_unscaled():
    p = torch.nn.Parameter(torch.ones(10_000))
    g = torch.randn(10_000)
    _, seen = _grads_seen([p], [g], drop_rate=0.5, rescale=False, seed=0)
    kept = seen[p] != 0
    assert torch.equal(seen[p][kept], g[kept])
    assert 0.45 < kept.float().mean().item() < 0.55


def test_nan_and_inf_stay_non_finite():
    p = torch.nn.Parameter(torch.ones(4000))
    g = torch.full((4000,), float("nan"))
    g[::2] = float("inf")
    _, seen = _grads_seen([p], [g], drop_rate=0.5, seed=0)
    assert not torch.isfinite(seen[p]).any()


@requires_named_optimizers
def test_params_dict_with_names_verbatim():
    model = EncDec()
    optimizer = torch.optim.SGD(model.named_parameters(), lr=0.0)
    optimizer = DropGrad(optimizer, params={"encoder": 0.1, "decoder": 0.2})
    assert optimizer.drop_rate is None
    rates = dict(zip([n for g in optimizer.param_groups for n in g["param_names"]], optimizer.current_drop_rates()))
    assert rates == {
        "encoder.0.weight": 0.1, "encoder.0.bias": 0.1, "encoder.1.weight": 0.1, "encoder.1.bias": 0.1,
        "decoder.weight": 0.2, "decoder.bias": 0.2, "head.weight": 0.0, "head.bias": 0.0,
    }
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))  # unlisted, drop_rate None
    assert (model.decoder.weight.grad == 0).any()


def test_params_dict_specificity_globs_and_default():
    model = EncDec()
    opt = DropGrad(
        torch.optim.SGD(model.parameters(), lr=0.0),
        drop_rate=0.05,
        params={"encoder": 0.1, "encoder.1": 0.3, "encoder.1.bias": 0.4, "*.bias": 0.0, model.head.weight: 0.9},
        model=model,
    )
    names = [n for n, _ in model.named_parameters()]
    rates = dict(zip(names, opt.current_drop_rates()))
    assert rates == {
        "encoder.0.weight": 0.1, "encoder.0.bias": 0.1,  # a prefix beats a glob
        "encoder.1.weight": 0.3, "encoder.1.bias": 0.4,  # longer prefix, then exact name
        "decoder.weight": 0.05, "decoder.bias": 0.0,  # default, glob
        "head.weight": 0.9, "head.bias": 0.0,  # parameter key is the most specific
    }


def test_params_dict_with_named_parameters_argument_and_parameter_keys():
    model = EncDec()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), params={"head": 0.5},
                   named_parameters=model.named_parameters())
    assert opt.current_drop_rates()[-2:] == [0.5, 0.5]
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), params={model.decoder.bias: 0.25})
    assert opt.current_drop_rates() == [0.0] * 5 + [0.25, 0.0, 0.0]


def test_param_group_drop_rate_and_precedence():
    model = EncDec()
    opt = DropGrad(
        torch.optim.SGD(
            [{"params": model.encoder.parameters(), "drop_rate": 0.3},
             {"params": model.decoder.parameters()},
             {"params": model.head.parameters(), "drop_rate": None}],
            lr=0.0,
        ),
        drop_rate=0.1,
        params={model.encoder[0].bias: 0.6},
    )
    assert opt.current_drop_rates() == [0.3, 0.6, 0.3, 0.3, 0.1, 0.1, 0.0, 0.0]


def test_group_rates_alone_are_enough():
    model = EncDec()
    opt = DropGrad(torch.optim.SGD([{"params": model.encoder.parameters(), "drop_rate": 0.2},
                                    {"params": model.decoder.parameters()}], lr=0.0))
    assert opt.current_drop_rates() == [0.2] * 4 + [0.0, 0.0]


def test_callable_rate_and_group_callable():
    model = EncDec()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), drop_rate=lambda step: min(0.1 * step, 0.5), seed=0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert opt.current_drop_rates()[0] == 0.0
    opt.step()
    assert opt.current_drop_rates()[0] == 0.1
    bad = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), drop_rate=lambda step: 1.5)
    with pytest.raises(ValueError, match=r"drop_rate \(callable .* at step 0\) must be in \[0, 1\], got 1.5"):
        bad.step()


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(), ValueError, "drop_rate or params"),
        (dict(drop_rate=-0.1), ValueError, r"drop_rate must be in \[0, 1\], got -0.1"),
        (dict(drop_rate=1.5), ValueError, r"drop_rate must be in \[0, 1\], got 1.5"),
        (dict(drop_rate=float("nan")), ValueError, r"drop_rate must be in \[0, 1\], got nan"),
        (dict(drop_rate="0.1"), TypeError, r"drop_rate must be a real number.*'0.1'.*str"),
        (dict(drop_rate=True), TypeError, r"drop_rate must be a real number.*True"),
        (dict(drop_rate=0.1, full_update_drop=2.0), ValueError, r"full_update_drop must be in \[0, 1\], got 2.0"),
        (dict(params={"encoder": 0.1}, full_update_drop=True), ValueError, "full_update_drop=True.*drop_rate is None"),
        (dict(drop_rate=0.1, seed="x"), TypeError, "seed must be an int"),
        (dict(drop_rate=0.1, rescale=1), TypeError, "rescale must be a bool"),
        (dict(drop_rate=0.1, impl="cuda"), ValueError, "impl must be"),
        (dict(params={"encoderr": 0.1}), ValueError, r"params keys \['encoderr'\] match no parameter"),
        (dict(params={"encoder": 1.1}), ValueError, r"params\['encoder'\] must be in \[0, 1\], got 1.1"),
        (dict(params={3: 0.1}), TypeError, "params keys must be parameters or parameter names"),
        (dict(params=[0.1]), TypeError, "params must be a dict"),
        (dict(params={"encoder.0.*": 0.1, "*der.0.bias": 0.2}), ValueError, "equally specifically"),
        (dict(drop_rate=0.1, bogus=1), TypeError, "bogus"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, exc, pattern):
    model = EncDec()
    with pytest.raises(exc, match=pattern):
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), model=model, **kwargs)


def test_bad_optimizer_and_unresolvable_names():
    model = EncDec()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got Sequential"):
        DropGrad(torch.nn.Sequential(), drop_rate=0.1)
    inner = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1)
    with pytest.raises(TypeError, match="already a DropGrad"):
        DropGrad(inner, drop_rate=0.1)
    with pytest.raises(ValueError, match="names cannot be resolved.*named_parameters"):
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), params={"encoder": 0.1})
    with pytest.raises(ValueError, match="does not optimize"):
        DropGrad(torch.optim.SGD(model.encoder.parameters(), lr=0.1), params={model.head.weight: 0.1})
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1)
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\], got 2"):
        opt.drop_rate = 2


# ---------------------------------------------------------------- full update drop
def test_skipped_step_leaves_everything_untouched_and_runs_closure():
    model = _linear()
    base = torch.optim.Adam(model.parameters(), lr=0.1)
    opt = DropGrad(base, drop_rate=0.1, full_update_drop=1.0, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(torch.randn(3, 50)).pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1] and isinstance(loss, torch.Tensor)
    assert opt.last_step_skipped is True
    assert len(base.state) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.step_count == 1  # a skipped step is still a step


def test_full_update_drop_true_uses_drop_rate_and_is_independent_of_element_masks():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = DropGrad(torch.optim.SGD([w], lr=1.0), drop_rate=0.5, full_update_drop=True, seed=4)
    assert opt.full_update_drop is True
    skipped = 0
    for _ in range(2000):
        w.grad = torch.ones(1)
        opt.step()
        skipped += opt.last_step_skipped
    assert abs(skipped - 1000) < 6 * math.sqrt(2000 * 0.25)
    opt = DropGrad(torch.optim.SGD([w], lr=1.0), drop_rate=0.5, seed=4)
    w.grad = torch.ones(1)
    opt.step()
    assert opt.last_step_skipped is False


# ---------------------------------------------------------------- seeds and RNG
def _one_step_grad(seed, **kw):
    p = torch.nn.Parameter(torch.zeros(10_000))
    _, seen = _grads_seen([p], [torch.ones(10_000)], drop_rate=0.5, seed=seed, **kw)
    return seen[p]


def test_same_seed_same_masks_other_seed_other_masks():
    assert torch.equal(_one_step_grad(1), _one_step_grad(1))
    assert not torch.equal(_one_step_grad(1), _one_step_grad(2))


def test_masks_never_touch_the_global_rng():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = DropGrad(torch.optim.SGD([p], lr=0.1), drop_rate=0.5, seed=1)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
    after = torch.rand(5)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(5))


def test_unseeded_runs_are_reproducible_with_manual_seed():
    def run():
        torch.manual_seed(42)
        p = torch.nn.Parameter(torch.zeros(1000))
        opt = DropGrad(torch.optim.SGD([p], lr=0.1), drop_rate=0.5)
        p.grad = torch.ones_like(p)
        opt.step()
        return p.detach().clone(), opt.seed

    (a, sa), (b, sb) = run(), run()
    assert sa == sb and torch.equal(a, b)
    torch.manual_seed(43)
    assert DropGrad(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), drop_rate=0.5).seed != sa


# ---------------------------------------------------------------- closures
def test_lbfgs_masks_every_closure_evaluation():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5000))
    evaluations = []

    class SpyLBFGS(torch.optim.LBFGS):
        pass

    opt = DropGrad(SpyLBFGS([w], lr=0.1, max_iter=4), drop_rate=0.5, seed=9)

    def closure():
        if evaluations:  # the previous evaluation's gradient had been masked inside step()
            evaluations[-1]["masked"] = w.grad.clone()
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        evaluations.append({"raw": w.grad.clone()})
        return loss

    opt.step(closure)
    assert len(evaluations) >= 3
    masks_seen = []
    for e in evaluations[:-1]:
        kept = e["masked"] != 0
        assert 0.45 < kept.float().mean().item() < 0.55
        torch.testing.assert_close(e["masked"][kept], e["raw"][kept] * 2.0)
        masks_seen.append(kept)
    assert not torch.equal(masks_seen[0], masks_seen[1])  # fresh masks per evaluation


def test_sgd_with_closure_masks_once():
    w = torch.nn.Parameter(torch.ones(10_000))
    opt = DropGrad(torch.optim.SGD([w], lr=1.0), drop_rate=0.5, seed=2)

    def closure():
        opt.zero_grad()
        w.sum().backward()
        return torch.tensor(0.0)

    opt.step(closure)
    moved = (w != 1.0)
    assert 0.45 < moved.float().mean().item() < 0.55
    assert torch.equal(w[moved], torch.full_like(w[moved], -1.0))  # 1 - lr * 2


# ---------------------------------------------------------------- gradient kinds
def test_none_empty_noncontiguous_sparse_complex_and_dtypes():
    dense = torch.nn.Parameter(torch.zeros(300, 200))
    empty = torch.nn.Parameter(torch.zeros(0, 3))
    none = torch.nn.Parameter(torch.zeros(5))
    cplx = torch.nn.Parameter(torch.zeros(20_000, dtype=torch.complex64))
    half = torch.nn.Parameter(torch.zeros(20_000, dtype=torch.float16))
    bf = torch.nn.Parameter(torch.zeros(20_000, dtype=torch.bfloat16))
    dbl = torch.nn.Parameter(torch.zeros(20_000, dtype=torch.float64))
    params = [dense, empty, none, cplx, half, bf, dbl]
    noncontig = torch.ones(200, 300).t()
    grads = [noncontig, torch.zeros(0, 3), None, torch.full((20_000,), 1 + 1j, dtype=torch.complex64),
             torch.ones(20_000, dtype=torch.float16), torch.ones(20_000, dtype=torch.bfloat16),
             torch.ones(20_000, dtype=torch.float64)]
    _, seen = _grads_seen(params, grads, drop_rate=0.25, seed=0)
    assert seen[none] is None and seen[empty].numel() == 0
    for p in [dense, half, bf, dbl]:
        g = seen[p]
        assert abs(_drop_fraction(g) - 0.25) < 0.02
        assert set(g.unique().tolist()) == {0.0, float(torch.tensor(1 / 0.75, dtype=g.dtype))}
    c = torch.view_as_real(seen[cplx])
    assert abs(_drop_fraction(c[:, 0]) - 0.25) < 0.02
    assert torch.equal(c[:, 0], c[:, 1])  # a complex element is kept or dropped whole
    assert set(c.unique().tolist()) == {0.0, float(torch.tensor(1 / 0.75))}
    # the mask follows logical (row-major) element order, whatever the layout
    _, seen2 = _grads_seen([dense], [noncontig.contiguous()], drop_rate=0.25, seed=0)
    assert torch.equal(seen[dense], seen2[dense])


def test_sparse_embedding_gradients_are_masked_on_their_values():
    emb = torch.nn.Embedding(1000, 16, sparse=True)
    opt = DropGrad(torch.optim.SparseAdam(emb.parameters(), lr=0.1), drop_rate=0.5, seed=0)
    seen = {}
    opt.optimizer.register_step_pre_hook(lambda o, a, k: seen.update(g=emb.weight.grad.coalesce()))
    emb(torch.arange(500)).sum().backward()
    opt.step()
    values = seen["g"].values()
    assert values.numel() == 500 * 16
    assert abs(_drop_fraction(values) - 0.5) < 0.03
    assert set(values.unique().tolist()) == {0.0, 2.0}


def _bits_of(t):
    view = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64, torch.complex64: torch.int64}[t.dtype]
    return t.contiguous().view(view)


def _twin_runs(make, steps, between=None, per_param=None, **wrap):
    """Gradients the wrapped optimizer sees with the default (fused, keys in C) path and with impl='reference'."""
    seen = {}
    for impl in (None, "reference"):
        params, grads_for = make()
        record = seen[impl] = []

        class Spy(torch.optim.SGD):
            def step(self, closure=None, record=record):
                record.append([None if p.grad is None else p.grad.clone() for g in self.param_groups for p in g["params"]])
                return super().step(closure)

        rates = None if per_param is None else {params[j]: r for j, r in per_param.items()}
        opt = DropGrad(Spy(params, lr=0.0), impl=impl, params=rates, **wrap)
        for k in range(steps):
            if between is not None:
                between(k, opt)
            for p, g in zip([p for grp in opt.param_groups for p in grp["params"]], grads_for(k, opt)):
                if g is None:
                    p.grad = None
                elif p.grad is not None and p.grad.dtype == g.dtype and k % 2:
                    p.grad.copy_(g)  # the same gradient tensors again (zero_grad(set_to_none=False) style)
                else:
                    p.grad = g.clone()  # fresh tensors, fresh data pointers
            opt.step()
    assert len(seen[None]) == len(seen["reference"]) == steps
    for a_step, b_step in zip(seen[None], seen["reference"]):
        assert len(a_step) == len(b_step)
        for a, b in zip(a_step, b_step):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(_bits_of(a), _bits_of(b))
    return seen[None]


def test_default_path_matches_reference_as_gradients_change():
    # the fused path re-reads every gradient each step: re-allocated grads, a dtype change,
    # a parameter group added (count change), grads that come and go, unservable ones mixed in
    def make():
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.zeros(s)) for s in [(70, 30), (30,), (1000,), (4, 5, 6), (0,)]]

        def grads_for(k, opt):
            out = []
            for j, p in enumerate([p for grp in opt.param_groups for p in grp["params"]]):
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                if (j + k) % 4 == 3:
                    g = None
                elif j == 0 and k == 4:
                    g = g.t().contiguous().t()  # non-contiguous (falls back for this tensor only)
                out.append(g)
            return out

        return params, grads_for

    def between(k, opt):
        if k == 2:
            for p in opt.param_groups[0]["params"][:3]:
                p.data = p.data.double()  # as module.double() does; grads follow
                p.grad = None
        if k == 3:
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(500, dtype=torch.float16))], "drop_rate": 0.6})
        if k == 5:
            opt.param_groups[0]["params"].pop(1)

    seen = _twin_runs(make, 8, between, per_param={0: 0.5, 3: 0.0}, drop_rate=0.3, seed=4)
    assert len(seen[-1]) == 5 and any(g is not None and g.dtype == torch.float64 for g in seen[-1])
    assert any(g is not None and g.dtype == torch.float16 for step in seen for g in step)
    assert any(g is not None and (g == 0).any() for g in seen[-1])


def test_default_path_matches_reference_with_sparse_and_complex_gradients():
    def make():
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.zeros(50, 4)), torch.nn.Parameter(torch.zeros(300, dtype=torch.complex64)),
                  torch.nn.Parameter(torch.zeros(800))]

        def grads_for(k, opt):
            i = torch.tensor([[0, 3, 3, 9]])
            sparse = torch.sparse_coo_tensor(i, torch.randn(4, 4, generator=gen), (50, 4))
            return [sparse, torch.randn(300, dtype=torch.complex64, generator=gen), torch.randn(800, generator=gen)]

        return params, grads_for

    out = {}
    for impl in (None, "reference"):
        params, grads_for = make()
        opt = DropGrad(torch.optim.SGD(params, lr=0.0), impl=impl, drop_rate=0.4, seed=2)
        out[impl] = []
        for k in range(3):
            for p, g in zip(params, grads_for(k, opt)):
                p.grad = g
            opt.step()
            out[impl].append([p.grad.coalesce().values() if p.grad.is_sparse else p.grad.clone() for p in params])
    for a_step, b_step in zip(out[None], out["reference"]):
        for a, b in zip(a_step, b_step):
            assert torch.equal(_bits_of(a), _bits_of(b))


def test_default_path_strict_fused_still_refuses_unservable_gradients():
    p, q = torch.nn.Parameter(torch.zeros(30, 20)), torch.nn.Parameter(torch.zeros(100))
    opt = DropGrad(torch.optim.SGD([p, q], lr=0.0), drop_rate=0.5, seed=0, impl="fused")
    p.grad = torch.ones(20, 30).t()
    q.grad = torch.ones(100)
    with pytest.raises(RuntimeError, match="not contiguous"):
        opt.step()
    assert torch.equal(q.grad, torch.ones(100))  # nothing was masked before the error


def test_stats_sizes_with_none_and_sparse_gradients():
    emb = torch.nn.Embedding(100, 4, sparse=True)
    lin = torch.nn.Linear(4, 3)
    opt = DropGrad(torch.optim.SGD(list(emb.parameters()) + list(lin.parameters()), lr=0.0), drop_rate=0.5, seed=0)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    opt.step()  # lin has no gradients
    st = opt.stats(exact=True)
    assert st["expected_dropped_fraction"] == 0.5 and 0.0 <= st["dropped_fraction"] <= 1.0
    lin(torch.ones(2, 4)).sum().backward()
    opt.step()
    # counted sizes, seen through the public stats: a sparse gradient counts its 3 x 4 stored
    # values (not the 400-element table), the Linear its 12 + 3 elements
    rates = {emb.weight: 0.1, lin.weight: 0.2, lin.bias: 0.3}
    opt2 = DropGrad(torch.optim.SGD(list(emb.parameters()) + list(lin.parameters()), lr=0.0), params=rates, seed=0)
    opt2.step()
    st = opt2.stats()
    assert (st["min_drop_rate"], st["max_drop_rate"]) == (0.1, 0.3)
    assert st["expected_dropped_fraction"] == pytest.approx((12 * 0.1 + 12 * 0.2 + 3 * 0.3) / 27, rel=1e-12)


def test_stats_count_each_steps_own_gradients_after_a_dense_step():
    # a dense step lets the step skip its second look at the gradients; the next steps look again
    lin = torch.nn.Linear(4, 3)
    opt = DropGrad(torch.optim.SGD(lin.parameters(), lr=0.0), params={lin.weight: 0.2, lin.bias: 0.4}, seed=0,
                   full_update_drop=lambda step: float(step == 1))  # the second step is skipped
    lin.weight.grad, lin.bias.grad = torch.ones(3, 4), torch.ones(3)
    opt.step()
    assert opt.stats()["expected_dropped_fraction"] == pytest.approx((12 * 0.2 + 3 * 0.4) / 15, rel=1e-12)
    lin.weight.grad, lin.bias.grad = None, torch.ones(3)  # a skipped step masks nothing; still its own sizes
    opt.step()
    st = opt.stats()
    assert st["skipped"] and (st["min_drop_rate"], st["expected_dropped_fraction"]) == (0.4, pytest.approx(0.4))
    lin.weight.grad, lin.bias.grad = torch.ones(3, 4), None
    opt.step()
    st = opt.stats(exact=True)
    assert st["expected_dropped_fraction"] == pytest.approx(0.2, rel=1e-12) and st["max_drop_rate"] == 0.2
    assert st["dropped_fraction"] == (lin.weight.grad == 0).sum().item() / 12


# ---------------------------------------------------------------- checkpoints
def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_is_weights_only_loadable_and_holds_dropgrad_state():
    model = EncDec()
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-3), drop_rate=lambda s: 0.1,
                   params={"encoder": 0.3}, full_update_drop=0.2, seed=5, model=model)
    opt.step()
    sd = _save_load(opt.state_dict())
    ours = sd["dropgrad"]
    assert ours["seed"] == 5 and ours["step"] == 1
    assert ours["drop_rate"] == "<live function>"
    assert set(ours["param_rates"].values()) == {0.3}
    # the checkpoint also loads into the bare optimizer
    torch.optim.Adam(EncDec().parameters(), lr=1e-3).load_state_dict(sd)


def test_loading_restores_rates_and_relinks_schedulers():
    model = EncDec()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.2, seed=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sd = _save_load(opt.state_dict())
    opt.load_state_dict(sd)
    opt.step()
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.5  # the scheduler still drives the live groups
    opt.drop_rate = 0.4
    opt.load_state_dict(sd)
    assert opt.drop_rate == 0.2


def test_callable_rates_come_back_from_the_live_object():
    model = EncDec()
    f = lambda s: 0.3  # noqa: E731
    opt = DropGrad(torch.optim.SGD([{"params": model.parameters(), "drop_rate": f}], lr=1.0), drop_rate=f, seed=1)
    sd = _save_load(opt.state_dict())
    assert sd["param_groups"][0]["drop_rate"] == "<live function>"
    g = lambda s: 0.1  # noqa: E731
    opt2 = DropGrad(torch.optim.SGD([{"params": model.parameters(), "drop_rate": g}], lr=1.0), drop_rate=g)
    opt2.load_state_dict(sd)
    assert opt2.drop_rate is g and opt2.param_groups[0]["drop_rate"] is g
    opt3 = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.1)
    with pytest.raises(ValueError, match="was a schedule/callable"):
        opt3.load_state_dict(sd)


def test_plain_optimizer_state_dict_loads_with_warning():
    model = _linear()
    bare = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 50)).sum().backward()
    bare.step()
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-3), drop_rate=0.1, seed=3)
    with pytest.warns(UserWarning, match="no DropGrad state"):
        opt.load_state_dict(bare.state_dict())
    assert opt.step_count == 0 and opt.seed == 3
    assert int(opt.state[model.weight]["step"]) == 1


def test_corrupt_dropgrad_state_is_rejected():
    opt = DropGrad(torch.optim.SGD(_linear().parameters(), lr=0.1), drop_rate=0.1)
    sd = opt.state_dict()
    sd["dropgrad"] = {"seed": 1}
    with pytest.raises(ValueError, match="not a DropGrad state"):
        opt.load_state_dict(sd)
    sd = opt.state_dict()
    sd["dropgrad"]["format"] = 99
    with pytest.raises(ValueError, match="newer than this dropgrad"):
        opt.load_state_dict(sd)


# ---------------------------------------------------------------- schedulers and AMP
@pytest.mark.parametrize("on_wrapper", [True, False])
def test_lr_scheduler_on_either_object_without_order_warning(on_wrapper):
    model = _linear()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.5, full_update_drop=0.5, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt if on_wrapper else opt.optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            model(torch.randn(2, 50)).sum().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    assert opt.param_groups[0]["lr"] == 0.125


def test_grad_scaler_with_fused_base_steps_on_unscaled_gradients():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(1000))
    ref = torch.nn.Parameter(torch.ones(1000))
    opt = DropGrad(torch.optim.SGD([w], lr=0.1, fused=True), drop_rate=0.5, seed=0)
    ref_opt = DropGrad(torch.optim.SGD([ref], lr=0.1), drop_rate=0.5, seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(w.sum()).backward()
    scaler.step(opt)
    scaler.update()
    ref.sum().backward()
    ref_opt.step()
    assert torch.equal(w, ref)
