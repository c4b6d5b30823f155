"""Periodic moment reset with SPAM's cosine learning-rate warm-up, for any optimizer with a state adapter."""

from __future__ import annotations

import torch

from lightning_optim.validation import check_int
from lightning_optim.callbacks._base import StabilityCallback, StepContext
from lightning_optim.callbacks._pipeline import OptimizerPipeline
from lightning_optim.monitors import tags
from lightning_optim.state_adapters import iter_states, state_adapter


def reset_moments(optimizer: torch.optim.Optimizer) -> None:
    """Zero every first and second moment of ``optimizer`` exactly (step counters untouched)."""
    adapter = state_adapter(optimizer)
    for _, _, state in iter_states(optimizer):
        adapter.reset_(state)


class MomentumReset(StabilityCallback):
    """SPAM's momentum reset (Huang et al., arXiv 2501.06842) as a callback for the optimizer you already use.

    With T the 1-based index of the optimizer step (steps skipped by a GradScaler are not counted):
    when ``T mod interval == 0`` the first and second moments are set to exactly zero through the
    optimizer's state adapter (the bias-correction ``step`` is kept), and the update of step T + k,
    k = 0 ... N - 1 (N = ``warmup_steps``), is scaled by SPAM's cosine warm-up

        s(k) = 1 - 0.99 (1 + cos(pi k / (N + 1))) / 2        (s(0) = 0.01)

    by multiplying whatever learning rate the scheduler set for that step, and restoring the exact value
    right after ``optimizer.step()``: any LR scheduler composes, and decoupled weight decay is warmed up
    with the update as in SPAM. ``AdamW(eps=1e-6) + SpikeAwareClipping + MomentumReset`` reproduces
    :class:`lightning_optim.SPAM` step for step. Logs ``stability/momentum_resets``.

    Args:
        interval: reset every ``interval`` optimizer steps (default 500, SPAM's ΔT); 0 never resets.
        warmup_steps: N, the length of the warm-up after a reset (default 150).
    """

    stage_order = 1

    def __init__(self, interval: int = 500, warmup_steps: int = 150) -> None:
        super().__init__()
        check_int("interval", interval, 0)
        check_int("warmup_steps", warmup_steps, 0)
        self.interval = interval
        self.warmup_steps = warmup_steps

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        state_adapter(optimizer)  # raises a TypeError naming the optimizer if it has no adapter

    def before_step(self, ctx: StepContext) -> None:
        clock = ctx.clock
        if self.interval == 0 or clock.step % self.interval != 0:
            return
        if clock.last_reset == clock.step:  # another stage reset this step: one reset, the longer warm-up
            clock.extend_warmup(self.warmup_steps)
            return
        reset_moments(ctx.optimizer)
        clock.record_reset(self.warmup_steps)

    def metrics(self, pipeline: OptimizerPipeline) -> dict[str, torch.Tensor | float]:
        return {tags.MOMENTUM_RESETS: float(pipeline.clock.resets)}
