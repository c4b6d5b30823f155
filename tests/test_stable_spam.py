"""Stable-SPAM numeric checks (docs/algorithms.md#stable-spam; float64, tolerance 1e-8)."""

from __future__ import annotations


import pytest
import torch

from conftest import flat, make_mlp, restore_from_checkpoint, train
from lightning_optim import StableSPAM
from lightning_optim.stable_spam import stable_spam_schedule

F64 = torch.float64


def _run(grads: list[tuple[float, ...]], foreach: bool, **kwargs) -> tuple[torch.nn.Parameter, StableSPAM]:
    p = torch.nn.Parameter(torch.zeros(len(grads[0]), dtype=F64))
    opt = StableSPAM([p], foreach=foreach, **kwargs)
    for g in grads:
        p.grad = torch.tensor(g, dtype=F64)
        opt.step()
    return p, opt


@pytest.mark.parametrize("foreach", [False, True])
def test_check1_first_step(foreach: bool) -> None:
    p, opt = _run([(3.0, -4.0)], foreach)
    state = opt.state[p]
    assert state["m_max"].item() / (1 - 0.999) == pytest.approx(4.0, abs=1e-8)
    assert state["m_norm"].item() == pytest.approx(1.5, abs=1e-8)
    assert state["v_norm"].item() == pytest.approx(2.5, abs=1e-8)
    # Adam's first step: m/sqrt(v) is the sign of the normalised gradient
    torch.testing.assert_close(p.detach(), torch.tensor([-0.001, 0.001], dtype=F64), rtol=0, atol=1e-8)
    # the normalised gradient has norm 5/(5 + 1e-8): recover it from the first moment m = 0.1 * g_hat
    g_hat = state["exp_avg"] / 0.1
    assert g_hat.norm().item() == pytest.approx(5 / (5 + 1e-8), abs=1e-12)
    torch.testing.assert_close(g_hat, torch.tensor([0.6, -0.8], dtype=F64) * 5 / (5 + 1e-8), rtol=0, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_check2_clipping(foreach: bool) -> None:
    p, opt = _run([(1, -1, 0.5, 0), (10, -8, 1, 0)], foreach, reset_interval=3)
    state = opt.state[p]
    assert state["m_max"].item() == pytest.approx(0.010999, abs=1e-8)
    assert state["m_max"].item() / (1 - 0.999**2) == pytest.approx(5.5022511, abs=1e-7)
    assert state["m_norm"].item() == pytest.approx(2.4500774, abs=1e-7)
    assert state["v_norm"].item() == pytest.approx(5.2675619, abs=1e-7)
    # exp_avg = 0.9 * 0.1 * g_hat1 + 0.1 * g_hat2; recover g_hat2 from the state
    p1, opt1 = _run([(1, -1, 0.5, 0)], foreach, reset_interval=3)
    g_hat2 = (state["exp_avg"] - 0.9 * opt1.state[p1]["exp_avg"]) / 0.1
    expected = torch.tensor([0.70539056, -0.56431245, 0.12820036, 0.0], dtype=F64)
    torch.testing.assert_close(g_hat2, expected, rtol=0, atol=1e-8)
    expected_theta = torch.tensor([-0.0020010727, 0.0019922407, -0.0018925959, 0.0], dtype=F64)
    torch.testing.assert_close(p.detach(), expected_theta, rtol=0, atol=1e-9)


@pytest.mark.parametrize("foreach", [False, True])
def test_check3_reset_step_uses_fresh_moments(foreach: bool) -> None:
    p, opt = _run([(1, -1, 0.5, 0), (10, -8, 1, 0)], foreach, reset_interval=2)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.002, 0.002, -0.002, 0.0], dtype=F64), rtol=0, atol=1e-9)
    assert opt.state[p]["step"].item() == 1 and opt.state[p]["stat_step"].item() == 2


def test_check4_schedule() -> None:
    expected = {1: 0.987764129, 5: 0.75, 9: 0.512235871, 10: 0.5, 11: 0.5, 20: 0.5}
    for t, s in expected.items():
        assert stable_spam_schedule(t, 9, 0.5) == pytest.approx(s, abs=1e-9)
    assert stable_spam_schedule(123, None, 0.5) == 1.0


@pytest.mark.parametrize("foreach", [False, True])
def test_check5_statistics_survive_a_reset(foreach: bool) -> None:
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = StableSPAM([p], reset_interval=1000, foreach=foreach)
    for _ in range(1000):
        p.grad = torch.ones(4, dtype=F64)
        opt.step()
    m_before = opt.state[p]["exp_avg"].clone()  # fresh moments since the reset at T = 1000
    p.grad = torch.tensor([10.0, 1.0, 1.0, 1.0], dtype=F64)
    opt.step()
    m_max_hat = opt.state[p]["m_max"].item() / (1 - 0.999**1001)
    assert m_max_hat == pytest.approx(1.0142254, abs=1e-7)
    # g_hat of T = 1001 is the clipped gradient times one positive factor: its entries keep the clip's ratio
    g_hat = (opt.state[p]["exp_avg"] - 0.9 * m_before) / 0.1
    assert (g_hat[0] / g_hat[1]).item() == pytest.approx(1.0142254, abs=1e-7)


@pytest.mark.parametrize("foreach", [False, True])
def test_check6_late_parameter_starts_its_own_statistics(foreach: bool) -> None:
    early = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    late = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    opt = StableSPAM([early, late], foreach=foreach)
    for _ in range(100):
        early.grad = torch.randn(2, dtype=F64)
        opt.step()
    early.grad = torch.randn(2, dtype=F64)
    late.grad = torch.tensor([3.0, -4.0], dtype=F64)
    opt.step()
    ref, ref_opt = _run([(3.0, -4.0)], foreach)
    assert opt.param_groups[0]["global_step"] == 101
    assert opt.state[late]["stat_step"].item() == 1
    torch.testing.assert_close(late.detach(), ref.detach(), rtol=0, atol=1e-12)
    for key in ("m_max", "m_norm", "v_norm", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[late][key], ref_opt.state[ref][key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_resume_is_bit_identical(foreach: bool) -> None:
    kwargs = dict(lr=1e-2, total_steps=40, reset_interval=15, foreach=foreach)
    spikes = {8: 1e3, 30: 1e4}
    model = make_mlp(torch.float32)
    train(model, StableSPAM(model.parameters(), **kwargs), 50, spikes=spikes)
    first = make_mlp(torch.float32)
    opt = StableSPAM(first.parameters(), **kwargs)
    train(first, opt, 22, spikes=spikes)
    resumed, opt2 = restore_from_checkpoint(first, opt, lambda m: StableSPAM(m.parameters(), **kwargs), seed=5)
    train(resumed, opt2, 28, start=22, spikes=spikes)
    assert torch.equal(flat(resumed), flat(model))


def test_zero_gradient_produces_no_nan() -> None:
    p, _ = _run([(0.0, 0.0, 0.0), (0.0, 0.0, 0.0)], foreach=True)
    assert torch.isfinite(p).all() and torch.equal(p.detach(), torch.zeros(3, dtype=F64))
