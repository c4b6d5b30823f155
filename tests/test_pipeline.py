"""The per-optimizer pipeline: side-effect-free checkpoints, exact resume with pending decisions, one clock.

A spike's decision reaches the host one optimizer step after the spike (callbacks/_pipeline.py), so a
checkpoint saved right after a spiking step holds a decision that has not acted yet. Saving must not act
on it, and the resumed run must act on it at the same step as the uninterrupted one.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from callback_models import GradientSpike, Regression, fit, flat_params
from lightning_optim import AdaptiveMomentumAdamW
from lightning_optim.callbacks import LRSafetyRadius, MomentumReset, SpikeAwareClipping, SpikeGuard
from lightning_optim.callbacks._pipeline import ClockListener, clock_for, existing_pipeline, pipeline_for

STEPS_PER_EPOCH = 64  # Regression: 512 samples, batch 8
SPIKE = STEPS_PER_EPOCH - 1  # 0-based global step of the spike: the last step of the first epoch


def _same(a: Any, b: Any) -> bool:
    """Deep equality of nested state (tensors: same dtype, shape and values, NaN included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _live_state(trainer: pl.Trainer) -> dict[str, Any]:
    """Everything a checkpoint save could change: parameters, optimizer state and groups, clock, pipeline."""
    optimizer = trainer.optimizers[0]
    pipeline = existing_pipeline(optimizer)
    clock = pipeline.clock
    return copy.deepcopy(
        {
            "params": [p.detach() for p in trainer.lightning_module.parameters()],
            "state": [dict(s) for s in optimizer.state.values()],
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
            "clock": (clock.completed, clock.last_reset, clock.reset_warmup, clock.resets, clock.in_step),
            "follow_ups": (pipeline.decisions.reset_due, pipeline.decisions.stop_due),
            "pending": sorted(pipeline.decisions.pending_steps()),
        }
    )


class SaveAfterSpike(pl.Callback):
    """Right after the spiking step (its decision still pending): checks that saving changes nothing."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.saved: list[dict[str, Any]] = []
        self.checked = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != SPIKE + 1:
            return
        guard = next(cb for cb in trainer.callbacks if isinstance(cb, SpikeGuard))
        before = _live_state(trainer)
        self.saved = [guard.state_dict(), guard.state_dict()]
        if self.path is not None:
            trainer.save_checkpoint(self.path)
        assert _same(_live_state(trainer), before)
        self.checked = True


def _guard(action: str) -> SpikeGuard:
    return SpikeGuard(warmup_steps=20, action=action, reset_warmup_steps=30)


@pytest.mark.parametrize("action", ["skip", "reset", "stop"])
def test_state_dict_with_a_pending_decision_changes_nothing(action: str, tmp_path: Path) -> None:
    """state_dict() right after a spike: live state unchanged, the decision saved as pending, twice alike."""
    probe = SaveAfterSpike()
    # AM-AdamW keeps its step T as a host value (param_groups[*]["global_step"]): the undo log must hold it
    module = Regression(lambda p: AdaptiveMomentumAdamW(p, lr=1e-2))
    fit(module, [GradientSpike({SPIKE}, 1e4), _guard(action), probe], max_steps=SPIKE + 3, root=tmp_path)
    assert probe.checked
    first, second = probe.saved
    assert _same(first, second)
    record = first["records"][0]
    spike_step = SPIKE + 1  # 1-based optimizer step
    assert record["completed"] == spike_step  # not yet undone: the host has not read the flag
    assert not record["reset_due"] and record["stop_due"] == 0
    (pending,) = record["pending"]
    assert pending["step"] == spike_step and pending["fired"] is True
    if action == "reset":
        assert record["undo"] == {}
    else:
        # host values by reference: the param group's step counter before the spiking step
        values = record["undo"][spike_step]["values"]
        assert {"group": 0, "param": None, "key": "global_step", "value": SPIKE, "absent": False} in values
        assert record["undo"][spike_step]["clock"] == {"last_reset": 0, "reset_warmup": 0, "resets": 0}


def _resume_callbacks(action: str, extra: list[pl.Callback]) -> list[pl.Callback]:
    return [
        GradientSpike({SPIKE}, 1e4),
        _guard(action),
        MomentumReset(interval=50, warmup_steps=40),
        SpikeAwareClipping(clip_delay=5),
        *extra,
    ]


def _resume_module() -> Regression:
    return Regression(lambda p: AdaptiveMomentumAdamW(p, lr=1e-2, weight_decay=0.01))


@pytest.mark.parametrize("action", ["skip", "reset"])
def test_resume_from_a_checkpoint_with_a_pending_decision_is_exact(action: str, tmp_path: Path) -> None:
    """A checkpoint saved right after a spike, resumed, ends bit-identical to the uninterrupted fit; the
    fit that saved it too (saving acts on nothing)."""
    epochs = {"max_epochs": 3, "max_steps": -1}
    full = _resume_module()
    full_callbacks = _resume_callbacks(action, [])
    fit(full, full_callbacks, **epochs)

    ckpt = tmp_path / "after-spike.ckpt"
    saver = SaveAfterSpike(ckpt)
    saving = _resume_module()
    fit(saving, _resume_callbacks(action, [saver]), **epochs)
    assert saver.checked
    saved = torch.load(ckpt, weights_only=False)
    guard_state = next(v for k, v in saved["callbacks"].items() if k.startswith("SpikeGuard"))
    assert [d["fired"] for d in guard_state["records"][0]["pending"]] == [True]

    resumed = _resume_module()
    callbacks = _resume_callbacks(action, [])
    fit(resumed, callbacks, ckpt_path=str(ckpt), **epochs)

    assert torch.equal(flat_params(saving), flat_params(full))
    assert torch.equal(flat_params(resumed), flat_params(full))
    clocks = [clock_for(m.trainer.optimizers[0]) for m in (full, saving, resumed)]
    assert len({(c.completed, c.last_reset, c.resets) for c in clocks}) == 1
    assert clocks[0].completed == 3 * STEPS_PER_EPOCH - (1 if action == "skip" else 0)
    assert clocks[0].resets == (3 if action == "skip" else 4)  # periodic at 50, 100, 150 (+1 after the spike)
    assert torch.equal(callbacks[1]._states[0].counters, full_callbacks[1]._states[0].counters)
    optimizer_steps = [m.trainer.optimizers[0].param_groups[0]["global_step"] for m in (full, resumed)]
    assert optimizer_steps[0] == optimizer_steps[1] == clocks[0].completed


@pytest.mark.parametrize("action", ["skip", "stop"])
def test_lr_safety_and_spike_guard_share_the_clock(action: str, tmp_path: Path) -> None:
    """A step SpikeGuard undoes is counted by neither callback: both report the clock's count."""
    safety = LRSafetyRadius(mode="control", target_ratio=0.5)
    guard = SpikeGuard(warmup_steps=10, action=action)
    module = Regression(lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = fit(module, [GradientSpike({20}, 1e4), safety, guard], max_steps=30, root=tmp_path)
    clock = clock_for(trainer.optimizers[0])
    undone = 1 if action == "skip" else 2  # stop also undoes the step after the spike, then stops
    assert float(guard._states[0].counters[1]) == undone
    assert safety.completed == clock.completed == trainer.global_step - undone
    assert safety.state_dict()["completed"] == clock.completed


def test_lr_safety_old_checkpoint_count_still_loads() -> None:
    """A checkpoint of LRSafetyRadius with its own ``completed`` (before the shared clock) resumes the count."""
    saved = {"completed": 12, "method": "jvp", "positions_per_row": 1, "ratio": 0.5, "radius": 2.0, "scale": None, "scaled_steps": 0.0}
    callback = LRSafetyRadius(every_n_steps=5)
    callback.load_state_dict(saved)
    assert callback.completed == 12
    module = Regression(lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = fit(module, [callback], max_steps=3)
    assert callback.completed == clock_for(trainer.optimizers[0]).completed == 15


def test_a_checkpoint_taken_mid_step_holds_the_unscaled_learning_rate() -> None:
    """While a warm-up factor is applied, optimizer.state_dict() holds the scheduler's lr; live lr untouched."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    pipeline = pipeline_for(optimizer, 0)
    seen: list[tuple[float, float]] = []

    def save_mid_step() -> None:
        seen.append((optimizer.param_groups[0]["lr"], optimizer.state_dict()["param_groups"][0]["lr"]))

    pipeline.clock.subscribe(ClockListener(on_start=save_mid_step))  # runs after the warm-up applies
    pipeline.warmup.set_factor(0.01)
    param.grad = torch.ones(3)
    optimizer.step()
    assert seen == [(pytest.approx(0.001), 0.1)]
    assert optimizer.param_groups[0]["lr"] == 0.1 and pipeline.clock.completed == 1
    pipeline.detach()


def test_clock_hooks_are_registered_once_and_removed_by_the_last_user() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    pipeline = pipeline_for(optimizer, 0)
    pipeline_for(optimizer, 0)  # a second stability callback: same pipeline, no second hook
    safety = ClockListener()
    clock_for(optimizer).subscribe(safety)
    param.grad = torch.ones(1)
    optimizer.step()
    assert clock_for(optimizer).completed == 1 and len(optimizer._optimizer_step_post_hooks) == 1
    pipeline.detach()
    optimizer.step()
    assert clock_for(optimizer).completed == 2  # still counted for the remaining user
    clock_for(optimizer).unsubscribe(safety)
    optimizer.step()
    assert clock_for(optimizer).completed == 2 and not optimizer._optimizer_step_post_hooks
    assert not math.isnan(float(param.detach()[0]))


def test_stop_checkpoint_holds_the_host_counters_of_before_the_spike(tmp_path: Path) -> None:
    """stop: the checkpoint it saves acts on the last pending undo first (saving itself would not)."""
    module = Regression(lambda p: AdaptiveMomentumAdamW(p, lr=1e-2))
    trainer = fit(module, [GradientSpike({SPIKE}, 1e4), _guard("stop")], max_steps=SPIKE + 10, root=tmp_path)
    assert trainer.global_step == SPIKE + 2  # the spiking step and the one after it ran, both undone
    saved = torch.load(tmp_path / f"spike-step={SPIKE + 1}.ckpt", weights_only=False)
    assert [g["global_step"] for g in saved["optimizer_states"][0]["param_groups"]] == [SPIKE]
    record = next(v for k, v in saved["callbacks"].items() if k.startswith("SpikeGuard"))["records"][0]
    assert record["completed"] == SPIKE and record["pending"] == [] and record["stop_due"] == SPIKE + 1
