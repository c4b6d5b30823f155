"""Run by tests/test_lr_safety.py: a 2-rank CPU DDP fit with LRSafetyRadius(mode="control").

Each rank sees different data (DistributedSampler), so the local spreads differ; the MAX all-reduce
must give both ranks the same scale s every step and so identical parameters. Each rank saves its
parameters, the scale of every step and its local (pre-reduce) spreads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from callback_models import Regression  # noqa: E402

from lightning_optim.callbacks import LRSafetyRadius  # noqa: E402


class Recorded(LRSafetyRadius):
    def __init__(self, out: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out, self.scales, self.local_spreads = out, [], []

    def _local_spread(self, old, update, tau):
        spread = super()._local_spread(old, update, tau)
        self.local_spreads.append(float(spread))
        return spread

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.scales.append(float(self.scale))

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {
                "params": torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]),
                "scales": self.scales,
                "local_spreads": self.local_spreads,
            },
            Path(self.out) / f"lr_safety-rank{trainer.global_rank}.pt",
        )


def main(out: str) -> None:
    module = Regression(lambda p: torch.optim.AdamW(p, lr=5e-2))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=20, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Recorded(out, mode="control", target_ratio=0.05, every_n_steps=5)],
    )
    trainer.fit(module)


if __name__ == "__main__":
    main(sys.argv[1])
