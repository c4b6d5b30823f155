"""ECO vs QAT with fp32 master weights: final validation loss, optimizer-state bytes and weight-storage bytes.

Trains the tiny GPT example (``lightning_optim.examples.gpt``, byte-level Python stdlib text) for the same
step budget and learning rate with

1. ``adamw_qat_int8``: torch AdamW on fp32 master weights + ``QuantizationAwareTraining`` (int8, one scale
   per output row, fake-quantized forward with straight-through gradients) — the baseline with master weights;
2. ``eco_int8``: ECO, weights kept on the int8 grid (one scale per output channel), no master copy;
3. ``eco_fp8``: ECO with float8 e4m3 weights.

ECO quantizes every parameter with ndim >= 2 (the embedding and the head too, which QAT leaves in full
precision); its forward runs on the stored grid weights. Reported per run: the final validation loss (QAT:
on the fake-quantized weights), the optimizer-state bytes (sum of ``nbytes`` of every tensor in
``optimizer.state``), and the weight storage: for AdamW + QAT the fp32 master copy plus the bf16 working
weights a mixed-precision run keeps (6 B/param; this CPU run keeps fp32 weights only, 4 B/param) and the
int8 codes + scales QAT would export; for ECO the codes (1 B/entry) + fp32 scales of the quantized tensors
plus the 0-/1-D tensors in fp32. Honest caveat: in this benchmark ECO's parameters are ordinary fp32
tensors whose values lie on the grid; the saving is real only where weights are stored as codes + scales.

    python bench/eco_memory.py                       # CPU, tiny GPT, 150 steps (about a minute on one core)
    python bench/eco_memory.py --steps 300 --lr 3e-3

Prints a table and writes ``bench/results/eco-<device>-<date>.json``.
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

from lightning_optim.callbacks import QuantizationAwareTraining
from lightning_optim.eco import ECO, state_bytes
from lightning_optim.examples.gpt import GPT, StdlibTextDataModule

CONFIGS = ("adamw_qat_int8", "eco_int8", "eco_fp8")
ROW = 1 << 20  # a QAT group size above every row length: one scale per output row, as ECO's default


def _groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def _weight_storage(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    qat: QuantizationAwareTraining | None) -> dict[str, int]:
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    if name == "adamw_qat_int8":
        assert qat is not None
        exported = qat.export_quantized_state_dict(model)
        quantized = {k.removesuffix(".weight") for k in exported if k.endswith(".weight")}
        rest = sum(p.numel() * 4 for name_, p in model.named_parameters() if name_.removesuffix(".weight") not in quantized)
        return {
            "training_weight_bytes": n * (4 + 2),  # fp32 master + bf16 working copy (mixed precision)
            "as_run_weight_bytes": n * 4,  # this CPU run: fp32 weights are the master copy
            "deploy_weight_bytes": sum(t.nbytes for t in exported.values()) + rest,
        }
    assert isinstance(optimizer, ECO)
    codes = sum(optimizer.quantized_weight(p).nbytes for p in params if p.dim() >= 2)
    vectors = sum(p.numel() * 4 for p in params if p.dim() < 2)
    return {
        "training_weight_bytes": codes + vectors,  # no master copy: codes + scales, vectors in fp32
        "as_run_weight_bytes": n * 4,  # simulated: fp32 parameters holding grid values
        "deploy_weight_bytes": codes + vectors,
    }


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    model = GPT(size=args.size, seq_len=args.seq_len)
    qat = None
    callbacks: list[pl.Callback] = []
    if name == "adamw_qat_int8":
        qat = QuantizationAwareTraining(bits=8, fmt="int", group_size=ROW, every_n_steps=0)
        callbacks.append(qat)
        model.configure_optimizers = lambda: torch.optim.AdamW(_groups(model, args.weight_decay), lr=args.lr)
    else:
        fmt = "int8" if name == "eco_int8" else "fp8_e4m3"
        model.configure_optimizers = lambda: ECO(_groups(model, args.weight_decay), lr=args.lr, weight_format=fmt)
    data = StdlibTextDataModule(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                                max_bytes=args.max_bytes)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, limit_val_batches=args.val_batches,
        val_check_interval=None, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - started
    val = trainer.validate(model, data, verbose=False)[0]["val/loss"]
    optimizer = trainer.optimizers[0]
    n = sum(p.numel() for p in model.parameters())
    storage = _weight_storage(name, model, optimizer, qat)
    state = state_bytes(optimizer)
    return {
        "config": name, "lr": args.lr, "steps": args.steps, "val_loss": val, "seconds": round(seconds, 1),
        "params": n, "state_bytes": state, "state_bytes_per_param": state / n, **storage,
        "training_total_bytes_per_param": (state + storage["training_weight_bytes"]) / n,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("| config | val loss | state B/param | training weights B/param | deploy weights B/param "
            "| state + training weights B/param | time s |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["params"]
        lines.append(
            f"| {r['config']} | {r['val_loss']:.4f} | {r['state_bytes_per_param']:.2f} | "
            f"{r['training_weight_bytes'] / n:.2f} | {r['deploy_weight_bytes'] / n:.2f} | "
            f"{r['training_total_bytes_per_param']:.2f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help="GPT size preset (tiny, small)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-3, help="the same for every configuration")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="matrices only; vectors get 0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--max-bytes", type=int, default=1_000_000, help="stdlib text read")
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--only", default=None, help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/eco-cpu-<date>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise ValueError(f"Unknown configurations {unknown}; choose from {list(CONFIGS)}.")
    rows = []
    for name in names:
        rows.append(run_one(name, args))
        print(f"{name}: val_loss {rows[-1]['val_loss']:.4f} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr)
    table = format_table(rows)
    print(f"device: cpu, torch {torch.__version__}, GPT {args.size}, {args.steps} steps, lr {args.lr:g}\n{table}")
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"eco-cpu-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": "cpu", "torch": torch.__version__, "date": date,
              "command": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
              "settings": vars(args), "results": rows, "table": table}
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
