"""QuantizationMonitor: how much a model would suffer from weight quantization, logged under ``quant/``."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_optim.validation import check_int
from lightning_optim.callbacks._logging import log_scalars
from lightning_optim.monitors import tags
from lightning_optim.monitors.quant import _decompose, check_quant_format, fake_quantize, kurtosis, linear_modules, mmr

def quant_targets(pl_module: nn.Module, exclude: list[str] | None = None) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``pl_module`` except names starting with a prefix in ``exclude`` or in the
    module's optional ``qat_exclude`` attribute."""
    return linear_modules(pl_module, [*(exclude or ()), *getattr(pl_module, "qat_exclude", ())])


def _model_inputs(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """What ``pl_module(...)`` takes from a training batch: ``pl_module.quant_calibration_inputs(batch)`` if
    defined, else the batch itself (a tensor) or its first element (an ``(x, y)`` tuple or list)."""
    hook = getattr(pl_module, "quant_calibration_inputs", None)
    inputs = hook(batch) if callable(hook) else (batch[0] if isinstance(batch, (tuple, list)) else batch)
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"cannot take calibration inputs from a batch of type {type(batch).__name__}: define "
            "`quant_calibration_inputs(batch) -> Tensor` on the LightningModule (the input of its forward)."
        )
    return inputs


class LayerStats:
    """Calibration rows and the per-layer ``quant/`` statistics shared by :class:`QuantizationMonitor` and
    :class:`~lightning_optim.callbacks.QuantizationAwareTraining` (all values stay on the device)."""

    def __init__(
        self, bits: int, fmt: str, group_size: int | None, every_n_steps: int | None, max_rows: int, group_depth: int | None
    ) -> None:
        check_quant_format(bits, fmt, group_size)
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, 0)
        check_int("max_rows", max_rows, 1)
        tags.layer_group("x", group_depth)  # validates group_depth
        self.quantize = partial(fake_quantize, bits=bits, fmt=fmt, group_size=group_size)
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows
        self.group_depth = group_depth
        self.calibration: Tensor | None = None
        self._last_logged = -1

    def capture(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Fix the calibration rows (the first ``max_rows`` rows of the first training batch) once."""
        if self.calibration is None and self.every_n_steps != 0:
            self.calibration = _model_inputs(pl_module, batch)[: self.max_rows].detach().clone()

    def due(self, trainer: pl.Trainer) -> bool:
        """A logging step: ``global_step`` a positive multiple of ``every_n_steps`` (default: the trainer's
        ``log_every_n_steps``), once per step (gradient accumulation calls batch hooks several times)."""
        n = trainer.log_every_n_steps if self.every_n_steps is None else self.every_n_steps
        step = trainer.global_step
        if not n or step == 0 or step % n or step == self._last_logged or not trainer.loggers:
            return False
        return self.calibration is not None

    def metrics(self, pl_module: nn.Module, targets: dict[str, nn.Module]) -> dict[str, Tensor]:
        """``quant/layer_error[_a|_b|_c]/<layer>``, ``quant/mmr/<layer>[/act]``, ``quant/kurtosis/<layer>[/act]``
        (weight, and the layer's input activation with ``/act``), each the maximum over its layer group."""
        assert self.calibration is not None
        device = next(pl_module.parameters()).device
        errors, inputs = _decompose(pl_module, self.calibration.to(device), self.quantize, targets)
        grouped: dict[str, list[Tensor]] = {}
        for name, err in errors.items():  # targets the forward never called are left out
            weight = targets[name].weight.detach()
            values = {
                tags.QUANT_LAYER_ERROR: err.R,
                tags.QUANT_LAYER_ERROR_A: err.A,
                tags.QUANT_LAYER_ERROR_B: err.B,
                tags.QUANT_LAYER_ERROR_C: err.C,
                tags.QUANT_MMR: mmr(weight),
                tags.QUANT_KURTOSIS: kurtosis(weight),
            }
            for prefix, value in values.items():
                grouped.setdefault(tags.layer_tag(prefix, name, self.group_depth), []).append(value)
            for prefix, stat in ((tags.QUANT_MMR, mmr), (tags.QUANT_KURTOSIS, kurtosis)):
                act_tag = tags.layer_tag(prefix, name, self.group_depth) + "/act"
                grouped.setdefault(act_tag, []).append(stat(inputs[name]))
        return {tag: torch.stack([v.float() for v in vs]).amax() for tag, vs in grouped.items()}

    def log(self, trainer: pl.Trainer, pl_module: nn.Module, targets: dict[str, nn.Module]) -> None:
        self._last_logged = trainer.global_step
        log_scalars(trainer, self.metrics(pl_module, targets))

    def state_dict(self) -> dict[str, Any]:
        return {"calibration": None if self.calibration is None else self.calibration.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calibration = state.get("calibration")


class QuantizationMonitor(Callback):
    r"""Per-layer quantization sensitivity of the model being trained (Vlassis et al., "Beyond Outliers: A Study
    of Optimizers Under Quantization", arXiv 2509.23500), logged every ``every_n_steps`` optimizer steps.

    Calibration inputs are fixed at fit start: the first ``max_rows`` rows of the first training batch
    (``batch[0]`` of an ``(x, y)`` batch, or ``pl_module.quant_calibration_inputs(batch)``); they are saved in
    the callback state. On a logging step, with every ``nn.Linear`` as target (except names starting with a
    prefix in ``pl_module.qat_exclude``) and Q the weight quantizer (default 4-bit symmetric per-row
    round-to-nearest, the paper's PTQ setting), :func:`~lightning_optim.monitors.layer_error_decomposition`
    gives per layer

        R = ||h~ - h|| / ||h||,   A = f(x~) - f(x),   B = f~(x) - f(x),   C = h~ - h - A - B

    (A/B/C relative to ||h||: error arriving from earlier layers, the layer's own, their interaction), and
    the outlier statistics MMR = max|W| / mean|W| and Pearson kurtosis E[(W - mu)^4] / E[(W - mu)^2]^2 of each
    weight and (suffix ``/act``) of each layer's input activation. Tags (docs/monitors.md):
    ``quant/layer_error/<layer>``, ``quant/layer_error_a|_b|_c/<layer>``, ``quant/mmr/<layer>[/act]``,
    ``quant/kurtosis/<layer>[/act]``, ``<layer>`` the module name truncated to ``group_depth`` parts, the value
    the maximum over the group. Cost per logging step: about 4 forwards of ``max_rows`` rows and one host
    transfer; nothing on other steps.

    Args:
        every_n_steps: logging interval in optimizer steps (default 500; 0 disables).
        bits: 8 or 4 (default 4). fmt: ``"int"`` (default) or ``"fp8"`` (needs bits=8).
        group_size: entries per scale along the input dimension (default None: one scale per row).
        max_rows: calibration rows (default 8).
        group_depth: name components kept in ``<layer>`` (default 2; None: one tag per module).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        bits: Literal[8, 4] = 4,
        fmt: Literal["int", "fp8"] = "int",
        group_size: int | None = None,
        max_rows: int = 8,
        group_depth: int | None = 2,
    ) -> None:
        self._stats = LayerStats(bits, fmt, group_size, every_n_steps, max_rows, group_depth)

    @property
    def calibration(self) -> Tensor | None:
        """The fixed calibration inputs (None before the first training batch)."""
        return self._stats.calibration

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_optim.callbacks.dashboard import attach_dashboard  # it imports every callback

        attach_dashboard(trainer)  # the TensorBoard stability page, written at fit start (one per trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._stats.capture(pl_module, batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stats.due(trainer):
            self._stats.log(trainer, pl_module, quant_targets(pl_module))

    def state_dict(self) -> dict[str, Any]:
        return self._stats.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stats.load_state_dict(state_dict)
