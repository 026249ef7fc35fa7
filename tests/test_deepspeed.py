"""DeepSpeed ZeRO stages 0-2: exact (stage 0 in fp32) or refused (flat partitions), on 2 gloo processes.

Launches ``tests/_deepspeed_worker.py`` once with DeepSpeed's CPU accelerator
(``DS_ACCELERATOR=cpu``). Stage 0 in fp32 steps DropGrad on the original
parameters after DeepSpeed's all-reduce: the final parameters are compared with
a single-process DropGrad run of the global batch (float rounding: DeepSpeed
averages in a different order; the replicas are compared bitwise). Stages 1 and
2 and bf16 at stage 0 give the client optimizer flat partitions: every rank must
raise DropGrad's error at the first step, naming DeepSpeed. Skipped where
DeepSpeed is not installed (``pip install deepspeed``; CPU only needs no build).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_deepspeed_worker.py")
SCENARIOS = ["stage0_fp32_exact", "stage1_refused", "stage2_refused", "stage0_bf16_refused"]
LAUNCH_TIMEOUT_S = 180

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"),
    pytest.mark.skipif(not torch.distributed.is_available() or not sys.platform.startswith("linux"),
                       reason="needs torch.distributed with gloo and a loopback interface named lo"),
]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    from _flat_launch import launch

    # an empty extension cache: nothing may need DeepSpeed's JIT builds (they take minutes)
    extensions = tmp_path_factory.mktemp("torch_extensions")
    return launch(WORKER, 2, SCENARIOS, tmp_path_factory.mktemp("ds2"), LAUNCH_TIMEOUT_S,
                  {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions)})


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_processes(world2, scenario):
    assert world2[scenario] == "ok", world2[scenario]
