"""QuantizationAwareTraining: fake-quantized Linear layers with straight-through gradients, from any step."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_optim.validation import check_int
from lightning_optim.callbacks._base import StabilityCallback, StepContext
from lightning_optim.callbacks._pipeline import OptimizerPipeline
from lightning_optim.callbacks.momentum_reset import reset_moments
from lightning_optim.callbacks.quant_monitor import LayerStats, QuantizationMonitor, quant_targets
from lightning_optim.monitors import tags
from lightning_optim.monitors.quant import check_quant_format, fake_quantize_ste, quantize_groups
from lightning_optim.state_adapters import state_adapter

class _QuantSpec(NamedTuple):
    bits: int
    fmt: str
    group_size: int
    quantize_activations: bool


def _qat_forward(self: nn.Linear, input: Tensor) -> Tensor:
    spec: _QuantSpec = self._qat_spec
    weight = fake_quantize_ste(self.weight, spec.bits, spec.fmt, spec.group_size)
    if spec.quantize_activations:  # per token, groups of G along the features
        input = fake_quantize_ste(input, spec.bits, spec.fmt, spec.group_size)
    return F.linear(input, weight, self.bias)


class QATLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight (STE); the class a target is switched to."""

    forward = _qat_forward


_QAT_CLASSES: dict[type, type] = {nn.Linear: QATLinear}


def _qat_class(cls: type) -> type:
    # Linear subclasses get their own thin subclass, so swapping back restores exactly their class.
    if cls not in _QAT_CLASSES:
        _QAT_CLASSES[cls] = type(f"QAT{cls.__name__}", (cls,), {"forward": _qat_forward, "__module__": __name__})
    return _QAT_CLASSES[cls]


class QuantizationAwareTraining(StabilityCallback):
    r"""Fake-quant QAT of every ``nn.Linear`` weight with straight-through gradients, starting at any step.

    Targets: every ``nn.Linear`` of the LightningModule except names starting with a prefix in ``exclude``
    or in the module's optional ``qat_exclude`` attribute (embeddings, norms and biases are never quantized).
    Per output row, contiguous groups of G = ``group_size`` weights along the input dimension (the last group
    may be shorter; G >= in_features means per row), α = max|w| of the group:

        int, b bits:  q_max = 2^(b-1) - 1,  s = α / q_max,  ŵ = s · clamp(round_half_even(w / s), -q_max, q_max)
        fp8 (e4m3):   s = α / 448,          ŵ = s · float8_e4m3fn(w / s)

    in fp32, cast back to the weight's dtype (α = 0 gives ŵ = 0). The forward uses w + (ŵ - w).detach(), so
    ∂L/∂w = ∂L/∂ŵ (STE); ``quantize_activations`` fake-quantizes each target's input the same way along its
    last dimension. Mechanism: each target's class is switched to a thin subclass overriding only
    ``forward`` (parameters, names and ``state_dict`` keys unchanged; checkpoints hold the full-precision
    weights) and switched back at the end of fit, on teardown, and by :meth:`remove`. A target's own
    ``forward`` is replaced by ``F.linear``; a Linear used only through its weight (e.g.
    ``nn.MultiheadAttention.out_proj``) is not quantized by this and should be excluded.

    Activation: at the first training batch with ``global_step >= start_step`` (saved in the callback
    state; it stays active, and validation runs quantized while active). If ``reset_moments_on_start`` and
    the optimizer has already stepped, its first and second moments are zeroed exactly through
    :mod:`lightning_optim.state_adapters` (``step`` kept) and the next N = ``reset_warmup_steps`` updates are
    scaled by SPAM's warm-up s_k = 1 - 0.99 (1 + cos(π k / (N + 1))) / 2 (k = 0 at the first quantized step,
    s_0 = 0.01), through the same pipeline as :class:`MomentumReset`: moments gathered on the
    full-precision loss are stale once the weights are quantized, and a reset without warm-up would make
    the first updates nearly sign-like at full learning rate. Logs ``stability/momentum_resets``.

    Every ``every_n_steps`` optimizer steps it also logs, for its own quantizer, the layer error
    ``quant/layer_error[_a|_b|_c]/<layer>`` of the full-precision model on fixed calibration rows, and
    ``quant/mmr/<layer>[/act]``, ``quant/kurtosis/<layer>[/act]`` (MMR = max|X| / mean|X|, Pearson kurtosis;
    Vlassis et al., "Beyond Outliers", arXiv 2509.23500), as :class:`QuantizationMonitor` does (weights
    only; one host transfer per logging step, no sync on other steps); when a QuantizationMonitor is
    attached, the ``quant/`` tags are left to it. A reset by another stage on the activation step (periodic
    or spike reset) counts once and keeps the longer warm-up. :meth:`export_quantized_state_dict`
    returns the integer/fp8 weight codes and their scales. Paper setting: W4A4 from scratch is
    ``bits=4, quantize_activations=True, start_step=0``.

    Args:
        bits: 8 (default) or 4. fmt: ``"int"`` (default) or ``"fp8"`` (e4m3, needs bits=8).
        group_size: G, weights per scale along the input dimension (default 128).
        start_step: first ``global_step`` trained quantized (default 0).
        quantize_activations: also fake-quantize each target's input (default False).
        reset_moments_on_start: reset the moments and warm up at activation (default True).
        reset_warmup_steps: N, the warm-up length after that reset (default 150, SPAM's).
        exclude: extra name prefixes to leave in full precision (default none).
        every_n_steps: interval of the ``quant/`` statistics (default None: the trainer's
            ``log_every_n_steps``; 0 disables). max_rows: calibration rows (default 8).
        group_depth: name components kept in ``<layer>`` (default 2; None: one tag per module).
    """

    stage_order = 1  # with the periodic reset: a reset on the same step happens once

    def __init__(
        self,
        bits: Literal[8, 4] = 8,
        fmt: Literal["int", "fp8"] = "int",
        group_size: int = 128,
        start_step: int = 0,
        quantize_activations: bool = False,
        reset_moments_on_start: bool = True,
        reset_warmup_steps: int = 150,
        exclude: list[str] | None = None,
        every_n_steps: int | None = None,
        max_rows: int = 8,
        group_depth: int | None = 2,
    ) -> None:
        super().__init__()
        check_quant_format(bits, fmt, group_size)
        check_int("start_step", start_step, 0)
        check_int("reset_warmup_steps", reset_warmup_steps, 0)
        self.spec = _QuantSpec(bits, fmt, group_size, bool(quantize_activations))
        self.start_step = start_step
        self.reset_moments_on_start = bool(reset_moments_on_start)
        self.reset_warmup_steps = reset_warmup_steps
        self.exclude = list(exclude or [])
        self._stats = LayerStats(bits, fmt, group_size, every_n_steps, max_rows, group_depth)
        self.active = False
        self.activation_step: int | None = None
        self._pending_resets: set[int] = set()  # optimizers whose activation reset has not run yet
        self._reset_at: dict[int, int] = {}  # optimizer index -> step T of its activation reset
        self._module: pl.LightningModule | None = None
        self._swapped: dict[str, tuple[nn.Module, type]] = {}

    # --- class swap ----------------------------------------------------------------------------------
    def targets(self, pl_module: nn.Module | None = None) -> dict[str, nn.Linear]:
        """The quantized layers by qualified name."""
        module = pl_module if pl_module is not None else self._module
        if module is None:
            raise RuntimeError("QuantizationAwareTraining is not attached to a model yet; pass pl_module.")
        return quant_targets(module, self.exclude)

    def _swap_in(self, pl_module: nn.Module) -> None:
        for name, module in self.targets(pl_module).items():
            if name in self._swapped:
                continue
            original = type(module)
            module._qat_spec = self.spec
            module.__class__ = _qat_class(original)
            self._swapped[name] = (module, original)

    def remove(self) -> None:
        """Switch every quantized layer back to its own class (the model is then exactly the plain one)."""
        for module, original in self._swapped.values():
            module.__class__ = original
            del module._qat_spec
        self._swapped.clear()

    @contextmanager
    def _full_precision(self) -> Iterator[None]:
        was_swapped = bool(self._swapped)
        self.remove()
        try:
            yield
        finally:
            if was_swapped and self._module is not None:
                self._swap_in(self._module)

    # --- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._module = pl_module

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.active:  # resumed after activation: the sanity check already runs quantized
            self._swap_in(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active:
            self._swap_in(pl_module)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self.reset_moments_on_start:
            state_adapter(optimizer)  # raises a TypeError naming the optimizer if it has no adapter

    def _logs_quant(self, trainer: pl.Trainer) -> bool:
        # one producer per quant/ tag: an attached QuantizationMonitor (its own quantizer) takes precedence
        return not any(isinstance(cb, QuantizationMonitor) for cb in trainer.callbacks)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._logs_quant(trainer):
            self._stats.capture(pl_module, batch)
        if not self.active and trainer.global_step >= self.start_step:
            self.active = True
            self.activation_step = trainer.global_step
            if self.reset_moments_on_start:
                self._pending_resets = set(range(len(trainer.optimizers)))
        if self.active:
            self._swap_in(pl_module)

    def before_step(self, ctx: StepContext) -> None:
        index, clock = ctx.pipeline.index, ctx.clock
        if index not in self._pending_resets:
            return
        self._pending_resets.discard(index)
        if clock.last_reset == clock.step:
            # another stage reset on this very step: one reset, the longer warm-up, whatever the order
            clock.extend_warmup(self.reset_warmup_steps)
        elif clock.completed > 0 or any(len(s) > 0 for s in ctx.optimizer.state.values()):
            reset_moments(ctx.optimizer)
            clock.record_reset(self.reset_warmup_steps)
        else:
            return  # the optimizer has not stepped: nothing stale to forget
        self._reset_at[index] = clock.step

    def metrics(self, pipeline: OptimizerPipeline) -> dict[str, Tensor | float]:
        return {tags.MOMENTUM_RESETS: float(pipeline.clock.resets)} if self.reset_moments_on_start else {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._logs_quant(trainer) and self._stats.due(trainer):
            with self._full_precision():  # the error of quantizing the full-precision (master) weights
                self._stats.log(trainer, pl_module, self.targets(pl_module))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self.remove()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.remove()  # an interrupted fit does not reach teardown

    # --- export and checkpoints ----------------------------------------------------------------------
    def export_quantized_state_dict(self, pl_module: nn.Module | None = None) -> dict[str, Tensor]:
        """Weight codes and scales of every target, as ``{"<name>.weight": codes, "<name>.weight_scale": scales}``.

        ``codes`` has the weight's shape (int8 integers in [-q_max, q_max], int4 codes one per int8; or
        ``float8_e4m3fn``); ``scales`` (fp32) has shape ``(out_features, ceil(in_features / G))``; ŵ is
        ``codes * scale`` of each group of G inputs, exactly the weight the quantized forward uses (before
        the cast to the weight dtype). Biases and other parameters are not included.
        """
        out: dict[str, Tensor] = {}
        for name, module in self.targets(pl_module).items():
            q = quantize_groups(module.weight.detach(), self.spec.bits, self.spec.fmt, self.spec.group_size)
            out[f"{name}.weight"] = q.codes
            out[f"{name}.weight_scale"] = q.scales
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "active": self.active,
            "activation_step": self.activation_step,
            "pending_resets": sorted(self._pending_resets),
            "reset_at": dict(self._reset_at),
            "stats": self._stats.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.active = bool(state_dict.get("active", False))
        self.activation_step = state_dict.get("activation_step")
        self._pending_resets = {int(i) for i in state_dict.get("pending_resets", ())}
        self._reset_at = {int(k): int(v) for k, v in state_dict.get("reset_at", {}).items()}
        self._stats.load_state_dict(state_dict.get("stats", {}))
