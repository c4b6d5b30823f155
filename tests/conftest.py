"""Shared helpers for the CPU test-suite; GPU tests are marked ``gpu`` and skip without CUDA."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


OptimizerFactory = Callable[..., torch.optim.Optimizer]
