"""AdaHessian numeric checks: hand-computed steps (float64), hessian_power, the conv spatial average, the
update_every schedule, agreement with pytorch_optimizer.AdaHessian, paths, resume, validation.

The Hessian comes from the authors' loop (``loss.backward(create_graph=True)``, then ``step``); on a
quadratic with a diagonal Hessian the Rademacher estimate is exact, so every expected number below follows
from the equations in the class docstring.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import flat, make_mlp
from lightning_optim.adahessian import AdaHessian
from lightning_optim.hessian import hutchinson_diagonal

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")

A = torch.tensor([[2.0, -0.5, 3.0], [0.25, 4.0, -1.5]], dtype=torch.float64)  # diag(H), signs included
B = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=torch.float64)
P0 = torch.tensor([[0.3, -1.2, 0.7], [2.0, -0.4, 0.1]], dtype=torch.float64)


def quadratic_step(optimizer: torch.optim.Optimizer, p: torch.Tensor, a: torch.Tensor = A, b: torch.Tensor = B) -> None:
    """L = ½ Σ a·p² + Σ b·p: g = a·p + b, H = diag(a)."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * (a * p * p).sum() + (b * p).sum()
        loss.backward(create_graph=True)
        return loss

    optimizer.step(closure)


def expected_trajectory(steps: int, lr: float, betas: tuple[float, float], eps: float, wd: float, k: float = 1.0,
                        due=lambda t: True) -> torch.Tensor:
    """The docstring's equations, written out (D = |a| on Hessian steps; u counts them)."""
    b1, b2 = betas
    p, m, v, u = P0.clone(), torch.zeros_like(P0), torch.zeros_like(P0), 0
    for t in range(1, steps + 1):
        g = A * p + B
        m = b1 * m + (1 - b1) * g
        if due(t):
            u += 1
            v = b2 * v + (1 - b2) * A.abs() ** 2
        p = p * (1 - lr * wd)
        denom = (v.sqrt() / math.sqrt(1 - b2**u)) ** k + eps
        p = p - lr * (m / (1 - b1**t)) / denom
    return p


@pytest.mark.parametrize("foreach", [False, True])
def test_hand_computed_steps(foreach: bool) -> None:
    p = torch.nn.Parameter(P0.clone())
    optimizer = AdaHessian([p], lr=0.1, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.2, foreach=foreach)
    for _ in range(4):
        quadratic_step(optimizer, p)
    expected = expected_trajectory(4, 0.1, (0.8, 0.9), 1e-3, 0.2)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
    state = optimizer.state[p]
    torch.testing.assert_close(state["exp_hessian_diag_sq"], (1 - 0.9**4) * A**2, rtol=1e-12, atol=0)
    assert float(state["step"]) == 4 and float(state["hessian_step"]) == 4
    assert not p.grad.requires_grad  # the graph of the gradient is released after the step


def test_first_step_closed_form() -> None:
    """At t = 1, m̂ = g and √v̂ = |D|: θ1 = θ0 − η·g/(|a| + ε), for any β (AdaHessian's Newton-like step)."""
    p = torch.nn.Parameter(P0.clone())
    optimizer = AdaHessian([p], lr=1.0, eps=0.0)
    quadratic_step(optimizer, p)
    # with lr 1, eps 0 and a diagonal H, one step from θ0 lands where g = 0 for a > 0: θ = −b/a
    newton = P0 - (A * P0 + B) / A.abs()
    torch.testing.assert_close(p.detach(), newton, rtol=1e-12, atol=1e-14)
    positive = A > 0
    torch.testing.assert_close(p.detach()[positive], (-B / A)[positive], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("foreach", [False, True])
def test_hessian_power(power: float, foreach: bool) -> None:
    """Denominator (√v̂)^k + ε: k = 1 the step above, k = 0.5 divides by √|a|, k = 0 is momentum SGD."""
    p = torch.nn.Parameter(P0.clone())
    optimizer = AdaHessian([p], lr=0.1, eps=1e-4, hessian_power=power, foreach=foreach)
    for _ in range(3):
        quadratic_step(optimizer, p)
    expected = expected_trajectory(3, 0.1, (0.9, 0.999), 1e-4, 0.0, k=power)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
    if power != 1.0:
        assert not torch.allclose(expected, expected_trajectory(3, 0.1, (0.9, 0.999), 1e-4, 0.0, k=1.0))


@pytest.mark.parametrize("spatial_average", [True, False])
def test_conv_kernel_spatial_average(spatial_average: bool) -> None:
    """A (2, 1, 3, 3) kernel with diag(H) = a: v after one step is (1 − β2)·(mean over the 3×3 window of |a|)²
    broadcast over the window (the authors' rule), or (1 − β2)·a² without the average."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 1, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 1, 3, 3, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(2, 1, 3, 3, generator=gen, dtype=torch.float64))
    w0 = w.detach().clone()
    optimizer = AdaHessian([w], lr=0.1, spatial_average=spatial_average)
    quadratic_step(optimizer, w, a, b)
    d = a.abs().mean(dim=(2, 3), keepdim=True).expand_as(a) if spatial_average else a.abs()
    torch.testing.assert_close(optimizer.state[w]["exp_hessian_diag_sq"], 0.001 * d**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * (a * w0 + b) / (d + 1e-4), rtol=1e-12, atol=1e-14)


def test_update_every_counts_its_own_bias_correction() -> None:
    """update_every=3: v changes only on steps 1, 4, 7 and its bias correction counts those updates."""
    p = torch.nn.Parameter(P0.clone())
    optimizer = AdaHessian([p], lr=0.05, update_every=3)
    for _ in range(7):
        quadratic_step(optimizer, p)
    expected = expected_trajectory(7, 0.05, (0.9, 0.999), 1e-4, 0.0, due=lambda t: (t - 1) % 3 == 0)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
    assert float(optimizer.state[p]["hessian_step"]) == 3 and float(optimizer.state[p]["step"]) == 7
    # steps 8 and 9 are not Hessian steps: plain gradients do; step 10 is one and needs H z
    assert not optimizer.hessian_due(8) and not optimizer.hessian_due(9) and optimizer.hessian_due(10)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        optimizer.step()
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="global step 10"):
        optimizer.step()


def test_a_parameter_without_an_estimate_waits() -> None:
    """A parameter whose first gradient comes on a non-Hessian step keeps its value (its m accumulates) until
    its first estimate: no step divided by ε alone."""
    p, q = torch.nn.Parameter(P0.clone()), torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = AdaHessian([p, q], lr=0.1, update_every=2)

    def closure(with_q: bool) -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * (A * p * p).sum() + (((q - 3.0) ** 2).sum() if with_q else 0.0)
        loss.backward(create_graph=True)
        return loss

    optimizer.step(lambda: closure(False))  # step 1 (Hessian step): q has no gradient
    optimizer.step(lambda: closure(True))  # step 2: q's first gradient, no estimate
    assert torch.equal(q.detach(), torch.ones(3, dtype=torch.float64))
    assert float(optimizer.state[q]["step"]) == 1 and float(optimizer.state[q]["hessian_step"]) == 0
    optimizer.step(lambda: closure(True))  # step 3 (Hessian step): q moves
    assert (q.detach() > 1).all()


def test_n_samples_average_the_probes() -> None:
    """A dense H: the first step's v is (1 − β2)·D² with D the mean of n probes seeded (seed, step 1, index 0)."""
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    a = r + r.T
    x = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    (g,) = torch.autograd.grad(0.5 * x @ a @ x, [x], create_graph=True)
    d = hutchinson_diagonal([g], [x], [0], seed=5, step=1, n_samples=3, probe="gaussian")[0]
    optimizer = AdaHessian([x], n_samples=3, probe="gaussian", seed=5)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * x @ a @ x
        loss.backward(create_graph=True)
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(optimizer.state[x]["exp_hessian_diag_sq"], 0.001 * d**2, rtol=1e-12, atol=0)
    one = hutchinson_diagonal([g], [x], [0], seed=5, step=1, n_samples=1, probe="gaussian")[0]
    assert not torch.allclose(one, d)


def test_set_hessian_estimate_is_used_once() -> None:
    """An estimate handed in is used by the step it belongs to (no graph needed) and then dropped."""
    p = torch.nn.Parameter(P0.clone())
    optimizer = AdaHessian([p], lr=0.1)
    optimizer.set_hessian_estimate({p: -A})  # raw D; the step takes |D|
    p.grad = A * P0 + B
    optimizer.step()
    torch.testing.assert_close(optimizer.state[p]["exp_hessian_diag_sq"], 0.001 * A**2, rtol=1e-12, atol=0)
    optimizer.set_hessian_estimate({p: A}, step=5)  # for another step: ignored, so step 2 has none
    p.grad = A * P0 + B
    with pytest.raises(RuntimeError, match="create_graph=True"):
        optimizer.step()


# -- pytorch_optimizer as a second opinion -------------------------------------------------------------------
def _mlp_closure(model: torch.nn.Module, optimizer: torch.optim.Optimizer, i: int, create_graph: bool = True):
    gen = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randn(8, 3, generator=gen, dtype=torch.float64)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    return closure


def _estimates(model: torch.nn.Module, i: int) -> list[torch.Tensor]:
    """The Hutchinson estimate of step i (float64 MLP, Rademacher probes seeded by (0, i + 1, index))."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randn(8, 3, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), params, create_graph=True)
    return [d.abs() for d in hutchinson_diagonal(grads, params, list(range(len(params))), seed=0, step=i + 1)]


def test_agrees_with_pytorch_optimizer_given_the_same_hessian() -> None:
    """pytorch_optimizer.AdaHessian fed the same |D| through step(hessian=...) (mapping: same lr, betas, eps,
    weight_decay with weight_decouple=True, hessian_power; update_period=1): the same weights over 6 steps.

    Known differences (not exercised here): pytorch_optimizer squares the signed D without |·| (the same v)
    and has no spatial average of conv kernels (the authors average |D| over 4-D kernels); with
    update_period > 1 it bias-corrects v with the step count although v was updated fewer times (see
    test_pytorch_optimizer_differs_with_update_period); its defaults are lr 0.1 and eps 1e-16 (authors:
    0.15 and 1e-4)."""
    from pytorch_optimizer import AdaHessian as Reference

    kwargs = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-4, weight_decay=0.1, hessian_power=0.5)
    ours_model, ref_model = make_mlp(), make_mlp()
    ours = AdaHessian(ours_model.parameters(), **kwargs)
    ref = Reference(ref_model.parameters(), weight_decouple=True, **kwargs)
    for i in range(6):
        estimate = _estimates(ref_model, i)
        ref.step(_mlp_closure(ref_model, ref, i, create_graph=False), hessian=estimate)
        ours.step(_mlp_closure(ours_model, ours, i))
    torch.testing.assert_close(flat(ours_model), flat(ref_model), rtol=1e-10, atol=1e-12)


def test_pytorch_optimizer_differs_with_update_period() -> None:
    """update_every = 2: ours bias-corrects v by its own number of updates (the hand formula above checks
    it); pytorch_optimizer divides by 1 − β2^t with t the step count, a denominator too small by ~√2 early,
    so its steps differ (ours is the unbiased EMA: E[v]/(1 − β2^u) = E[D²])."""
    from pytorch_optimizer import AdaHessian as Reference

    ours_p, ref_p = torch.nn.Parameter(P0.clone()), torch.nn.Parameter(P0.clone())
    ours = AdaHessian([ours_p], lr=0.05, update_every=2)
    ref = Reference([ref_p], lr=0.05, update_period=2, eps=1e-4)
    for t in range(4):
        quadratic_step(ours, ours_p)
        ref.zero_grad()
        (0.5 * (A * ref_p * ref_p).sum() + (B * ref_p).sum()).backward()
        ref.step(hessian=[A.abs()] if t % 2 == 0 else None)
    expected = expected_trajectory(4, 0.05, (0.9, 0.999), 1e-4, 0.0, due=lambda t: (t - 1) % 2 == 0)
    torch.testing.assert_close(ours_p.detach(), expected, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(ref_p.detach(), expected, rtol=1e-6, atol=1e-8)


# -- paths, dtypes, resume, validation ---------------------------------------------------------------------------
def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for i in steps:
        optimizer.step(_mlp_closure(model, optimizer, i))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_foreach_matches_per_parameter(dtype: torch.dtype, tol: float) -> None:
    results = []
    for foreach in (False, True):
        model = make_mlp().to(dtype)
        groups = [{"params": [p for p in model.parameters() if p.ndim > 1]},
                  {"params": [p for p in model.parameters() if p.ndim == 1], "lr": 0.02, "update_every": 2}]
        optimizer = AdaHessian(groups, lr=0.05, weight_decay=0.1, hessian_power=0.7, foreach=foreach)
        for i in range(6):
            gen = torch.Generator().manual_seed(100 + i)
            x, y = torch.randn(8, 6, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype)

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward(create_graph=True)
                return loss

            optimizer.step(closure)
        results.append(flat(model))
    torch.testing.assert_close(results[1], results[0], rtol=tol, atol=tol)


def test_bf16_parameters_keep_fp32_state() -> None:
    model = make_mlp().to(torch.bfloat16)
    optimizer = AdaHessian(model.parameters(), lr=0.05)
    for i in range(3):
        gen = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 6, generator=gen).bfloat16(), torch.randn(8, 3, generator=gen).bfloat16()

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward(create_graph=True)
            return loss

        optimizer.step(closure)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        state = optimizer.state[p]
        assert state["exp_avg"].dtype == state["exp_hessian_diag_sq"].dtype == torch.float32
        assert state["exp_hessian_diag_sq"].any()


@pytest.mark.parametrize("foreach", [False, True])
def test_resume_mid_cycle_is_bit_identical(foreach: bool) -> None:
    """update_every=3, saved after step 4 (between Hessian steps): the resumed run continues bit for bit."""
    make = lambda m: AdaHessian(m.parameters(), lr=0.05, update_every=3, foreach=foreach)  # noqa: E731
    model = make_mlp()
    optimizer = make(model)
    _train(model, optimizer, range(4))
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    _train(model, optimizer, range(4, 9))
    resumed = make_mlp(seed=7)
    resumed.load_state_dict(saved[0])
    resumed_optimizer = make(resumed)
    resumed_optimizer.load_state_dict(saved[1])
    _train(resumed, resumed_optimizer, range(4, 9))
    assert torch.equal(flat(resumed), flat(model))


@pytest.mark.parametrize(
    "name, value",
    [("lr", -1.0), ("eps", math.nan), ("hessian_power", 1.5), ("hessian_power", -0.1), ("update_every", 0),
     ("n_samples", 0), ("probe", "normal"), ("seed", -1), ("spatial_average", 1), ("betas", (0.9, 1.0)),
     ("weight_decay", math.inf), ("state_bits", 16)],
)
def test_validation_names_the_argument(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name.split()[0]):
        AdaHessian([torch.nn.Parameter(torch.zeros(2))], **{name: value})
