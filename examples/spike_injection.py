"""A callback that injects gradient spikes, so the stability callbacks have something to act on.

Used by ``examples/configs/gpt_adamw_spike_demo*.yaml``: the same run with and without SpikeGuard, to be
compared in TensorBoard (``stability/grad_norm``, ``stability/spikes``, ``train/loss``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

__all__ = ["GradientSpikeInjector"]


class GradientSpikeInjector(pl.Callback):
    """Multiplies every gradient by ``factor`` on the optimizer steps ``at_steps`` .. ``at_steps + duration - 1``.

    It acts in ``on_before_optimizer_step``, so list it before the stability callbacks in ``callbacks``
    (Lightning calls callbacks in list order): they must see the spiked gradient. A spike of this kind is
    what a bad batch, an fp16 overflow or a data-loader bug produces.

    Args:
        at_steps: 0-based optimizer steps (``trainer.global_step`` before the step) where a spike starts.
        factor: the gradient multiplier (default 1000).
        duration: consecutive steps each spike lasts (default 1).
    """

    def __init__(self, at_steps: list[int] = [150], factor: float = 1000.0, duration: int = 1) -> None:  # noqa: B006
        from lightning_optim.validation import check_int, check_range

        for step in at_steps:
            check_int("at_steps", step, 0)
        check_range("factor", factor, 0.0)
        check_int("duration", duration, 1)
        self.steps = {start + k for start in at_steps for k in range(duration)}
        self.factor = float(factor)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.global_step in self.steps:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, self.factor)
