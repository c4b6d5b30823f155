"""Learning-rate spike experiment: plain AdamW vs gradient clipping vs the safety-radius controller.

A small-scale reproduction of Table 1 of Sao, "Ghosts of Softmax" (arXiv 2603.13552): train with AdamW,
multiply the learning rate by ``--factors`` (1000x and 10000x) for ``--durations`` steps (1 and 10), and
compare, against the spike-free run, the final validation metric of

- ``plain``: AdamW as it is;
- ``clip``: AdamW with ``gradient_clip_val=1`` (clipping the gradient norm does not bound Adam's step);
- ``controller``: AdamW with ``LRSafetyRadius(mode="control", target_ratio=1)``, which rescales every
  update so that its step length stays within the softmax safety radius.

Tasks: ``digits`` (the MLP with LayerNorm of examples/digits.py on scikit-learn's digits; metric:
validation accuracy) and ``gpt`` (the LLaMA-style GPT of examples/gpt.py on Python stdlib source;
metric: validation loss). Target: the controller ends within 5% of the spike-free run where plain and
clipped runs collapse. Paper (10,000x spike, accuracy plain / clipped / controller): Transformer
31.8 / 38.7 / 95.3%, MLP+LayerNorm 44.6 / 51.5 / 93.9%.

    python bench/lr_spike.py                                   # CPU: digits + tiny GPT (~10 min)
    python bench/lr_spike.py --tasks digits                    # ~1 min
    python bench/lr_spike.py --device cuda --gpt-size 20m --gpt-steps 600 --gpt-batch-size 32

Prints a table and writes ``bench/results/lr_spike-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from lightning_optim.callbacks import LRSafetyRadius
from lightning_optim.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_optim.examples.gpt import GPT, StdlibTextDataModule

METHODS = ("plain", "clip", "controller")


class SpikeSchedule:
    """LambdaLR factor: ``factor`` for optimizer steps ``start ... start + duration - 1`` (0-based), else 1."""

    def __init__(self, start: int, duration: int, factor: float) -> None:
        self.start, self.duration, self.factor = start, duration, factor

    def __call__(self, step: int) -> float:
        return self.factor if self.start <= step < self.start + self.duration else 1.0


class SpikedAdamW:
    """Mixin: ``configure_optimizers`` returns AdamW with a per-step :class:`SpikeSchedule`."""

    spike: SpikeSchedule = SpikeSchedule(0, 0, 1.0)
    adamw_lr: float = 1e-3
    adamw_weight_decay: float = 0.01

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.adamw_lr, weight_decay=self.adamw_weight_decay)
        scheduler = LambdaLR(optimizer, self.spike)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SpikedDigits(SpikedAdamW, DigitsClassifier):
    pass


class SpikedGPT(SpikedAdamW, GPT):
    pass


class RatioRecorder(pl.Callback):
    """The controller's r and s at the first spike step (read on the host: a benchmark may sync)."""

    def __init__(self, controller: LRSafetyRadius, step: int) -> None:
        self.controller, self.step = controller, step
        self.ratio = self.scale = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1 and self.controller.ratio is not None:
            self.ratio = float(self.controller.ratio)
            self.scale = float(self.controller.scale)


def evaluate(model: pl.LightningModule, loader: Any, device: torch.device, max_batches: int) -> dict[str, float]:
    """Mean validation loss (and accuracy for classifiers) over at most ``max_batches`` batches."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if i >= max_batches:
                break
            logits = model(x.to(device)).float()
            y = y.to(device)
            total_loss += F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            count += y.numel()
    loss = total_loss / count
    return {"val_loss": loss if math.isfinite(loss) else math.inf, "val_acc": correct / count}


def run_one(task: str, method: str, factor: float, duration: int, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    if task == "digits":
        model: pl.LightningModule = SpikedDigits(arch="mlp")
        data: pl.LightningDataModule = DigitsDataModule(batch_size=64, seed=args.seed)
        steps, start = args.digits_steps, args.digits_spike_at
    else:
        model = SpikedGPT(size=args.gpt_size, seq_len=args.seq_len)
        data = StdlibTextDataModule(seq_len=args.seq_len, batch_size=args.gpt_batch_size, seed=args.seed,
                                    max_bytes=args.gpt_max_bytes)
        steps, start = args.gpt_steps, args.gpt_spike_at
    model.spike = SpikeSchedule(start, duration, factor)
    callbacks: list[pl.Callback] = []
    recorder = None
    if method == "controller":
        controller = LRSafetyRadius(mode="control", target_ratio=args.target_ratio, max_samples=args.max_samples)
        recorder = RatioRecorder(controller, start)
        callbacks = [controller, recorder]
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=steps,
        gradient_clip_val=1.0 if method == "clip" else None,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - started
    metrics = evaluate(model, data.val_dataloader(), model.device, args.val_batches)
    row = {"task": task, "method": method, "factor": factor, "duration": duration, "spike_at": start,
           "steps": steps, "seconds": round(seconds, 2), **metrics}
    if recorder is not None:
        row.update(ratio_at_spike=recorder.ratio, scale_at_spike=recorder.scale,
                   scaled_steps=float(callbacks[0].scaled_steps))
    return row


def within_target(task: str, row: dict[str, Any], reference: dict[str, Any]) -> bool:
    """Within 5% of the spike-free run: accuracy >= 0.95 x reference, or validation loss <= 1.05 x reference."""
    if task == "digits":
        return row["val_acc"] >= 0.95 * reference["val_acc"]
    return row["val_loss"] <= 1.05 * reference["val_loss"]


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        metric = "val_acc" if task == "digits" else "val_loss"
        fmt = (lambda v: f"{100 * v:.1f}%") if task == "digits" else (lambda v: f"{v:.3f}")
        task_rows = [r for r in rows if r["task"] == task]
        reference = next(r for r in task_rows if r["factor"] == 1.0 and r["method"] == "plain")
        calm = next((r for r in task_rows if r["factor"] == 1.0 and r["method"] == "controller"), None)
        head = f"{task}: {metric}; spike-free {fmt(reference[metric])}"
        if calm is not None:
            head += f" (controller without a spike: {fmt(calm[metric])})"
        lines += [head, f"  {'spike':<16}" + "".join(f"{m:>14}" for m in METHODS) + f"{'r at spike':>12}"]
        spiked = sorted({(r["factor"], r["duration"]) for r in task_rows if r["factor"] != 1.0})
        for factor, duration in spiked:
            cells, ratio = [], ""
            for method in METHODS:
                row = next(r for r in task_rows if (r["factor"], r["duration"], r["method"]) == (factor, duration, method))
                mark = "*" if within_target(task, row, reference) else " "
                cells.append(f"{fmt(row[metric])}{mark}")
                if row.get("ratio_at_spike") is not None:
                    ratio = f"{row['ratio_at_spike']:.3g}"
            lines.append(f"  {f'{factor:g}x, {duration} step' + ('s' if duration > 1 else ''):<16}"
                         + "".join(f"{c:>14}" for c in cells) + f"{ratio:>12}")
        lines.append("  * within 5% of the spike-free run")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--tasks", default="digits,gpt", help="comma list of digits, gpt")
    parser.add_argument("--factors", default="1000,10000")
    parser.add_argument("--durations", default="1,10")
    parser.add_argument("--target-ratio", type=float, default=1.0)
    parser.add_argument("--max-samples", type=int, default=256)
    parser.add_argument("--digits-steps", type=int, default=400)
    parser.add_argument("--digits-spike-at", type=int, default=50)
    parser.add_argument("--gpt-size", default="tiny")
    parser.add_argument("--gpt-steps", type=int, default=300)
    parser.add_argument("--gpt-spike-at", type=int, default=100)
    parser.add_argument("--gpt-batch-size", type=int, default=16)
    parser.add_argument("--gpt-max-bytes", type=int, default=4_000_000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val-batches", type=int, default=32)
    parser.add_argument("--precision", default=None, help="default bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/lr_spike-<device>-<date>.json)")
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    factors = [float(f) for f in args.factors.split(",")]
    durations = [int(d) for d in args.durations.split(",")]
    rows = []
    for task in args.tasks.split(","):
        if task not in ("digits", "gpt"):
            raise ValueError(f"Unknown task {task!r}; choose digits and/or gpt.")
        configs = [("plain", 1.0, 0), ("controller", 1.0, 0)]
        configs += [(m, f, d) for f in factors for d in durations for m in METHODS]
        for method, factor, duration in configs:
            rows.append(run_one(task, method, factor, duration, args))
            r = rows[-1]
            print(f"{task} {method} x{factor:g}/{duration}: val_loss {r['val_loss']:.4f} acc {r['val_acc']:.4f} "
                  f"({r['seconds']:.0f} s)", file=sys.stderr)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    table = format_table(rows)
    print(f"device: {device}, torch {torch.__version__}, precision {args.precision}\n{table}")
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"lr_spike-{args.device}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "torch": torch.__version__, "date": date, "command": [sys.argv[0], *(argv or sys.argv[1:])],
              "settings": vars(args), "results": rows, "table": table}
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
