"""Small Lightning fixtures for the stability-callback tests (imported by tests/test_callbacks*.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]


class Regression(pl.LightningModule):
    """MLP regression on fixed synthetic data; ``loss_spikes`` multiplies the loss at given global steps."""

    def __init__(self, make_optimizer: OptimizerFactory, loss_spikes: dict[int, float] | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
        )
        self.make_optimizer = make_optimizer
        self.loss_spikes = loss_spikes or {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        return loss * self.loss_spikes.get(self.trainer.global_step, 1.0)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(512, 6, generator=gen), torch.randn(512, 3, generator=gen))
        return DataLoader(data, batch_size=8, shuffle=False)


class GradientSpike(pl.Callback):
    """Multiplies every gradient by ``factor`` (or sets it to NaN) at the given 0-based optimizer steps.

    Put it before the stability callbacks: it must act before their pipeline reads the gradients.
    ``rank``: only that rank's gradients (after DDP's all-reduce), to test that ranks agree.
    """

    def __init__(self, steps: set[int], factor: float = 1e4, rank: int | None = None) -> None:
        self.steps, self.factor, self.rank = set(steps), factor, rank

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step not in self.steps or (self.rank is not None and trainer.global_rank != self.rank):
            return
        for p in pl_module.parameters():
            if p.grad is not None:
                if math.isnan(self.factor):
                    p.grad.fill_(math.nan)
                else:
                    p.grad.mul_(self.factor)


class History(pl.Callback):
    """Parameters and the mean train loss after every optimizer step."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params.append(torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()]))


def fit(
    module: pl.LightningModule,
    callbacks: list[pl.Callback],
    max_steps: int,
    root: Path | None = None,
    ckpt_path: str | None = None,
    datamodule: pl.LightningDataModule | None = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=str(root) if root else None,
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])
