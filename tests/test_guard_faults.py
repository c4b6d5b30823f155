"""SpikeGuard with a NaN in one gradient entry while the loss stays finite.

Whatever the ``monitor``, a non-finite gradient is a spike: ``clip``/``reset`` zero it, ``skip``/``stop``
undo the step, so no NaN reaches the weights, the optimizer moments or the checkpoint ``stop`` saves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from callback_models import Regression, fit
from lightning_optim.callbacks import SpikeGuard

NAN_STEP = 20  # 0-based global step whose gradient gets the NaN (after a warm-up of 10)


class NaNGradientEntry(Regression):
    """Regression whose gradient gets a NaN in one entry at global step ``NAN_STEP``; the loss stays finite."""

    def on_after_backward(self) -> None:
        if self.trainer.global_step == NAN_STEP:
            self.net[0].weight.grad[0, 0] = math.nan


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested dict/list (an optimizer state, a checkpoint's ``optimizer_states``)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _non_finite(tensors: Iterable[torch.Tensor]) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors if t.is_floating_point())


def _fit(tmp_path: Path, callbacks: list) -> tuple[NaNGradientEntry, Any]:
    module = NaNGradientEntry(lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = fit(module, callbacks, max_steps=NAN_STEP + 10, root=tmp_path)
    return module, trainer


def test_the_injected_nan_poisons_an_unguarded_run(tmp_path: Path) -> None:
    module, _ = _fit(tmp_path, [])
    assert _non_finite(module.parameters()) > 0


@pytest.mark.parametrize("action", ["reset", "clip", "skip", "stop"])
@pytest.mark.parametrize("monitor", ["grad_norm", "loss", "both"])
def test_non_finite_gradient_is_a_spike_for_every_monitor(tmp_path: Path, monitor: str, action: str) -> None:
    guard = SpikeGuard(monitor=monitor, warmup_steps=10, action=action)
    module, trainer = _fit(tmp_path, [guard])
    assert _non_finite(module.parameters()) == 0
    assert _non_finite(_tensors(trainer.optimizers[0].state_dict()["state"])) == 0
    spikes, skipped = guard._states[0].counters.tolist()
    if action == "stop":  # the spiking step and the one after it are undone, then training stops
        assert (spikes, skipped) == (2.0, 2.0)
        checkpoint = torch.load(tmp_path / f"spike-step={NAN_STEP + 1}.ckpt", weights_only=False)
        assert _non_finite(checkpoint["state_dict"].values()) == 0
        assert _non_finite(_tensors(checkpoint["optimizer_states"])) == 0
    else:
        assert spikes == 1.0 and skipped == (1.0 if action == "skip" else 0.0)
        assert trainer.global_step == NAN_STEP + 10
