"""PolarGrad (lightning_optim.polargrad): ‖M‖_*·polar(M) on matrices with a known SVD, QDWH's singular-value
map in closed form, hand-computed steps (both momentum orders), the Newton-Schulz option, both paths, resume,
overflow and NaN, validation. pytorch_optimizer 4.1.0 has no PolarGrad, so there is no second opinion."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_optim.matrix import newton_schulz
from lightning_optim.polargrad import POLAR_NS_COEFFICIENTS, PolarGrad, polar_factor, qdwh_coefficients, qdwh_polar


def known_svd(m: int, n: int, s: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X = U diag(s) Vᵀ, U, V) with random orthonormal U (m × k), V (n × k), float64."""
    gen = torch.Generator().manual_seed(seed)
    k = len(s)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T, u, v


@pytest.mark.parametrize("shape", [(5, 3), (3, 5)])
def test_svd_step_is_the_nuclear_norm_times_the_polar_factor(shape):
    s = [4.0, 1.5, 0.25]
    x, u, v = known_svd(*shape, s)
    lr, mu, wd = 0.1, 0.9, 0.5
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    p.grad = x.clone()
    PolarGrad([p], lr=lr, momentum=mu, weight_decay=wd, method="svd").step()
    # M = (1 − μ)X: ‖M‖_* = (1 − μ)·Σs, polar(M) = U Vᵀ
    expected = w0 * (1 - lr * wd) - lr * (1 - mu) * sum(s) * (u @ v.T)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)


def test_qdwh_maps_each_singular_value_by_its_rational_function():
    """QDWH on X = U diag(s) Vᵀ returns U diag(f(s)) Vᵀ: σ₀ = σ/√(‖X‖₁‖X‖_∞), each iteration
    σ ← σ(a + bσ²)/(1 + cσ²) with the weights of qdwh_coefficients, then σ ← 1.5σ − 0.5σ³."""
    s = [3.0, 1.0, 0.1, 1e-3]
    x, u, v = known_svd(6, 4, s, seed=2)
    alpha = math.sqrt(torch.linalg.matrix_norm(x, ord=1).item() * torch.linalg.matrix_norm(x, ord=math.inf).item())
    for iterations in (1, 2, 3):
        sig = [si / alpha for si in s]
        for _, a, b, c in qdwh_coefficients(float(torch.finfo(torch.float64).eps), iterations):
            sig = [t * (a + b * t * t) / (1 + c * t * t) for t in sig]
        sig = [1.5 * t - 0.5 * t**3 for t in sig]
        expected = u @ torch.diag(torch.tensor(sig, dtype=torch.float64)) @ v.T
        torch.testing.assert_close(qdwh_polar(x, iterations), expected, rtol=1e-7, atol=1e-9)
    # with enough iterations (the Halley continuation after ℓ reaches 1) it is the exact polar factor
    torch.testing.assert_close(qdwh_polar(x, 10), u @ v.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(qdwh_polar(x.T, 10), v @ u.T, rtol=0, atol=1e-10)


def test_qdwh_weights_follow_the_dynamically_weighted_halley_formulas():
    eps = float(torch.finfo(torch.float32).eps)
    coefs = qdwh_coefficients(eps, 20)
    assert coefs[0][0] and not coefs[-1][0]  # QR form first (c > 100), then Cholesky
    low = eps
    for _, a, b, c in coefs:
        d = (4 * (1 - low**2) / low**4) ** (1 / 3)
        assert a == pytest.approx(math.sqrt(1 + d) + 0.5 * math.sqrt(8 - 4 * d + 8 * (2 - low**2) / (low**2 * math.sqrt(1 + d))))
        assert b == pytest.approx((a - 1) ** 2 / 4) and c == pytest.approx(a + b - 1)
        low = low * (a + b * low**2) / (1 + c * low**2)
    assert 1 - low < 5 * eps and len(coefs) < 8  # converged in a handful of iterations


def test_hand_step_polar_first_and_two_steps_of_momentum():
    """polar_first: O = polar(G), M ← μM + (1 − μ)O, Δ = ‖G‖_*·M (exact SVD; two steps)."""
    lr, mu = 0.05, 0.5
    g1, u1, v1 = known_svd(4, 3, [2.0, 1.0, 0.5], seed=3)
    g2, u2, v2 = known_svd(4, 3, [1.0, 0.2, 0.1], seed=4)
    p = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = PolarGrad([p], lr=lr, momentum=mu, polar_first=True, method="svd")
    w, m = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    for g, u, v, nuc in ((g1, u1, v1, 3.5), (g2, u2, v2, 1.3)):
        p.grad = g.clone()
        opt.step()
        m = mu * m + (1 - mu) * (u @ v.T)
        w = w - lr * nuc * m
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)


def test_default_qdwh_step_and_the_ns_option():
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    p = nn.Parameter(torch.zeros(5, 4, dtype=torch.float64))
    p.grad = g.clone()
    PolarGrad([p], lr=1.0, momentum=0.5).step()  # defaults: qdwh, 2 inner steps
    m = 0.5 * g
    scaled = m / m.abs().max()
    o = qdwh_polar(scaled, 2)
    torch.testing.assert_close(p.detach(), -(scaled * o).sum() * m.abs().max() * o)
    # ns: Muon's Newton-Schulz in bf16 with the authors' coefficients and inner_steps iterations
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(polar_factor(x, "ns", 3), newton_schulz(x, 3, "bfloat16", POLAR_NS_COEFFICIENTS).float())


def test_overflow_scale_invariance_zero_and_nan():
    x, _, _ = known_svd(4, 5, [2.0, 1.0, 0.5, 0.1], seed=7)
    x = x.float()
    for method in ("qdwh", "svd"):
        torch.testing.assert_close(polar_factor(x * 1e-20, method), polar_factor(x, method), rtol=1e-4, atol=1e-5)
    big = torch.full((4, 5), 1e-3)
    big[0, 0] = 1e20  # squares overflow fp32; the momentum step must stay finite
    p = nn.Parameter(torch.zeros(4, 5))
    p.grad = big
    PolarGrad([p]).step()
    assert torch.isfinite(p).all() and p.abs().max() > 1e15  # the nuclear norm keeps the gradient's scale
    z = nn.Parameter(torch.ones(3, 3))
    z.grad = torch.zeros(3, 3)
    PolarGrad([z], method="svd").step()
    assert torch.equal(z.detach(), torch.ones(3, 3))
    q = nn.Parameter(torch.ones(3, 4))
    q.grad = torch.ones(3, 4)
    q.grad[1, 1] = math.nan
    PolarGrad([q]).step()  # does not raise
    assert torch.isnan(q).all()


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


@pytest.mark.parametrize("options", [{}, {"polar_first": True, "method": "svd", "weight_decay": 0.1}])
def test_foreach_equals_per_parameter(options):
    results = []
    for foreach in (False, True):
        model = _model()
        opt = PolarGrad(model.parameters(), foreach=foreach, **options)
        _train(model, opt, 3)
        results.append([p.detach().clone() for p in model.parameters()] + [opt.state[model[2].weight]["momentum_buffer"]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_is_bit_exact(foreach):
    model = _model()
    opt = PolarGrad(model.parameters(), foreach=foreach)
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=1)
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = PolarGrad(resumed.parameters(), foreach=foreach)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, 3, seed=1)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True])
def test_bf16_parameters_and_experts(foreach):
    w = nn.Parameter(torch.randn(2, 4, 5).bfloat16())
    opt = PolarGrad([w], foreach=foreach, method="svd", lr=1.0, momentum=0.0)
    g = torch.randn(2, 4, 5)
    w0 = w.detach().float().clone()
    w.grad = g.bfloat16()
    opt.step()
    assert w.dtype == torch.bfloat16 and opt.state[w]["momentum_buffer"].dtype == torch.float32
    gb = g.bfloat16().float()
    for e in range(2):  # per expert: ‖G_e‖_*·polar(G_e)
        left, sv, right = torch.linalg.svd(gb[e], full_matrices=False)
        torch.testing.assert_close(w.detach()[e].float(), (w0[e] - sv.sum() * left @ right).bfloat16().float())


@pytest.mark.parametrize(
    "name, value",
    [
        ("lr", float("nan")),
        ("momentum", -0.1),
        ("weight_decay", float("inf")),
        ("method", "zolo-pd"),
        ("inner_steps", 0),
        ("polar_first", "no"),
        ("ns_coefficients", (1.0, 2.0)),
        ("ns_coefficients", (1.0, float("nan"), 2.0)),
        ("adamw_lr", -1.0),
        ("adamw_weight_decay", float("nan")),
    ],
)
def test_validation_names_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        PolarGrad([nn.Parameter(torch.randn(3, 3))], **{name: value})
