"""A fit stopped and resumed from its checkpoint continues exactly as an uninterrupted one (issue 3, §5)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from callback_models import GradientSpike, Regression, fit, flat_params
from lightning_optim.callbacks import AdaptiveMomentum, MomentumReset, SpikeAwareClipping, SpikeGuard

STEPS_PER_EPOCH = 64  # 512 samples, batch 8


def _callbacks(action: str) -> list:
    return [
        # a 1e4x spike on the last step before the checkpoint: its deferred reset crosses the boundary
        GradientSpike({2 * STEPS_PER_EPOCH - 1}, 1e4),
        SpikeGuard(warmup_steps=20, action=action, reset_warmup_steps=30),
        MomentumReset(interval=50, warmup_steps=40),
        SpikeAwareClipping(clip_delay=5),
        AdaptiveMomentum(),
    ]


def _module() -> Regression:
    # an inf loss at step 40: non-finite gradients from backward (a GradScaler sees them and skips the step)
    return Regression(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01), loss_spikes={40: math.inf})


@pytest.mark.parametrize(
    "action, trainer_kwargs",
    [
        ("reset", {}),
        ("skip", {}),
        ("reset", {"accumulate_grad_batches": 2}),
        ("skip", {"amp_scaler": True}),
        ("reset", {"amp_scaler": True}),
    ],
)
def test_resume_matches_uninterrupted(action: str, trainer_kwargs: dict, tmp_path: Path) -> None:
    if trainer_kwargs.pop("amp_scaler", False):
        # fp16 autocast with a GradScaler on the CPU: the inf gradient at step 40 makes the scaler skip
        # that step, which the callbacks must not count
        trainer_kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    epochs = {"max_steps": -1}
    full = _module()
    fit(full, _callbacks(action), max_epochs=4, **epochs, **trainer_kwargs)

    first = _module()
    trainer = fit(first, _callbacks(action), max_epochs=2, **epochs, **trainer_kwargs)
    ckpt = tmp_path / "stop.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = _module()
    callbacks = _callbacks(action)
    fit(resumed, callbacks, max_epochs=4, ckpt_path=str(ckpt), **epochs, **trainer_kwargs)

    torch.testing.assert_close(flat_params(resumed), flat_params(full), rtol=1e-6, atol=1e-6)
    guard = callbacks[1]
    scaler = "plugins" in trainer_kwargs
    # spikes before the checkpoint are still counted; the inf step left to a GradScaler is not
    assert float(guard._states[0].counters[0]) == (1 if scaler else 2)
    steps = 4 * STEPS_PER_EPOCH // trainer_kwargs.get("accumulate_grad_batches", 1)
    undone = (1 if scaler else 0) + (0 if action == "reset" else 2 - int(scaler))
    assert resumed.trainer.optimizers[0]._lightning_optim_step_record.completed == steps - undone
