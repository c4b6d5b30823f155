"""Bytes communicated per step and loss: OneBitAdam vs plain DDP Adam on 2 CPU ranks (gloo).

Both runs train the tiny GPT of ``lightning_optim.examples.gpt`` (byte-level, ~0.14M parameters) with
``torch.nn.parallel.DistributedDataParallel`` on 2 spawned gloo processes, the same init, data (each rank
its own windows of Python stdlib source) and learning rate:

- ``ddp_adam``: ``torch.optim.Adam`` with DDP's gradient all-reduce, counted by a comm hook that does the
  same mean all-reduce and adds up the bucket bytes;
- ``onebit_adam``: ``OneBitAdam`` with :func:`lightning_optim.onebit_adam.onebit_comm_hook`; every
  ``torch.distributed`` collective the hook and the optimizer issue (``all_reduce`` during the warm-up,
  ``all_to_all_single`` and ``all_gather`` afterwards) is counted by wrapping those functions.

Reported per phase (warm-up / compressed) and rank: the payload handed to the collectives per step
(the all-reduced buffer; the all_to_all input; the all_gather input) and an estimate of the bytes each
rank puts on the wire (ring all-reduce 2(W−1)/W·B, all-to-all (W−1)/W·B, all-gather (W−1)·B); the
training loss (mean of the last 10 steps over both ranks) and the loss on a held-out batch at the end.

    python bench/onebit_comm.py                      # 80 steps, freeze_step 20
    python bench/onebit_comm.py --steps 200 --freeze-step 50 --out /tmp/onebit.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

WORLD = 2
SEQ_LEN = 64
BATCH = 8


def _text() -> torch.Tensor:
    import argparse as a
    import json as j
    import os as o

    data = b"".join(Path(m.__file__).read_bytes() for m in (a, j.decoder, j.encoder, o))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _batch(text: torch.Tensor, step: int, rank: int, held_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * (rank + 1) + step if not held_out else 999)
    split = int(0.9 * len(text))
    low, high = (split, len(text) - SEQ_LEN - 1) if held_out else (0, split - SEQ_LEN - 1)
    starts = torch.randint(low, high, (BATCH * (4 if held_out else 1),), generator=gen)
    x = torch.stack([text[s : s + SEQ_LEN] for s in starts])
    y = torch.stack([text[s + 1 : s + SEQ_LEN + 1] for s in starts])
    return x, y


class Counter:
    """Payload and wire-estimate bytes per phase."""

    def __init__(self) -> None:
        self.phase = "warmup"
        self.payload: dict[str, float] = defaultdict(float)
        self.wire: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int) -> None:
        factor = {"all_reduce": 2 * (WORLD - 1) / WORLD, "all_to_all_single": (WORLD - 1) / WORLD, "all_gather": WORLD - 1}
        self.payload[self.phase] += nbytes
        self.wire[self.phase] += factor[kind] * nbytes
        self.calls[f"{self.phase}:{kind}"] += 1


def _wrap_collectives(counter: Counter) -> None:
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_to_all_single", "all_gather")}

    def all_reduce(tensor, *args, **kwargs):
        counter.add("all_reduce", tensor.numel() * tensor.element_size())
        return originals["all_reduce"](tensor, *args, **kwargs)

    def all_to_all_single(output, input, *args, **kwargs):
        counter.add("all_to_all_single", input.numel() * input.element_size())
        return originals["all_to_all_single"](output, input, *args, **kwargs)

    def all_gather(tensor_list, tensor, *args, **kwargs):
        counter.add("all_gather", tensor.numel() * tensor.element_size())
        return originals["all_gather"](tensor_list, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_to_all_single, dist.all_gather = all_reduce, all_to_all_single, all_gather


def _counting_allreduce_hook(counter: Counter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    tensor = bucket.buffer()
    counter.add("all_reduce", tensor.numel() * tensor.element_size())
    tensor.div_(dist.get_world_size())
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


_counting_allreduce_hook.__annotations__ = {
    "counter": Any, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]
}


def _worker(rank: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from lightning_optim.examples.gpt import GPT
    from lightning_optim.onebit_adam import OneBitAdam, onebit_comm_hook

    text = _text()
    results = {}
    for method in ("ddp_adam", "onebit_adam"):
        torch.manual_seed(0)
        model = GPT(size="tiny", seq_len=SEQ_LEN)
        ddp = DistributedDataParallel(model)
        counter = Counter()
        if method == "ddp_adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            ddp.register_comm_hook(counter, _counting_allreduce_hook)
        else:
            optimizer = OneBitAdam(model.parameters(), lr=args.lr, freeze_step=args.freeze_step)
            ddp.register_comm_hook(None, onebit_comm_hook)
            saved = {n: getattr(dist, n) for n in ("all_reduce", "all_to_all_single", "all_gather")}
            _wrap_collectives(counter)
        losses = []
        start = time.perf_counter()
        for step in range(args.steps):
            counter.phase = "warmup" if step < args.freeze_step else "compressed"
            x, y = _batch(text, step, rank)
            optimizer.zero_grad(set_to_none=True)
            logits = ddp(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        seconds = time.perf_counter() - start
        if method == "onebit_adam":
            for n, fn in saved.items():
                setattr(dist, n, fn)
        with torch.no_grad():
            x, y = _batch(text, 0, 0, held_out=True)
            logits = model(x)
            held_out = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
        steps = {"warmup": min(args.steps, args.freeze_step), "compressed": max(args.steps - args.freeze_step, 0)}
        results[method] = {
            "payload_bytes_per_step": {p: counter.payload[p] / steps[p] if steps[p] else 0.0 for p in steps},
            "wire_bytes_per_step": {p: counter.wire[p] / steps[p] if steps[p] else 0.0 for p in steps},
            "collectives": dict(counter.calls),
            "train_losses": losses,
            "held_out_loss": held_out,
            "seconds": seconds,
            "params": sum(p.numel() for p in model.parameters()),
            "param_tensors": sum(1 for _ in model.parameters()),
            # bytes, not a tensor: a tensor in the queue is shared memory that dies with the process
            "final_params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().tobytes(),
        }
    queue.put((rank, results))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--freeze-step", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, args, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    by_rank = dict(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    r0, r1 = by_rank[0], by_rank[1]
    table = [
        "| method | payload B/step warm-up | payload B/step compressed | wire B/step compressed (est.) | "
        "train loss (last 10) | held-out loss | ranks identical | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    for method in ("ddp_adam", "onebit_adam"):
        a, b = r0[method], r1[method]
        last = (sum(a["train_losses"][-10:]) + sum(b["train_losses"][-10:])) / 20
        same = a["final_params"] == b["final_params"]
        pay, wire = a["payload_bytes_per_step"], a["wire_bytes_per_step"]
        table.append(
            f"| {method} | {pay['warmup']:,.0f} | {pay['compressed']:,.0f} | {wire['compressed']:,.0f} | "
            f"{last:.4f} | {a['held_out_loss']:.4f} | {same} | {a['seconds']:.1f} |"
        )
        summary[method] = {
            **{k: v for k, v in a.items() if k != "final_params"},
            "train_loss_last10_mean_over_ranks": last,
            "ranks_identical": same,
        }
    ratio = summary["onebit_adam"]["payload_bytes_per_step"]["compressed"] / summary["ddp_adam"]["payload_bytes_per_step"]["compressed"]
    table.append(f"\ncompressed-phase payload: OneBitAdam / DDP Adam = {ratio:.4f} ({1 / ratio:.1f}x less)")
    print("\n".join(table))
    date = datetime.date.today().isoformat()
    out = args.out or Path(__file__).resolve().parent / "results" / f"onebit-cpu-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": date, "world_size": WORLD, "backend": "gloo", "model": "GPT tiny", "seq_len": SEQ_LEN,
        "batch_per_rank": BATCH, "steps": args.steps, "freeze_step": args.freeze_step, "lr": args.lr,
        "torch": torch.__version__, "python": sys.version.split()[0],
        "payload_ratio_compressed": ratio, "results": summary, "table": "\n".join(table),
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
