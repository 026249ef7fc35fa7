"""Test-suite grouping: the tests that launch worker processes carry the ``processes`` marker.

They are the slow part of the suite (each launch imports torch in every worker, several
gloo ranks per launch, torchrun restarts, DeepSpeed, the examples): about two thirds of its
wall time on a 2-core machine. The README's test command runs everything; for a quick loop
while editing, ``python -m pytest -q -m "not processes"`` leaves them out.
"""

from __future__ import annotations

import pytest

# modules whose tests (all of them, or their slow majority) start other Python processes
_PROCESS_MODULES = {
    "test_distributed",  # 2 and 4 gloo ranks
    "test_dcp",  # torchrun launches with kill/restart (also 8 quick single-process tests)
    "test_tensor_parallel",  # 4 ranks, 2x2 meshes
    "test_deepspeed",  # 2 DeepSpeed ranks
    "test_comm_hook_device",  # the GPU check script on CPU (also quick unit tests)
    "test_examples",  # the examples, torchrun included
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark = pytest.mark.processes
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in _PROCESS_MODULES:
            item.add_marker(mark)
