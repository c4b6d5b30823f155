"""SpikeGuard: detect a gradient-norm or loss spike before the update lands and act on that same step."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_optim.validation import check_int, check_range
from lightning_optim.callbacks._base import StabilityCallback, StepContext
from lightning_optim.callbacks._pipeline import HostValue, OptimizerPipeline, existing_pipeline, host_action
from lightning_optim.callbacks.momentum_reset import reset_moments
from lightning_optim.monitors import ZScore, global_grad_norm, tags
from lightning_optim.state_adapters import TorchAOStateAdapter, state_adapter

Monitor = Literal["grad_norm", "loss", "both"]
Action = Literal["reset", "skip", "clip", "stop"]
Statistic = Literal["ema", "window"]


@dataclass
class _GuardState:
    """Per-optimizer statistics and cumulative counters (device tensors, saved in the checkpoint)."""

    grad_z: ZScore
    loss_z: ZScore
    counters: Tensor | None = None  # [spikes, skipped_steps]; a CPU copy when loaded from a checkpoint
    last: Tensor | None = None  # [grad_norm, grad_norm_z, loss_z] of the last step


class SpikeGuard(StabilityCallback):
    """Spike detection with an action on the spiking step itself, for any optimizer, without host syncs.

    Statistics (``lightning_optim.monitors.ZScore``, docs/monitors.md): the global gradient norm
    ‖g‖ (after AMP unscaling, before any clipping) and the training loss averaged over the accumulation
    window and over data-parallel ranks. With ``statistic="ema"`` (ZClip-style): after ``warmup_steps``
    values, z = (x − μ)/σ with an exponentially weighted μ, σ² (factor ``alpha``), spike iff
    z > ``z_threshold``; with ``statistic="window"`` (OLMo-core-style): μ, σ over the last ``window``
    accepted values, spike iff x > μ + ``z_threshold``·σ. Spikes enter the statistics winsorised (EMA) or
    not at all (window); a value too large for the statistic's dtype counts as non-finite (see ZScore).
    A non-finite gradient norm is a spike whatever ``monitor`` is; with ``monitor="loss"`` or ``"both"``
    so is a non-finite loss.

    Data parallelism: every statistic and decision is the same on every rank, even when a gradient goes
    wrong on one rank only after DDP's all-reduce. The gradient norm that feeds the statistics is the
    largest over the ranks (+inf everywhere if any rank's is not finite; one more 0-dim all-reduce per
    step), the loss is averaged over the ranks, and the spike flag is all-reduced (max) as well. ZScore
    states, counters, resets, undone steps and the zeroing of a non-finite gradient therefore agree on
    every rank; ``"clip"``/``"reset"`` rescale each rank's own gradient to the shared μ.

    Actions, applied on the device with masks and multiplications (decided before ``optimizer.step``):

    - ``"clip"``: rescale the gradient to the running norm, g ← g·μ/‖g‖, and step normally.
    - ``"reset"`` (default): as ``"clip"`` on the spiking step T, so the spike cannot poison the
      moments; then at step T + 1 zero the moments through the optimizer's state adapter and warm the
      learning rate up over ``reset_warmup_steps`` steps exactly as :class:`MomentumReset` does.
      The reset comes one step after the spike because the host learns of a device decision one step
      late (see below); the moments only ever saw the rescaled gradient.
    - ``"skip"``: the step has no effect: parameters, optimizer state and step counters are restored
      from a copy taken before the step (memory: one more copy of the parameters and of the optimizer
      state, e.g. 3× the parameters for Adam; time: a copy and a select per step).
    - ``"stop"``: as ``"skip"``; the next step is skipped too, then a checkpoint
      ``spike-step=<T>.ckpt`` is saved in the log directory and training stops with a message.

    A non-finite gradient never reaches the weights or the moments, for every ``monitor``: it counts as
    a spike and is zeroed (``"clip"``, ``"reset"``, which then resets the moments as for any spike) or the
    step is undone (``"skip"``, ``"stop"``). Under a GradScaler (16-mixed) the scaler already skips
    non-finite steps and lowers its scale, so those are left to it and not counted.

    No per-step host sync: the host reads the spike flag one optimizer step later from pinned memory,
    when the device has finished it. Logs ``stability/grad_norm``, ``stability/grad_norm_z``,
    ``stability/loss_z``, ``stability/spikes``, ``stability/skipped_steps`` and
    ``stability/momentum_resets`` every ``log_every_n_steps``. Under FSDP the squared gradient norm of
    the local shards is all-reduced (sum) before the statistics.

    Args:
        monitor: which statistic flags spikes: ``"grad_norm"`` (default), ``"loss"`` or ``"both"``.
        z_threshold: spike threshold on z (default 6.0).
        warmup_steps: values collected before any decision (EMA warm-up; default 50).
        action: ``"reset"`` (default), ``"skip"``, ``"clip"`` or ``"stop"``.
        statistic: ``"ema"`` (default) or ``"window"``.
        alpha: EMA factor of μ and σ² (default 0.97, ZClip's).
        window: window length for ``statistic="window"`` (default 128; decisions once ``warmup_steps``
            values are held).
        reset_warmup_steps: learning-rate warm-up after a spike reset (default 150, SPAM's).
    """

    stage_order = 0

    def __init__(
        self,
        monitor: Monitor = "grad_norm",
        z_threshold: float = 6.0,
        warmup_steps: int = 50,
        action: Action = "reset",
        statistic: Statistic = "ema",
        alpha: float = 0.97,
        window: int = 128,
        reset_warmup_steps: int = 150,
    ) -> None:
        super().__init__()
        _check_choice("monitor", monitor, ("grad_norm", "loss", "both"))
        _check_choice("action", action, ("reset", "skip", "clip", "stop"))
        _check_choice("statistic", statistic, ("ema", "window"))
        check_range("z_threshold", z_threshold, 0.0, low_open=True)
        check_int("warmup_steps", warmup_steps, 1)
        check_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        check_int("window", window, 1)
        if statistic == "window" and warmup_steps > window:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps}; with statistic='window' it must be <= window ({window}).")
        check_int("reset_warmup_steps", reset_warmup_steps, 0)
        self.monitor = monitor
        self.z_threshold = float(z_threshold)
        self.warmup_steps = warmup_steps
        self.action = action
        self.statistic = statistic
        self.alpha = float(alpha)
        self.window = window
        self.reset_warmup_steps = reset_warmup_steps
        self._states: dict[int, _GuardState] = {}
        self._loss_sum: Tensor | None = None
        self._stop_saved: set[int] = set()

    # --- statistics ----------------------------------------------------------------------------------
    def _zscore(self) -> ZScore:
        return ZScore(
            mode=self.statistic,
            alpha=self.alpha,
            threshold=self.z_threshold,
            warmup=self.warmup_steps,
            window=self.window,
            min_count=min(self.warmup_steps, self.window),
        )

    def _state(self, index: int) -> _GuardState:
        if index not in self._states:
            self._states[index] = _GuardState(self._zscore(), self._zscore())
        return self._states[index]

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self.action == "reset":
            state_adapter(optimizer)
        elif self.action in ("skip", "stop") and _torchao_state(optimizer):
            raise TypeError(
                f"SpikeGuard(action={self.action!r}) undoes a step by copying the optimizer state, which "
                f"torchao's quantized state types of {type(optimizer).__name__} do not support; use "
                "action='reset' or action='clip'."
            )

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # Lightning passes the loss already divided by accumulate_grad_batches: the sum over the
        # accumulation window is the mean loss of the optimizer step.
        if self.monitor != "grad_norm":
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    # --- the stage -----------------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        decisions = ctx.pipeline.decisions
        state = self._state(ctx.pipeline.index)
        device = ctx.params[0].device
        if state.last is None:
            state.counters = (state.counters if state.counters is not None else torch.zeros(2)).to(device)
            state.last = torch.zeros(3, device=device)
        if decisions.take_reset():  # a spike reset decided one step ago
            reset_moments(ctx.optimizer)
            ctx.clock.record_reset(self.reset_warmup_steps)

        own_norm = _grad_norm(ctx)
        # The statistic is the same on every rank (a fault after DDP's all-reduce is local to one rank), so
        # ZScore states, counters and every decision below stay identical across ranks.
        norm = own_norm if _sharded(ctx.trainer) else _max_over_ranks(own_norm)
        finite = torch.isfinite(norm)
        z_grad, spike_grad = state.grad_z.update(norm)
        spike = ~finite  # whatever the monitor: a non-finite gradient must never reach the weights
        if self.monitor != "loss":
            spike = spike | spike_grad
        z_loss = torch.zeros((), device=device)
        if self.monitor != "grad_norm" and self._loss_sum is not None:
            loss = _mean_over_ranks(self._loss_sum.to(device))
            z_loss, spike_loss = state.loss_z.update(loss)
            spike = spike | spike_loss
            finite = finite & torch.isfinite(loss)
        self._loss_sum = None
        if ctx.grad_scaler:  # the scaler skips non-finite steps itself (and must see them to rescale)
            spike = spike & finite
        spike = _any_over_ranks(spike)  # a safety net: the inputs above are already the same on every rank
        if decisions.stop_due:  # the host knows now: undo this step as well, then stop after the batch
            spike = torch.ones_like(spike)

        state.counters[0] += spike.to(state.counters.dtype)
        state.last.copy_(torch.stack([norm.float(), z_grad.float(), z_loss.float()]))

        if self.action in ("clip", "reset"):
            self._rescale(ctx, state, own_norm, spike, finite)
            if self.action == "reset":
                decisions.defer(spike, _SCHEDULE_RESET)
        else:
            _undo_if(ctx, spike)
            state.counters[1] += spike.to(state.counters.dtype)
            decisions.defer(spike, _SCHEDULE_STOP if self.action == "stop" else _UNDO_HOST_STEP)

    def _rescale(self, ctx: StepContext, state: _GuardState, norm: Tensor, spike: Tensor, finite: Tensor) -> None:
        """g ← g·μ/‖g‖ on a spike; a non-finite gradient becomes 0 (left to the GradScaler under 16-mixed).

        ``norm`` is the norm of the gradient this rank holds (the global one under sharding): each rank
        rescales its own gradient to the shared target μ, so a gradient corrupted on one rank only ends up
        with the same norm as the others'. ``spike`` and ``finite`` are the same on every rank.
        """
        ratio = state.grad_z.mean.to(norm.dtype) / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        factor = torch.where(spike, ratio, torch.ones_like(ratio))
        if not ctx.grad_scaler:
            factor = torch.where(finite, factor, torch.zeros_like(factor))
        grads = ctx.grads
        torch._foreach_mul_(grads, factor)
        if not ctx.grad_scaler:
            for g in grads:  # non-finite entries stay NaN after the multiplication by 0
                g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    # --- stop ----------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.action != "stop":
            return
        for optimizer in trainer.optimizers:
            pipeline = existing_pipeline(optimizer)
            stop_due = pipeline.decisions.stop_due if pipeline is not None else 0
            if not stop_due or stop_due in self._stop_saved:
                continue
            self._stop_saved.add(stop_due)
            # Act on the undo still pending for this batch's step, so the checkpoint's optimizer state holds
            # the host counters of before the spike too; training stops, so this one wait costs nothing.
            pipeline.resolve()
            directory = trainer.log_dir or trainer.default_root_dir
            path = os.path.join(directory, f"spike-step={stop_due}.ckpt")
            trainer.save_checkpoint(path)
            trainer.should_stop = True
            rank_zero_warn(
                f"SpikeGuard: spike at optimizer step {stop_due} (optimizer {pipeline.index}); the spiking "
                f"step and the one after it were undone, checkpoint saved to {path}; stopping training."
            )

    # --- logging and checkpoints ---------------------------------------------------------------------
    def metrics(self, pipeline: OptimizerPipeline) -> dict[str, Tensor | float]:
        state = self._states.get(pipeline.index)
        if state is None or state.last is None:
            return {}
        out: dict[str, Tensor | float] = {
            tags.GRAD_NORM: state.last[0],
            tags.GRAD_NORM_Z: state.last[1],
            tags.SPIKES: state.counters[0],
            tags.MOMENTUM_RESETS: float(pipeline.clock.resets),
        }
        if self.monitor != "grad_norm":
            out[tags.LOSS_Z] = state.last[2]
        if self.action in ("skip", "stop"):
            out[tags.SKIPPED_STEPS] = state.counters[1]
        return out

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["guard"] = {
            index: {
                "grad_z": state.grad_z.state_dict(),
                "loss_z": state.loss_z.state_dict(),
                "counters": (state.counters if state.counters is not None else torch.zeros(2)).cpu(),
            }
            for index, state in self._states.items()
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._states = {}
        for index, saved in state_dict.get("guard", {}).items():
            state = self._state(int(index))
            state.grad_z.load_state_dict(saved["grad_z"])
            state.loss_z.load_state_dict(saved["loss_z"])
            state.counters = saved["counters"].clone()


# --- host actions, run one step after the device decided (see callbacks/_pipeline.py) -----------------
# Registered by name: a decision still pending when a checkpoint is saved is saved with its action's name.
_SCHEDULE_RESET = "spike_guard.schedule_reset"
_UNDO_HOST_STEP = "spike_guard.undo_host_step"
_SCHEDULE_STOP = "spike_guard.schedule_stop"


@host_action(_SCHEDULE_RESET)
def _schedule_reset(pipeline: OptimizerPipeline, step: int) -> None:
    pipeline.decisions.schedule_reset()


@host_action(_UNDO_HOST_STEP)
def _undo_host_step(pipeline: OptimizerPipeline, step: int) -> None:
    pipeline.undo.put_back(step, pipeline.optimizer, pipeline.clock)
    pipeline.clock.uncount_step()


@host_action(_SCHEDULE_STOP)
def _schedule_stop(pipeline: OptimizerPipeline, step: int) -> None:
    pipeline.decisions.schedule_stop(step)
    _undo_host_step(pipeline, step)


def _undo_if(ctx: StepContext, flag: Tensor) -> None:
    """Copy parameters and optimizer state now; after the step, restore them where ``flag`` is set.

    Tensors on the flag's device are restored on the device with ``torch.where`` right after the step.
    Host values (Python step counters, CPU step tensors of a CUDA model, our ``global_step``) and state
    created by this step are restored or removed by the host one step later, when it reads the flag.
    """
    optimizer = ctx.optimizer
    device = flag.device
    on_device: list[tuple[Tensor, Tensor]] = []
    on_host: list[HostValue] = []
    with torch.no_grad():
        for g, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None:  # the parameters of ctx.params, by position
                    continue
                on_device.append((p, p.detach().clone()))
                state = optimizer.state.get(p)
                if not state:
                    on_host.append(HostValue(g, i, None, absent=True))  # the step creates it: remove it
                    continue
                for key, value in state.items():
                    if isinstance(value, Tensor) and value.device == device:
                        on_device.append((value, value.clone()))
                    else:
                        on_host.append(HostValue.of(g, i, key, value))
    for g, group in enumerate(optimizer.param_groups):
        if "global_step" in group:
            on_host.append(HostValue.of(g, None, "global_step", group["global_step"]))
    ctx.pipeline.undo.keep(ctx.clock.step, flag, on_device, on_host, ctx.clock)


def _grad_norm(ctx: StepContext) -> Tensor:
    """‖g‖ of this rank's gradients after AMP unscaling; under sharding the global norm of all shards."""
    norm = global_grad_norm(ctx.params)
    if _sharded(ctx.trainer):
        squared = norm.square()
        dist.all_reduce(squared)
        norm = squared.sqrt()
    if ctx.amp_scale is not None:
        norm = norm / ctx.amp_scale
    return norm


def _sharded(trainer: pl.Trainer) -> bool:
    return type(trainer.strategy).__name__.startswith(("FSDP", "ModelParallel", "DeepSpeed"))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mean_over_ranks(x: Tensor) -> Tensor:
    if _distributed():
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def _max_over_ranks(norm: Tensor) -> Tensor:
    """The largest gradient norm over the ranks, +inf on every rank if any rank's is not finite.

    Non-finite values become +inf first: how a MAX all-reduce treats NaN is backend-dependent.
    """
    if not _distributed():
        return norm
    norm = torch.where(torch.isfinite(norm), norm, math.inf)
    dist.all_reduce(norm, op=dist.ReduceOp.MAX)
    return norm


def _any_over_ranks(flag: Tensor) -> Tensor:
    if not _distributed():
        return flag
    as_float = flag.float()
    dist.all_reduce(as_float, op=dist.ReduceOp.MAX)
    return as_float > 0


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r}; allowed values are {', '.join(map(repr, allowed))}.")


def _torchao_state(optimizer: torch.optim.Optimizer) -> bool:
    try:
        return isinstance(state_adapter(optimizer), TorchAOStateAdapter)
    except TypeError:  # no adapter: skip/stop need none
        return False
