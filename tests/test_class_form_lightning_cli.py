"""LightningCLI picks the optimizer by class path: ``--optimizer dropgrad.optim.AdamW
--optimizer.drop_rate 0.1``, or the same in a YAML config file."""

from __future__ import annotations

import pytest
import torch

lightning = pytest.importorskip("lightning")
pytest.importorskip("jsonargparse")
from lightning.pytorch.cli import LightningCLI  # noqa: E402

import dropgrad  # noqa: E402

from _class_form_helpers import MaskAudit  # noqa: E402

SEED, RATE, STEPS = 9, 0.25, 4


class TinyModel(lightning.LightningModule):
    """No configure_optimizers: LightningCLI adds the one from --optimizer."""

    def __init__(self, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        self.audit = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_fit_start(self):
        self.audit = MaskAudit(self.trainer.optimizers[0], raw="manual")

    def on_before_optimizer_step(self, optimizer):  # inside Lightning's closure: after backward, before the masks
        self.audit.record_raw()

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=16)


TRAINER_ARGS = [
    f"--trainer.max_steps={STEPS}", "--trainer.accelerator=cpu", "--trainer.logger=false",
    "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
]


def _fit(args, tmp_path):
    cli = LightningCLI(
        TinyModel, args=["fit", f"--trainer.default_root_dir={tmp_path}", *TRAINER_ARGS, *args],
        save_config_kwargs={"overwrite": True},
    )
    opt = cli.trainer.optimizers[0]
    assert type(opt) is dropgrad.optim.AdamW and opt.seed == SEED and opt.param_groups[0]["lr"] == 0.01
    return cli.model.audit


def test_optimizer_class_path_on_the_command_line(tmp_path):
    audit = _fit(
        ["--optimizer", "dropgrad.optim.AdamW", "--optimizer.lr", "0.01",
         "--optimizer.drop_rate", str(RATE), "--optimizer.seed", str(SEED)],
        tmp_path,
    )
    audit.check(RATE, min_steps=STEPS)


def test_optimizer_from_a_config_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "optimizer:\n"
        "  class_path: dropgrad.optim.AdamW\n"
        "  init_args:\n"
        "    lr: 0.01\n"
        "    weight_decay: 0.0\n"
        f"    drop_rate: {RATE}\n"
        f"    seed: {SEED}\n"
    )
    audit = _fit([f"--config={config}"], tmp_path)
    assert audit.opt.param_groups[0]["weight_decay"] == 0.0
    audit.check(RATE, min_steps=STEPS)


def test_cli_help_lists_dropgrad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(TinyModel, args=["fit", "--optimizer", "dropgrad.optim.AdamW", "--optimizer.help", "dropgrad.optim.AdamW"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--optimizer.drop_rate" in out and "--optimizer.lr" in out and "--optimizer.param_drop_rates" in out
