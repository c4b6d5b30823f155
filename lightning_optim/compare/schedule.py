"""The one learning-rate schedule every run of a comparison shares, as a typed LightningCLI scheduler.

LightningCLI builds ``lr_scheduler: {class_path: ..., init_args: ...}`` from a class's typed signature, so a
``LambdaLR`` (a Python function argument) cannot come from YAML; :class:`WarmupCosine` can.
"""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_optim.validation import check_choice, check_int, check_range

__all__ = ["WarmupCosine", "lr_factor"]

Decay = Literal["cosine", "linear", "constant"]


def lr_factor(
    step: int, total_steps: int, warmup_steps: int = 0, decay: Decay = "cosine", final_lr_fraction: float = 0.0
) -> float:
    """Multiplier of the base learning rate for the optimizer step that follows ``step`` completed steps.

    Linear warm-up over the first ``warmup_steps`` steps (the k-th step, k = step + 1, uses k / warmup_steps),
    then ``decay`` from 1 to ``final_lr_fraction`` over the remaining ``total_steps - warmup_steps`` steps:
    ``cosine`` f + (1 - f)·(1 + cos(π·p))/2, ``linear`` f + (1 - f)·(1 - p), ``constant`` 1, where
    p = (step - warmup_steps) / (total_steps - warmup_steps) in [0, 1] (clamped past the end).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return final_lr_fraction + (1.0 - final_lr_fraction) * shape


class WarmupCosine(LRScheduler):
    """Linear warm-up, then cosine (or linear, or no) decay to the end of the run; step it every optimizer step.

    Each param group's lr is its initial lr times :func:`lr_factor`, so ratios between groups are kept.

    Args:
        optimizer: the wrapped optimizer.
        total_steps: the run's number of optimizer steps (the decay ends there).
        warmup_steps: steps of linear warm-up from ``lr / warmup_steps`` to ``lr`` (0: none).
        decay: ``"cosine"``, ``"linear"`` or ``"constant"`` (warm-up, then the constant lr).
        final_lr_fraction: the lr at the end of the decay as a fraction of the initial lr, in [0, 1].
        last_epoch: index of the last step done (-1: a fresh schedule), as in torch's schedulers.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        decay: Decay = "cosine",
        final_lr_fraction: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        check_int("total_steps", total_steps, 1)
        check_int("warmup_steps", warmup_steps, 0)
        if warmup_steps > total_steps:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps}; it must be at most total_steps ({total_steps}).")
        check_choice("decay", decay, ("cosine", "linear", "constant"))
        check_range("final_lr_fraction", final_lr_fraction, 0.0, 1.0)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.final_lr_fraction = float(final_lr_fraction)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the initial lr after ``step`` completed steps (see :func:`lr_factor`)."""
        return lr_factor(step, self.total_steps, self.warmup_steps, self.decay, self.final_lr_fraction)

    def get_lr(self) -> list[float]:
        scale = self.factor(self.last_epoch)
        return [base * scale for base in self.base_lrs]
