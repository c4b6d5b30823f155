"""SPAM's element-wise spike-aware gradient clipping against the optimizer's own second moment."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_optim import registry
from lightning_optim.validation import check_int, check_range
from lightning_optim.callbacks._base import StabilityCallback, StepContext
from lightning_optim.callbacks._pipeline import OptimizerPipeline
from lightning_optim.monitors import tags
from lightning_optim.functional import spike_clip_
from lightning_optim.state_adapters import state_adapter


class SpikeAwareClipping(StabilityCallback):
    """SPAM's spike-aware clipping (Huang et al., arXiv 2501.06842) for any optimizer with a second moment.

    In ``on_before_optimizer_step`` (after AMP unscaling, before Lightning's own gradient clipping), with
    v the optimizer's raw (not bias-corrected) second moment as it stands before this step and ϑ the
    threshold, every gradient entry with g² > ϑ·v is replaced in place by sign(g)·√(ϑ·v). Clipping is
    active from k = T − R ≥ ``clip_delay`` on, T the optimizer step and R the step of the last moment
    reset (0 before any), so the first steps after a start or reset, when v is still small, pass
    unclipped. An entry with v = 0 is clipped to 0 while active (as SPAM does). Decisions stay on the
    device (a clamp, no masks read by the host). For fused optimizers that unscale inside ``step``
    under a GradScaler, the bound is scaled by the loss scale. Logs ``stability/clipped_fraction``
    (share of entries clipped at the logged step). Non-finite gradients pass through: pair it with
    :class:`SpikeGuard` to keep them out of the weights.

    Args:
        threshold: ϑ > 0 (default 5000, SPAM's); ``math.inf`` disables clipping.
        clip_delay: D ≥ 2 (default 20): steps after a start or reset before clipping is active.
    """

    stage_order = 2

    def __init__(self, threshold: float = 5000.0, clip_delay: int = 20) -> None:
        super().__init__()
        check_range("threshold", threshold, 0.0, low_open=True)
        check_int("clip_delay", clip_delay, 2)
        self.threshold = float(threshold)
        self.clip_delay = clip_delay
        self._clipped: dict[int, Tensor] = {}

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        # registered optimizers declare whether their second moment is the raw EMA of g² (a
        # normalised-gradient or sign method may keep one that is not comparable to grad ** 2)
        adapter = state_adapter(optimizer)
        info = registry.info_for(optimizer)
        comparable = info.second_moment_like_grad_sq if info is not None else adapter.has_second_moment
        if not comparable:
            raise TypeError(
                f"SpikeAwareClipping needs a second moment comparable to grad ** 2 (the raw EMA of g²), and "
                f"{type(optimizer).__name__} "
                f"{'keeps one of another quantity or basis' if adapter.has_second_moment else 'keeps no second moment'}; "
                "use it with an Adam-type or RMSprop-type optimizer, or use SpikeGuard, which works with any."
            )

    def before_step(self, ctx: StepContext) -> None:
        if math.isinf(self.threshold) or ctx.clock.steps_since_reset < self.clip_delay:
            if ctx.log_now:
                self._clipped[ctx.pipeline.index] = torch.zeros((), device=ctx.params[0].device)
            return
        adapter = state_adapter(ctx.optimizer)
        grads, second_moments = [], []
        for p in ctx.params:
            state = ctx.optimizer.state.get(p)
            v = adapter.second_moment(state) if state else None
            if v is not None:
                grads.append(p.grad)
                second_moments.append(v if v.dtype == p.grad.dtype else v.to(p.grad.dtype))
        if not grads:
            return
        if ctx.log_now:
            self._clipped[ctx.pipeline.index] = _clipped_fraction(grads, second_moments, self.threshold, ctx.amp_scale)
        spike_clip_(grads, second_moments, self.threshold, ctx.amp_scale)

    def metrics(self, pipeline: OptimizerPipeline) -> dict[str, Tensor | float]:
        clipped = self._clipped.get(pipeline.index)
        return {} if clipped is None else {tags.CLIPPED_FRACTION: clipped}


def _clipped_fraction(grads: list[Tensor], second_moments: list[Tensor], threshold: float, scale: Tensor | None) -> Tensor:
    """Share of entries with g² > ϑ·v (computed on logging steps only)."""
    factor = threshold if scale is None else threshold * scale.square()
    clipped = torch.stack([(g.square() > v * factor).sum() for g, v in zip(grads, second_moments)]).sum()
    return clipped.float() / sum(g.numel() for g in grads)
