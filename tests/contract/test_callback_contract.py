"""The callback fault contract: NaN/Inf never reaches the weights, the optimizer moments or a checkpoint.

Every stability callback × fault, with a SpikeGuard attached: a short CPU fit of a tiny LightningModule
whose gradient gets one bad entry (NaN, inf, or a finite 1e20 whose square overflows fp32) in
``on_after_backward`` at one step after the guard's warm-up. Afterwards no NaN/Inf may be found in

- the weights;
- the optimizer's moments, read through ``lightning_optim.state_adapter(optimizer)``;
- any checkpoint of the run: the one ModelCheckpoint wrote, one saved with ``trainer.save_checkpoint``
  after the fit, and for ``action="stop"`` the ``spike-step=*.ckpt`` the guard writes (which must exist).

Covered: SpikeGuard with every action × every monitor; SpikeGuard (every action) + MomentumReset,
SpikeAwareClipping, AdaptiveMomentum and QuantizationAwareTraining; all with torch AdamW; and
SpikeGuard(action="reset") with every registered optimizer of ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callback_models import Regression, fit
from contract_helpers import OURS, non_finite, tensors
from lightning_optim import state_adapter
from lightning_optim.callbacks import (
    AdaptiveMomentum,
    HessianEstimator,
    MomentumReset,
    PerpendicularGrad,
    QuantizationAwareTraining,
    SoftmaxCollapseMonitor,
    SpikeAwareClipping,
    SpikeGuard,
)
from lightning_optim.registry import OptimizerInfo

MAX_STEPS = 12
GUARD_WARMUP = 3
FAULT_STEP = 5  # 0-based global step whose gradient gets the bad entry (after the guard's warm-up)
FAULTS = {"nan_entry": math.nan, "inf_entry": math.inf, "entry_1e20": 1e20}
ACTIONS = ("reset", "skip", "clip", "stop")
MONITORS = ("grad_norm", "loss", "both")

# The other stability callbacks, set up so that they act within the short run.
OTHERS: dict[str, Callable[[], pl.Callback]] = {
    "MomentumReset": lambda: MomentumReset(interval=4, warmup_steps=2),
    "SpikeAwareClipping": lambda: SpikeAwareClipping(clip_delay=2),
    "AdaptiveMomentum": lambda: AdaptiveMomentum(),
    "QuantizationAwareTraining": lambda: QuantizationAwareTraining(
        bits=8, group_size=4, start_step=2, reset_warmup_steps=2, every_n_steps=0
    ),
    "PerpendicularGrad": lambda: PerpendicularGrad(),
    # logits scaled 1e4 so the regression's outputs count as collapsed: ⊥Grad switches on before the fault
    "SoftmaxCollapseMonitor": lambda: SoftmaxCollapseMonitor(
        every_n_steps=2, on_collapse="perp_grad", threshold=1e-9, logits_fn=lambda m, b: m(b[0]) * 1e4
    ),
}


class FaultyRegression(Regression):
    """Regression (tests/callback_models.py) with one bad gradient entry at global step FAULT_STEP."""

    def __init__(self, make_optimizer: Callable[[Any], torch.optim.Optimizer], value: float) -> None:
        super().__init__(make_optimizer)
        self.fault_value = value
        self.injected = False

    def on_after_backward(self) -> None:
        if self.trainer.global_step == FAULT_STEP:
            with torch.no_grad():
                self.net[0].weight.grad[0, 0] = self.fault_value
            self.injected = True


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


def _fit(tmp_path: Path, make_optimizer: Callable[[Any], torch.optim.Optimizer], fault: str, callbacks: list) -> tuple:
    module = FaultyRegression(make_optimizer, FAULTS[fault])
    trainer = fit(
        module,
        callbacks,
        max_steps=MAX_STEPS,
        root=tmp_path,
        logger=TensorBoardLogger(str(tmp_path), name="logs"),
        log_every_n_steps=2,
        enable_checkpointing=True,
    )
    return module, trainer


def assert_nothing_non_finite(module: FaultyRegression, trainer: pl.Trainer, tmp_path: Path, stops: bool) -> None:
    assert module.injected, f"the run ended before the fault step {FAULT_STEP}"
    problems: dict[str, int] = {}
    if n := non_finite(list(module.parameters())):
        problems["weights"] = n
    optimizer = trainer.optimizers[0]
    adapter = state_adapter(optimizer)
    for i, state in enumerate(s for s in optimizer.state.values() if s):
        for kind, moment in (("first", adapter.first_moment(state)), ("second", adapter.second_moment(state))):
            if moment is not None and (n := non_finite(moment)):
                problems[f"{kind} moment of parameter {i}"] = n

    trainer.save_checkpoint(tmp_path / "after-fit.ckpt")
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    spike_checkpoints = [c for c in checkpoints if c.name.startswith("spike-step=")]
    if stops:
        assert spike_checkpoints, "SpikeGuard(action='stop') wrote no spike-step=*.ckpt"
    # our callbacks' states (Lightning's ModelCheckpoint keeps kth_value = inf by design)
    ours = {cb.state_key for cb in trainer.callbacks if type(cb).__module__.startswith("lightning_optim.")}
    for path in checkpoints:
        checkpoint = torch.load(path, weights_only=False)
        parts = {"state_dict": checkpoint["state_dict"], "optimizer_states": checkpoint["optimizer_states"]}
        parts.update({f"callbacks[{k!r}]": v for k, v in checkpoint.get("callbacks", {}).items() if k in ours})
        for part, value in parts.items():
            if n := non_finite(value):
                problems[f"{path.relative_to(tmp_path)} {part}"] = n
    assert not problems, f"NaN/Inf entries found in: {problems}"
    assert any(True for _ in tensors(checkpoint["optimizer_states"]))  # the checkpoint holds the moments


@pytest.mark.parametrize("fault", ["nan_entry", "inf_entry"])
def test_unguarded_fault_poisons_the_run(tmp_path: Path, fault: str) -> None:
    """Control: without a guard the injected fault does reach the weights and moments."""
    module, trainer = _fit(tmp_path, adamw, fault, [])
    assert module.injected and non_finite(list(module.parameters())) > 0


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("monitor", MONITORS)
@pytest.mark.parametrize("action", ACTIONS)
def test_spike_guard(tmp_path: Path, action: str, monitor: str, fault: str) -> None:
    guard = SpikeGuard(monitor=monitor, action=action, warmup_steps=GUARD_WARMUP)
    module, trainer = _fit(tmp_path, adamw, fault, [guard])
    assert_nothing_non_finite(module, trainer, tmp_path, stops=action == "stop")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("other", OTHERS)
def test_spike_guard_with_callback(tmp_path: Path, other: str, action: str, fault: str) -> None:
    guard = SpikeGuard(action=action, warmup_steps=GUARD_WARMUP)
    module, trainer = _fit(tmp_path, adamw, fault, [guard, OTHERS[other]()])
    assert_nothing_non_finite(module, trainer, tmp_path, stops=action == "stop")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("info", [pytest.param(info, id=info.name) for info in OURS])
def test_spike_guard_reset_with_registered_optimizer(tmp_path: Path, info: OptimizerInfo, fault: str) -> None:
    def make_optimizer(params: Any) -> torch.optim.Optimizer:
        overrides = {info.total_steps_arg: MAX_STEPS} if info.total_steps_arg else {}
        return info.build(params, **overrides)

    callbacks: list[pl.Callback] = [SpikeGuard(action="reset", warmup_steps=GUARD_WARMUP)]
    if info.needs_hvp:  # Hessian-vector optimizers train in Lightning with the callback that feeds them
        callbacks.append(HessianEstimator())
    module, trainer = _fit(tmp_path, make_optimizer, fault, callbacks)
    assert_nothing_non_finite(module, trainer, tmp_path, stops=False)
