"""Training memory of one step of the GPT example per optimizer: weights, gradients, optimizer state, activations.

For each candidate, builds ``lightning_optim.examples.gpt.GPT(size=--size)`` (default ``20m``: 6 layers,
d_model 512, 19.5M parameters), runs ``--steps`` training steps on random byte tokens (batch ``--batch`` x
``--seq-len``; memory does not depend on the data) and accounts every tensor a step holds:

- ``weights``: the model's parameters as they are stored (fp32 here; ECO's parameters are fp32 tensors
  whose values lie on its int8/fp8 grid, so the column ``weights (stored)`` also gives the bytes of its codes
  + scales, what a run storing the weights quantized keeps);
- ``grads``: the ``.grad`` tensors (one per parameter, the parameter's dtype);
- ``state``: every tensor in ``optimizer.state`` (each once; bitsandbytes' uint8 states and absmax included);
- ``activations``: the bytes autograd saved for backward during the forward (``saved_tensors_hooks``, each
  storage once): the same for every optimizer at the same batch.

``total`` = weights + grads + state + activations: the tensors alive at the peak of a step, without the
temporaries of the kernels (the optimizer's own scratch included: a per-tensor path holds about one extra
tensor, a multi-tensor path a list of them). On CUDA the measured ``torch.cuda.max_memory_allocated`` is
reported next to it. ``% AdamW``: total / AdamW's total, and (weights + grads + state) / AdamW's, the part the
optimizer decides (activations depend on the batch); the last column counts ECO's weights as stored codes.

With ``--losses`` a compare results.json (``lightning-optim compare``) is joined in: each optimizer's best
final validation loss and its gap to AdamW's, so the table answers "how much memory for how much loss".

    python bench/memory.py                                   # CPU, 20m GPT, registry low-rank/low-bit/matrix
    python bench/memory.py --only AdamW,GaLore,APOLLO-Mini --size small
    python bench/memory.py --losses bench/results/compare/gpt_tiny/results.json

Candidates: ``AdamW`` (torch, the reference), ``AdamW8bit`` (bitsandbytes, when importable: it runs on
the CPU since 0.45), ``<Name>-8bit`` (our ``state_bits=8``) for the entries that offer it among
``--eight-bit`` (default StableSPAM, Lion), and every registry entry of the families ``--families``.
Prints a markdown table and writes JSON to ``bench/results/memory-<device>-<size>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_optim import registry
from lightning_optim.examples.gpt import GPT

MiB = float(1 << 20)
DEFAULT_FAMILIES = ("low-rank", "low-bit", "matrix")
DEFAULT_EIGHT_BIT = ("StableSPAM", "Lion")


def tensor_bytes(values: Any, seen: set[int] | None = None) -> int:
    """Bytes of every tensor in a nest of dicts/lists/tuples, each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(values, torch.Tensor):
        key = values.untyped_storage().data_ptr() if values.numel() else id(values)
        if key in seen:
            return 0
        seen.add(key)
        return values.untyped_storage().nbytes()
    if isinstance(values, dict):
        return sum(tensor_bytes(v, seen) for v in values.values())
    if isinstance(values, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in values)
    return 0


def stored_weight_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights as a run would store them: ECO's quantized tensors as codes + scales, the rest as they are."""
    quantized = getattr(optimizer, "quantized_weight", None)
    total = 0
    for p in model.parameters():
        if quantized is not None and p.dim() >= 2:
            total += quantized(p).nbytes
        else:
            total += p.numel() * p.element_size()
    return total


def _bnb_adamw8bit() -> Callable[..., torch.optim.Optimizer] | None:
    try:
        import bitsandbytes as bnb  # noqa: PLC0415 - optional
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return bnb.optim.AdamW8bit


def candidates(only: set[str] | None, families: tuple[str, ...], eight_bit: tuple[str, ...]) -> dict[str, Callable]:
    """name -> (params -> optimizer)."""
    out: dict[str, Callable] = {"AdamW": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)}
    bnb = _bnb_adamw8bit()
    if bnb is not None:
        out["AdamW8bit"] = lambda params: bnb(params, lr=1e-3, weight_decay=0.1)
    for name in eight_bit:
        info = registry.get(name)
        if info.state_bits_8:
            out[f"{info.name}-8bit"] = lambda params, n=info.name: registry.build(n, params, state_bits=8)
    for info in registry.optimizers(ours=True):
        if info.family in families and not info.needs_hvp:
            out[info.name] = lambda params, n=info.name: registry.build(n, params)
    if only is not None:
        missing = only - set(out)
        if missing:
            raise SystemExit(f"unknown or unavailable candidates {sorted(missing)}; choose from {sorted(out)}")
        out = {k: v for k, v in out.items() if k in only}
    return out


def measure(name: str, make: Callable, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = GPT(size=args.size, seq_len=args.seq_len).to(device)
    optimizer = make(model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=gen).to(device)
    batch = (x[:, :-1], x[:, 1:])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    activations = 0
    for _ in range(args.steps):
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = model._loss(batch)
        param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        activations = tensor_bytes([t for t in saved if t.untyped_storage().data_ptr() not in param_storages])
        del saved  # the graph keeps them alive until backward; the list must not
        loss.backward()
        optimizer.step()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        optimizer.zero_grad(set_to_none=False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = tensor_bytes(list(optimizer.state.values()))
    stored = stored_weight_bytes(model, optimizer)
    n = sum(p.numel() for p in model.parameters())
    row = dict(
        optimizer=name, params=n, weights=weights, weights_stored=stored, grads=grads, state=state,
        activations=activations, total=weights + grads + state + activations,
        total_stored=stored + grads + state + activations, state_bytes_per_param=state / n,
        final_loss=float(loss.detach()), finite=bool(all(torch.isfinite(p).all() for p in model.parameters())),
    )
    if device.type == "cuda":
        row["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    del model, optimizer
    gc.collect()
    return row


def join_losses(rows: list[dict[str, Any]], path: Path) -> str:
    """Add ``val_loss`` / ``val_loss_gap`` from a compare results.json; returns a line naming the source."""
    data = json.loads(path.read_text())
    best = {e["optimizer"]: e["best"]["final_loss"] for e in data["optimizers"] if e.get("best")}
    reference = best.get("AdamW")
    for row in rows:
        loss = best.get(row["optimizer"])  # 8-bit and bitsandbytes rows were not in the sweep
        if loss is not None:
            row["val_loss"] = loss
            if reference:
                row["val_loss_gap"] = loss / reference - 1.0
    return f"validation losses: {path} (best lr of each optimizer, AdamW {reference})"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, smallest first. ``% AdamW`` columns: of AdamW's total (activations included) and of
    AdamW's weights + grads + state (what the optimizer choice changes; activations depend on the batch)."""
    ref = next((r for r in rows if r["optimizer"] == "AdamW"), None)
    ref_model = ref["weights"] + ref["grads"] + ref["state"] if ref else None
    with_loss = any("val_loss" in r for r in rows)
    head = ("| optimizer | state B/param | weights MiB | grads MiB | state MiB | activations MiB | total MiB | % AdamW "
            "| weights+grads+state % AdamW | same, weights stored quantized |")
    sep = "|---" * 10 + "|"
    if with_loss:
        head += " val loss (tiny GPT) | vs AdamW |"
        sep += "---|---|"
    lines = [head, sep]
    pct = lambda x, y: f"{100 * x / y:.0f}%" if y else "-"  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["weights_stored"] + r["grads"] + r["state"], r["optimizer"])):
        model = r["weights"] + r["grads"] + r["state"]
        stored = r["weights_stored"] + r["grads"] + r["state"]
        line = (f"| {r['optimizer']} | {r['state_bytes_per_param']:.2f} | {r['weights'] / MiB:.1f} | "
                f"{r['grads'] / MiB:.1f} | {r['state'] / MiB:.1f} | {r['activations'] / MiB:.1f} | "
                f"{r['total'] / MiB:.1f} | {pct(r['total'], ref['total'] if ref else 0)} | {pct(model, ref_model)} | "
                f"{pct(stored, ref_model) if stored != model else '-'} |")
        if with_loss:
            loss = f"{r['val_loss']:.4f}" if "val_loss" in r else "-"
            gap = f"{100 * r['val_loss_gap']:+.1f}%" if "val_loss_gap" in r else "-"
            line += f" {loss} | {gap} |"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/memory.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="20m", choices=["tiny", "small", "20m", "60m"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="steps per candidate (state is complete after 2)")
    parser.add_argument("--only", default=None, help="comma-separated candidate names")
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES))
    parser.add_argument("--eight-bit", default=",".join(DEFAULT_EIGHT_BIT))
    parser.add_argument("--losses", type=Path, default=None, help="a compare results.json to join")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    only = set(args.only.split(",")) if args.only else None
    cands = candidates(only, tuple(args.families.split(",")), tuple(filter(None, args.eight_bit.split(","))))
    rows = []
    for name, make in cands.items():
        rows.append(measure(name, make, args, device))
        print(f"{name}: total {rows[-1]['total'] / MiB:.1f} MiB, state {rows[-1]['state_bytes_per_param']:.2f} B/param",
              file=sys.stderr, flush=True)
    source = join_losses(rows, args.losses) if args.losses else None
    table = format_table(rows)
    print(table)
    if source:
        print(source)
    date = datetime.date.today().isoformat()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    out = args.out or Path(__file__).parent / "results" / f"memory-{dev.replace(' ', '-').lower()}-{args.size}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(device=dev, torch=torch.__version__, date=date, size=args.size, batch=args.batch,
                  seq_len=args.seq_len, steps=args.steps, losses=str(args.losses) if args.losses else None,
                  rows=rows, table=table)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
