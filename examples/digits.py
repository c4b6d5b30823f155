"""An MLP and a small CNN on scikit-learn's 8x8 handwritten digits (1797 images, 10 classes).

The data ships with scikit-learn, so nothing is downloaded.

    python examples/digits.py                     # MLP, SPAM, 200 steps on the CPU (seconds)
    python examples/digits.py --arch cnn --optimizer am_adamw

The same classes work with LightningCLI: ``lightning-optim fit --config examples/configs/digits_spam.yaml``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_optim.examples._script import OPTIMIZERS, LossHistory, build_optimizer, optimizer_name
from lightning_optim.monitors.numerics import stablemax_cross_entropy

__all__ = ["DigitsDataModule", "DigitsClassifier", "main"]

NUM_CLASSES = 10


class DigitsDataModule(pl.LightningDataModule):
    """``sklearn.datasets.load_digits`` as ``(x, y)`` batches: x float32 ``(B, 1, 8, 8)`` in [0, 1], y int64.

    The train/validation split is stratified by class and fixed by ``seed``.
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"Invalid val_fraction: {val_fraction}; it must be in (0, 1).")
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        # imported here so that importing this module (e.g. by LightningCLI) does not need scikit-learn
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.as_tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # pixels are 0..16
        y = torch.as_tensor(digits.target, dtype=torch.int64)
        train_idx, val_idx = train_test_split(
            torch.arange(len(y)).numpy(),
            test_size=self.hparams.val_fraction,
            random_state=self.hparams.seed,
            stratify=digits.target,
        )
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            # own generator: the batch order depends on `seed` only, not on the global RNG
            generator=torch.Generator().manual_seed(self.hparams.seed),
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)


class DigitsClassifier(pl.LightningModule):
    """Digits classifier: ``mlp`` (LayerNorm, GELU) or ``cnn`` (two conv layers with BatchNorm, a max-pool).

    Logs ``train/loss``, ``val/loss`` and ``val/acc``. ``lr`` and ``weight_decay`` configure the default
    AdamW; a LightningCLI ``optimizer:`` section replaces it. ``loss`` is the training loss,
    ``"cross_entropy"`` or ``"stablemax"`` (StableMax cross-entropy in float64, Prieto et al. 2025), kept in
    ``self.loss`` (``SoftmaxCollapseMonitor(on_collapse="stablemax")`` may switch it); ``val/loss`` is always
    the cross-entropy.
    """

    def __init__(
        self,
        arch: Literal["mlp", "cnn"] = "mlp",
        hidden: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        loss: Literal["cross_entropy", "stablemax"] = "cross_entropy",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if loss not in ("cross_entropy", "stablemax"):
            raise ValueError(f"Invalid loss {loss!r}; choose 'cross_entropy' or 'stablemax'.")
        self.loss = loss
        if arch == "mlp":
            self.net = nn.Sequential(
                nn.Flatten(),
                nn.Linear(64, hidden),
                nn.LayerNorm(hidden),
                nn.GELU(),
                nn.Linear(hidden, hidden),
                nn.GELU(),
                nn.Linear(hidden, NUM_CLASSES),
            )
        elif arch == "cnn":
            self.net = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(64 * 4 * 4, hidden),
                nn.ReLU(),
                nn.Linear(hidden, NUM_CLASSES),
            )
        else:
            raise ValueError(f"Invalid arch {arch!r}; choose 'mlp' or 'cnn'.")
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        if self.loss == "stablemax":  # in float64, as the authors compute it
            loss = stablemax_cross_entropy(logits.double(), y).float()
        else:
            loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.val_acc(logits, y)
        # logging the metric object lets torchmetrics accumulate over the epoch (and across processes)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def main(argv: Sequence[str] | None = None) -> None:
    """Train on the digits and print the first/last training loss and the final validation accuracy."""
    from lightning.pytorch.loggers import TensorBoardLogger

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--optimizer", type=optimizer_name, default="spam", help=f"a registered optimizer: {', '.join(OPTIMIZERS)}"
    )
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--arch", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default=None, help="default: Lightning's (32-true)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--loss", choices=("cross_entropy", "stablemax"), default="cross_entropy", help="training loss")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from lightning_optim.quiet import quiet_lightning

    quiet_lightning()
    pl.seed_everything(args.seed)
    model = DigitsClassifier(arch=args.arch, lr=args.lr, loss=args.loss)
    data = DigitsDataModule(batch_size=args.batch_size, seed=args.seed)
    model.configure_optimizers = lambda: build_optimizer(args.optimizer, model.parameters(), args.lr, args.max_steps)
    history = LossHistory()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        precision=args.precision,
        max_steps=args.max_steps,
        max_epochs=-1,  # max_steps decides; without this Lightning would also stop at 1000 epochs
        logger=TensorBoardLogger("lightning_logs", name="digits"),
        callbacks=[history],
        log_every_n_steps=5,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    # validate the final weights: fit's last validation ran at the end of the last *full* epoch
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    print(f"train/loss first {float(history.losses[0]):.4f} -> last {float(history.losses[-1]):.4f}")
    print(f"val/loss {metrics['val/loss']:.4f}  val/acc {metrics['val/acc']:.4f}")
    print(f"TensorBoard logs: {trainer.logger.log_dir}  (tensorboard --logdir lightning_logs)")


if __name__ == "__main__":
    main()
