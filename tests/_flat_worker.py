"""One rank of the FSDP1 checks in ``test_flat_buffers.py`` (not collected by pytest).

Run as ``python tests/_flat_worker.py RANK WORLD PORT OUTDIR SCENARIO[,SCENARIO...]``.
FSDP1 (``FullyShardedDataParallel``) runs on CPU with gloo; DropGrad must refuse
its parameters on every rank, with a message that says why and what to use.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
import warnings

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from dropgrad import DropGrad  # noqa: E402

torch.set_num_threads(1)


def _fsdp1(use_orig_params: bool) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: N817

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's deprecation and CPU notices
        return FSDP(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"))


def _expect_refusal(model: nn.Module, kind: str) -> None:
    params = list(model.parameters())
    if not any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise AssertionError("FSDP1 did not mark its parameters: the check would be blind")
    try:
        DropGrad(torch.optim.Adam(params, lr=0.05), drop_rate=0.5, seed=3)
    except ValueError as exc:
        text = str(exc)
        for needed in (kind, "FSDP1", "world size", "fully_shard"):
            if needed not in text:
                raise AssertionError(f"{needed!r} missing from the error: {text}") from exc
    else:
        raise AssertionError(f"DropGrad accepted FSDP1's parameters ({kind})")


def fsdp1_flat_refused():
    model = _fsdp1(use_orig_params=False)
    from torch.distributed.fsdp._flat_param import FlatParameter

    if not any(isinstance(p, FlatParameter) for p in model.parameters()):
        raise AssertionError("no FlatParameter with use_orig_params=False")
    _expect_refusal(model, "a FlatParameter")


def fsdp1_orig_params_refused():
    _expect_refusal(_fsdp1(use_orig_params=True), "a view into a FlatParameter")


SCENARIOS = {f.__name__: f for f in (fsdp1_flat_refused, fsdp1_orig_params_refused)}


def main() -> None:
    rank, world, port, outdir, names = sys.argv[1:6]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank), world_size=int(world),
                            timeout=datetime.timedelta(seconds=60))
    results: dict[str, str] = {}
    path = os.path.join(outdir, f"rank{rank}.json")
    failed = False
    for name in names.split(","):
        try:
            SCENARIOS[name]()
            dist.barrier()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
            failed = True
        with open(path, "w") as f:
            json.dump(results, f)
        if failed:
            break  # peers may be stuck in a collective: the parent ends them
    if not failed:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()
