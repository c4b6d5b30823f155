"""One step pipeline per optimizer, shared by every stability callback, on one step clock per optimizer.

Lightning calls each callback's ``on_before_optimizer_step`` in list order. The stability callbacks must
not depend on that order (SPAM = AdamW + SpikeAwareClipping + MomentumReset holds either way), so the
first of them in ``trainer.callbacks`` (the *leader*) runs every attached callback's stage in a fixed
order: detection and spike action (SpikeGuard), periodic reset (MomentumReset), spike-aware clipping,
adaptive momentum. The others' hooks do nothing.

Each job has one owner:

- :class:`StepClock` (one per optimizer, :func:`clock_for`): the optimizer steps that really ran
  (``completed``, counted by the only step hooks registered on the optimizer, so a step skipped by a
  GradScaler is not counted) and the moment-reset bookkeeping on that count (``last_reset``,
  ``reset_warmup``, ``resets``). :class:`~lightning_optim.callbacks.LRSafetyRadius` reads the same clock.
- :class:`LRWarmup`: scales every group's learning rate by the warm-up factor for one step and puts the
  exact previous value back right after it, so LR schedulers (and checkpoints) never see it.
- :class:`DeferredDecisions`: device flags (SpikeGuard's spike flag) that the host reads one step later,
  and the host follow-ups they produce (a reset due, a stop due).
- :class:`StepUndoLog`: how to undo a step a flag may call off: device copies restored right after the
  step, host values put back when the host reads the flag.
- :class:`OptimizerPipeline` (one per optimizer, :func:`pipeline_for`) composes the last three and runs
  them around the clock's step events.

Device decisions never reach the host on the step they are taken: at the end of the step the flag is
copied to pinned host memory without blocking, and the next step's pipeline reads it. By then the
device has long finished that work, so the read does not stall it. Everything the host does with a flag
(a reset, undoing a skipped step's host counters, stopping) therefore happens exactly one optimizer step
later, identically on every rank and on every device type.

Checkpoints: :meth:`OptimizerPipeline.state_dict` changes nothing. A decision still pending is saved with
its value (reading a flag of a finished step is cheap, and saving is not a per-step path) and re-queued
on load, so it acts at the same step as in the uninterrupted run; the host values its undo would put
back are saved by reference (param-group index, parameter index, state key), because Lightning restores
the optimizer state after the callbacks and into new objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_optim.functional import spam_warmup_factor

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

# The clock keeps the attribute name of the former all-in-one step record: code reading
# ``optimizer._lightning_optim_step_record.completed`` / ``.resets`` keeps working.
_CLOCK_ATTR = "_lightning_optim_step_record"
_PIPELINE_ATTR = "_lightning_optim_pipeline"


# --- the clock -------------------------------------------------------------------------------------------
@dataclass(eq=False)  # compared by identity: subscribing the same listener twice is a no-op
class ClockListener:
    """What a user of the clock runs at the start and at the end of every step that really runs."""

    on_start: Callable[[], None] | None = None
    on_end: Callable[[int], None] | None = None  # gets the 1-based index of the step that just ran


class StepClock:
    """The optimizer steps that really ran, and where the last moment reset lies on that count.

    Created on first use and attached to its optimizer (:func:`clock_for`); its step pre- and post-hooks
    are the only ones registered, while at least one listener is subscribed.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.completed = 0
        self.last_reset = 0  # step T of the last moment reset (0: none yet)
        self.reset_warmup = 0  # learning-rate warm-up length after that reset
        self.resets = 0
        self.in_step = False  # between the step's pre- and post-hook
        self._listeners: list[ClockListener] = []
        self._handles: list[Any] = []

    @property
    def step(self) -> int:
        """T: the 1-based index of the optimizer step about to run (or running)."""
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
        """The moments are reset at this step; warm the learning rate up over ``warmup_steps`` steps."""
        self.last_reset = self.step
        self.reset_warmup = warmup_steps
        self.resets += 1

    def extend_warmup(self, warmup_steps: int) -> None:
        """Another stage resets at the step already reset: one reset, the longer warm-up."""
        self.reset_warmup = max(self.reset_warmup, warmup_steps)

    def uncount_step(self) -> None:
        """The last counted step was undone (SpikeGuard skip/stop): it did not happen."""
        self.completed -= 1

    def resume_count(self, completed: int) -> None:
        """Continue counting from a checkpoint that saved only the count (LRSafetyRadius)."""
        self.completed = completed

    # --- undo support --------------------------------------------------------------------------------
    def reset_bookkeeping(self) -> dict[str, int]:
        """The reset fields, to put back with :meth:`restore_reset_bookkeeping` if a step is undone."""
        return {"last_reset": self.last_reset, "reset_warmup": self.reset_warmup, "resets": self.resets}

    def restore_reset_bookkeeping(self, saved: dict[str, int]) -> None:
        self.last_reset = int(saved["last_reset"])
        self.reset_warmup = int(saved["reset_warmup"])
        self.resets = int(saved["resets"])

    # --- listeners and optimizer hooks ---------------------------------------------------------------
    def subscribe(self, listener: ClockListener, first: bool = False) -> None:
        """Run ``listener`` around every step; ``first``: before the listeners already subscribed."""
        if listener in self._listeners:
            return
        self._listeners.insert(0 if first else len(self._listeners), listener)
        if not self._handles:
            self._handles = [
                self.optimizer.register_step_pre_hook(self._pre_step),
                self.optimizer.register_step_post_hook(self._post_step),
            ]

    def unsubscribe(self, listener: ClockListener) -> None:
        """Stop running ``listener``; the last one to leave removes the optimizer hooks."""
        if listener in self._listeners:
            self._listeners.remove(listener)
        if not self._listeners:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self.in_step = False

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.in_step = True
        for listener in list(self._listeners):
            if listener.on_start is not None:
                listener.on_start()

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.in_step = False
        self.completed += 1
        for listener in list(self._listeners):
            if listener.on_end is not None:
                listener.on_end(self.completed)

    # --- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"completed": self.completed, **self.reset_bookkeeping()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.completed = int(state["completed"])
        self.restore_reset_bookkeeping(state)


def clock_for(optimizer: torch.optim.Optimizer) -> StepClock:
    """The optimizer's clock, created on first use."""
    clock = getattr(optimizer, _CLOCK_ATTR, None)
    if clock is None:
        clock = StepClock(optimizer)
        setattr(optimizer, _CLOCK_ATTR, clock)
    return clock


# --- the learning-rate warm-up ---------------------------------------------------------------------------
class LRWarmup:
    """Scales every group's learning rate for one step and restores the exact previous value after it."""

    def __init__(self, optimizer: torch.optim.Optimizer, clock: StepClock) -> None:
        self.optimizer = optimizer
        self.clock = clock
        self.factor = 1.0
        self._saved_lrs: list[Any] | None = None  # the unscaled values while the scaled ones are live
        self._state_dict_hook: Any = None

    def set_factor(self, factor: float) -> None:
        """Scale this step's learning rates by ``factor`` (restored right after the step).

        Without a GradScaler Lightning runs the closure, and so this pipeline, inside ``optimizer.step``,
        after the step pre-hook: apply at once. With one, the closure runs before ``scaler.step``: apply in
        the pre-hook, which a skipped step never reaches, so the scaled value can never outlive its step.
        """
        self.factor = factor
        if self.clock.in_step:
            self.apply()

    def apply(self) -> None:
        if self.factor == 1.0 or self._saved_lrs is not None:
            return
        self._saved_lrs = []
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, Tensor):
                self._saved_lrs.append(lr.clone())
                lr.mul_(self.factor)  # tensor lrs (capturable, torchao) must change in place
            else:
                self._saved_lrs.append(lr)
                group["lr"] = lr * self.factor

    def restore(self) -> None:
        if self._saved_lrs is not None:
            for group, lr in zip(self.optimizer.param_groups, self._saved_lrs):
                if isinstance(lr, Tensor):
                    group["lr"].copy_(lr)
                else:
                    group["lr"] = lr
            self._saved_lrs = None
        self.factor = 1.0

    def discard(self) -> None:
        """Forget a factor set for a step that never ran (a GradScaler skipped it before the pre-hook)."""
        if not self.clock.in_step:
            self.factor = 1.0

    def attach(self) -> None:
        if self._state_dict_hook is None:
            self._state_dict_hook = self.optimizer.register_state_dict_post_hook(self._unscaled_in_state_dict)

    def detach(self) -> None:
        if self._state_dict_hook is not None:
            self._state_dict_hook.remove()
            self._state_dict_hook = None

    def _unscaled_in_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        # a checkpoint taken mid-step must hold the scheduler's learning rate, not this step's scaled one;
        # the packed groups are fresh dicts, so replacing an entry leaves the live groups alone
        if self._saved_lrs is not None:
            for packed, lr in zip(state["param_groups"], self._saved_lrs):
                packed["lr"] = lr.clone() if isinstance(lr, Tensor) else lr
        return state


# --- deferred device decisions ---------------------------------------------------------------------------
HostAction = Callable[["OptimizerPipeline", int], None]
_HOST_ACTIONS: dict[str, HostAction] = {}


def host_action(name: str) -> Callable[[HostAction], HostAction]:
    """Register what the host does when a deferred flag is set, under a name a checkpoint can hold."""

    def register(action: HostAction) -> HostAction:
        _HOST_ACTIONS[name] = action
        return action

    return register


@dataclass
class PendingDecision:
    """A flag of a finished step, on its way to (or already in) host memory."""

    step: int
    action: str
    on_host: Tensor
    ready: Any = None  # a CUDA event recorded after the copy; None when the copy is already complete

    def fired(self) -> bool:
        """The flag's value (waits for the copy only if the device has not got there yet)."""
        if self.ready is not None:
            self.ready.synchronize()
        return bool(self.on_host)


class DeferredDecisions:
    """Device flags the host acts on one optimizer step later, and the follow-ups that produces.

    Follow-ups: ``reset_due`` (a spike reset for the next pipeline run) and ``stop_due`` (the step of the
    spike that stops training; 0 while none); SpikeGuard's stage and stop hook consume them.
    """

    def __init__(self) -> None:
        self._this_step: list[tuple[Tensor, str]] = []  # flags of the step in flight
        self._pending: list[PendingDecision] = []  # flags of finished steps, not read yet
        self.reset_due = False
        self.stop_due = 0

    def defer(self, flag: Tensor, action: str) -> None:
        """Run the host action ``action`` one optimizer step later if ``flag`` is set (and this step runs)."""
        if action not in _HOST_ACTIONS:
            raise KeyError(f"Unknown host action {action!r}; register it with @host_action({action!r}).")
        self._this_step.append((flag, action))

    def step_finished(self, step: int) -> None:
        """Start the copies of this step's flags to the host (they are read at the next pipeline run)."""
        self._pending += [_to_host(step, flag, action) for flag, action in self._this_step]
        self._this_step.clear()

    def discard_step(self) -> None:
        """Forget the flags of a step that did not run."""
        self._this_step.clear()

    def take(self) -> list[PendingDecision]:
        """The pending decisions, in step order; they are no longer pending."""
        pending, self._pending = self._pending, []
        return pending

    def pending_steps(self) -> set[int]:
        return {decision.step for decision in self._pending}

    def schedule_reset(self) -> None:
        self.reset_due = True

    def take_reset(self) -> bool:
        """Whether a reset is due now; it is then no longer due."""
        due, self.reset_due = self.reset_due, False
        return due

    def schedule_stop(self, step: int) -> None:
        if not self.stop_due:  # the first spike names the stop
            self.stop_due = step

    # --- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Follow-ups and the pending decisions with their values; reads the flags, changes nothing."""
        return {
            "reset_due": self.reset_due,
            "stop_due": self.stop_due,
            "pending": [{"step": d.step, "action": d.action, "fired": d.fired()} for d in self._pending],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset_due = bool(state["reset_due"])
        self.stop_due = int(state["stop_due"])
        self._this_step.clear()
        self._pending = [
            PendingDecision(int(d["step"]), str(d["action"]), torch.tensor(bool(d["fired"])))
            for d in state.get("pending", ())  # checkpoints before the split resolved everything first
        ]


def _to_host(step: int, flag: Tensor, action: str) -> PendingDecision:
    if flag.device.type == "cpu":
        return PendingDecision(step, action, flag.clone())
    on_host = torch.empty((), dtype=torch.bool, pin_memory=True)
    on_host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event() if flag.device.type == "cuda" else None
    if event is not None:
        event.record()
    return PendingDecision(step, action, on_host, event)


# --- undoing a step --------------------------------------------------------------------------------------
@dataclass
class HostValue:
    """A host value of the optimizer to put back, named by where it lives rather than by object.

    ``param`` None: the entry ``key`` of param group ``group``. Otherwise the state entry ``key`` of
    parameter ``param`` of that group, or its whole state when ``key`` is None. ``absent``: it did not
    exist, so putting it back removes it. References by index survive a checkpoint and the new state
    objects of ``optimizer.load_state_dict``.
    """

    group: int
    param: int | None
    key: Any
    value: Any = None
    absent: bool = False

    @classmethod
    def of(cls, group: int, param: int | None, key: Any, value: Any) -> HostValue:
        """A copy of ``value`` (a tensor would change in place in the next step)."""
        return cls(group, param, key, value.clone() if isinstance(value, Tensor) else value)

    def put_back(self, optimizer: torch.optim.Optimizer) -> None:
        group = optimizer.param_groups[self.group]
        if self.param is None:
            container = group
        else:
            param = group["params"][self.param]
            if self.key is None:
                optimizer.state.pop(param, None)  # only "absent" is recorded for a whole state
                return
            container = optimizer.state[param]
        if self.absent:
            container.pop(self.key, None)
        else:
            container[self.key] = self.value

    def state_dict(self) -> dict[str, Any]:
        return {"group": self.group, "param": self.param, "key": self.key, "value": _copy(self.value), "absent": self.absent}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HostValue:
        return cls(state["group"], state["param"], state["key"], _copy(state["value"]), bool(state["absent"]))


@dataclass
class HostUndo:
    """The host half of one step's undo: optimizer values and the clock's reset bookkeeping."""

    values: list[HostValue]
    reset_bookkeeping: dict[str, int]

    def state_dict(self) -> dict[str, Any]:
        return {"values": [v.state_dict() for v in self.values], "clock": dict(self.reset_bookkeeping)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HostUndo:
        return cls([HostValue.from_state(v) for v in state["values"]], {k: int(v) for k, v in state["clock"].items()})


class StepUndoLog:
    """What it takes to undo an optimizer step that a device flag may call off.

    Device tensors are restored on the device right after the step wherever the flag is set (no host
    read). Host values (Python counters, CPU step tensors of a CUDA model, state a step creates) can only
    be put back once the host reads the flag, one step later; they are kept per step until then.
    """

    def __init__(self) -> None:
        self._on_device: list[tuple[Tensor, list[tuple[Tensor, Tensor]]]] = []  # step in flight: (flag, [(live, copy)])
        self._on_host: dict[int, HostUndo] = {}

    def keep(
        self, step: int, flag: Tensor, on_device: list[tuple[Tensor, Tensor]], on_host: list[HostValue], clock: StepClock
    ) -> None:
        """Undo step ``step`` if ``flag`` is set: restore ``on_device`` after it, ``on_host`` when read."""
        self._on_device.append((flag, on_device))
        # a reset stage may still run at this step, after the caller: its bookkeeping is undone too
        self._on_host[step] = HostUndo(on_host, clock.reset_bookkeeping())

    def step_finished(self) -> None:
        with torch.no_grad():
            for flag, pairs in self._on_device:
                for live, copy in pairs:
                    torch.where(flag, copy, live, out=live)
        self._on_device.clear()

    def discard_step(self, step: int) -> None:
        """Forget the undo of a step that did not run."""
        self._on_device.clear()
        self._on_host.pop(step, None)

    def put_back(self, step: int, optimizer: torch.optim.Optimizer, clock: StepClock) -> None:
        """Put the host values of ``step`` back (its flag was set)."""
        undo = self._on_host.pop(step, None)
        if undo is None:
            return
        for value in undo.values:
            value.put_back(optimizer)
        clock.restore_reset_bookkeeping(undo.reset_bookkeeping)

    def forget(self, step: int) -> None:
        self._on_host.pop(step, None)

    def state_dict(self, steps: set[int]) -> dict[int, dict[str, Any]]:
        """The host undo of ``steps`` (those with a pending decision; not the step in flight)."""
        return {step: undo.state_dict() for step, undo in sorted(self._on_host.items()) if step in steps}

    def load_state_dict(self, state: dict[Any, dict[str, Any]]) -> None:
        self._on_device.clear()
        self._on_host = {int(step): HostUndo.from_state(undo) for step, undo in state.items()}


def _copy(value: Any) -> Any:
    # a saved state dict must not share a tensor with live state that a later step changes in place
    return value.clone() if isinstance(value, Tensor) else value


# --- the pipeline ----------------------------------------------------------------------------------------
class OptimizerPipeline:
    """The stability callbacks' per-optimizer state: warm-up, deferred decisions and undo log on its clock."""

    def __init__(self, optimizer: torch.optim.Optimizer, index: int) -> None:
        self.optimizer = optimizer
        self.index = index  # position in trainer.optimizers: names the per-optimizer tags and states
        self.clock = clock_for(optimizer)
        self.warmup = LRWarmup(optimizer, self.clock)
        self.decisions = DeferredDecisions()
        self.undo = StepUndoLog()
        self._listener = ClockListener(on_start=self.warmup.apply, on_end=self._finish_step)

    @property
    def step(self) -> int:
        """T: the 1-based index of the optimizer step in flight (on the clock)."""
        return self.clock.step

    def attach(self) -> None:
        # first: a step is finished (learning rate restored, undone on the device) before anyone else
        # (LRSafetyRadius) observes it
        self.clock.subscribe(self._listener, first=True)
        self.warmup.attach()

    def detach(self) -> None:
        self.clock.unsubscribe(self._listener)
        self.warmup.detach()
        self.decisions.discard_step()
        self.undo.discard_step(self.clock.step)

    def _finish_step(self, step: int) -> None:
        self.warmup.restore()
        self.undo.step_finished()
        self.decisions.step_finished(step)

    def begin_step(self) -> None:
        """Start a pipeline run: drop what a GradScaler-skipped step queued, act on earlier decisions."""
        self.decisions.discard_step()
        self.undo.discard_step(self.clock.step)
        self.warmup.discard()
        self.resolve()

    def resolve(self) -> None:
        """Read the flags of earlier steps and run the host action of each one that is set."""
        for decision in self.decisions.take():
            if decision.fired():
                _HOST_ACTIONS[decision.action](self, decision.step)
            self.undo.forget(decision.step)

    # --- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Clock, follow-ups, pending decisions and their host undo; changes no live state."""
        decisions = self.decisions.state_dict()
        return {
            **self.clock.state_dict(),
            **decisions,
            "undo": self.undo.state_dict(self.decisions.pending_steps()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.load_state_dict(state)
        self.decisions.load_state_dict(state)
        self.undo.load_state_dict(state.get("undo", {}))


def pipeline_for(optimizer: torch.optim.Optimizer, index: int) -> OptimizerPipeline:
    """The optimizer's pipeline, created (and attached to its clock) on first use."""
    pipeline = getattr(optimizer, _PIPELINE_ATTR, None)
    if pipeline is None:
        pipeline = OptimizerPipeline(optimizer, index)
        setattr(optimizer, _PIPELINE_ATTR, pipeline)
    pipeline.index = index
    pipeline.attach()
    return pipeline


def existing_pipeline(optimizer: torch.optim.Optimizer) -> OptimizerPipeline | None:
    return getattr(optimizer, _PIPELINE_ATTR, None)


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
