"""Run by tests/test_onebit_adam.py: 2-rank CPU (gloo) DDP fits of OneBitAdam and of plain DDP Adam.

Three parts, each rank saving ``onebit-rank{r}.pt``:

1. OneBitAdam (freeze_step 4, 12 steps) under ``strategy="ddp"`` with the OneBitAdamDDP callback: every rank
   sees its own half of the data (DistributedSampler), so after the warm-up the local gradients, and
   the local momenta before the exchange, differ between the ranks. Saved: the parameters, the optimizer
   state, the per-step local losses, the full-data loss and the torch.distributed calls made after the
   freeze (the hook must have issued no all_reduce).
2. torch.optim.Adam under plain ``strategy="ddp"`` on the same model, data and seed: the reference for
   loss parity (the warm-up steps must match it, the compressed ones stay close).
3. With the process group Lightning left behind, one compressed step of a raw OneBitAdam on a 21-entry
   tensor (padded to 32: chunks of 16) against a direct re-computation of the two-stage compression from
   both ranks' inputs (all-gathered), written with plain tensor ops.

Lightning's ``strategy="ddp"`` relaunches this script for rank 1, so it has to be a standalone file.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from lightning_optim.callbacks import OneBitAdamDDP
from lightning_optim.onebit_adam import OneBitAdam

FREEZE_STEP = 4
STEPS = 12
LR = 1e-2


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(192, 6, generator=gen)
    y = torch.tanh(x @ torch.randn(6, 3, generator=gen)) + 0.1 * torch.randn(192, 3, generator=gen)
    return TensorDataset(x, y)


class Regression(pl.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.optimizer_name = optimizer
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "onebit":
            return OneBitAdam(self.parameters(), lr=LR, freeze_step=FREEZE_STEP)
        return torch.optim.Adam(self.parameters(), lr=LR)


class CountCalls(pl.Callback):
    """Counts the torch.distributed collectives issued from Python during the warm-up and after the freeze
    (DDP's built-in reducer runs in C++ and is not seen: with the hook installed, the warm-up all_reduce is)."""

    NAMES = ("all_reduce", "all_to_all_single", "all_gather")

    def __init__(self) -> None:
        self.calls: dict[str, Counter[str]] = {"warmup": Counter(), "compressed": Counter()}
        self.originals = {name: getattr(dist, name) for name in self.NAMES}
        self.phase: str | None = None

        def wrap(name):
            original = self.originals[name]

            def counted(*args, **kwargs):
                if self.phase is not None:
                    self.calls[self.phase][name] += 1
                return original(*args, **kwargs)

            return counted

        for name in self.NAMES:
            setattr(dist, name, wrap(name))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # this batch's backward and step are compressed from global_step = FREEZE_STEP on
        self.phase = "compressed" if trainer.global_step >= FREEZE_STEP else "warmup"

    def on_train_end(self, trainer, pl_module):
        self.phase = None
        for name, original in self.originals.items():
            setattr(dist, name, original)


def _fit(optimizer: str, strategy, callbacks: list[pl.Callback]) -> Regression:
    model = Regression(optimizer)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(model, DataLoader(_data(), batch_size=8, shuffle=False))
    model.trainer_ref = trainer
    return model


def _full_loss(model: Regression) -> float:
    x, y = _data().tensors
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model.net(x), y))


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))


def _raw_exchange_check() -> dict[str, torch.Tensor]:
    """One compressed step (freeze_step=1, step 2) of a 21-entry parameter on both ranks, checked against
    the equations computed from both ranks' values."""
    rank, world = dist.get_rank(), dist.get_world_size()
    p = torch.nn.Parameter(torch.zeros(21, dtype=torch.float64))
    opt = OneBitAdam([p], lr=0.1, betas=(0.5, 0.75), freeze_step=1)
    gen = torch.Generator().manual_seed(7)
    g1 = torch.randn(21, generator=gen, dtype=torch.float64)  # step 1 (warm-up): the same on both ranks
    g2 = torch.randn(2, 21, generator=gen, dtype=torch.float64)[rank]  # step 2: a different local gradient
    p.grad = g1.clone()
    opt.step()
    m1, v1 = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()
    p1 = p.detach().clone()
    p.grad = g2.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a raw optimizer without DDP: no hook, as intended here
        opt.step()
    # the equations, from everyone's local momentum
    local = torch.zeros(32, dtype=torch.float64)
    local[:21] = 0.5 * m1 + 0.5 * g2
    everyone = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(everyone, local)
    scales = [x.norm() / 32**0.5 for x in everyone]
    compressed = [s * _sign(x) for s, x in zip(scales, everyone)]
    worker_error = local - compressed[rank]
    average = sum(compressed) / world
    chunks = average.chunk(world)
    server = [c.norm() / 16**0.5 * _sign(c) for c in chunks]
    server_error = chunks[rank] - server[rank]
    m_bar = torch.cat(server)[:21]
    expected_p = p1 - 0.1 / (1 - 0.5**2) * m_bar / ((v1 / (1 - 0.75)).sqrt() + 1e-8)
    return {
        "p": p.detach().clone(), "expected_p": expected_p,
        "exp_avg": opt.state[p]["exp_avg"].clone(), "expected_exp_avg": m_bar,
        "worker_error": opt.state[p]["worker_error"].clone(), "expected_worker_error": worker_error,
        "server_error": opt.state[p]["server_error"].clone(), "expected_server_error": server_error,
    }


def main(out: str) -> None:
    counter = CountCalls()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        onebit = _fit("onebit", "ddp", [counter, OneBitAdamDDP()])
    no_hook_warnings = sum("no onebit_comm_hook ran" in str(w.message) for w in caught)
    adam = _fit("adam", "ddp", [])
    rank = onebit.global_rank
    optimizer = onebit.trainer_ref.optimizers[0]
    result = {
        "params": torch.cat([p.detach().reshape(-1) for p in onebit.parameters()]),
        "adam_params": torch.cat([p.detach().reshape(-1) for p in adam.parameters()]),
        "state": {k: v.clone() for i, s in enumerate(optimizer.state.values()) for k, v in
                  ((f"{i}.{key}", t) for key, t in s.items())},
        "losses": onebit.losses,
        "adam_losses": adam.losses,
        "full_loss": _full_loss(onebit),
        "adam_full_loss": _full_loss(adam),
        "calls": {phase: dict(c) for phase, c in counter.calls.items()},
        "no_hook_warnings": no_hook_warnings,
        "raw": _raw_exchange_check(),
    }
    torch.save(result, Path(out) / f"onebit-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
