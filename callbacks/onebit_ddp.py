"""OneBitAdamDDP: installs 1-bit Adam's DDP communication hook on the Trainer's model (docs/algorithms.md#onebitadam)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.nn.parallel import DistributedDataParallel

from lightning_optim.onebit_adam import onebit_comm_hook

__all__ = ["OneBitAdamDDP"]


class OneBitAdamDDP(pl.Callback):
    """Installs :func:`lightning_optim.onebit_adam.onebit_comm_hook` on the Trainer's DDP model.

    Add it to ``Trainer(strategy="ddp", callbacks=[OneBitAdamDDP()])`` when training with
    :class:`lightning_optim.OneBitAdam`: backward then all-reduces gradients during the warm-up only, and
    the optimizer's 1-bit momentum exchange is the only communication afterwards. Lightning's own
    ``DDPStrategy(ddp_comm_hook=...)`` registers hooks on CUDA only, hence this callback. The hook is
    registered in ``on_fit_start`` (after the strategy wrapped the model, before the first backward; once
    per DDP model). A no-op without DDP (one process). Do not combine with a ``ddp_comm_hook`` of your
    own (DDP accepts one hook).

    Args:
        process_group: the group the warm-up all-reduce uses (None: the default group, as DDP's).
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel) and not getattr(model, "_onebit_hook", False):
            model.register_comm_hook(self.process_group, onebit_comm_hook)
            model._onebit_hook = True
