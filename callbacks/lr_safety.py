"""Learning-rate safety radius (Ghosts of Softmax) as a monitor and a step-length controller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_optim.validation import check_bool, check_int, check_range
from lightning_optim.callbacks._logging import log_scalars
from lightning_optim.callbacks._pipeline import ClockListener, StepClock, clock_for
from lightning_optim.monitors import tags
from lightning_optim.monitors.safety_radius import (
    Method,
    check_fd_epsilon,
    check_method,
    controller_scale,
    directional_slopes,
    eval_mode,
    functional_logits,
    logit_slope_spread,
    radius_from_spread,
    update_norm,
)

LogitsFn = Callable[[pl.LightningModule, Any], Tensor]


class LRSafetyRadius(Callback):
    r"""Measure, and optionally cap, each update's step length against the softmax safety radius.

    Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes in Cross-Entropy",
    arXiv 2603.13552. For the update the optimizer actually applied, p = θ_new − θ_old (learning rate,
    momentum, weight decay and warm-ups included, so any optimizer works), of length τ = ‖p‖, the logits
    of sample x move by a(x) = J_z(x)·p to first order. The cross-entropy's Taylor series along p
    converges only within

    .. math::
        \rho_a = \frac{\pi}{\max_x \Delta a_v(x)}, \qquad
        \Delta a_v(x) = \frac{\max_k a_k(x) - \min_k a_k(x)}{\tau}, \qquad r = \tau / \rho_a

    of θ_old. r < 1: the step stays inside the radius (safe; across the paper's six architectures no step
    with r < 1 broke training); r ≥ 1: the step leaves the region where the loss is predicted by its
    local expansion (risky). r is proportional to the learning rate, so a plot of
    ``stability/lr_safety_ratio`` next to the learning rate shows how far the schedule is from the edge.

    Modes:
        ``"monitor"``: every ``every_n_steps``-th optimizer step, snapshot θ before the step, difference
        after it and log r (``stability/lr_safety_ratio``) and ρ_a (``stability/lr_safety_radius``) of
        that step on the current batch. The parameters are never changed.
        ``"control"``: probe every optimizer step and apply θ = θ_old + s·p with
        s = min(1, target_ratio / r), so the kept update has r ≤ target_ratio; the optimizer state keeps
        this step's gradient, only the displacement is scaled. Also logs ``stability/lr_scale`` (s of the
        last step) and ``stability/lr_scaled_steps`` (cumulative steps with s < 1); every_n_steps sets
        only the logging cadence. The logged r is that of the proposed update, before scaling.

    Logits: ``logits_fn(pl_module, batch)`` if given, else ``pl_module.probe_logits(batch)`` if the
    module defines it, else ``pl_module(batch[0])`` for tuple/list batches and ``pl_module(batch)`` for
    a tensor batch; an output with a ``.logits`` attribute is accepted. Classes are on the last
    dimension; every other position is a sample (each token of a language model). The probe runs on the
    first R rows of the batch (every tensor in the batch must have the sample dimension first),
    R = max(1, ⌊max_samples / S⌋) with S positions per row, learned on the first probe (one row); every
    module runs in eval mode and autocast is off (fp32 logits).

    Cost: a probe is one forward-mode JVP (≈ 2 forwards; run under the math attention kernel because
    flash/cuDNN attention has no forward-mode rule) or two forwards with finite differences.
    Memory: monitor mode holds a copy of the updated parameters only during a probe; control mode keeps
    one persistent copy (1× the parameters the optimizer updates, e.g. 4 bytes per fp32 parameter) and,
    during the probe, the update p (another 1×, freed after) plus the probe's logits and tangents.
    No host sync per step: r and s stay on the device until they are logged.

    Distributed: single device and DDP; the spread is all-reduced with MAX before ρ_a is formed, so every
    rank applies the same s. Exactly one optimizer.

    Steps are counted on the optimizer's step clock, shared with the stability callbacks
    (``callbacks/_pipeline.py``): a step skipped by a GradScaler is not counted, nor one undone by
    :class:`SpikeGuard` (``action="skip"``/``"stop"``). ``completed`` is the clock's count. The host
    learns of an undo during the next step; without a GradScaler that is after the next step's probe
    decision, so that one decision still counts the undone step.

    Args:
        mode: ``"monitor"`` (default) or ``"control"``.
        every_n_steps: probe (monitor) / logging (control) cadence in optimizer steps (default 50, >= 1).
        target_ratio: the controller's cap on r (default 1.0, the theoretical boundary; the authors
            recommend 0.5 as a conservative start). > 0.
        max_samples: samples (rows × positions) per probe (default 256, >= 1).
        method: ``"jvp"`` (forward-mode AD), ``"finite_difference"`` (central, two forwards) or ``"auto"``
            (default: JVP, falling back to finite differences once, with a warning, when the model has an
            operation without a forward-mode rule).
        fd_epsilon: finite-difference step in parameter-space distance (default 1e-4, > 0).
        logits_fn: ``(pl_module, batch) -> logits`` for models whose ``forward`` does not return logits.
        verbose: at the end of fit, print one verdict (rank 0): the last r, how many probes had r >= 1, the
            final training loss and what to do about the learning rate (default True; see :meth:`verdict`).
    """

    def __init__(
        self,
        mode: Literal["monitor", "control"] = "monitor",
        every_n_steps: int = 50,
        target_ratio: float = 1.0,
        max_samples: int = 256,
        method: Method = "auto",
        fd_epsilon: float = 1e-4,
        logits_fn: LogitsFn | None = None,
        verbose: bool = True,
    ) -> None:
        if mode not in ("monitor", "control"):
            raise ValueError(f"Invalid mode: {mode!r}; allowed values are 'monitor' and 'control'.")
        check_int("every_n_steps", every_n_steps, 1)
        check_range("target_ratio", target_ratio, 0.0, None, low_open=True)
        check_int("max_samples", max_samples, 1)
        check_method(method)
        check_fd_epsilon(fd_epsilon)
        check_bool("verbose", verbose)
        if logits_fn is not None and not callable(logits_fn):
            raise ValueError(f"Invalid logits_fn: {logits_fn!r}; must be callable as logits_fn(pl_module, batch).")
        self.mode = mode
        self.every_n_steps = every_n_steps
        self.target_ratio = float(target_ratio)
        self.max_samples = max_samples
        self.method: str = method
        self.fd_epsilon = float(fd_epsilon)
        self.logits_fn = logits_fn
        self.verbose = bool(verbose)

        self._clock: StepClock | None = None  # the optimizer's shared step clock, from fit start on
        self._resumed_completed: int | None = None  # a loaded count, handed to the clock at fit start
        self._listener = ClockListener(on_start=self._pre_step, on_end=self._post_step)
        self.positions_per_row: int | None = None  # S, learned on the first probe
        self.ratio: Tensor | None = None
        self.radius: Tensor | None = None
        self.scale: Tensor | None = None
        self.scaled_steps: Tensor | float = 0.0
        self.probes = 0  # probes taken (host count)
        self.risky_probes: Tensor | float = 0.0  # probes with r >= 1 (on the device until the verdict)
        self.peak_ratio: Tensor | float = 0.0
        self._module: pl.LightningModule | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._snapshot: list[Tensor] | None = None
        self._probing = False
        self._batch: Any = None
        self._log_due = False

    @property
    def completed(self) -> int:
        """Optimizer steps that really ran, on the optimizer's step clock."""
        if self._clock is None:
            return self._resumed_completed or 0
        return self._clock.completed

    # --- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_optim.callbacks.dashboard import attach_dashboard  # it imports every callback

        attach_dashboard(trainer)  # the TensorBoard stability page, written at fit start (one per trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_strategy(trainer)
        if len(trainer.optimizers) != 1:
            raise ValueError(f"LRSafetyRadius needs exactly one optimizer, found {len(trainer.optimizers)}.")
        optimizer = trainer.optimizers[0]
        names = {p: name for name, p in pl_module.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        missing = [i for i, p in enumerate(params) if p not in names]
        if missing:
            raise ValueError(
                f"LRSafetyRadius: {len(missing)} parameters of the optimizer are not parameters of the "
                "LightningModule, so the probe cannot substitute them."
            )
        self._module, self._optimizer = pl_module, optimizer
        self._params = params
        self._names = [names[p] for p in params]
        self._remove_hooks()
        self._clock = clock_for(optimizer)
        if self._resumed_completed is not None:
            # a pipeline restore (the stability callbacks, at train start) comes later and takes precedence
            self._clock.resume_count(self._resumed_completed)
            self._resumed_completed = None
        self._clock.subscribe(self._listener)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._log_due:
            self._log_due = False
            log_scalars(trainer, self.metrics())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self.verbose and trainer.is_global_zero:
            print(self.verdict(trainer.callback_metrics))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def metrics(self) -> dict[str, Tensor | float]:
        """The last probe's scalars under their ``stability/`` tags (device tensors stay on the device)."""
        if self.ratio is None or self.radius is None:
            return {}
        metrics: dict[str, Tensor | float] = {tags.LR_SAFETY_RATIO: self.ratio, tags.LR_SAFETY_RADIUS: self.radius}
        if self.mode == "control" and self.scale is not None:
            metrics[tags.LR_SCALE] = self.scale
            metrics[tags.LR_SCALED_STEPS] = self.scaled_steps
        return metrics

    # --- step clock events ---------------------------------------------------------------------------
    def _pre_step(self) -> None:
        step = self.completed + 1
        self._probing = self._batch is not None and (self.mode == "control" or step % self.every_n_steps == 0)
        if not self._probing:
            return
        with torch.no_grad():
            if self.mode == "control":
                if self._snapshot is None:  # one persistent buffer, reused every step
                    self._snapshot = [torch.empty_like(p) for p in self._params]
                torch._foreach_copy_(self._snapshot, self._params)
            else:
                self._snapshot = [p.detach().clone() for p in self._params]

    def _post_step(self, step: int) -> None:
        if not self._probing or self._snapshot is None:
            return
        self._probing = False
        with torch.no_grad():
            new = [p.detach() for p in self._params]
            update = torch._foreach_sub(new, self._snapshot)
            ratio, radius = self._probe(self._snapshot, update)
            self.ratio, self.radius = ratio, radius
            self.probes += 1
            self.risky_probes = self.risky_probes + (ratio >= 1).to(ratio.dtype)
            self.peak_ratio = torch.maximum(ratio, torch.as_tensor(self.peak_ratio, dtype=ratio.dtype, device=ratio.device))
            if self.mode == "control":
                scale = controller_scale(ratio, self.target_ratio)
                # θ_new − (1 − s)·p = θ_old + s·p, and exactly θ_new when s = 1
                torch._foreach_mul_(update, 1.0 - scale)
                torch._foreach_sub_(new, update)
                self.scale = scale
                self.scaled_steps = self.scaled_steps + (scale < 1).to(scale.dtype)
            else:
                self._snapshot = None  # monitor mode frees the copy after the probe
        del update
        self._log_due = step % self.every_n_steps == 0

    def verdict(self, metrics: dict[str, Any] | None = None) -> str:
        """What the probes found, in one or two sentences (one host sync: call it at the end, not per step).

        The advice follows the ratio's meaning: r is proportional to the learning rate and r < 1 keeps the
        step inside the radius where the loss follows its local expansion.

        Args:
            metrics: ``trainer.callback_metrics``, for the final training loss (optional).
        """
        loss = next((float(v) for k, v in (metrics or {}).items() if k in ("train/loss", "train_loss", "loss")), None)
        head = f"LRSafetyRadius ({self.mode}): " + (f"final training loss {loss:.4g}; " if loss is not None else "")
        if self.ratio is None or not self.probes:
            return head + f"no probe ran (one every {self.every_n_steps} optimizer steps); train longer to measure r."
        last, peak, risky = float(self.ratio), float(self.peak_ratio), int(float(self.risky_probes))
        found = f"last r = {last:.3g}, peak r = {peak:.3g}, {risky} of {self.probes} probes had r >= 1"
        if self.mode == "control":
            shrunk = int(float(self.scaled_steps))
            return head + found + f"; the controller shrank {shrunk} steps to r <= {self.target_ratio:g}."
        if peak >= 1:
            advice = (f"Steps left the safety radius: lower the learning rate about {peak:.2g}x, or use "
                      "LRSafetyRadius(mode='control') to cap each step at r = 1.")
        elif last < 0.5:
            advice = (f"Every step stayed well inside the radius: the learning rate has headroom (r reaches 1 "
                      f"near {1 / max(last, 1e-12):.2g}x the current lr), so a larger lr is worth a try.")
        else:
            advice = "Steps stay inside the radius but near its edge: keep this learning rate or lower it slightly."
        return head + found + ". " + advice

    # --- the probe -----------------------------------------------------------------------------------
    def _probe(self, old: list[Tensor], update: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(r, ρ_a) of the update ``update`` taken from ``old``, the same on every rank."""
        tau = update_norm(update)
        spread = self._local_spread(old, update, tau)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)  # p and τ are equal on all ranks; the batches not
        rho, ratio = radius_from_spread(spread, tau.to(spread.device))
        return ratio, rho

    def _local_spread(self, old: list[Tensor], update: list[Tensor], tau: Tensor) -> Tensor:
        """max over this rank's probe samples of Δ(J·p), at θ_old, every module in eval mode."""
        assert self._module is not None
        rows = 1 if self.positions_per_row is None else max(1, self.max_samples // self.positions_per_row)
        logits_fn = functional_logits(self._module, self._forward_for(_first_rows(self._batch, rows)))
        params, tangents = dict(zip(self._names, old)), dict(zip(self._names, update))
        with eval_mode(self._module):
            a, used = directional_slopes(
                logits_fn, params, tangents, method=self.method, fd_epsilon=self.fd_epsilon, tau=tau
            )
        if self.method == "auto":
            self.method = used  # keep the working method: warn and fall back only once
        if self.positions_per_row is None:
            self.positions_per_row = max(1, a[..., 0].numel() // rows)
        return logit_slope_spread(a).amax()

    def _forward_for(self, batch: Any) -> Callable[[torch.nn.Module], Tensor]:
        if self.logits_fn is not None:
            user_fn = self.logits_fn
            return lambda module: _as_logits(user_fn(module, batch), "logits_fn")  # type: ignore[arg-type]
        if callable(getattr(self._module, "probe_logits", None)):
            return lambda module: _as_logits(module.probe_logits(batch), "probe_logits")  # type: ignore[operator]
        if isinstance(batch, Tensor):
            return lambda module: _as_logits(module(batch), "forward")
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            return lambda module: _as_logits(module(batch[0]), "forward")
        raise TypeError(
            f"LRSafetyRadius cannot find the logits for a batch of type {type(batch).__name__}: define "
            "`probe_logits(self, batch) -> Tensor` on the LightningModule or pass "
            "LRSafetyRadius(logits_fn=lambda module, batch: ...)."
        )

    def _remove_hooks(self) -> None:
        if self._clock is not None:  # the clock stays readable: ``completed`` after the fit
            self._clock.unsubscribe(self._listener)
        self._snapshot = None
        self._batch = None

    # --- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def host(value: Tensor | float | None) -> float | None:
            return None if value is None else float(value)

        return {
            "completed": self.completed,
            "method": self.method,
            "positions_per_row": self.positions_per_row,
            "ratio": host(self.ratio),
            "radius": host(self.radius),
            "scale": host(self.scale),
            "scaled_steps": host(self.scaled_steps),
            "probes": self.probes,
            "risky_probes": host(self.risky_probes),
            "peak_ratio": host(self.peak_ratio),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._clock is not None:
            self._clock.unsubscribe(self._listener)
        self._clock = None  # the count is the loaded one until the next fit attaches to a clock
        self._resumed_completed = int(state_dict["completed"])
        self.method = state_dict["method"]
        self.positions_per_row = state_dict["positions_per_row"]
        for key in ("ratio", "radius", "scale"):
            value = state_dict[key]
            setattr(self, key, None if value is None else torch.tensor(value))
        self.scaled_steps = float(state_dict["scaled_steps"])
        # absent from checkpoints written before the verdict existed
        self.probes = int(state_dict.get("probes", 0))
        self.risky_probes = float(state_dict.get("risky_probes", 0.0))
        self.peak_ratio = float(state_dict.get("peak_ratio", 0.0))


def _check_strategy(trainer: pl.Trainer) -> None:
    strategy = trainer.strategy
    name = type(strategy).__name__
    if "DeepSpeed" in name or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise NotImplementedError(
            f"LRSafetyRadius supports single-device and DDP training; strategy {name} is not supported "
            "(sharded parameters cannot be snapshotted and probed as a whole)."
        )


def _first_rows(batch: Any, rows: int) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t[:rows] if t.dim() > 0 else t)


def _as_logits(output: Any, source: str) -> Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"LRSafetyRadius: {source} returned {type(output).__name__}, not logits. Define "
            "`probe_logits(self, batch) -> Tensor` on the LightningModule or pass logits_fn=..."
        )
    return logits
