"""Run by tests/test_ddp.py: a 2-rank CPU DDP fit stepping all four optimizers; each rank saves its parameters.

Lightning's ``strategy="ddp"`` relaunches this script for rank 1, so it has to be a standalone file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_optim import registry

# every optimizer of ours that steps on plain gradients (the Hessian-vector ones have their own DDP test,
# with the callback that averages their estimate across ranks)
INFOS = [e for e in registry.optimizers(ours=True) if not e.needs_hvp]
NAMES = tuple(e.name for e in INFOS)
STEPS = 20  # optimizer steps of each optimizer (training batches)
# short runs: settings that make each optimizer's schedule events (resets, warm-ups) happen within 20 steps
OVERRIDES = {
    "SPAM": dict(reset_interval=10, warmup_steps=3, clip_delay=2),
    "StableSPAM": dict(reset_interval=8),
    # projections refreshed (GaLore's SVD, APOLLO's seeded random matrices, FRUGAL's subspace) within the run
    **{name: dict(update_proj_gap=6) for name in ("GaLore", "NaturalGaLore", "Fira", "APOLLO", "APOLLO-Mini", "Conda")},
    "FRUGAL": dict(update_gap=6),
    # the 1-bit compressed momentum exchange from step 11 on (DDP still all-reduces the gradients: no hook)
    "OneBitAdam": dict(freeze_step=10),
}


class OneNetPerOptimizer(pl.LightningModule):
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
        # one backward for all nets (DDP reduces once per backward); each net's gradient is its own loss's
        scale = 1e3 if batch_idx == 7 else 1.0  # a spike, the same on both ranks' all-reduced gradient
        loss = sum(torch.nn.functional.mse_loss(net(x), y) for net in self.nets) * scale
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()

    def configure_optimizers(self):
        return [
            registry.build(info.name, net.parameters(), total_steps=STEPS, **OVERRIDES.get(info.name, {}))
            for info, net in zip(INFOS, self.nets)
        ]

    def _flat(self) -> dict[str, torch.Tensor]:
        return {n: torch.cat([p.detach().reshape(-1) for p in net.parameters()]) for n, net in zip(NAMES, self.nets)}

    def on_train_start(self) -> None:
        self.initial = {n: t.clone() for n, t in self._flat().items()}

    def on_train_end(self) -> None:
        torch.save(self._flat(), Path(self.out) / f"rank{self.global_rank}.pt")
        torch.save(self.initial, Path(self.out) / "initial.pt")
        steps = {info.name: opt.optimizer.param_groups[0]["global_step"] for info, opt in zip(INFOS, self.optimizers())}
        torch.save(steps, Path(self.out) / f"steps{self.global_rank}.pt")


def main(out: str) -> None:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 6, generator=gen), torch.randn(256, 3, generator=gen))
    # in manual optimization Lightning counts every optimizer.step() call towards max_steps: 20 batches, so
    # each optimizer takes 20 steps (the spike at batch 7 and the SPAM/StableSPAM resets included)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS * len(INFOS), logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(OneNetPerOptimizer(out), DataLoader(data, batch_size=8))


if __name__ == "__main__":
    main(sys.argv[1])
