"""Module-mode helpers shared by the probes (safety radius, layer-error decomposition)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (no dropout, no BatchNorm statistic updates); each module's own
    ``training`` flag is restored afterwards, also for models that mix train and eval submodules."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
