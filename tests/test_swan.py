"""SWAN (lightning_optim.swan): GradNorm by hand, the Newton-Schulz inverse square root against eigh, the
whitened output (X Xᵀ = I), a hand-computed step from the paper's equations, both paths, statelessness, resume,
overflow, validation. pytorch_optimizer 4.1.0 has no SWAN, so there is no second opinion."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_optim.swan import SWAN, grad_norm, grad_whitening, inverse_sqrt_newton_schulz


def test_grad_norm_by_hand():
    """Row [1, 2, 3, 6]: mean 3, deviations (−2, −1, 0, 3), std √(14/4); row [5, 5, 5, 5] (std 0) → 0."""
    g = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0], [0.0, -4.0, 0.0, 4.0]], dtype=torch.float64)
    s0, s2 = math.sqrt(14 / 4), math.sqrt(32 / 4)
    expected = torch.tensor(
        [[-2 / s0, -1 / s0, 0.0, 3 / s0], [0.0, 0.0, 0.0, 0.0], [0.0, -4 / s2, 0.0, 4 / s2]], dtype=torch.float64
    )
    torch.testing.assert_close(grad_norm(g), expected)
    x = grad_norm(torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 1e25)
    torch.testing.assert_close(x.mean(dim=1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(x.square().mean(dim=1), torch.ones(5))
    spiky = torch.full((3, 4), 1e-3)
    spiky[0, 0] = 1e20  # its square overflows fp32
    assert torch.isfinite(grad_norm(spiky)).all()


def test_inverse_square_root_matches_eigh():
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    a = b @ b.T
    vals, vecs = torch.linalg.eigh(a)
    expected = vecs @ torch.diag(vals.rsqrt()) @ vecs.T
    torch.testing.assert_close(inverse_sqrt_newton_schulz(a, 40), expected, rtol=1e-8, atol=1e-10)
    assert torch.equal(inverse_sqrt_newton_schulz(torch.zeros(2, 3, 3), 5), torch.zeros(2, 3, 3))


@pytest.mark.parametrize("shape", [(4, 9), (9, 4), (6, 6)])
def test_whitened_output_is_the_polar_factor(shape):
    """Δ = (G̃G̃ᵀ)^{-1/2}G̃: Δ Δᵀ = I for m ≤ n (ΔᵀΔ = I for m > n), i.e. U Vᵀ of G̃'s SVD. A square G̃ has rank
    n − 1 (GradNorm centres every row; a tall one too), so Δ is the partial isometry U Vᵀ on its range there."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    normed = grad_norm(g)
    white = grad_whitening(normed, 30)  # (more steps grow the rounding noise on a singular Gram's null space by 1.5 each)
    left, sv, right = torch.linalg.svd(normed, full_matrices=False)
    rank = int((sv > 1e-9 * sv[0]).sum())
    torch.testing.assert_close(white, left[:, :rank] @ right[:rank], rtol=0, atol=1e-7)
    gram = white @ white.T if shape[0] <= shape[1] else white.T @ white
    if rank == min(shape):
        torch.testing.assert_close(gram, torch.eye(min(shape), dtype=torch.float64), rtol=0, atol=1e-7)
    # the default 10 steps bring every nonzero singular value into [0.8, 1] (the iteration approaches 1 from below)
    white10 = grad_whitening(grad_norm(g.float()), 10)
    sv10 = torch.linalg.svdvals(white10)[:rank]
    assert sv10.min() > 0.8 and sv10.max() < 1 + 1e-5


def test_hand_computed_step():
    """W ← W(1 − ηλ) − η·Δ·‖G̃‖_F/‖Δ‖_F, Δ = polar(G̃) (exact SVD reference, 60 Newton-Schulz steps)."""
    lr, wd = 0.01, 0.1
    g = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, 4.0, -1.0]], dtype=torch.float64)
    w0 = torch.tensor([[0.5, 0.5, -1.0, 0.0], [1.0, 2.0, 0.0, -0.5]], dtype=torch.float64)
    normed = (g - g.mean(dim=1, keepdim=True)) / g.std(dim=1, unbiased=False, keepdim=True)
    left, _, right = torch.linalg.svd(normed, full_matrices=False)
    delta = left @ right
    delta = delta * normed.norm() / delta.norm()  # = √(mn)/√m = √n = 2
    p = nn.Parameter(w0.clone())
    p.grad = g.clone()
    SWAN([p], lr=lr, weight_decay=wd, ns_steps=60).step()
    torch.testing.assert_close(p.detach(), w0 * (1 - lr * wd) - lr * delta, rtol=1e-9, atol=1e-10)
    assert delta.square().mean().sqrt().item() == pytest.approx(1.0)  # RMS 1 entries
    q = nn.Parameter(w0.clone())
    q.grad = g.clone()
    SWAN([q], lr=lr, ns_steps=60, rescale=False).step()
    torch.testing.assert_close(q.detach(), w0 - lr * left @ right, rtol=1e-9, atol=1e-10)


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


def test_stateless_matrices_and_adamw_for_the_rest():
    model = _model()
    opt = SWAN(model.parameters())
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    _train(model, opt, 2)
    assert set(opt.state[model[0].weight]) == {"step"}
    assert set(opt.state[model[0].bias]) == {"exp_avg", "exp_avg_sq", "step"}
    opt2 = SWAN([{"params": [model[0].weight], "rule": "swan"}, {"params": [model[0].bias], "rule": "adamw"}])
    assert [g["use_muon"] for g in opt2.param_groups] == [True, False]


def test_foreach_equals_per_parameter_and_experts_are_per_matrix():
    results = []
    for foreach in (False, True):
        model = _model()
        _train(model, SWAN(model.parameters(), weight_decay=0.1, foreach=foreach), 3)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    experts = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(3))
    batched = grad_whitening(grad_norm(experts), 10)
    torch.testing.assert_close(batched, torch.stack([grad_whitening(grad_norm(e), 10) for e in experts]))


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_is_bit_exact(foreach):
    model = _model()
    opt = SWAN(model.parameters(), foreach=foreach)
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=1)
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = SWAN(resumed.parameters(), foreach=foreach)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, 3, seed=1)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_1e20_entry_and_bf16_parameters(foreach):
    w = nn.Parameter(torch.randn(4, 5).bfloat16())
    opt = SWAN([w], foreach=foreach)
    g = torch.randn(4, 5) * 1e-3
    g[0, 0] = 1e20
    w.grad = g.bfloat16()
    opt.step()
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()


@pytest.mark.parametrize(
    "name, value",
    [
        ("lr", -1.0),
        ("lr", float("inf")),
        ("ns_steps", 0),
        ("ns_steps", 2.5),
        ("rescale", 1),
        ("weight_decay", float("nan")),
        ("adamw_betas", (1.0, 0.9)),
        ("adamw_eps", -1.0),
    ],
)
def test_validation_names_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        SWAN([nn.Parameter(torch.randn(3, 3))], **{name: value})
