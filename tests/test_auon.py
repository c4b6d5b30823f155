"""AuON (lightning_optim.auon): a hand-computed step from the paper's equations, the spectral-norm bound and
the cosh brake, the hybrid variant, both paths, resume, overflow, validation. pytorch_optimizer 4.1.0 has no
AuON, so there is no second opinion."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_optim.auon import AuON, auon_direction
from lightning_optim.matrix import newton_schulz


def ref_direction(u: torch.Tensor, gamma: float) -> torch.Tensor:
    """The paper's equations, entry by entry in float64: X = U/(‖U‖_F + 1e-7), r = √(mean cosh(γX)²), X/(r + 1e-8)."""
    u = u.double()
    norm = math.sqrt(sum(float(v) ** 2 for v in u.flatten()))
    x = u / (norm + 1e-7)
    r = math.sqrt(sum(math.cosh(gamma * float(v)) ** 2 for v in x.flatten()) / x.numel())
    return x / (r + 1e-8)


def test_two_steps_by_hand():
    """W (2 × 3, m/n < 1: no aspect factor), μ = 0.5, Nesterov, decay before the update."""
    lr, mu, wd, gamma = 0.1, 0.5, 0.2, 1.5
    w0 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=torch.float64)
    g1 = torch.tensor([[3.0, 0.0, -4.0], [1.0, 2.0, 0.0]], dtype=torch.float64)
    g2 = torch.tensor([[-1.0, 1.0, 2.0], [0.5, 0.0, 1.0]], dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = AuON([p], lr=lr, momentum=mu, weight_decay=wd, gamma=gamma)
    w, m = w0.clone(), torch.zeros_like(w0)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        m = mu * m + (1 - mu) * g
        u = mu * m + (1 - mu) * g
        w = w * (1 - lr * wd) - lr * ref_direction(u, gamma)
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], m)
    assert torch.equal(p.grad, g2)  # the gradient is never overwritten


def test_tall_matrices_get_the_aspect_factor_and_no_nesterov_uses_the_buffer():
    g = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = nn.Parameter(torch.zeros(6, 2, dtype=torch.float64))
    p.grad = g.clone()
    AuON([p], lr=1.0, momentum=0.9, weight_decay=0.0, nesterov=False).step()
    torch.testing.assert_close(p.detach(), -math.sqrt(3.0) * ref_direction(0.1 * g, 1.5))
    q = nn.Parameter(torch.zeros(6, 2, dtype=torch.float64))
    q.grad = g.clone()
    AuON([q], lr=1.0, momentum=0.9, weight_decay=0.0, nesterov=False, aspect_scale=False).step()
    torch.testing.assert_close(q.detach(), p.detach() / math.sqrt(3.0))


def test_the_step_is_in_the_spectral_norm_ball_and_spiky_updates_are_braked():
    """r ≥ 1, so ‖D‖_2 ≤ ‖D‖_F = 1/(r + ε) ≤ 1; a single spike (X = one entry 1) gives r² = (cosh²γ + N − 1)/N,
    the largest r, a spread-out X the smallest (r → 1 as N grows); scale-invariant."""
    gen = torch.Generator().manual_seed(1)
    for shape in [(4, 6), (8, 3), (2, 5, 5)]:
        d = auon_direction(torch.randn(shape, generator=gen) * 1e3)
        assert (torch.linalg.matrix_norm(d, ord=2) <= 1.0 + 1e-6).all()
    n, gamma = 24, 1.5
    spike = torch.zeros(4, 6)
    spike[1, 2] = 5.0
    r_spike = math.sqrt((math.cosh(gamma) ** 2 + n - 1) / n)
    torch.testing.assert_close(torch.linalg.matrix_norm(auon_direction(spike, gamma)), torch.tensor(1 / r_spike), rtol=1e-6, atol=0)
    flat = torch.ones(4, 6)
    r_flat = math.cosh(gamma / math.sqrt(n))
    torch.testing.assert_close(torch.linalg.matrix_norm(auon_direction(flat, gamma)), torch.tensor(1 / r_flat), rtol=1e-6, atol=0)
    assert r_spike > r_flat > 1.0
    g = torch.randn(4, 6, generator=gen)
    torch.testing.assert_close(auon_direction(g * 1e25), auon_direction(g), rtol=1e-5, atol=1e-7)
    assert torch.equal(auon_direction(torch.zeros(3, 4)), torch.zeros(3, 4))
    big = torch.full((4, 5), 1e-3)
    big[0, 0] = 1e20  # its square overflows fp32
    assert torch.isfinite(auon_direction(big)).all()


def test_hybrid_is_newton_schulz_then_the_brake():
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    d = newton_schulz(g, 1, "float32")
    x = 1.5 * d / (d.norm() + 1e-7)
    expected = d / (torch.cosh(x).square().mean().sqrt() + 1e-8)
    torch.testing.assert_close(auon_direction(g, 1.5, hybrid=True, ns_steps=1), expected)
    assert torch.linalg.matrix_norm(auon_direction(g, hybrid=True), ord=2) < 1.3  # NS band [0.7, 1.2] / r


# -- the optimizer -------------------------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2))


def _train(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 6, generator=gen)).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("hybrid", [False, True])
def test_foreach_equals_per_parameter(hybrid):
    results = []
    for foreach in (False, True):
        model = _model()
        experts = nn.Parameter(torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(4)))
        opt = AuON([*model.parameters(), experts], hybrid=hybrid, foreach=foreach)
        for i in range(3):
            experts.grad = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(10 + i))
            _train(model, opt, 1, seed=i)
        results.append([p.detach().clone() for p in [*model.parameters(), experts]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # batched fp32 matmuls round differently


def test_experts_are_braked_one_by_one():
    experts = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(5))
    experts[1] *= 100.0
    torch.testing.assert_close(auon_direction(experts), torch.stack([auon_direction(e) for e in experts]))


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_is_bit_exact(foreach):
    model = _model()
    opt = AuON(model.parameters(), foreach=foreach)
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=1)
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = AuON(resumed.parameters(), foreach=foreach)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, 3, seed=1)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True])
def test_bf16_parameters_keep_fp32_momentum_and_survive_1e20(foreach):
    w = nn.Parameter(torch.randn(4, 5).bfloat16())
    opt = AuON([w], foreach=foreach)
    g = torch.randn(4, 5) * 1e-3
    g[0, 0] = 1e20
    w.grad = g.bfloat16()
    opt.step()
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()
    assert opt.state[w]["momentum_buffer"].dtype == torch.float32


@pytest.mark.parametrize(
    "name, value",
    [
        ("lr", -1.0),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("gamma", float("inf")),
        ("gamma", -0.5),
        ("ns_steps", 0),
        ("hybrid", 1),
        ("nesterov", "yes"),
        ("aspect_scale", None),
        ("weight_decay", -0.1),
        ("adamw_betas", (0.9, 1.0)),
        ("adamw_eps", float("nan")),
    ],
)
def test_validation_names_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        AuON([nn.Parameter(torch.randn(3, 3))], **{name: value})
