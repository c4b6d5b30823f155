"""A Lightning fit stopped at a checkpoint and resumed with ``ckpt_path`` ends with the same parameters as an
uninterrupted fit: the global step, resets, warm-ups and schedules all come back from the checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import flat
from test_optimizers_common import FACTORIES

STEPS_PER_EPOCH = 12


class Regression(pl.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.name = name
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        spike = 1e3 if self.global_step in (4, 17) else 1.0
        return torch.nn.functional.mse_loss(self.net(x), y) * spike

    def configure_optimizers(self):
        return FACTORIES[self.name](self.parameters())

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(8 * STEPS_PER_EPOCH, 6, generator=gen), torch.randn(8 * STEPS_PER_EPOCH, 3, generator=gen))
        return DataLoader(data, batch_size=8, shuffle=False)


def _trainer(root: Path, epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_epochs=epochs, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )


@pytest.mark.parametrize("name", FACTORIES)
def test_fit_resumed_from_checkpoint_matches_uninterrupted(name: str, tmp_path: Path) -> None:
    full = Regression(name)
    _trainer(tmp_path / "full", 2, enable_checkpointing=False).fit(full)

    first = Regression(name)
    trainer = _trainer(tmp_path / "part", 1)
    trainer.fit(first)
    ckpt = tmp_path / "part.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = Regression(name)
    resumed_trainer = _trainer(tmp_path / "resumed", 2, enable_checkpointing=False)
    resumed_trainer.fit(resumed, ckpt_path=ckpt)
    assert resumed_trainer.global_step == 2 * STEPS_PER_EPOCH
    assert resumed_trainer.optimizers[0].param_groups[0]["global_step"] == 2 * STEPS_PER_EPOCH
    assert torch.equal(flat(resumed), flat(full))
