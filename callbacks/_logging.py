"""Logging of device scalars with one host transfer per logging step."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, Tensor | float]) -> None:
    """Send ``metrics`` to every logger at ``trainer.global_step``; all device tensors travel in one copy."""
    if not metrics or not trainer.loggers:
        return
    names = list(metrics)
    values = list(metrics.values())
    host = [0.0 if isinstance(v, Tensor) else float(v) for v in values]
    tensors = [(i, v) for i, v in enumerate(values) if isinstance(v, Tensor)]
    if tensors:
        device = tensors[0][1].device
        stacked = torch.stack([v.detach().to(device=device, dtype=torch.float32) for _, v in tensors]).cpu()
        for (i, _), value in zip(tensors, stacked.tolist()):
            host[i] = value
    for logger in trainer.loggers:
        logger.log_metrics(dict(zip(names, host)), step=trainer.global_step)
