"""SoftmaxCollapseMonitor: the share of training samples whose softmax collapsed in floating point (Grokking paper)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_optim.callbacks._base import StabilityCallback, StepContext
from lightning_optim.callbacks._logging import log_scalars
from lightning_optim.monitors import tags
from lightning_optim.monitors.modes import eval_mode
from lightning_optim.monitors.numerics import perpendicular_grads_, softmax_collapse_fraction
from lightning_optim.validation import check_bool, check_choice, check_int, check_range

LogitsFn = Callable[[pl.LightningModule, Any], Tensor]
OnCollapse = Literal["none", "stablemax", "perp_grad"]
Dtype = Literal["auto", "float16", "bfloat16", "float32", "float64"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class SoftmaxCollapseMonitor(StabilityCallback):
    r"""Softmax collapse (Prieto, Barsbey, Mediano, Birdal, "Grokking at the Edge of Numerical Stability",
    ICLR 2025, arXiv 2501.04697): the share of training samples whose softmax is exactly one-hot in floating
    point, so their cross-entropy loss and gradient are exactly zero; optionally switch to a remedy.

    A sample (every position of the logits but the last, class, dimension: each token of a language model)
    has collapsed when :math:`S = \sum_j e^{z_j - \max_k z_k} = 1` exactly: every non-maximal term was
    absorbed. As in the authors' ``logger.py`` (``compute_softmax_collapse``), S is evaluated in the
    softmax's precision: ``dtype="auto"`` uses the logits' dtype promoted to at least float32 (what
    ``F.cross_entropy`` computes in under autocast and what the examples' losses use), or a fixed one.
    With two classes collapse starts at a margin of 16.6 in float32 and 36.7 in float64, which is why the
    paper's fp64 runs keep learning where fp32 ones stall.

    Every ``every_n_steps`` optimizer steps, after the step, the logits of the last training batch are
    computed once more (no grad, every module in eval mode, the trainer's precision context) and the
    collapsed share is all-reduced over the data-parallel ranks (sum of collapsed and of counted samples),
    so it is the same on every rank. It is logged right away as ``stability/softmax_collapse``; with an
    action, ``stability/softmax_collapse_switched`` (0 before, 1 from the switch on) too.

    Logits: ``logits_fn(pl_module, batch)`` if given, else ``pl_module.probe_logits(batch)`` if the module
    defines it, else ``pl_module(batch[0])`` for tuple/list batches and ``pl_module(batch)`` for a tensor
    batch (the protocol of :class:`LRSafetyRadius`); an output with a ``.logits`` attribute is accepted.

    Actions (``on_collapse``), taken once, when a probe finds a share >= ``threshold``; the share is read on
    the host only then (one sync per probe, only when an action is set) and is the same on every rank, so
    every rank switches at the same step, from the next optimizer step on:

    - ``"stablemax"``: the module's loss becomes StableMax cross-entropy through the attribute protocol
      ``pl_module.loss = "stablemax"`` (the example models, ``lightning_optim.examples``, read it in
      ``training_step``). A module without a ``loss`` attribute is an error at fit start.
    - ``"perp_grad"``: the ⊥Grad transform of :class:`PerpendicularGrad` is applied to every gradient from
      then on (pipeline slot 1, before the clip-type stages; ``skip_1d`` as there).

    The switch step is saved in the checkpoint and re-applied on resume. This automatic switch is this
    project's construction: the paper applies StableMax or ⊥Grad from the start of training.

    Cost: one forward of one training batch per probe. State: the switch step, the last probe's step and
    share.

    Args:
        every_n_steps: probe cadence in optimizer steps (default 50, >= 1; the authors log every 50 epochs).
        on_collapse: ``"none"`` (default, monitor only), ``"stablemax"`` or ``"perp_grad"``.
        threshold: collapsed share that triggers the action (default 0.1, in (0, 1]; our choice).
        dtype: precision of the collapse test: ``"auto"`` (default), ``"float16"``, ``"bfloat16"``,
            ``"float32"`` or ``"float64"`` (the authors' ``softmax_precision``).
        logits_fn: ``(pl_module, batch) -> logits`` for models whose ``forward`` does not return logits.
        skip_1d: with ``on_collapse="perp_grad"``, leave 1-D tensors untouched (default False).
    """

    stage_order = 1  # the perp_grad action, in PerpendicularGrad's slot

    def __init__(
        self,
        every_n_steps: int = 50,
        on_collapse: OnCollapse = "none",
        threshold: float = 0.1,
        dtype: Dtype = "auto",
        logits_fn: LogitsFn | None = None,
        skip_1d: bool = False,
    ) -> None:
        super().__init__()
        check_int("every_n_steps", every_n_steps, 1)
        check_choice("on_collapse", on_collapse, ("none", "stablemax", "perp_grad"))
        check_range("threshold", threshold, 0.0, 1.0, low_open=True)
        check_choice("dtype", dtype, ("auto", *_DTYPES))
        check_bool("skip_1d", skip_1d)
        if logits_fn is not None and not callable(logits_fn):
            raise ValueError(f"Invalid logits_fn: {logits_fn!r}; must be callable as logits_fn(pl_module, batch).")
        self.every_n_steps = every_n_steps
        self.on_collapse = on_collapse
        self.threshold = float(threshold)
        self.dtype = dtype
        self.logits_fn = logits_fn
        self.skip_1d = bool(skip_1d)
        self.switched_at: int | None = None  # global step from which the action applies
        self.fraction: Tensor | None = None  # the last probe's collapsed share (device)
        self.probes = 0
        self._last_probe_step: int | None = None

    @property
    def switched(self) -> bool:
        return self.switched_at is not None

    # --- Lightning hooks -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.on_collapse == "stablemax" and not hasattr(pl_module, "loss"):
            raise TypeError(
                f"SoftmaxCollapseMonitor(on_collapse='stablemax') switches the loss by setting "
                f"`pl_module.loss = 'stablemax'`, but {type(pl_module).__name__} has no `loss` attribute. Give "
                "the LightningModule a `loss` attribute that its training_step reads (as the example models "
                "do: `loss: Literal['cross_entropy', 'stablemax']`), or use on_collapse='perp_grad'."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.switched and self.on_collapse == "stablemax":
            pl_module.loss = "stablemax"  # a resumed run that had switched keeps the switched loss

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_probe_step:
            return  # not a probe step, or a later micro-batch of the same optimizer step
        self._last_probe_step = step
        self.fraction = self.measure(trainer, pl_module, batch)
        self.probes += 1
        if self.on_collapse != "none" and not self.switched and float(self.fraction) >= self.threshold:
            self._switch(step, pl_module)
        metrics: dict[str, Tensor | float] = {tags.SOFTMAX_COLLAPSE: self.fraction}
        if self.on_collapse != "none":
            metrics[tags.SOFTMAX_COLLAPSE_SWITCHED] = 1.0 if self.switched else 0.0
        log_scalars(trainer, metrics)

    # --- the measurement and the action --------------------------------------------------------------
    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        """Collapsed share of the samples of ``batch`` at the current weights, over every rank (0-dim float32)."""
        with eval_mode(pl_module), trainer.precision_plugin.forward_context():
            logits = model_logits(pl_module, batch, self.logits_fn, "SoftmaxCollapseMonitor")
        dtype = _DTYPES.get(self.dtype) or torch.promote_types(logits.dtype, torch.float32)
        fraction = softmax_collapse_fraction(logits.detach().to(dtype))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            count = torch.tensor(float(logits[..., 0].numel()), device=fraction.device)
            pair = torch.stack([fraction.double() * count.double(), count.double()])
            dist.all_reduce(pair)
            fraction = (pair[0] / pair[1]).float()
        return fraction

    def _switch(self, step: int, pl_module: pl.LightningModule) -> None:
        self.switched_at = step
        if self.on_collapse == "stablemax":
            pl_module.loss = "stablemax"

    def before_step(self, ctx: StepContext) -> None:
        if self.on_collapse != "perp_grad" or self.switched_at is None or ctx.trainer.global_step < self.switched_at:
            return
        params = [p for p in ctx.params if not (self.skip_1d and p.ndim < 2)]
        if params:
            perpendicular_grads_(params)

    # --- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["softmax_collapse"] = {
            "switched_at": self.switched_at,
            "last_probe_step": self._last_probe_step,
            "probes": self.probes,
            "fraction": None if self.fraction is None else float(self.fraction),
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("softmax_collapse", {})
        self.switched_at = saved.get("switched_at")
        self._last_probe_step = saved.get("last_probe_step")
        self.probes = int(saved.get("probes", 0))
        fraction = saved.get("fraction")
        self.fraction = None if fraction is None else torch.tensor(fraction)


def model_logits(pl_module: pl.LightningModule, batch: Any, logits_fn: LogitsFn | None, owner: str) -> Tensor:
    """The logits of ``batch``: ``logits_fn``, else ``probe_logits(batch)``, else ``forward`` of the inputs."""
    if logits_fn is not None:
        output, source = logits_fn(pl_module, batch), "logits_fn"
    elif callable(getattr(pl_module, "probe_logits", None)):
        output, source = pl_module.probe_logits(batch), "probe_logits"
    elif isinstance(batch, Tensor):
        output, source = pl_module(batch), "forward"
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        output, source = pl_module(batch[0]), "forward"
    else:
        raise TypeError(
            f"{owner} cannot find the logits for a batch of type {type(batch).__name__}: define "
            f"`probe_logits(self, batch) -> Tensor` on the LightningModule or pass {owner}(logits_fn=...)."
        )
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"{owner}: {source} returned {type(output).__name__}, not logits. Define "
            f"`probe_logits(self, batch) -> Tensor` on the LightningModule or pass logits_fn=..."
        )
    return logits
