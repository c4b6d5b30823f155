"""One step pipeline per optimizer, shared by every stability callback.

Lightning calls each callback's ``on_before_optimizer_step`` in list order. The stability callbacks must
not depend on that order (SPAM = AdamW + SpikeAwareClipping + MomentumReset holds either way), so the
first of them in ``trainer.callbacks`` (the *leader*) runs every attached callback's stage in a fixed
order: detection and spike action (SpikeGuard), periodic reset (MomentumReset), spike-aware clipping,
adaptive momentum. The others' hooks do nothing.

The per-optimizer :class:`StepRecord` keeps the host-side clock: ``completed`` optimizer steps (counted
by a step post-hook, so a step skipped by a GradScaler is not counted), the step ``last_reset`` of the last
moment reset and its warm-up length. It scales every group's learning rate by the warm-up factor in a
step pre-hook and restores the exact previous value in the post-hook, so LR schedulers never see it.

Device decisions (SpikeGuard's spike flag) never reach the host on the step they are taken: the post-hook
copies them to pinned host memory without blocking, and the next step's pipeline reads them. By then the
device has long finished that work, so the read does not stall it. Everything the host does with a flag
(a reset, undoing a skipped step's host counters, stopping) therefore happens exactly one optimizer step
later, identically on every rank and on every device type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_optim.functional import spam_warmup_factor

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

_RECORD_ATTR = "_lightning_optim_step_record"


@dataclass
class DeferredFlag:
    """A 0-dim bool device tensor whose value the host reads one step later, and what to do then."""

    step: int
    on_host: Tensor
    event: Any
    action: Callable[[StepRecord, int], None]


@dataclass
class StepRecord:
    """Host-side clock and hooks of one optimizer (see module docstring)."""

    optimizer: torch.optim.Optimizer
    index: int
    completed: int = 0
    last_reset: int = 0
    reset_warmup: int = 0
    resets: int = 0
    reset_due: bool = False
    stop_due: int = 0
    lr_factor: float = 1.0
    _saved_lrs: list[Any] | None = None
    _in_step: bool = False
    _deferred: list[DeferredFlag] = field(default_factory=list)
    _this_step_flags: list[tuple[Tensor, Callable[[StepRecord, int], None]]] = field(default_factory=list)
    _after_step: list[Callable[[], None]] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    # host values to put back if the device flag of that step says "undo" (SpikeGuard skip/stop)
    host_snapshots: dict[int, list[tuple[Any, Any, Any]]] = field(default_factory=dict)

    # --- clock -------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """T: the 1-based index of the optimizer step about to run."""
        return self.completed + 1

    @property
    def steps_since_reset(self) -> int:
        """k = T - R (R = 0 before any reset)."""
        return self.step - self.last_reset

    def warmup_factor(self) -> float:
        """SPAM's cosine warm-up factor s(k) after the last reset; 1 before any reset and after N steps."""
        if self.last_reset == 0:
            return 1.0
        return spam_warmup_factor(self.steps_since_reset, self.reset_warmup)

    def record_reset(self, warmup_steps: int) -> None:
        self.last_reset = self.step
        self.reset_warmup = warmup_steps
        self.resets += 1

    # --- deferred device decisions -------------------------------------------------------------------
    def defer(self, flag: Tensor, action: Callable[[StepRecord, int], None]) -> None:
        """Act on ``flag`` on the host one optimizer step later (only if this step really runs)."""
        self._this_step_flags.append((flag, action))

    def after_step(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` right after this step's ``optimizer.step`` (not at all if a GradScaler skips it)."""
        self._after_step.append(fn)

    def resolve(self) -> None:
        """Read the flags of earlier steps (waiting for the device only if it has not got there yet)."""
        deferred, self._deferred = self._deferred, []
        for item in deferred:
            if item.event is not None:
                item.event.synchronize()
            if bool(item.on_host):
                item.action(self, item.step)
            self.host_snapshots.pop(item.step, None)

    # --- optimizer hooks -----------------------------------------------------------------------------
    def attach(self) -> None:
        if not self._handles:
            self._handles = [
                self.optimizer.register_step_pre_hook(self._pre_step),
                self.optimizer.register_step_post_hook(self._post_step),
            ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._this_step_flags.clear()
        self._after_step.clear()

    def set_lr_factor(self, factor: float) -> None:
        """Scale this step's learning rates by ``factor`` (restored right after the step).

        Without a GradScaler Lightning runs the closure, and so this pipeline, inside ``optimizer.step``,
        after the step pre-hook: apply at once. With one, the closure runs before ``scaler.step``: apply in
        the pre-hook, which a skipped step never reaches, so the scaled value can never outlive its step.
        """
        self.lr_factor = factor
        if self._in_step:
            self._apply_lr()

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_step = True
        self._apply_lr()

    def _apply_lr(self) -> None:
        if self.lr_factor == 1.0 or self._saved_lrs is not None:
            return
        self._saved_lrs = []
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, Tensor):
                self._saved_lrs.append(lr.clone())
                lr.mul_(self.lr_factor)  # tensor lrs (capturable, torchao) must change in place
            else:
                self._saved_lrs.append(lr)
                group["lr"] = lr * self.lr_factor

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_step = False
        if self._saved_lrs is not None:
            for group, lr in zip(optimizer.param_groups, self._saved_lrs):
                if isinstance(lr, Tensor):
                    group["lr"].copy_(lr)
                else:
                    group["lr"] = lr
            self._saved_lrs = None
        self.lr_factor = 1.0
        for fn in self._after_step:
            fn()
        self._after_step.clear()
        for flag, action in self._this_step_flags:
            self._deferred.append(_to_host(self.step, flag, action))
        self._this_step_flags.clear()
        self.completed += 1

    def discard_step(self) -> None:
        """Forget this step's pending work (called when a new pipeline run starts without a completed step,
        e.g. after a GradScaler skipped the step)."""
        self._this_step_flags.clear()
        self._after_step.clear()
        self.host_snapshots.pop(self.step, None)
        if not self._in_step:
            self.lr_factor = 1.0

    # --- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.resolve()
        return {
            "completed": self.completed,
            "last_reset": self.last_reset,
            "reset_warmup": self.reset_warmup,
            "resets": self.resets,
            "reset_due": self.reset_due,
            "stop_due": self.stop_due,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("completed", "last_reset", "reset_warmup", "resets", "reset_due", "stop_due"):
            setattr(self, key, type(getattr(self, key))(state[key]))


def _to_host(step: int, flag: Tensor, action: Callable[[StepRecord, int], None]) -> DeferredFlag:
    if flag.device.type == "cpu":
        return DeferredFlag(step, flag.clone(), None, action)
    on_host = torch.empty((), dtype=torch.bool, pin_memory=True)
    on_host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event() if flag.device.type == "cuda" else None
    if event is not None:
        event.record()
    return DeferredFlag(step, on_host, event, action)


def record_for(optimizer: torch.optim.Optimizer, index: int) -> StepRecord:
    """The optimizer's record, created (and its hooks registered) on first use."""
    record = getattr(optimizer, _RECORD_ATTR, None)
    if record is None:
        record = StepRecord(optimizer, index)
        setattr(optimizer, _RECORD_ATTR, record)
    record.index = index
    record.attach()
    return record


def existing_record(optimizer: torch.optim.Optimizer) -> StepRecord | None:
    return getattr(optimizer, _RECORD_ATTR, None)


def optimizer_index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    for i, candidate in enumerate(trainer.optimizers):
        if candidate is optimizer or getattr(candidate, "optimizer", None) is optimizer:
            return i
    return 0


def amp_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The GradScaler's scale when the gradients are still scaled in ``on_before_optimizer_step``.

    Lightning unscales before the hook, except for optimizers that unscale inside ``step`` (fused Adam):
    their gradients arrive multiplied by the scale, which the statistics and clip bounds must account for.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    return scaler._scale


def has_grad_scaler(trainer: pl.Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None
