"""Helpers shared by the example scripts: pick an optimizer by name, record the training loss."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["OPTIMIZERS", "build_optimizer", "LossHistory"]

OPTIMIZERS = ("spam", "stable_spam", "am_adamw", "am_sgd", "adamw")


def build_optimizer(
    name: str, params: Iterable[Any], lr: float, total_steps: int | None = None
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) over ``params`` with learning rate ``lr``.

    ``total_steps`` sets Stable-SPAM's β1 schedule length (the run's number of steps); others ignore it.
    """
    import lightning_optim  # here, not at module level: the models and data import without it

    if name == "spam":
        return lightning_optim.SPAM(params, lr=lr)
    if name == "stable_spam":
        return lightning_optim.StableSPAM(params, lr=lr, total_steps=total_steps)
    if name == "am_adamw":
        return lightning_optim.AdaptiveMomentumAdamW(params, lr=lr)
    if name == "am_sgd":
        return lightning_optim.AdaptiveMomentumSGD(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


class LossHistory(pl.Callback):
    """Keeps every training loss (detached, on the device: no per-step host sync) to print the first and last."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(outputs["loss"].detach())
