"""Base class of the stability callbacks: the leader election, logging and checkpoint plumbing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_optim.callbacks._logging import log_scalars
from lightning_optim.callbacks._pipeline import (
    StepRecord,
    amp_scale,
    existing_record,
    has_grad_scaler,
    optimizer_index,
    record_for,
)
from lightning_optim.monitors.tags import tag_for


@dataclass
class StepContext:
    """What every stage sees for one optimizer step."""

    trainer: pl.Trainer
    optimizer: torch.optim.Optimizer
    record: StepRecord
    params: list[Tensor]  # parameters of the optimizer that have a gradient at this step
    amp_scale: Tensor | None  # GradScaler scale when the gradients are still scaled (fused optimizers)
    grad_scaler: bool  # a GradScaler will skip the step itself if the gradients are not finite
    log_now: bool  # this step's statistics will be logged (compute log-only values)

    @property
    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]


class StabilityCallback(Callback):
    """Shared plumbing; subclasses implement :meth:`before_step` (and optionally :meth:`metrics`).

    ``stage_order`` fixes where a callback's stage runs in the per-optimizer pipeline, whatever the order
    of ``trainer.callbacks``: 0 spike detection/action, 1 periodic reset, 2 spike clipping, 3 momentum.
    """

    stage_order: int = 0

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._saved_records: dict[int, dict[str, Any]] = {}

    # --- stage interface ---------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise a clear error at fit start if this callback cannot work with ``optimizer``."""

    def metrics(self, record: StepRecord) -> dict[str, Tensor | float]:
        """Untagged (``stability/...``) scalars to log for one optimizer; device tensors stay on the device."""
        return {}

    # --- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index, optimizer in enumerate(trainer.optimizers):
            self.check_optimizer(optimizer)
            # register the step hooks now: Lightning runs the closure (and so our pipeline) inside
            # optimizer.step, after the pre-hooks of that call have already run
            record_for(optimizer, index)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        stages = _stability_callbacks(trainer)
        if stages[0] is not self:
            return  # the leader runs every stage, in stage order
        record = record_for(optimizer, optimizer_index(trainer, optimizer))
        for callback in stages:
            saved = callback._saved_records.pop(record.index, None)
            if saved is not None:
                record.load_state_dict(saved)
        record.discard_step()  # work queued for a step that a GradScaler then skipped
        record.resolve()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        ctx = StepContext(
            trainer=trainer,
            optimizer=optimizer,
            record=record,
            params=params,
            amp_scale=amp_scale(trainer, optimizer),
            grad_scaler=has_grad_scaler(trainer),
            log_now=trainer._logger_connector.should_update_logs,
        )
        if params:
            for callback in sorted(stages, key=lambda c: c.stage_order):
                callback.before_step(ctx)
        record.set_lr_factor(record.warmup_factor())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stages = _stability_callbacks(trainer)
        if stages[0] is self and trainer.loggers and trainer._logger_connector.should_update_logs:
            _log(trainer, stages)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            record = existing_record(optimizer)
            if record is not None:
                record.resolve()  # a flag of the last step may still be pending
                record.detach()

    # --- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        records = {}
        if self._trainer is not None:
            for optimizer in self._trainer.optimizers:
                record = existing_record(optimizer)
                if record is not None:
                    records[record.index] = record.state_dict()
        for index, saved in self._saved_records.items():  # loaded but not used yet
            records.setdefault(index, saved)
        return {"records": records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_records = {int(k): dict(v) for k, v in state_dict.get("records", {}).items()}


def _stability_callbacks(trainer: pl.Trainer) -> list[StabilityCallback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, StabilityCallback)]


def _log(trainer: pl.Trainer, stages: list[StabilityCallback]) -> None:
    """Every stage's scalars of every optimizer, tagged per optimizer, in one host transfer."""
    metrics: dict[str, Tensor | float] = {}
    for optimizer in trainer.optimizers:
        record = existing_record(optimizer)
        if record is None:
            continue
        for callback in stages:
            for name, value in callback.metrics(record).items():
                metrics[tag_for(name, record.index)] = value
    log_scalars(trainer, metrics)
