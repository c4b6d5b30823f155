"""Run by tests/test_ddp.py: a 2-rank CPU DDP fit of AdamW with all four stability callbacks.

``skip``: a 1e4x gradient spike is injected on rank 0 only, after DDP's all-reduce, so only rank 0 sees
it: the spike flag is all-reduced and both ranks undo the same step. ``reset``: the loss of rank 0 only
is multiplied by 1e4 (the realistic case: DDP averages it into both ranks' gradients); both rescale and
reset on the same steps. Each rank saves its parameters and counters.

With the argument ``faults``: SpikeGuard alone, and a NaN or a 1e6x gradient on rank 0 only, after the
all-reduce, for ``reset``, ``clip`` and (NaN) ``skip``: every statistic and decision must stay the same on
both ranks. Each rank saves its parameters and SpikeGuard's state_dict.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from callback_models import GradientSpike, Regression  # noqa: E402

from lightning_optim.callbacks import AdaptiveMomentum, MomentumReset, SpikeAwareClipping, SpikeGuard  # noqa: E402


class RankZeroLossSpike(Regression):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e4 if self.trainer.global_step == 30 and self.global_rank == 0 else loss


class Saver(pl.Callback):
    def __init__(self, out: str, action: str) -> None:
        self.out, self.action = out, action

    def on_train_end(self, trainer, pl_module) -> None:
        guard = next(cb for cb in trainer.callbacks if isinstance(cb, SpikeGuard))
        record = trainer.optimizers[0]._lightning_optim_step_record
        torch.save(
            {
                "params": torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]),
                "counters": guard._states[0].counters.clone(),
                "resets": record.resets,
                "completed": record.completed,
            },
            Path(self.out) / f"{self.action}-rank{trainer.global_rank}.pt",
        )


class GuardSaver(pl.Callback):
    """Saves the parameters, SpikeGuard's state_dict and the step record of this rank after the fit."""

    def __init__(self, out: str, name: str) -> None:
        self.out, self.name = out, name

    def on_train_end(self, trainer, pl_module) -> None:
        guard = next(cb for cb in trainer.callbacks if isinstance(cb, SpikeGuard))
        record = trainer.optimizers[0]._lightning_optim_step_record
        torch.save(
            {
                "params": torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]),
                "guard": guard.state_dict()["guard"],
                "resets": record.resets,
                "completed": record.completed,
            },
            Path(self.out) / f"{self.name}-rank{trainer.global_rank}.pt",
        )


FAULTS = {"nan": ("reset", "clip", "skip"), "1e6": ("reset", "clip")}  # fault -> actions


def faults(out: str) -> None:
    for fault, actions in FAULTS.items():
        for action in actions:
            callbacks = [
                GradientSpike({30}, float(fault), rank=0),
                SpikeGuard(warmup_steps=10, action=action),
                GuardSaver(out, f"{fault}-{action}"),
            ]
            _trainer(callbacks).fit(Regression(lambda p: torch.optim.AdamW(p, lr=1e-2)))


def _trainer(callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=40, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )


def main(out: str) -> None:
    for action in ("skip", "reset"):
        callbacks = [
            GradientSpike({30} if action == "skip" else set(), 1e4, rank=0),
            SpikeGuard(warmup_steps=10, action=action),
            MomentumReset(interval=25, warmup_steps=5),
            SpikeAwareClipping(clip_delay=5),
            AdaptiveMomentum(),
            Saver(out, action),
        ]
        module = Regression if action == "skip" else RankZeroLossSpike
        _trainer(callbacks).fit(module(lambda p: torch.optim.AdamW(p, lr=1e-2)))


if __name__ == "__main__":
    if sys.argv[2:] == ["faults"]:
        faults(sys.argv[1])
    else:
        main(sys.argv[1])
