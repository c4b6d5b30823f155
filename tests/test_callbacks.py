"""AdaptiveMomentum (spec adaptive_momentum.md check 6), errors, TensorBoard tags, manual optimization."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from callback_models import Regression, fit
from conftest import flat, make_mlp
from lightning_optim import AdaptiveMomentumAdamW, AdaptiveMomentumSGD
from lightning_optim.callbacks import AdaptiveMomentum, MomentumReset, SpikeAwareClipping, SpikeGuard


def _batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randn(8, 3, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("mu0", [0.5, 0.9])
def test_sgd_with_callback_equals_am_sgd(mu0: float) -> None:
    ref, mine = make_mlp(), make_mlp()
    am = AdaptiveMomentumSGD(ref.parameters(), lr=0.05, memory_weight=0.1, beta_max=0.9)
    sgd = torch.optim.SGD(mine.parameters(), lr=0.05, momentum=mu0, dampening=mu0)
    callback = AdaptiveMomentum(memory_weight=0.1, beta_max=0.9)
    for step in range(50):
        x, y = _batches(step)
        for model, opt in ((ref, am), (mine, sgd)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if opt is sgd:
                callback.premix_(sgd)
            opt.step()
    torch.testing.assert_close(flat(mine), flat(ref), rtol=0, atol=1e-10)


def test_adamw_with_callback_tracks_am_adamw_memory() -> None:
    """Fixed gradients (no feedback): exp_avg equals AM-AdamW's d, increments differ by 1 − β0^t only."""
    lam, beta_max = 0.1, 0.9
    beta0 = (beta_max + lam) / (1 + lam)
    a, b = torch.zeros(5, dtype=torch.float64, requires_grad=True), torch.zeros(5, dtype=torch.float64, requires_grad=True)
    am = AdaptiveMomentumAdamW([a], lr=0.1, weight_decay=0.0, memory_weight=lam, betas=(beta_max, 0.999))
    adamw = torch.optim.AdamW([b], lr=0.1, betas=(beta0, 0.999), weight_decay=0.0, eps=1e-8)
    callback = AdaptiveMomentum(memory_weight=lam, beta_max=beta_max)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 31):
        g = torch.randn(5, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        a_before, b_before = a.detach().clone(), b.detach().clone()
        am.step()
        callback.premix_(adamw)
        adamw.step()
        torch.testing.assert_close(adamw.state[b]["exp_avg"], am.state[a]["exp_avg"], rtol=0, atol=1e-10)
        torch.testing.assert_close((b - b_before) * (1 - beta0**t), a - a_before, rtol=1e-9, atol=1e-12)


def test_callback_beta_is_logged_and_stays_in_range(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    module = Regression(lambda p: torch.optim.AdamW(p, lr=1e-2), loss_spikes={60: 1e4})
    callbacks = [SpikeGuard(warmup_steps=10), MomentumReset(interval=30, warmup_steps=5), SpikeAwareClipping(clip_delay=5), AdaptiveMomentum()]
    fit(module, callbacks, max_steps=80, logger=logger, log_every_n_steps=10)
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "stability/grad_norm", "stability/grad_norm_z", "stability/spikes", "stability/momentum_resets",
        "stability/clipped_fraction", "stability/beta1",
    }
    assert expected <= tags
    assert all(tag.startswith(("stability/", "quant/")) for tag in tags)
    resets = [e.value for e in events.Scalars("stability/momentum_resets")]
    assert resets[-1] == 3.0  # periodic at 30 and 60, one after the spike at 61
    assert [e.value for e in events.Scalars("stability/spikes")][-1] == 1.0
    assert [e.step for e in events.Scalars("stability/beta1")] == list(range(10, 81, 10))
    assert all(0.1 / 1.1 - 1e-6 <= e.value <= 1.0 for e in events.Scalars("stability/beta1"))
    # beta1 is beta_eff = (beta* + 0.1)/1.1 (it may exceed beta_max 0.9); beta_star is beta* itself, in [0, 0.9]
    for eff, star in zip(events.Scalars("stability/beta1"), events.Scalars("stability/beta_star")):
        assert eff.step == star.step and -1e-6 <= star.value <= 0.9 + 1e-6
        assert abs(eff.value - (star.value + 0.1) / 1.1) < 1e-5


def test_two_optimizers_get_their_own_tags(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    class Two(Regression):
        def __init__(self):
            super().__init__(lambda p: None)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            opts = self.optimizers()
            for opt in opts:
                opt.zero_grad()
            self.manual_backward(torch.nn.functional.mse_loss(self.net(x), y))
            for opt in opts:
                opt.step()

        def configure_optimizers(self):
            return [torch.optim.AdamW(self.net[:2].parameters()), torch.optim.Adam(self.net[2:].parameters())]

    guard, reset = SpikeGuard(warmup_steps=5), MomentumReset(interval=7, warmup_steps=2)
    fit(Two(), [guard, reset], max_steps=20, logger=CSVLogger(tmp_path), log_every_n_steps=5)
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"stability/spikes", "stability/spikes/opt1", "stability/momentum_resets/opt1"} <= set(header)
    # manual optimization: Lightning's max_steps counts both optimizers' steps (10 each); each optimizer
    # keeps its own clock, so each was reset once (at its own step 7)
    records = [opt._lightning_optim_step_record for opt in guard._trainer.optimizers]
    assert [r.completed for r in records] == [10, 10] and [r.resets for r in records] == [1, 1]


def test_unsupported_optimizers_fail_at_fit_start_naming_them() -> None:
    with pytest.raises(TypeError, match="Adagrad.*register_state_adapter"):
        fit(Regression(lambda p: torch.optim.Adagrad(p)), [MomentumReset()], max_steps=2)
    with pytest.raises(TypeError, match="second moment.*SGD"):
        fit(Regression(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)), [SpikeAwareClipping()], max_steps=2)
    with pytest.raises(TypeError, match="RMSprop.*supported"):
        fit(Regression(lambda p: torch.optim.RMSprop(p)), [AdaptiveMomentum()], max_steps=2)
    with pytest.raises(ValueError, match="dampening"):
        fit(Regression(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)), [AdaptiveMomentum()], max_steps=2)


def test_works_with_rmsprop_and_bitsandbytes_8bit() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    for make in (lambda p: torch.optim.RMSprop(p, lr=1e-3), lambda p: bnb.optim.AdamW8bit(p, lr=1e-3, min_8bit_size=16)):
        module = Regression(make, loss_spikes={25: 1e4})
        fit(module, [SpikeGuard(warmup_steps=10), MomentumReset(interval=20, warmup_steps=3), SpikeAwareClipping(clip_delay=3)], max_steps=40)
        assert torch.isfinite(torch.cat([p.reshape(-1) for p in module.parameters()])).all()


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: SpikeAwareClipping(threshold=0.0), "threshold"),
        (lambda: SpikeAwareClipping(threshold=-1.0), "threshold"),
        (lambda: SpikeAwareClipping(clip_delay=1), "clip_delay"),
        (lambda: MomentumReset(interval=-1), "interval"),
        (lambda: MomentumReset(warmup_steps=1.5), "warmup_steps"),
        (lambda: AdaptiveMomentum(memory_weight=-0.1), "memory_weight"),
        (lambda: AdaptiveMomentum(beta_max=1.0), "beta_max"),
        (lambda: AdaptiveMomentum(beta_max=math.nan), "beta_max"),
    ],
)
def test_bad_arguments_name_the_argument(make, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()
