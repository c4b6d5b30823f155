"""Helpers shared by the example scripts: pick an optimizer by name, record the training loss."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["OPTIMIZERS", "build_optimizer", "optimizer_name", "LossHistory"]

def _registered() -> tuple[str, ...]:
    from lightning_optim import registry  # here, not at module level: the models and data import without it

    return tuple(e.name for e in registry.optimizers())


#: the names ``--optimizer`` accepts: every registered optimizer (aliases such as ``stable_spam`` work too)
OPTIMIZERS = _registered()


def optimizer_name(value: str) -> str:
    """``argparse`` type for ``--optimizer``: a registered name or alias, else an error listing them."""
    import argparse

    from lightning_optim import registry

    try:
        registry.get(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def build_optimizer(
    name: str, params: Iterable[Any], lr: float, total_steps: int | None = None
) -> torch.optim.Optimizer:
    """The registered optimizer ``name`` (a name or alias, see :data:`OPTIMIZERS`) with learning rate ``lr``.

    ``total_steps`` goes to the optimizers that need the run's length (Stable-SPAM's β1 schedule).
    """
    from lightning_optim import registry

    return registry.build(name, params, total_steps=total_steps, lr=lr)


class LossHistory(pl.Callback):
    """Keeps every training loss (detached, on the device: no per-step host sync) to print the first and last."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(outputs["loss"].detach())
