"""Every script in examples/ runs end to end (tiny settings, in a temporary folder)."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _compat import transformers_skip_reason

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(args, cwd, timeout=300):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_digits_demo_prints_both_accuracies(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "digits_demo.py"), "--epochs", "2", "--seeds", "1"], tmp_path)
    lines = [line for line in out.splitlines() if "test accuracy" in line]
    assert len(lines) == 2 and lines[1].startswith("DropGrad(Adam")
    for line in lines:
        assert 0.5 < float(line.split("test accuracy")[1].split()[0]) <= 1.0


def test_log_stats_csv_writes_one_row_per_step(tmp_path):
    _run([sys.executable, str(EXAMPLES / "log_stats_csv.py"), "--steps", "20", "--out", "stats.csv"], tmp_path)
    rows = (tmp_path / "stats.csv").read_text().strip().splitlines()
    assert len(rows) == 21  # header + one row per step


@pytest.mark.parametrize(
    "script, args, needs",
    [
        ("lightning_example.py", ["--epochs", "1"], "lightning"),
        ("hf_trainer_example.py", ["--steps", "4", "--save-steps", "2"], "transformers"),
        ("accelerate_example.py", ["--epochs", "1"], "accelerate"),
    ],
)
def test_framework_examples_run(tmp_path, script, args, needs):
    pytest.importorskip(needs)
    if needs == "transformers" and transformers_skip_reason():
        pytest.skip(transformers_skip_reason())
    _run([sys.executable, str(EXAMPLES / script), *args], tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_example_under_torchrun(tmp_path):
    out = _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", str(EXAMPLES / "ddp_example.py"), "--epochs", "1"],
        tmp_path,
    )
    assert "bitwise identical: True" in out
