"""PerpendicularGrad: the ⊥Grad gradient transform of the Grokking paper as a pipeline stage for any optimizer."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_optim.callbacks._base import StabilityCallback, StepContext
from lightning_optim.callbacks._pipeline import OptimizerPipeline
from lightning_optim.monitors import tags
from lightning_optim.monitors.numerics import perpendicular_grads_
from lightning_optim.validation import check_bool, check_int


class PerpendicularGrad(StabilityCallback):
    r"""⊥Grad (Prieto, Barsbey, Mediano, Birdal, "Grokking at the Edge of Numerical Stability", ICLR 2025,
    arXiv 2501.04697) in front of any optimizer: the part of each gradient that only rescales the weights
    is removed before the step.

    Per parameter tensor w with gradient g (flattened), in ``on_before_optimizer_step``:

    .. math::
        g_\perp = g - \frac{\langle w, g\rangle}{\langle w, w\rangle}\, w, \qquad
        g \leftarrow g_\perp \, \frac{\lVert g\rVert}{\lVert g_\perp\rVert}

    so the update is orthogonal to w and keeps the gradient's norm (g ← 0 when g ∥ w; a zero w leaves g
    as it is). The paper motivates it by *naive loss minimisation* (NLM): once the training loss is low,
    the gradient aligns with w and the optimizer mostly scales the weights up, which drives the logits
    towards softmax collapse (:class:`SoftmaxCollapseMonitor`); ⊥Grad removes that direction. The
    authors' ``orthograd.py`` (the ``OrthoGrad`` optimizer wrapper) applies exactly these two equations
    to every parameter tensor, 1-D ones (biases, norm weights) included, with ``+1e-30`` guards in both
    denominators; this callback does the same by default (``skip_1d=False``).

    Deviations from the authors' code: the reductions work on g / max|g| so that a finite gradient whose
    square overflows (an entry of 1e20 in float32) gives a finite g⊥ of the right norm instead of NaN
    (the guards become ``where`` selects, identical except for ⟨w, w⟩ < 1e-30, where the authors' coefficient
    also vanishes); half-precision gradients are transformed in float32 and clamped to their dtype's
    range. NaN/inf gradients pass through as non-finite (never raising): pair it with :class:`SpikeGuard`,
    which zeroes them or undoes the step.

    Place in the pipeline (``stage_order = 1``): after SpikeGuard (stage 0) and before SpikeAwareClipping
    (2) and AdaptiveMomentum (3), whatever the order of ``Trainer(callbacks=[...])``. SpikeGuard's
    statistic is the gradient norm, which ⊥Grad keeps, and its only gradient edits (rescaling by μ/‖g‖,
    zeroing a non-finite gradient) commute with ⊥Grad (⊥(c·g) = c·⊥(g) for c ≥ 0), so detection and
    action see the raw gradient either way, and ⊥Grad never sees a gradient SpikeGuard zeroed as NaN. The
    clip-type stages are element-wise and do not commute with a rotation: running first, ⊥Grad gives
    them, and the moments, exactly the gradient that ``OrthoGrad(base_optimizer)`` would hand to the
    base optimizer (SPAM's clip lives inside its optimizer step). It shares slot 1 with MomentumReset and
    QuantizationAwareTraining, which touch only the moments and the learning rate, never the gradient.

    Sync-free: a handful of ``torch._foreach_*`` kernels and one dot per tensor, no host read; the result
    is the same on every rank (DDP gradients are already all-reduced). Transient memory: one temporary the
    size of the gradients. State (``state_dict``): the options and the first step it applied, so a resumed
    run continues bit for bit.

    Logs ``stability/nlm_cosine`` = Σ⟨w, g⟩ / (√Σ‖w‖² · √Σ‖g‖²) of the *incoming* gradient (before the
    projection, over the tensors it transforms; close to 1 means the step would mostly rescale the
    weights, the NLM direction) on logging steps, also before ``start_step``: with a large ``start_step``
    it is a pure monitor.

    Args:
        start_step: first ``trainer.global_step`` whose gradient is transformed (default 0: from the start,
            as in the paper).
        skip_1d: leave 1-D tensors (biases, norm weights) untouched (default False, as the authors' code).
    """

    stage_order = 1

    def __init__(self, start_step: int = 0, skip_1d: bool = False) -> None:
        super().__init__()
        check_int("start_step", start_step, 0)
        check_bool("skip_1d", skip_1d)
        self.start_step = start_step
        self.skip_1d = bool(skip_1d)
        self.applied_from: int | None = None  # first global step transformed (None: not yet)
        self._cosine: dict[int, Tensor] = {}

    def active(self, trainer: pl.Trainer) -> bool:
        """Whether this step's gradient is transformed."""
        return trainer.global_step >= self.start_step

    def before_step(self, ctx: StepContext) -> None:
        params = [p for p in ctx.params if not (self.skip_1d and p.ndim < 2)]
        if not params:
            return
        active = self.active(ctx.trainer)
        measure = ctx.log_now and bool(ctx.trainer.loggers)
        if not active and not measure:
            return
        cosine = perpendicular_grads_(params, apply=active, alignment=measure)
        if cosine is not None:
            self._cosine[ctx.pipeline.index] = cosine
        if active and self.applied_from is None:
            self.applied_from = ctx.trainer.global_step

    def metrics(self, pipeline: OptimizerPipeline) -> dict[str, Tensor | float]:
        cosine = self._cosine.get(pipeline.index)
        return {} if cosine is None else {tags.NLM_COSINE: cosine}

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["perpendicular_grad"] = {
            "start_step": self.start_step, "skip_1d": self.skip_1d, "applied_from": self.applied_from
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("perpendicular_grad", {})
        self.applied_from = saved.get("applied_from")
