"""FSDP2 / DTensor parameters for the matrix optimizers: each matrix gathered for the matrix rule (matrix.gathered_matrix_step).

tests/dtensor_script.py runs every case of its CASES on 2 CPU ranks (gloo) with ``fully_shard`` parameters;
here the same optimizer replays the same full gradients on plain full tensors, and the two ranks' local
shards, concatenated, must equal the plain run (parameters and state), to 1e-6 (bit-equal in practice:
the gather design runs the same matrix rule on the same full matrices).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lightning_optim.matrix as matrix
from dtensor_script import CASES, STEPS, make_optimizer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dtensor")
    script = Path(__file__).with_name("dtensor_script.py")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=out,
        )
        for rank in (0, 1)
    ]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank}:\n{log[-3000:]}"
    return out


def _replay(case: str, replay: dict[str, Any]) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    name, kwargs, _ = CASES[case]
    params = [torch.nn.Parameter(t.clone()) for t in replay["initial"]]
    opt = make_optimizer(name, params, kwargs)
    for grads in replay["grads"]:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _joined(ranks: list[dict[str, Any]], get: Any) -> torch.Tensor:
    return torch.cat([get(r) for r in ranks], dim=0)


@pytest.mark.parametrize("case", CASES)
def test_fully_shard_matches_plain_tensors(runs: Path, case: str) -> None:
    replay = torch.load(runs / f"{case}-replay.pt")
    ranks = [torch.load(runs / f"{case}-rank{r}.pt") for r in (0, 1)]
    assert len(replay["grads"]) == STEPS
    params, opt = _replay(case, replay)
    for i, (p, p0) in enumerate(zip(params, replay["initial"])):
        assert not torch.equal(p, p0), f"{case}: parameter {i} did not move"
        joined = _joined(ranks, lambda r: r["params"][i])
        torch.testing.assert_close(joined, p.detach(), rtol=0, atol=1e-6, msg=f"{case}: parameter {i}")
        state = opt.state[p]
        assert set(ranks[0]["state"][i]) == set(state), f"{case}: state keys of parameter {i}"
        for key, want in state.items():
            if ranks[0]["dtensor"][i][key]:  # a DTensor with the parameter's placements: one shard per rank
                got = _joined(ranks, lambda r: r["state"][i][key])
            else:  # plain (step counters, per-matrix scalars): the same on both ranks
                got = ranks[0]["state"][i][key]
                other = ranks[1]["state"][i][key]
                assert torch.equal(got, other) if isinstance(got, torch.Tensor) else got == other, f"{case}: {key}"
            if isinstance(want, torch.Tensor):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{case}: state {key} of parameter {i}")
            else:
                assert got == want, f"{case}: state {key} of parameter {i}"
    # the hidden weights' param-shaped moments are DTensors (zeros_like of a DTensor), the counters plain
    if case.startswith(("muon", "namo")):
        assert ranks[0]["dtensor"][0]["momentum_buffer"] and not ranks[0]["dtensor"][0]["step"]
        assert ranks[0]["dtensor"][1]["exp_avg"]  # the bias: AdamW on DTensors


def test_plain_tensors_never_take_the_gathered_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain parameters go straight to the matrix rule (the DTensor branch is a no-op for them)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("gathered_matrix_step called for plain tensors")

    monkeypatch.setattr(matrix, "gathered_matrix_step", refuse)
    w = torch.nn.Parameter(torch.randn(4, 3))
    w.grad = torch.randn(4, 3)
    opt = make_optimizer("Muon", [w], {})
    before = w.detach().clone()
    opt.step()
    assert not matrix.is_dtensor(w) and not torch.equal(w, before)
    assert matrix.gathered_source(w) is w
