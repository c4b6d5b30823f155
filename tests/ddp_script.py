"""Run by tests/test_ddp.py: a 2-rank CPU DDP fit stepping all four optimizers; each rank saves its parameters.

Lightning's ``strategy="ddp"`` relaunches this script for rank 1, so it has to be a standalone file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_optim import SPAM, AdaptiveMomentumAdamW, AdaptiveMomentumSGD, StableSPAM

NAMES = ("spam", "stable_spam", "am_sgd", "am_adamw")


class FourModels(pl.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.out = out
        torch.manual_seed(0)
        self.nets = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)) for _ in NAMES
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        # one backward for all four nets (DDP reduces once per backward); each net's gradient is its own loss's
        scale = 1e3 if batch_idx == 7 else 1.0  # a spike, the same on both ranks' all-reduced gradient
        loss = sum(torch.nn.functional.mse_loss(net(x), y) for net in self.nets) * scale
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()

    def configure_optimizers(self):
        return [
            SPAM(self.nets[0].parameters(), lr=1e-2, reset_interval=10, warmup_steps=3, clip_delay=2),
            StableSPAM(self.nets[1].parameters(), lr=1e-2, total_steps=20, reset_interval=8),
            AdaptiveMomentumSGD(self.nets[2].parameters(), lr=5e-2),
            AdaptiveMomentumAdamW(self.nets[3].parameters(), lr=1e-2),
        ]

    def on_train_end(self) -> None:
        flat = {n: torch.cat([p.detach().reshape(-1) for p in net.parameters()]) for n, net in zip(NAMES, self.nets)}
        torch.save(flat, Path(self.out) / f"rank{self.global_rank}.pt")


def main(out: str) -> None:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 6, generator=gen), torch.randn(256, 3, generator=gen))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=20, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(FourModels(out), DataLoader(data, batch_size=8))


if __name__ == "__main__":
    main(sys.argv[1])
