"""SpikeGuard on the digits MLP with plain AdamW: injected 1e4x / NaN gradient spikes (issue 3, §2 and §7)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from callback_models import GradientSpike, Regression, fit, flat_params
from lightning_optim.callbacks import SpikeGuard
from lightning_optim.examples.digits import DigitsClassifier, DigitsDataModule

SPIKE_STEP = 100


class TrainLoss(pl.Callback):
    """Full training-set loss after the given optimizer steps, and a snapshot of everything after each step."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.loss, self.snapshots = steps, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps:
            x, y = trainer.datamodule.train_set.tensors
            with torch.no_grad():
                self.loss[step] = float(F.cross_entropy(pl_module(x), y))
        if step in (SPIKE_STEP, SPIKE_STEP + 1):  # global_step counts the spiking step as SPIKE_STEP + 1
            opt = trainer.optimizers[0]
            self.snapshots[step] = (
                flat_params(pl_module),
                [{k: v.clone() for k, v in opt.state[p].items()} for p in pl_module.parameters()],
            )


def _digits_run(callbacks: list[pl.Callback], factor: float | None, steps: set[int], root: Path | None = None):
    torch.manual_seed(0)
    probe = TrainLoss(steps)
    spike = [GradientSpike({SPIKE_STEP}, factor)] if factor is not None else []
    trainer = fit(DigitsClassifier(), spike + callbacks + [probe], max_steps=max(steps), root=root, datamodule=DigitsDataModule())
    return probe, trainer


@pytest.fixture(scope="module")
def clean_loss() -> dict[int, float]:
    return _digits_run([], None, {120, 300})[0].loss


def test_unguarded_spike_poisons_adamw(clean_loss: dict[int, float]) -> None:
    loss = _digits_run([], 1e4, {120, 300})[0].loss
    assert loss[120] > 1.1 * clean_loss[120] and loss[300] > 1.1 * clean_loss[300]


@pytest.mark.parametrize("action", ["skip", "clip"])
@pytest.mark.parametrize("factor", [1e4, math.nan])
def test_guard_recovers_within_20_steps(action: str, factor: float, clean_loss: dict[int, float]) -> None:
    probe, _ = _digits_run([SpikeGuard(action=action)], factor, {120})
    assert probe.loss[120] == pytest.approx(clean_loss[120], rel=0.1)


@pytest.mark.parametrize("factor", [1e4, math.nan])
def test_guard_reset_recovers(factor: float, clean_loss: dict[int, float]) -> None:
    """reset re-warms the learning rate over 150 steps, so it is compared at the end of the warm-up."""
    unguarded = _digits_run([], 1e4, {120})[0].loss[120]
    probe, _ = _digits_run([SpikeGuard(action="reset")], factor, {120, 300})
    assert probe.loss[120] < 0.5 * unguarded
    assert probe.loss[300] == pytest.approx(clean_loss[300], rel=0.1)


def test_skip_leaves_parameters_moments_and_steps_unchanged() -> None:
    guard = SpikeGuard(action="skip")
    probe, _ = _digits_run([guard], math.nan, {SPIKE_STEP + 1})
    (before, state_before), (after, state_after) = probe.snapshots[SPIKE_STEP], probe.snapshots[SPIKE_STEP + 1]
    assert torch.equal(before, after)
    for a, b in zip(state_before, state_after):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert float(guard._states[0].counters[1]) == 1.0  # one skipped step
    assert float(guard._states[0].counters[0]) == 1.0  # one spike


def test_stop_saves_a_checkpoint_of_the_state_before_the_spike(tmp_path: Path) -> None:
    probe, trainer = _digits_run([SpikeGuard(action="stop")], 1e4, {SPIKE_STEP, 300}, root=tmp_path)
    assert trainer.global_step == SPIKE_STEP + 2  # the spiking step and the one after it ran (and were undone)
    checkpoint = tmp_path / f"spike-step={SPIKE_STEP + 1}.ckpt"
    assert checkpoint.exists()
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    before = probe.snapshots[SPIKE_STEP][0]
    assert torch.equal(torch.cat([v.reshape(-1) for k, v in saved.items() if k.startswith("net.")]), before)


def test_loss_monitor_flags_a_loss_spike() -> None:
    guard = SpikeGuard(monitor="loss", warmup_steps=10, action="clip")
    module = Regression(lambda p: torch.optim.AdamW(p, lr=1e-2), loss_spikes={40: 1e4})
    fit(module, [guard], max_steps=60)
    assert float(guard._states[0].counters[0]) == 1.0
    assert torch.isfinite(flat_params(module)).all()


def test_grad_accumulation_sums_the_window_loss() -> None:
    guard = SpikeGuard(monitor="both", warmup_steps=5)
    module = Regression(lambda p: torch.optim.AdamW(p, lr=1e-2))
    fit(module, [guard], max_steps=12, accumulate_grad_batches=4)
    state = guard._states[0]
    assert int(state.loss_z.state_dict()["count"]) == 12  # one loss per optimizer step, not per micro-batch
    assert float(state.counters[0]) == 0.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"monitor": "weights"}, "monitor"),
        ({"action": "explode"}, "action"),
        ({"statistic": "median"}, "statistic"),
        ({"z_threshold": 0.0}, "z_threshold"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"alpha": 1.0}, "alpha"),
        ({"window": 0}, "window"),
        ({"statistic": "window", "window": 8, "warmup_steps": 9}, "warmup_steps"),
        ({"reset_warmup_steps": -1}, "reset_warmup_steps"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SpikeGuard(**kwargs)
