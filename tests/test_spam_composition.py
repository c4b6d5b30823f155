"""SPAM = AdamW + SpikeAwareClipping + MomentumReset step for step (docs/algorithms.md#spam)."""

from __future__ import annotations

import pytest
import torch

from callback_models import History, Regression, fit, flat_params
from lightning_optim import SPAM
from lightning_optim.callbacks import MomentumReset, SpikeAwareClipping

SPIKES = {30: 1000.0, 75: 1000.0, 121: 1000.0}


class ClipLog(SpikeAwareClipping):
    """Records, per optimizer step, whether any entry was clipped (forces the log-only statistic)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fired: list[int] = []

    def before_step(self, ctx) -> None:
        ctx.log_now = True
        super().before_step(ctx)
        clipped = self._clipped.get(ctx.record.index)
        if clipped is not None and float(clipped) > 0:
            self.fired.append(ctx.record.step)


def _spam_clip_steps(weight_decay: float) -> tuple[torch.Tensor, list[int]]:
    """Native SPAM run; the clip steps are found by comparing g² with ϑ·v before each step."""
    fired: list[int] = []

    class Probe(History):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            step = optimizer.param_groups[0]["global_step"] + 1
            k = step % 50
            if k < 5:
                return
            for p in pl_module.parameters():
                v = optimizer.state[p]["exp_avg_sq"]
                if bool((p.grad.square() > 5000 * v).any()):
                    fired.append(step)
                    return

    module = Regression(
        lambda params: SPAM(params, lr=1e-2, weight_decay=weight_decay, reset_interval=50, warmup_steps=10, clip_delay=5),
        loss_spikes=SPIKES,
    )
    fit(module, [Probe()], max_steps=160)
    return flat_params(module), fired


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("reverse", [False, True])
def test_adamw_with_callbacks_reproduces_spam(weight_decay: float, reverse: bool) -> None:
    expected, spam_fired = _spam_clip_steps(weight_decay)
    clip = ClipLog(threshold=5000.0, clip_delay=5)
    callbacks = [clip, MomentumReset(interval=50, warmup_steps=10)]
    module = Regression(
        lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-6, weight_decay=weight_decay), loss_spikes=SPIKES
    )
    fit(module, callbacks[::-1] if reverse else callbacks, max_steps=160)
    torch.testing.assert_close(flat_params(module), expected, rtol=1e-6, atol=1e-7)
    assert clip.fired == spam_fired
    assert {31, 76, 122} <= set(clip.fired)  # the injected spikes (0-based steps 30, 75, 121) were clipped


def test_lr_warmup_is_restored_for_the_scheduler() -> None:
    """The warm-up multiplies the scheduler's lr for the step only; the scheduler never sees the product."""
    seen: list[float] = []

    class Module(Regression):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_train_batch_end(self, outputs, batch, batch_idx):
            seen.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    module = Module(lambda p: None)
    fit(module, [MomentumReset(interval=4, warmup_steps=3)], max_steps=12)
    assert seen == pytest.approx([1e-2 * 0.5 ** ((i + 1) // 3) for i in range(12)], rel=0, abs=0)
