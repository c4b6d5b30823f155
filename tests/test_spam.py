"""SPAM numeric checks (docs/algorithms.md#spam): clip, warm-up factor, scalar run, reset, Adam equivalence
and the resume test; SPAM = AdamW + callbacks is in test_spam_composition.py."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import flat, make_mlp, restore_from_checkpoint, train
from lightning_optim import SPAM
from lightning_optim.spam import spam_schedule, spam_warmup_factor, spike_clip_


def _masked_clip(g: torch.Tensor, v: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(g * g > threshold * v, g.sign() * (threshold * v).sqrt(), g)


def test_check1_clip_function() -> None:
    g = torch.tensor([100.0, -100.0, 70.0, 1.0], dtype=torch.float64)
    v = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    expected = torch.tensor([70.710678, -70.710678, 70.0, 0.0], dtype=torch.float64)
    clipped = [g.clone()]
    spike_clip_(clipped, [v], 5000.0)
    torch.testing.assert_close(clipped[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(_masked_clip(g, v, 5000.0), expected, rtol=0, atol=1e-6)


def test_clamp_form_equals_masked_form_on_random_data() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(10_000, generator=gen, dtype=torch.float64) * 10
    v = torch.rand(10_000, generator=gen, dtype=torch.float64) * (torch.rand(10_000, generator=gen) > 0.1)
    for threshold in (0.5, 5.0, 5000.0):
        clipped = [g.clone()]
        spike_clip_(clipped, [v], threshold)
        assert torch.equal(clipped[0], _masked_clip(g, v, threshold))


def test_check2_warmup_factor() -> None:
    expected = {0: 0.01, 1: 0.010107129, 75: 0.499850794, 149: 0.999571532, 150: 1.0}
    for k, s in expected.items():
        assert spam_warmup_factor(k, 150) == pytest.approx(s, abs=1e-9)
    # s = 1 at every step before the first reset
    assert all(spam_schedule(t, 500, 150)[2] == 1.0 for t in range(1, 500))
    assert spam_schedule(500, 500, 150) == (0, True, pytest.approx(0.01))
    assert spam_schedule(7, 0, 150) == (7, False, 1.0)  # reset_interval=0: never


@pytest.mark.parametrize("foreach", [False, True])
def test_check3_scalar_run_with_spike(foreach: bool) -> None:
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SPAM([p], foreach=foreach)
    updates = []
    for t in range(1, 22):
        p.grad = torch.tensor([1.0 if t <= 20 else 1000.0], dtype=torch.float64)
        if t == 21:
            raw_v = opt.state[p]["exp_avg_sq"].item()
        before = p.item()
        opt.step()
        updates.append(before - p.item())
    assert raw_v == pytest.approx(0.019811135, abs=1e-9)
    assert p.grad.item() == pytest.approx(9.952671795, abs=1e-9)  # clipped gradient written back
    assert opt.state[p]["exp_avg"].item() == pytest.approx(1.785848190, abs=1e-9)
    assert opt.state[p]["exp_avg_sq"].item() == pytest.approx(0.118847000, abs=1e-9)
    assert all(u == pytest.approx(9.99999e-4, abs=1e-9) for u in updates[:20])
    assert updates[20] == pytest.approx(8.387217e-4, abs=1e-9)
    assert p.item() == pytest.approx(-2.0838702e-2, abs=1e-9)


@pytest.mark.parametrize("foreach", [False, True])
def test_check4_reset_keeps_bias_correction_step(foreach: bool) -> None:
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SPAM([p], lr=1.0, reset_interval=4, warmup_steps=2, clip_delay=2, foreach=foreach)
    expected = [0.999999, 0.999999, 0.999999, 0.005811272, 0.188759991, 0.817323059, 0.871368034]
    for t, update in enumerate(expected, start=1):
        p.grad = torch.ones(1, dtype=torch.float64)
        before = p.item()
        opt.step()
        assert before - p.item() == pytest.approx(update, abs=1e-9), t
        if t == 4:
            state = opt.state[p]
            assert state["exp_avg"].item() == pytest.approx(0.1, abs=1e-12)
            assert state["exp_avg_sq"].item() == pytest.approx(0.001, abs=1e-12)
            assert state["step"].item() == 4
    assert p.item() == pytest.approx(-4.883259355, abs=1e-9)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_check5_equals_adamw_without_clip_and_reset(
    foreach: bool, dtype: torch.dtype, tol: float, weight_decay: float
) -> None:
    spam_model, adam_model = make_mlp(dtype), make_mlp(dtype)
    spam = SPAM(
        spam_model.parameters(), lr=1e-2, threshold=math.inf, reset_interval=1000, weight_decay=weight_decay,
        foreach=foreach,
    )
    adam = torch.optim.AdamW(adam_model.parameters(), lr=1e-2, eps=1e-6, weight_decay=weight_decay, foreach=foreach)
    train(spam_model, spam, 100)
    train(adam_model, adam, 100)
    if dtype == torch.float64:
        torch.testing.assert_close(flat(spam_model), flat(adam_model), rtol=0, atol=tol)
    else:
        torch.testing.assert_close(flat(spam_model), flat(adam_model), rtol=tol, atol=1e-7)


@pytest.mark.parametrize("foreach", [False, True])
def test_resume_inside_warmup_window_is_bit_identical(foreach: bool) -> None:
    interval = 10
    kwargs = dict(lr=1e-2, reset_interval=interval, warmup_steps=5, clip_delay=2, threshold=50.0, foreach=foreach)
    total, stop = 2 * interval + 7, interval + 3
    model = make_mlp(torch.float32)
    train(model, SPAM(model.parameters(), **kwargs), total, spikes={4: 1e3, 15: 1e4})

    first = make_mlp(torch.float32)
    opt = SPAM(first.parameters(), **kwargs)
    train(first, opt, stop, spikes={4: 1e3, 15: 1e4})
    resumed, opt2 = restore_from_checkpoint(first, opt, lambda m: SPAM(m.parameters(), **kwargs), seed=9)
    train(resumed, opt2, total - stop, start=stop, spikes={4: 1e3, 15: 1e4})
    assert torch.equal(flat(resumed), flat(model))


def test_clip_is_inactive_within_clip_delay_after_reset() -> None:
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = SPAM([p], reset_interval=5, warmup_steps=0, clip_delay=3)
    for t in range(1, 9):
        p.grad = torch.full((3,), 1e6 if t in (6, 7) else 1.0, dtype=torch.float64)
        opt.step()
        if t in (6, 7):  # k = 1, 2 < clip_delay: the spike goes through unclipped
            assert p.grad[0].item() == 1e6
    p.grad = torch.full((3,), 1e9, dtype=torch.float64)
    opt.step()  # T = 9, k = 4: clipped against sqrt(5000 v) ~ 3e6
    assert p.grad[0].item() < 1e7
