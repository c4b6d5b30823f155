"""4-bit QAT stability: AdamW vs SPAM vs Stable-SPAM vs AdamW + stability callbacks, against full precision.

Trains the GPT example on Python stdlib source with 4-bit weight fake quantization
(``QuantizationAwareTraining(bits=4)``, and W4A4 with ``--activations``) from step 0, at the same
learning rate and step budget for every optimizer, plus full-precision AdamW (bf16-mixed on CUDA) as
the reference, at each of ``--lrs`` (the second default is a learning rate where full-precision AdamW
is on the edge). Reports the final validation loss and whether a run diverged (non-finite, or final
validation loss above ln 256 = 5.55, the loss of guessing bytes uniformly). Direction to reproduce
(Stable-SPAM paper, Huang et al. 2025): Stable-SPAM in 4 bits reaches AdamW-in-4-bit's loss or better,
ideally the full-precision AdamW's.

    python bench/lowbit_stability.py                                       # CUDA: 20m GPT, 1000 steps
    python bench/lowbit_stability.py --device cpu --size tiny --steps 300 --lrs 3e-3,1e-2 --batch-size 16

Prints a table and writes ``bench/results/lowbit_stability-<device>-<date>.json``.
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

from lightning_optim.callbacks import MomentumReset, QuantizationAwareTraining, SpikeAwareClipping, SpikeGuard
from lightning_optim.examples._script import build_optimizer
from lightning_optim.examples.gpt import GPT, StdlibTextDataModule

DIVERGED_LOSS = math.log(256)

# name -> (optimizer, quantized, stability callbacks)
CONFIGS: dict[str, tuple[str, bool, bool]] = {
    "fp_adamw": ("adamw", False, False),
    "q_adamw": ("adamw", True, False),
    "q_spam": ("spam", True, False),
    "q_stable_spam": ("stable_spam", True, False),
    "q_adamw_callbacks": ("adamw", True, True),
}


def run_one(name: str, lr: float, activations: bool, args: argparse.Namespace) -> dict[str, Any]:
    optimizer_name, quantized, stabilized = CONFIGS[name]
    pl.seed_everything(args.seed, verbose=False)
    model = GPT(size=args.size, seq_len=args.seq_len)
    model.configure_optimizers = lambda: build_optimizer(optimizer_name, model.parameters(), lr, args.steps)
    data = StdlibTextDataModule(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    callbacks: list[pl.Callback] = []
    if quantized:
        callbacks.append(QuantizationAwareTraining(bits=4, group_size=args.group_size,
                                                   quantize_activations=activations, every_n_steps=0))
    if stabilized:  # AdamW + SpikeAwareClipping + MomentumReset is SPAM; SpikeGuard adds spike resets
        callbacks += [SpikeGuard(), MomentumReset(), SpikeAwareClipping()]
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        limit_val_batches=args.val_batches,
        val_check_interval=None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - started
    val = trainer.validate(model, data, verbose=False)[0]["val/loss"]  # quantized while QAT is active
    diverged = not math.isfinite(val) or val > DIVERGED_LOSS
    return {"config": name, "optimizer": optimizer_name, "quantized": quantized, "activations": activations and quantized,
            "stability_callbacks": stabilized, "lr": lr, "steps": args.steps, "val_loss": val,
            "diverged": diverged, "seconds": round(seconds, 1)}


def format_table(rows: list[dict[str, Any]]) -> str:
    lrs = list(dict.fromkeys(r["lr"] for r in rows))
    lines = [f"{'configuration':<26}" + "".join(f"{f'lr {lr:g}':>14}" for lr in lrs)]
    keys = list(dict.fromkeys((r["config"], r["activations"]) for r in rows))
    for config, activations in keys:
        label = config.replace("q_", "W4A4 " if activations else "W4 ").replace("fp_", "full precision ")
        cells = []
        for lr in lrs:
            row = next(r for r in rows if (r["config"], r["activations"], r["lr"]) == (config, activations, lr))
            cells.append("diverged" if row["diverged"] else f"{row['val_loss']:.3f}")
        lines.append(f"{label:<26}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--size", default="20m", help="GPT size preset (tiny, small, 20m, 60m)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lrs", default="1e-3,4e-3", help="comma list; the last should put full-precision AdamW on the edge")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--activations", action="store_true", help="also run W4A4 (fake-quantized Linear inputs)")
    parser.add_argument("--only", default=None, help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--val-batches", type=int, default=32)
    parser.add_argument("--precision", default=None, help="default bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/lowbit_stability-<device>-<date>.json)")
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise ValueError(f"Unknown configurations {unknown}; choose from {list(CONFIGS)}.")
    rows = []
    for lr in (float(v) for v in args.lrs.split(",")):
        for name in names:
            for activations in (False, True) if args.activations and CONFIGS[name][1] else (False,):
                rows.append(run_one(name, lr, activations, args))
                r = rows[-1]
                print(f"{name}{' W4A4' if activations else ''} lr {lr:g}: val_loss {r['val_loss']:.4f} "
                      f"({r['seconds']:.0f} s)", file=sys.stderr)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    table = format_table(rows)
    print(f"device: {device}, torch {torch.__version__}, precision {args.precision}, GPT {args.size}, "
          f"{args.steps} steps\n{table}")
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"lowbit_stability-{args.device}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "torch": torch.__version__, "date": date,
              "command": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
              "settings": vars(args), "results": rows, "table": table}
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
