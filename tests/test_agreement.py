"""The rank checks of dropgrad.agreement in one process: arguments, fingerprint, messages, store protocol.

The multi-process behaviour (every rank raising the same message, a skipped
step not hanging DDP) is tested in test_distributed.py; here the pieces are
checked directly, ranks of the store protocol being threads over a HashStore.
"""

from __future__ import annotations

import copy
import datetime
import pickle
import threading

import pytest
import torch
from torch import nn

import dropgrad
from dropgrad import DropGrad
from dropgrad import agreement as ag
from dropgrad import distributed as dgd


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))


def _opt(params, **kw) -> DropGrad:
    kw.setdefault("drop_rate", 0.1)
    kw.setdefault("seed", 5)
    return DropGrad(torch.optim.SGD(params, lr=0.1), **kw)


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize("bad, error", [
    (-1, ValueError), (0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    (datetime.timedelta(0), ValueError), ("3", TypeError), (True, TypeError),
])
def test_timeout_is_validated_even_without_a_process_group(bad, error):
    opt = _opt(_model().parameters())
    for fn in (dgd.agree_seed, dgd.check_consistency):
        with pytest.raises(error, match="timeout"):
            fn(opt, timeout=bad)
    dgd.check_consistency(opt, timeout=datetime.timedelta(seconds=2))  # valid: a no-op on one process
    dgd.agree_seed(opt, timeout=2.5)


def test_timeout_environment_variable(monkeypatch):
    monkeypatch.delenv(ag.TIMEOUT_ENV, raising=False)
    assert ag._env_timeout() is None
    monkeypatch.setenv(ag.TIMEOUT_ENV, " 2.5 ")
    assert ag._env_timeout() == 2.5
    for bad in ("abc", "0", "-3", "nan", "inf"):
        monkeypatch.setenv(ag.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"DROPGRAD_AGREE_TIMEOUT_S={bad!r}: expected a positive number"):
            ag._env_timeout()


# ---------------------------------------------------------------------- names
def test_param_names_are_kept_in_optimizer_order():
    model = _model()
    assert _opt(model.parameters()).param_names() == [None] * 4
    assert _opt(model.parameters(), model=model).param_names() == ["0.weight", "0.bias", "1.weight", "1.bias"]
    params = list(model.parameters())
    swapped = _opt([params[2], params[0]], model=model)
    assert swapped.param_names() == ["1.weight", "0.weight"]
    # an optimizer built on named parameters carries them in its groups
    assert _opt(list(model.named_parameters())[:2]).param_names() == ["0.weight", "0.bias"]
    # add_param_group: names from the group's "param_names" where given (torch wants all groups or
    # none named), else unknown
    swapped.add_param_group({"params": [params[1]]})
    assert swapped.param_names() == ["1.weight", "0.weight", None]
    named = _opt(list(model.named_parameters())[:1])
    extra = nn.Parameter(torch.zeros(2))
    named.add_param_group({"params": [extra, params[3]], "param_names": ["extra", "1.bias"]})
    assert named.param_names() == ["0.weight", "extra", "1.bias"]
    # the class form passes its named parameters through
    assert dropgrad.optim.SGD(model.named_parameters(), lr=0.1, drop_rate=0.1).param_names()[3] == "1.bias"
    # survives pickling (a list, not ids); a DropGrad pickled before names were kept reads as unknown
    clone = copy.deepcopy(swapped)
    assert clone.param_names() == swapped.param_names()
    state = swapped.__getstate__()
    del state["_param_names"]
    old = DropGrad.__new__(DropGrad)
    old.__setstate__(state)
    assert old.param_names() == [None] * 3


# ---------------------------------------------------------------------- fingerprint
def test_fingerprint_holds_parameter_identity():
    model = _model()
    params = list(model.parameters())
    base = ag._fingerprint(_opt(params))
    digest = ag._digest(base, with_seed=True)
    assert ag._digest(ag._fingerprint(_opt(params)), with_seed=True) == digest  # deterministic
    # the blind spot: two same-shaped parameters swapped, no names
    swapped = ag._fingerprint(_opt([params[2], params[1], params[0], params[3]]))
    assert [e[1] for e in swapped["parameters"]] == [e[1] for e in base["parameters"]]  # same shapes in order
    assert ag._digest(swapped, with_seed=True) != digest
    # one bit of one value
    other = _model()
    with torch.no_grad():
        w = other[1].bias
        w.view(torch.int32)[3] ^= 1
    assert ag._digest(ag._fingerprint(_opt(other.parameters())), with_seed=True) != digest
    # a rate, the seed (compared in check_consistency, not in the agreement), the step, names
    assert ag._digest(ag._fingerprint(_opt(params, drop_rate=0.2)), with_seed=True) != digest
    reseeded = ag._fingerprint(_opt(params, seed=6))
    assert ag._digest(reseeded, with_seed=True) != digest
    assert ag._digest(reseeded, with_seed=False) == ag._digest(base, with_seed=False)
    stepped = _opt(params)
    stepped.mask_gradients()
    assert ag._fingerprint(stepped)["step"] == 1
    named = ag._fingerprint(_opt(params, model=model))
    assert [e[0] for e in named["parameters"]] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert ag._digest(named, with_seed=True) != digest
    # the fingerprint travels pickled
    assert pickle.loads(pickle.dumps(base)) == base


def test_fingerprint_of_schedules_holds_their_current_value():
    params = list(_model().parameters())
    a = ag._fingerprint(_opt(params, drop_rate=dropgrad.schedules.LinearDropRateScheduler(0.0, 0.5, num_steps=10)))
    b = ag._fingerprint(_opt(params, drop_rate=dropgrad.schedules.LinearDropRateScheduler(0.1, 0.5, num_steps=10)))
    assert a["drop_rate"] != b["drop_rate"] and a["drop_rate"][0] == "LinearDropRateScheduler"
    c = ag._fingerprint(_opt(params, full_update_drop=lambda step: 0.25))
    assert c["full_update_drop"][1] == 0.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.complex64, torch.bool,
                                   torch.int8])
def test_device_checksum_is_exact_and_sees_moved_elements(dtype):
    """The non-CPU path (integer sums on the device), run on CPU: order-free, but it sees a swap."""
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(3000, 7, generator=g) * 100).to(dtype)  # 21000 elements: rows of 1024 words plus a tail
    base = ag._device_checksum(t)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ag._device_checksum(t), base)  # another reduction order, the same sums
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ag._device_checksum(t.t().contiguous().t()), base)  # strides do not matter
    flat = t.reshape(-1)
    for i, j in ((0, 1), (5, 5 + 1024 * 4), (20000, 20995)):  # neighbours, same column of two rows, in the tail
        moved = flat.clone()
        if bool(moved[i] == moved[j]):
            continue
        moved[i], moved[j] = flat[j], flat[i]
        assert not torch.equal(ag._device_checksum(moved), base), (i, j)
    assert ag._device_checksum(torch.empty(0, dtype=dtype)).tolist() == [0, 0, 0]
    assert ag._device_checksum(torch.ones(3, dtype=torch.int8)[1:]).numel() == 3  # an odd byte count


def test_dtensor_like_parameters_compare_their_layout_not_their_shard():
    class Sharded(torch.Tensor):  # stands in for a DTensor: what the fingerprint reads is placements/device_mesh
        placements = ("Shard(dim=0)",)

        class device_mesh:  # noqa: N801
            shape = (2,)

    p = torch.zeros(4).as_subclass(Sharded)
    plain = torch.zeros(4)
    [layout, values] = ag._identities([p, plain])
    assert layout == ("dtensor", "('Shard(dim=0)',)", (2,))
    assert values[0] == "values" and values[1].startswith("sha256:")


# ---------------------------------------------------------------------- messages
def _fp(**over):
    model = _model()
    fp = ag._fingerprint(_opt(model.parameters(), model=model))
    fp.update(over)
    return fp


def test_mismatch_message_names_parameters_ranks_and_values():
    ref = _fp()
    params = ref["parameters"]
    swapped = _fp(parameters=[params[2], params[1], params[0], params[3]], step=4)
    rate = _fp(parameters=[params[0], (*params[1][:3], 0.3, params[1][4]), *params[2:]])
    message = ag._mismatch_message(0, [1, 2], {0: ref, 1: swapped, 2: rate}, 3, with_seed=True)
    assert "ranks 1 and 2 (2 of 3) differ from rank 0" in message
    assert "step count 4 on rank 1, 0 on rank 0 (a rank skipped or repeated a step() call)" in message
    assert "parameter 0: named '1.weight' on rank 1, '0.weight' on rank 0" in message
    assert ("parameter 0 ('0.weight', shape (8, 8)): values differ between rank 1 and rank 0 (rank 1's parameter 0 "
            "holds the values of rank 0's parameter 2: are the parameters in a different order?)") in message
    assert "parameter 1 ('0.bias', shape (8,)): drop rate 0.3 on rank 2, 0.1 on rank 0" in message
    # long lists are cut, and say how much was left out
    many = _fp(parameters=[(*e[:3], 0.9, e[4]) for e in params], rescale=False, seed=1, step=3, drop_rate=0.9,
               full_update_drop=0.5)
    cut = ag._mismatch_message(0, [3], {0: ref, 3: many}, 4, with_seed=True)
    assert "; ... (1 more differences)" in cut and "seed 1 on rank 3, 5 on rank 0" in cut
    assert "rank 3 (1 of 4) differs from rank 0" in cut
    # only values differ: the message says what that means
    drift = _fp(parameters=[(*e[:4], ("values", "sha256:0")) for e in params])
    assert "every replica must hold the same values" in ag._mismatch_message(0, [1], {0: ref, 1: drift}, 2, True)
    # the agreement does not compare seeds
    assert "seed" not in ag._mismatch_message(0, [1], {0: ref, 1: _fp(seed=9, step=1)}, 2, False).split(". Build")[0]


# ---------------------------------------------------------------------- the store protocol
def _run_ranks(store, payloads, timeout_s=5.0, present=None, base="t"):
    """Each present rank runs one exchange in a thread; returns {rank: (ref, bad) or the exception}."""
    size = len(payloads)
    present = range(size) if present is None else present
    out: dict[int, object] = {}

    def rank(r):
        ex = ag._StoreExchange(store, base, list(range(size)), r, timeout_s, "the check")
        try:
            out[r] = ex.first_round(payloads[r], "digest")
            ex.finish()
        except RuntimeError as exc:
            out[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in present]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a rank of the store protocol hung"
    return out


def test_store_exchange_agrees_finds_differing_ranks_and_cleans_up():
    store = torch.distributed.HashStore()
    same = [{"digest": "a", "seed": 10 + r} for r in range(4)]
    out = _run_ranks(store, same)
    assert all(out[r] == ({"digest": "a", "seed": 10}, []) for r in range(4)), out  # rank 0's seed for everyone
    assert store.num_keys() == 0, "the last rank did not delete the check's keys"
    differ = [{"digest": d, "seed": 0} for d in "abac"]
    out = _run_ranks(store, differ, base="u")
    assert all(out[r][1] == [1, 3] for r in range(4)), out


def test_store_exchange_names_the_rank_that_never_comes():
    store = torch.distributed.HashStore()
    out = _run_ranks(store, [{"digest": "a", "seed": 0}] * 3, timeout_s=0.5, present=[0, 2])
    for r in (0, 2):
        assert isinstance(out[r], RuntimeError), out
        assert "rank 1 did not reach the check within 0.5 s" in str(out[r])
    # the latecomer finds that the others gave up, and raises too instead of going on alone
    [late] = _run_ranks(store, [{"digest": "a", "seed": 0}] * 3, timeout_s=0.5, present=[1]).values()
    assert isinstance(late, RuntimeError) and "after another rank had stopped waiting" in str(late)
    # a missing first rank (whose payload everyone compares with) is named as well
    out = _run_ranks(torch.distributed.HashStore(), [{"digest": "a", "seed": 0}] * 2, timeout_s=0.5, present=[1])
    assert "rank 0 did not reach the check" in str(out[1])
