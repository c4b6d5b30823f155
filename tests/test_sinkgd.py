"""SinkGD (lightning_optim.sinkgd): SR-Sinkhorn by hand and against the paper's equations, the target row and
column norms, scale invariance and overflow, the split, both paths, statelessness, resume, validation.
pytorch_optimizer 4.1.0 has no SinkGD, so there is no second opinion."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_optim.sinkgd import SinkGD, sr_sinkhorn


def ref_sr_sinkhorn(g: torch.Tensor, iterations: int) -> torch.Tensor:
    """The paper's Algorithm (SR-Sinkhorn) as written: X ← √n Q(X)⁻¹X, X ← √m X R(X)⁻¹, L times, float64."""
    x = g.double()
    m, n = x.shape
    for _ in range(iterations):
        q = x.norm(dim=1)  # row norms
        x = math.sqrt(n) * torch.diag(1 / q) @ x
        r = x.norm(dim=0)  # column norms
        x = math.sqrt(m) * x @ torch.diag(1 / r)
    return x


def test_one_iteration_by_hand():
    """G = [[3, 4], [0, 2]]: rows 5, 2 → √2·[[0.6, 0.8], [0, 1]]; columns √2·0.6 and √2·√1.64 → ×√2 / norm."""
    g = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    r2 = math.sqrt(2.0)
    col1 = r2 * math.sqrt(0.8**2 + 1.0)
    expected = torch.tensor(
        [[r2 * (r2 * 0.6) / (r2 * 0.6), r2 * (r2 * 0.8) / col1], [0.0, r2 * r2 / col1]], dtype=torch.float64
    )
    torch.testing.assert_close(sr_sinkhorn(g, 1).double(), expected, rtol=1e-6, atol=1e-7)

    lr, scale, wd = 0.1, 0.5, 0.2
    w0 = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    p.grad = g.clone()
    SinkGD([p], lr=lr, scale=scale, iterations=1, weight_decay=wd).step()
    torch.testing.assert_close(p.detach(), w0 * (1 - lr * wd) - lr * scale * expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(4, 6), (7, 3), (5, 5)])
@pytest.mark.parametrize("iterations", [1, 5])
def test_matches_the_papers_equations(shape, iterations):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sr_sinkhorn(g, iterations).double(), ref_sr_sinkhorn(g, iterations), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 6), (8, 3)])
def test_rows_and_columns_reach_the_target_norms(shape):
    """After the last (column) pass every column has norm √m; the rows converge to √n (a Sinkhorn
    iteration on the squared entries), so ‖X‖_F = √(mn)."""
    m, n = shape
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 10, n)
    x5 = sr_sinkhorn(g, 5)
    torch.testing.assert_close(x5.norm(dim=0), torch.full((n,), math.sqrt(m)), rtol=1e-5, atol=0)
    assert (x5.norm(dim=1) - math.sqrt(n)).abs().max() < 0.25 * math.sqrt(n)
    x = sr_sinkhorn(g, 60)
    torch.testing.assert_close(x.norm(dim=0), torch.full((n,), math.sqrt(m)), rtol=1e-5, atol=0)
    torch.testing.assert_close(x.norm(dim=1), torch.full((m,), math.sqrt(n)), rtol=1e-4, atol=0)
    assert x.norm().item() == pytest.approx(math.sqrt(m * n), rel=1e-4)
    # more passes bring the rows closer: the iteration converges
    far = (g.norm(dim=1) / g.norm(dim=1).mean() - 1).abs().max()
    assert (x5.norm(dim=1) / math.sqrt(n) - 1).abs().max() < far


def test_scale_invariant_overflow_safe_and_zero_rows_stay_zero():
    g = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sr_sinkhorn(g * 1e25), sr_sinkhorn(g), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sr_sinkhorn(g * 1e-25), sr_sinkhorn(g), rtol=1e-5, atol=1e-6)
    spiky = torch.full((4, 5), 1e-3)
    spiky[2, 3] = 1e20  # its square overflows fp32
    assert torch.isfinite(sr_sinkhorn(spiky)).all()
    g[1] = 0.0
    x = sr_sinkhorn(g)
    assert torch.isfinite(x).all() and torch.equal(x[1], torch.zeros(5))
    assert torch.equal(sr_sinkhorn(torch.zeros(3, 4)), torch.zeros(3, 4))


def test_experts_are_per_matrix_and_conv_kernels_are_flattened():
    gen = torch.Generator().manual_seed(3)
    experts = torch.randn(3, 4, 5, generator=gen)
    torch.testing.assert_close(sr_sinkhorn(experts), torch.stack([sr_sinkhorn(e) for e in experts]))
    conv = nn.Parameter(torch.randn(4, 2, 3, 3, generator=gen))
    w0 = conv.detach().clone()
    conv.grad = torch.randn(4, 2, 3, 3, generator=gen)
    SinkGD([conv], lr=1.0, scale=1.0).step()
    torch.testing.assert_close(w0 - conv.detach(), sr_sinkhorn(conv.grad.reshape(4, 18)).reshape(4, 2, 3, 3))


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
    opt = SinkGD(model.parameters(), adamw_lr=1e-2)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    biases = [nn.Parameter(p.detach().clone()) for p in opt.param_groups[1]["params"]]
    ref = torch.optim.AdamW(biases, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 6, generator=gen)).pow(2).mean().backward()
        for b, p in zip(biases, opt.param_groups[1]["params"]):
            b.grad = p.grad.clone()
        opt.step()
        ref.step()
    for b, p in zip(biases, opt.param_groups[1]["params"]):
        torch.testing.assert_close(p.detach(), b.detach())
    assert set(opt.state[model[0].weight]) == {"step"}  # no moments for the matrices
    assert set(opt.state[model[0].bias]) == {"exp_avg", "exp_avg_sq", "step"}
    opt2 = SinkGD([{"params": [model[0].weight], "rule": "sinkgd"}, {"params": [model[0].bias], "rule": "adamw"}])
    assert [g["use_muon"] for g in opt2.param_groups] == [True, False]


def test_foreach_equals_per_parameter():
    results = []
    for foreach in (False, True):
        model = _model()
        _train(model, SinkGD(model.parameters(), weight_decay=0.1, foreach=foreach), 4)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_is_bit_exact(foreach):
    model = _model()
    opt = SinkGD(model.parameters(), foreach=foreach)
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=1)
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = SinkGD(resumed.parameters(), foreach=foreach)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, 3, seed=1)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_1e20_entry_and_bf16_parameters(foreach):
    w = nn.Parameter(torch.randn(4, 5).bfloat16())
    opt = SinkGD([w], foreach=foreach)
    g = torch.randn(4, 5) * 1e-3
    g[0, 0] = 1e20
    w.grad = g.bfloat16()
    opt.step()
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()


@pytest.mark.parametrize(
    "name, value",
    [
        ("lr", -1.0),
        ("lr", float("nan")),
        ("scale", float("inf")),
        ("iterations", 0),
        ("iterations", 2.5),
        ("weight_decay", -0.1),
        ("adamw_lr", float("nan")),
        ("adamw_betas", (0.9, 1.0)),
        ("adamw_eps", -1.0),
        ("adamw_weight_decay", float("nan")),
    ],
)
def test_validation_names_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        SinkGD([nn.Parameter(torch.randn(3, 3))], **{name: value})
