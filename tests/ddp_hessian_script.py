"""Run by tests/test_hessian_estimator.py: a 2-rank CPU DDP fit stepping AdaHessian, SophiaH and SophiaG (one
small net each) with the HessianEstimator callback; each rank saves its weights and optimizer state.

Lightning's ``strategy="ddp"`` relaunches this script for rank 1, so it has to be a standalone file.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_optim.adahessian import AdaHessian
from lightning_optim.callbacks.hessian_estimator import HessianEstimator
from lightning_optim.sophia import SophiaG, SophiaH

NAMES = ("AdaHessian", "SophiaH", "SophiaG")
CURVATURE = {"AdaHessian": "exp_hessian_diag_sq", "SophiaH": "hessian", "SophiaG": "hessian"}


def _net(out: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, out))


class ThreeNets(pl.LightningModule):
    """One net per optimizer; one backward of the sum of their losses (each net's gradient is its own)."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.out = out
        torch.manual_seed(0)
        self.nets = torch.nn.ModuleList([_net(3), _net(3), _net(4)])  # regression, regression, 4 classes
        self.first_loss: float | None = None

    def hessian_logits(self, batch):  # for SophiaG's Gauss-Newton-Bartlett estimate
        return self.nets[2](batch[0])

    def training_step(self, batch, batch_idx):
        x, y, c = batch
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        loss = F.mse_loss(self.nets[0](x), y) + F.mse_loss(self.nets[1](x), y) + F.cross_entropy(self.nets[2](x), c)
        if self.first_loss is None:
            self.first_loss = float(loss)
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()

    def configure_optimizers(self):
        return [
            AdaHessian(self.nets[0].parameters(), lr=0.05),
            SophiaH(self.nets[1].parameters(), lr=0.02, update_every=3),
            SophiaG(self.nets[2].parameters(), lr=0.02, update_every=3),
        ]

    def _flat(self, net: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])

    def on_train_start(self) -> None:
        self.initial = [self._flat(net) for net in self.nets]

    def on_train_end(self) -> None:
        saved = {}
        for name, net, opt, initial in zip(NAMES, self.nets, self.trainer.optimizers, self.initial):
            states = [opt.state[p] for p in net.parameters()]
            saved[name] = {
                "params": self._flat(net),
                "initial": initial,
                "first_loss": self.first_loss,
                "state": {
                    "exp_avg": torch.cat([s["exp_avg"].reshape(-1) for s in states]),
                    "curvature": torch.cat([s[CURVATURE[name]].reshape(-1) for s in states]),
                    "counters": torch.stack([torch.stack([s["step"], s["hessian_step"]]) for s in states]),
                },
            }
        torch.save(saved, Path(self.out) / f"rank{self.global_rank}.pt")


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=gen)
    data = TensorDataset(x, torch.randn(256, 3, generator=gen), torch.randint(0, 4, (256,), generator=gen))
    trainer = pl.Trainer(
        # max_steps counts optimizer steps: 21 = 7 batches of 3 optimizer steps
        accelerator="cpu", devices=2, strategy="ddp", max_steps=21, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[HessianEstimator()],
    )
    trainer.fit(ThreeNets(out), DataLoader(data, batch_size=8))


if __name__ == "__main__":
    main(sys.argv[1])
