"""Step-time overhead of the stability callbacks in a Lightning fit of the GPT example.

GPU setting of issue 3: 6 layers, d_model 768, 12 heads, bf16-mixed, batch 16 x 256 tokens of Python
standard-library source. Runs one fit per configuration: no callback, Lightning's SpikeDetection,
each of ours alone, all four of ours together, and LRSafetyRadius in monitor mode (a probe every 50
steps) and in control mode (a probe every step); prints a table and writes JSON.

    python bench/callback_overhead.py                                  # CUDA, the issue's setting
    python bench/callback_overhead.py --device cpu --size tiny --seq-len 64 --steps 30 --warmup 10   # smoke

Step time = wall time of the steps after ``--warmup`` (device synchronised at both ends) / their number.
Targets: all four stability callbacks together <= 3% over no callback; LRSafetyRadius monitor <= 3%;
LRSafetyRadius control <= one extra forward+backward per step (roughly +100% of a plain step's compute).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_optim.callbacks import (
    AdaptiveMomentum,
    LRSafetyRadius,
    MomentumReset,
    SpikeAwareClipping,
    SpikeGuard,
)
from lightning_optim.examples.gpt import GPT, StdlibTextDataModule


def _configs() -> dict[str, Any]:
    from lightning.pytorch.callbacks.spike import SpikeDetection

    def ours() -> list[pl.Callback]:
        return [SpikeGuard(), MomentumReset(), SpikeAwareClipping(), AdaptiveMomentum()]

    return {
        "none": list,
        "lightning_spike_detection": lambda: [SpikeDetection()],
        "spike_guard": lambda: [SpikeGuard()],
        "momentum_reset": lambda: [MomentumReset()],
        "spike_aware_clipping": lambda: [SpikeAwareClipping()],
        "adaptive_momentum": lambda: [AdaptiveMomentum()],
        "all_ours": ours,
        # issue 4 targets: monitor <= 3% at every_n_steps=50; control <= 1x an extra forward+backward
        "lr_safety_monitor": lambda: [LRSafetyRadius(mode="monitor", every_n_steps=50)],
        "lr_safety_control": lambda: [LRSafetyRadius(mode="control")],
    }


class StepTimer(pl.Callback):
    """Wall time of the optimizer steps after ``warmup``, with the device synchronised at both ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self._sync(pl_module)
            self.start = time.perf_counter()
            self.first = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.first

    @property
    def ms_per_step(self) -> float:
        return 1e3 * (self.end - self.start) / max(self.steps, 1)


def run_one(name: str, make_callbacks: Any, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = GPT(size=args.size, seq_len=args.seq_len, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head)
    model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=args.device == "cuda")
    data = StdlibTextDataModule(seq_len=args.seq_len, batch_size=args.batch_size)
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=args.log_every,
        callbacks=make_callbacks() + [timer],
    )
    trainer.fit(model, data)
    return {"name": name, "ms_per_step": timer.ms_per_step, "steps": timer.steps}


def format_table(rows: list[dict[str, Any]]) -> str:
    base = next(r["ms_per_step"] for r in rows if r["name"] == "none")
    lines = [f"{'configuration':<28} {'ms/step':>9} {'overhead':>9}"]
    for row in rows:
        lines.append(f"{row['name']:<28} {row['ms_per_step']:>9.2f} {100 * (row['ms_per_step'] / base - 1):>8.1f}%")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--size", default="60m", help="GPT size preset; the layer/width flags override it")
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default=None, help="default bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--log-every", type=int, default=50, help="trainer.log_every_n_steps")
    parser.add_argument("--only", default=None, help="comma list of configurations")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/callback_overhead-<device>-<date>.json)")
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    if args.size == "tiny":  # the smoke setting: the preset's own shape
        args.n_layer = args.d_model = args.n_head = None
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    configs = _configs()
    names = args.only.split(",") if args.only else list(configs)
    if "none" not in names:
        names.insert(0, "none")
    rows = []
    for name in names:
        rows.append(run_one(name, configs[name], args))
        print(f"{name}: {rows[-1]['ms_per_step']:.2f} ms/step", file=sys.stderr)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    table = format_table(rows)
    print(f"device: {device}, torch {torch.__version__}, precision {args.precision}\n{table}")
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"callback_overhead-{args.device}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "torch": torch.__version__, "settings": vars(args), "results": rows}
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
