"""Shared helpers for the CPU test-suite; GPU tests are marked ``gpu`` and skip without CUDA."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

# One intra-op thread for the whole suite: its tensors are tiny, and the README runs it on two xdist workers on
# two cores, where each worker's default two OpenMP threads oversubscribe the machine and spin on each other
# (Lightning fits of the digits MLP measured 5-10x slower that way). Subprocesses (the DDP tests) set
# OMP_NUM_THREADS=1 themselves.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread (the suite's default, see above; kept for tests that must not
    depend on it): on tiny tensors on a busy 2-core machine extra threads only add synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """A small MLP with a LayerNorm: weights, biases and norm parameters of different shapes."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).to(dtype)


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    start: int = 0,
    spikes: dict[int, float] | None = None,
) -> None:
    """Regression on fixed synthetic batches: batch i depends only on i, so runs can be split and resumed."""
    dtype = next(model.parameters()).dtype
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(8, 6, generator=gen).to(dtype)
        y = torch.randn(8, 3, generator=gen).to(dtype)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y) * (spikes or {}).get(i, 1.0)
            loss.backward()
            return loss

        optimizer.step(closure)


def restore_from_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    seed: int = 123,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A checkpoint round-trip: deep copies of both state dicts loaded into a model with a different init
    and a fresh optimizer from ``make_optimizer(model)``, so everything must come from the checkpoint."""
    saved_model, saved_optimizer = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    resumed = make_mlp(next(model.parameters()).dtype, seed=seed)
    resumed.load_state_dict(saved_model)
    resumed_optimizer = make_optimizer(resumed)
    resumed_optimizer.load_state_dict(saved_optimizer)
    return resumed, resumed_optimizer


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


OptimizerFactory = Callable[..., torch.optim.Optimizer]
