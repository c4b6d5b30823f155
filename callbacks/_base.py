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
    OptimizerPipeline,
    StepClock,
    amp_scale,
    existing_pipeline,
    has_grad_scaler,
    optimizer_index,
    pipeline_for,
)
from lightning_optim.monitors.tags import tag_for


@dataclass
class StepContext:
    """What every stage sees for one optimizer step."""

    trainer: pl.Trainer
    optimizer: torch.optim.Optimizer
    pipeline: OptimizerPipeline
    params: list[Tensor]  # parameters of the optimizer that have a gradient at this step
    amp_scale: Tensor | None  # GradScaler scale when the gradients are still scaled (fused optimizers)
    grad_scaler: bool  # a GradScaler will skip the step itself if the gradients are not finite
    log_now: bool  # this step's statistics will be logged (compute log-only values)

    @property
    def clock(self) -> StepClock:
        return self.pipeline.clock

    @property
    def record(self) -> OptimizerPipeline:
        """The pipeline under its former name (``record.index``, ``record.step``), for existing stages."""
        return self.pipeline

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
        self._saved_pipelines: dict[int, dict[str, Any]] = {}  # loaded, restored at train start

    # --- stage interface ---------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise a clear error at fit start if this callback cannot work with ``optimizer``."""

    def metrics(self, pipeline: OptimizerPipeline) -> dict[str, Tensor | float]:
        """Untagged (``stability/...``) scalars to log for one optimizer; device tensors stay on the device."""
        return {}

    # --- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        # the dashboard module imports every callback, so not at the top of this one
        from lightning_optim.callbacks.dashboard import attach_dashboard

        attach_dashboard(trainer)  # the TensorBoard stability page, written at fit start (one per trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index, optimizer in enumerate(trainer.optimizers):
            self.check_optimizer(optimizer)
            # register the step hooks now: Lightning runs the closure (and so our pipeline) inside
            # optimizer.step, after the pre-hooks of that call have already run
            pipeline_for(optimizer, index)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The earliest point at which both the callback states and the optimizer states are loaded, for
        # every strategy (some restore after on_fit_start), and before the first step: LRSafetyRadius's
        # step pre-hook reads the clock before any pipeline run.
        stages = _stability_callbacks(trainer)
        if stages[0] is not self:
            return
        for index, optimizer in enumerate(trainer.optimizers):
            saved = [s for s in (cb._saved_pipelines.pop(index, None) for cb in stages) if s is not None]
            if saved:  # every stability callback saved the same pipeline state
                pipeline_for(optimizer, index).load_state_dict(saved[0])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        stages = _stability_callbacks(trainer)
        if stages[0] is not self:
            return  # the leader runs every stage, in stage order
        pipeline = pipeline_for(optimizer, optimizer_index(trainer, optimizer))
        pipeline.begin_step()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        ctx = StepContext(
            trainer=trainer,
            optimizer=optimizer,
            pipeline=pipeline,
            params=params,
            amp_scale=amp_scale(trainer, optimizer),
            grad_scaler=has_grad_scaler(trainer),
            log_now=trainer._logger_connector.should_update_logs,
        )
        if params:
            for callback in sorted(stages, key=lambda c: c.stage_order):
                callback.before_step(ctx)
        pipeline.warmup.set_factor(pipeline.clock.warmup_factor())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stages = _stability_callbacks(trainer)
        if stages[0] is self and trainer.loggers and trainer._logger_connector.should_update_logs:
            _log(trainer, stages)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            pipeline = existing_pipeline(optimizer)
            if pipeline is not None:
                pipeline.resolve()  # a flag of the last step may still be pending
                pipeline.detach()

    # --- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every optimizer's pipeline state under ``"records"``; reads live state, changes none of it."""
        records = {}
        if self._trainer is not None:
            for optimizer in self._trainer.optimizers:
                pipeline = existing_pipeline(optimizer)
                if pipeline is not None:
                    records[pipeline.index] = pipeline.state_dict()
        for index, saved in self._saved_pipelines.items():  # loaded but not restored yet
            records.setdefault(index, saved)
        return {"records": records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_pipelines = {int(k): dict(v) for k, v in state_dict.get("records", {}).items()}


def _stability_callbacks(trainer: pl.Trainer) -> list[StabilityCallback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, StabilityCallback)]


def _log(trainer: pl.Trainer, stages: list[StabilityCallback]) -> None:
    """Every stage's scalars of every optimizer, tagged per optimizer, in one host transfer."""
    metrics: dict[str, Tensor | float] = {}
    for optimizer in trainer.optimizers:
        pipeline = existing_pipeline(optimizer)
        if pipeline is None:
            continue
        for callback in stages:
            for name, value in callback.metrics(pipeline).items():
                metrics[tag_for(name, pipeline.index)] = value
    log_scalars(trainer, metrics)
