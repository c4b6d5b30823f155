"""Run by tests/test_matrix_dtensor.py: the matrix optimizers on FSDP2 (``fully_shard``) parameters, 2 CPU ranks (gloo).

Launched twice, as ranks 0 and 1 (``RANK``, ``WORLD_SIZE=2``, ``MASTER_ADDR``, ``MASTER_PORT`` in the
environment, as ``torchrun`` sets them): ``python tests/dtensor_script.py OUT``. Each rank builds the same tiny model (Linear 8->16,
Linear 16->4, with biases; 8->7->4 for the uneven case), shards it with ``torch.distributed.fsdp.fully_shard`` on
``init_device_mesh("cpu", (2,))`` (every parameter a DTensor, ``Shard(0)``), and for each case of
:data:`CASES` takes :data:`STEPS` steps: forward/backward of the same batch on both ranks (FSDP2
reduce-scatters the gradients), then ``optimizer.step()``. The hidden weights take the matrix rule
through :func:`lightning_optim.matrix.gathered_matrix_step`, the biases the AdamW rule on DTensors.

Each rank saves ``{case}-rank{r}.pt``: its LOCAL shards of the parameters and of every DTensor state after
the last step (the test concatenates the two ranks' shards); rank 0 also saves ``{case}-replay.pt``: the
initial full parameters and each step's full gradients, which the test replays on plain tensors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

import lightning_optim.matrix as matrix

DEFAULT_CHUNK = matrix.GATHER_CHUNK_NUMEL
STEPS = 4
#: case name -> (registry class name, keyword arguments, hidden width: 7 makes every shard of the first layer uneven)
CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "muon": ("Muon", {"foreach": False}, 16),
    "muon-foreach": ("Muon", {"foreach": True}, 16),
    "muon-uneven": ("Muon", {"foreach": True}, 7),
    "muon-chunked": ("Muon", {"foreach": True}, 16),  # matrix.GATHER_CHUNK_NUMEL = 1: one matrix per chunk
    "namo": ("NAMO", {"foreach": False}, 16),
    "namo-foreach": ("NAMO", {"foreach": True}, 16),
    "sinkgd": ("SinkGD", {}, 16),
    "conda": ("Conda", {"update_proj_gap": 2}, 16),
    "drop_muon": ("DropMuon", {}, 16),
}


def make_optimizer(name: str, params: Any, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    from lightning_optim.registry import get

    return get(name).cls(params, **kwargs)


def model(hidden: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 8, generator=gen), torch.randn(6, 4, generator=gen)


def _local(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.to_local().clone() if isinstance(t, DTensor) else t


def main(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    try:
        for case, (name, kwargs, hidden) in CASES.items():
            matrix.GATHER_CHUNK_NUMEL = 1 if case.endswith("chunked") else DEFAULT_CHUNK
            net = model(hidden)
            initial = [p.detach().clone() for p in net.parameters()]
            fully_shard(net, mesh=mesh)
            params = list(net.parameters())
            assert all(isinstance(p, DTensor) for p in params)
            opt = make_optimizer(name, params, kwargs)
            grads = []
            for step in range(STEPS):
                opt.zero_grad()
                x, y = batch(step)
                torch.nn.functional.mse_loss(net(x), y).backward()
                grads.append([p.grad.full_tensor() for p in params])  # collective: every rank
                opt.step()
            shards = [_local(p.detach()) for p in params]
            state = [{k: _local(v) for k, v in opt.state[p].items()} for p in params]
            state_is_dtensor = [{k: isinstance(v, DTensor) for k, v in opt.state[p].items()} for p in params]
            torch.save({"params": shards, "state": state, "dtensor": state_is_dtensor}, Path(out) / f"{case}-rank{rank}.pt")
            if rank == 0:
                torch.save({"initial": initial, "grads": grads}, Path(out) / f"{case}-replay.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
