"""Flat buffers are refused: FSDP1's FlatParameter (and its use_orig_params views), swapped parameters.

A mask's indices refer to the parameters DropGrad was built with; a flat
partition (DeepSpeed ZeRO-1/2, its fp16/bf16 optimizers) or an FSDP1 flat
parameter would silently get masks that depend on the world size. FSDP1 itself
(on CPU, gloo) is refused on every rank in ``test_tensor_parallel.py``'s
4-process launch (scenarios ``fsdp1_*`` of ``tests/_tp_worker.py``), which
asserts the error text there.
"""

from __future__ import annotations

import copy
import gc
import pickle
import sys
import types
import weakref

import pytest
import torch

from dropgrad import DropGrad


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _backward(model):
    model(torch.randn(5, 4)).pow(2).sum().backward()


def test_replaced_parameters_are_refused_at_the_next_step():
    model = _model()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=0)
    _backward(model)
    opt.step()  # the parameters it was built with: fine
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]  # what DeepSpeed ZeRO-1/2 does to the client optimizer
    before = flat.detach().clone()
    with pytest.raises(ValueError, match=r"no longer hold the parameters it was built with: "
                                         r"param_groups\[0\]\['params'\]\[0\] \(shape \(23,\)\) is none of "
                                         r"the 4 tensors it was given") as info:
        opt.step()
    assert "fully_shard" in str(info.value) and "ZeroRedundancyOptimizer" in str(info.value)
    assert torch.equal(flat.detach(), before) and torch.equal(flat.grad, torch.ones_like(flat))  # nothing ran
    with pytest.raises(ValueError, match="no longer hold"):
        opt.mask_gradients()


def test_the_error_names_deepspeed_when_it_is_loaded_and_removal_stays_allowed(monkeypatch):
    model = _model()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=0)
    opt.param_groups[0]["params"].pop(1)  # removed (indices of the later ones shift, on every rank alike)
    _backward(model)
    opt.step()
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    opt.param_groups[0]["params"][2] = torch.nn.Parameter(torch.zeros(2, 3))  # same shape, another tensor
    with pytest.raises(ValueError, match=r"\['params'\]\[2\] \(shape \(2, 3\)\).*"
                                         r"DeepSpeed is loaded: its ZeRO stages 1 and 2"):
        opt.step()


def test_a_removed_parameter_is_not_kept_alive_and_a_tensor_in_its_place_is_refused():
    keep = torch.nn.Parameter(torch.ones(3))
    gone = torch.nn.Parameter(torch.ones(1000))
    gone.grad = torch.ones(1000)
    opt = DropGrad(torch.optim.SGD([keep, gone], lr=0.1), drop_rate=0.5, seed=0)
    opt.param_groups[0]["params"].pop(1)  # gone
    keep.grad = torch.ones(3)
    opt.step()
    ref = weakref.ref(gone)
    del gone
    gc.collect()
    assert ref() is None  # neither DropGrad nor its registry holds it (nor its gradient)
    stranger = torch.nn.Parameter(torch.ones(1000))  # may even reuse the freed tensor's id
    opt.param_groups[0]["params"].append(stranger)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\] \(shape \(1000,\)\) is none of the 1 tensors"):
        opt.step()


def test_appended_parameters_keep_working_through_either_add_param_group():
    model = _model()
    extra1, extra2 = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(6))
    opt = DropGrad(torch.optim.SGD(model[0].parameters(), lr=0.1), drop_rate=0.5, seed=0)
    opt.add_param_group({"params": list(model[1].parameters())})
    opt.optimizer.add_param_group({"params": [extra1]})  # on the wrapped optimizer: DropGrad is not told
    opt.add_param_group({"params": [extra2]})
    _backward(model)
    extra1.grad, extra2.grad = torch.ones(6), torch.ones(6)
    opt.step()
    # the same masks as a DropGrad built with every parameter at once
    ref_model = _model()
    ref_extra = [torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(6))]
    ref = DropGrad(torch.optim.SGD([*ref_model.parameters(), *ref_extra], lr=0.1), drop_rate=0.5, seed=0)
    _backward(ref_model)
    for e in ref_extra:
        e.grad = torch.ones(6)
    ref.step()
    got = [p.grad for g in opt.param_groups for p in g["params"]]
    want = [p.grad for g in ref.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == len(want) == 6


def test_pickled_and_copied_optimizers_check_their_own_parameters():
    model = _model()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=0)
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        for p in clone.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        clone.step()  # its own (copied) parameters are the ones it was built with
        clone.param_groups[0]["params"] = list(model.parameters())  # the original's: not its own
        with pytest.raises(ValueError, match="no longer hold"):
            clone.step()


def test_fsdp1_flat_parameters_and_their_views_are_refused_by_name():
    p = torch.nn.Parameter(torch.zeros(3))
    p._fsdp_flattened = True  # how FSDP1 marks the original parameters with use_orig_params=True
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(3,\)\) is a view into a FlatParameter of FSDP1 "
                                         r"\(FullyShardedDataParallel, use_orig_params=True\).*fully_shard"):
        DropGrad(torch.optim.SGD([p], lr=0.1), drop_rate=0.5)
    opt = DropGrad(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), drop_rate=0.5)
    with pytest.raises(ValueError, match=r"add_param_group: parameter 0 .*FSDP1.*world size"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1
