"""Adaptive Memory Momentum checks (docs/algorithms.md#adaptive-memory-momentum): closed forms, the
proximal-model brute force, λ = 0 as EMA momentum, bounds, a hand-computed AM-AdamW run, one β across
param groups and the resume test."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import flat, make_mlp, restore_from_checkpoint, train
from lightning_optim import AdaptiveMomentumAdamW, AdaptiveMomentumSGD
from lightning_optim.adaptive_momentum import adaptive_beta, effective_beta

F64 = torch.float64


def _rule(g: torch.Tensor, d: torch.Tensor, lam: float, beta_max: float) -> tuple[float, torch.Tensor]:
    beta = adaptive_beta((g * g).sum(), ((d - g) ** 2).sum(), lam, beta_max)
    b = effective_beta(beta, lam)
    return beta.item(), b * d + (1 - b) * g


@pytest.mark.parametrize(
    "g,d,beta,d_new",
    [
        ((1, 0), (0, 1), 0.45, (0.5, 0.5)),
        ((1, 0), (-1, 0), 0.175, (0.5, 0.0)),
        ((1, 0), (2, 0), 0.9, (1.9090909, 0.0)),
        ((0.3, -2.0), (0.3, -2.0), 0.0, (0.3, -2.0)),  # g = d
        ((0.3, -2.0), (0.0, 0.0), 0.9, None),  # d = 0: beta_max
    ],
)
def test_check1_closed_forms(g: tuple, d: tuple, beta: float, d_new: tuple | None) -> None:
    g_t, d_t = torch.tensor(g, dtype=F64), torch.tensor(d, dtype=F64)
    got_beta, got_d = _rule(g_t, d_t, 0.1, 0.9)
    assert got_beta == pytest.approx(beta, abs=1e-12)
    if d_new is not None:
        torch.testing.assert_close(got_d, torch.tensor(d_new, dtype=F64), rtol=0, atol=1e-7)
    # both numerator forms agree: (1+λ)<g,d> - <e, g + λd>  ==  (1+λ)A - λB
    lam, e = 0.1, d_t - g_t
    long_form = (1 + lam) * (g_t @ d_t) - e @ (g_t + lam * d_t)
    short_form = (1 + lam) * (g_t @ g_t) - lam * (e @ e)
    assert long_form.item() == pytest.approx(short_form.item(), abs=1e-12)


def test_effective_beta_for_clipped_case() -> None:
    assert effective_beta(torch.tensor(0.9, dtype=F64), 0.1).item() == pytest.approx(0.9090909, abs=1e-7)


def test_check2_brute_force_minimiser_of_the_proximal_model() -> None:
    gen = torch.Generator().manual_seed(0)
    grid_points = 20_001
    for _ in range(200):
        g, d = torch.randn(5, generator=gen, dtype=F64), torch.randn(5, generator=gen, dtype=F64)
        lam = torch.rand(1, generator=gen, dtype=F64).item()
        beta_max = 0.5 + 0.49 * torch.rand(1, generator=gen, dtype=F64).item()
        eta = 0.01 + 0.99 * torch.rand(1, generator=gen, dtype=F64).item()
        betas = torch.linspace(0, beta_max, grid_points, dtype=F64)[:, None]
        d_new = (betas + lam) / (1 + lam) * d + (1 - betas) / (1 + lam) * g
        u = -eta * d_new  # x - x_t
        phi = (
            torch.maximum(u @ g, eta * (g @ d) + u @ d)
            + (u * u).sum(1) / (2 * eta)
            + lam / (2 * eta) * ((u + eta * d) ** 2).sum(1)
        )
        grid_min = betas[phi.argmin(), 0].item()
        beta = adaptive_beta(g @ g, (d - g) @ (d - g), lam, beta_max).item()
        assert abs(grid_min - beta) <= 5e-5


@pytest.mark.parametrize("foreach", [False, True])
def test_check3_lambda_zero_is_ema_momentum(foreach: bool) -> None:
    x_am = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    x_sgd = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    am = AdaptiveMomentumSGD([x_am], lr=0.1, memory_weight=0.0, beta_max=0.9, foreach=foreach)
    sgd = torch.optim.SGD([x_sgd], lr=0.1, momentum=0.9, dampening=0.9)
    for t in range(50):
        g = (1 + 0.1 * math.sin(t)) * torch.tensor([0.6, -0.8], dtype=F64)
        x_am.grad, x_sgd.grad = g.clone(), g.clone()
        am.step()
        sgd.step()
        if t > 0:
            assert am.last_beta.item() == pytest.approx(0.9, abs=1e-12)
        torch.testing.assert_close(am.state[x_am]["momentum_buffer"], sgd.state[x_sgd]["momentum_buffer"], rtol=0, atol=1e-12)
        torch.testing.assert_close(x_am.detach(), x_sgd.detach(), rtol=0, atol=1e-12)


def test_check4_range_and_no_nan() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(500):
        g = torch.randn(4, generator=gen, dtype=F64) * 10 ** torch.randint(-8, 8, (1,), generator=gen).item()
        d = torch.randn(4, generator=gen, dtype=F64) * 10 ** torch.randint(-8, 8, (1,), generator=gen).item()
        beta, d_new = _rule(g, d, 0.3, 0.95)
        assert 0.0 <= beta <= 0.95 and torch.isfinite(d_new).all()
    beta, d_new = _rule(torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), 0.1, 0.9)
    assert beta == 0.0 and torch.equal(d_new, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("foreach", [False, True])
def test_check5_am_adamw_two_steps(foreach: bool) -> None:
    x = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    opt = AdaptiveMomentumAdamW([x], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, memory_weight=0.1, foreach=foreach)
    x.grad = torch.tensor([1.0, 2.0], dtype=F64)
    opt.step()
    assert opt.last_beta.item() == pytest.approx(0.9, abs=1e-7)
    torch.testing.assert_close(opt.state[x]["exp_avg"], torch.tensor([0.0909091, 0.1818182], dtype=F64), rtol=0, atol=1e-7)
    torch.testing.assert_close(x.detach(), torch.tensor([-0.0090909, -0.0090909], dtype=F64), rtol=0, atol=1e-7)
    x.grad = torch.tensor([-1.0, -2.0], dtype=F64)
    opt.step()
    assert opt.last_beta.item() == pytest.approx(0.8243056, abs=1e-7)
    assert effective_beta(opt.last_beta, 0.1).item() == pytest.approx(0.8402778, abs=1e-7)
    torch.testing.assert_close(opt.state[x]["exp_avg"], torch.tensor([-0.0833333, -0.1666667], dtype=F64), rtol=0, atol=1e-7)
    torch.testing.assert_close(x.detach(), torch.tensor([-0.00075758, -0.00075758], dtype=F64), rtol=0, atol=1e-7)


@pytest.mark.parametrize("cls", [AdaptiveMomentumSGD, AdaptiveMomentumAdamW])
def test_check7_one_beta_for_all_groups(cls: type) -> None:
    a, b = torch.nn.Parameter(torch.randn(3, dtype=F64)), torch.nn.Parameter(torch.randn(4, dtype=F64))
    with pytest.raises(ValueError, match="memory_weight"):
        cls([{"params": [a]}, {"params": [b], "memory_weight": 0.5}])
    # one shared beta: the two-group optimizer equals one group over the concatenated parameters
    ga, gb = [torch.randn(3, dtype=F64) for _ in range(5)], [torch.randn(4, dtype=F64) for _ in range(5)]
    two = cls([{"params": [a]}, {"params": [b]}])
    c = torch.nn.Parameter(torch.cat([a.detach(), b.detach()]))
    one = cls([c])
    for x, y in zip(ga, gb):
        a.grad, b.grad, c.grad = x, y, torch.cat([x, y])
        two.step()
        one.step()
        assert two.last_beta.item() == pytest.approx(one.last_beta.item(), abs=1e-12)
    torch.testing.assert_close(torch.cat([a.detach(), b.detach()]), c.detach(), rtol=0, atol=1e-12)


def test_am_sgd_beta_max_must_match_across_groups() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="beta_max"):
        AdaptiveMomentumSGD([{"params": [a]}, {"params": [b], "beta_max": 0.5}])
    with pytest.raises(ValueError, match="betas"):
        AdaptiveMomentumAdamW([{"params": [a]}, {"params": [b], "betas": (0.5, 0.999)}])


def test_am_sgd_first_step_is_plain_sgd() -> None:
    x = torch.nn.Parameter(torch.ones(3, dtype=F64))
    opt = AdaptiveMomentumSGD([x], lr=0.5)
    x.grad = torch.tensor([1.0, -2.0, 4.0], dtype=F64)
    opt.step()
    assert opt.last_beta.item() == 0.0
    torch.testing.assert_close(x.detach(), torch.tensor([0.5, 2.0, -1.0], dtype=F64))


@pytest.mark.parametrize("cls", [AdaptiveMomentumSGD, AdaptiveMomentumAdamW])
@pytest.mark.parametrize("foreach", [False, True])
def test_resume_after_37_steps_is_bit_identical(cls: type, foreach: bool) -> None:
    model = make_mlp(torch.float32)
    train(model, cls(model.parameters(), foreach=foreach), 80)
    first = make_mlp(torch.float32)
    opt = cls(first.parameters(), foreach=foreach)
    train(first, opt, 37)
    resumed, opt2 = restore_from_checkpoint(first, opt, lambda m: cls(m.parameters(), foreach=foreach), seed=3)
    train(resumed, opt2, 43, start=37)
    assert torch.equal(flat(resumed), flat(model))
