"""SophiaG / SophiaH numeric checks: hand-computed steps (float64), the clip at 1, the sign steps before the
first estimate, the refresh every k steps, negative curvature, agreement with pytorch_optimizer.SophiaH,
paths (per-parameter, foreach, 8-bit, compiled) with a live curvature EMA, resume, validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import flat, make_mlp
from lightning_optim.hessian import hutchinson_diagonal
from lightning_optim.sophia import SophiaG, SophiaH

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")

A = torch.tensor([[2.0, 0.5, 3.0], [0.25, 4.0, 1.5]], dtype=torch.float64)
B = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=torch.float64)
P0 = torch.tensor([[0.3, -1.2, 0.7], [2.0, -0.4, 0.1]], dtype=torch.float64)


def grad_at(p: torch.Tensor, a: torch.Tensor = A) -> torch.Tensor:
    return a * p + B  # L = ½ Σ a·p² + Σ b·p


def sophia_reference(p, m, h, g, *, lr, beta1, rho, eps, wd, clamp):
    """One step of the docstring's equations (plain tensors)."""
    p = p * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    denom = torch.clamp(rho * h, min=eps) if clamp else rho * h + eps
    return p - lr * m.sign() * torch.clamp(m.abs() / denom, max=1.0), m


# -- SophiaG ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_sophia_g_hand_computed(foreach: bool) -> None:
    """4 steps, update_every=2; after steps 2 and 4 a GNB estimate (ĝ, B = 16) is folded in:
    h ← β2·h + (1 − β2)·B·ĝ⊙ĝ. Steps 1-2 use h = 0 (clipped sign steps), step 3-4 the refreshed h."""
    lr, betas, rho, eps, wd, batch = 0.05, (0.9, 0.95), 0.5, 1e-15, 0.1, 16
    p = torch.nn.Parameter(P0.clone())
    optimizer = SophiaG([p], lr=lr, betas=betas, rho=rho, eps=eps, weight_decay=wd, update_every=2, foreach=foreach)
    ref_p, m, h = P0.clone(), torch.zeros_like(P0), torch.zeros_like(P0)
    for t in range(1, 5):
        p.grad = grad_at(p.detach())
        g = grad_at(ref_p)
        optimizer.step()
        ref_p, m = sophia_reference(ref_p, m, h, g, lr=lr, beta1=betas[0], rho=rho, eps=eps, wd=wd, clamp=False)
        if t % 2 == 0:
            assert optimizer.hessian_due(t)
            g_hat = A * ref_p + B  # any stand-in for the sampled-label gradient
            optimizer.update_hessian(batch_size=batch, grads=[g_hat])
            h = betas[1] * h + (1 - betas[1]) * batch * g_hat * g_hat
        else:
            assert not optimizer.hessian_due(t)
        torch.testing.assert_close(p.detach(), ref_p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(optimizer.state[p]["hessian"], h, rtol=1e-12, atol=0)
    assert float(optimizer.state[p]["hessian_step"]) == 2
    ratios = m.abs() / (rho * h + eps)
    assert (ratios < 1).any() and (ratios > 1).any()  # both sides of the clip were exercised


def test_sophia_g_without_estimate_takes_sign_steps() -> None:
    """h = 0 (before the first refresh): every entry moves by exactly η·sign(m) (the authors' first k steps);
    an entry with m = 0 does not move."""
    p = torch.nn.Parameter(P0.clone())
    optimizer = SophiaG([p], lr=0.01, weight_decay=0.0)
    g = grad_at(P0)
    g[1, 0] = 0.0
    p.grad = g.clone()
    optimizer.step()
    torch.testing.assert_close(p.detach(), P0 - 0.01 * g.sign(), rtol=0, atol=1e-15)
    assert p.detach()[1, 0] == P0[1, 0]


def test_clip_at_one() -> None:
    """With h set so that |m|/(ρh + ε) is 4 for one entry and 1/4 for another: steps η and η/4."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = SophiaG([p], lr=0.1, betas=(0.0, 0.5), rho=1.0, weight_decay=0.0, eps=1e-15)
    # h = 0.5·B·ĝ² with B = 1: ĝ = (1/√2, √2) gives h = (0.25, 1)
    optimizer.update_hessian(batch_size=1, grads=[torch.tensor([0.5**0.5, 2**0.5], dtype=torch.float64)])
    p.grad = torch.tensor([1.0, 0.25], dtype=torch.float64)  # β1 = 0: m = g
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, -0.025], dtype=torch.float64), rtol=1e-12, atol=0)


def test_infinite_curvature_gives_a_zero_step_and_nan_estimates_keep_h() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = SophiaG([p], lr=0.1, weight_decay=0.0)
    optimizer.update_hessian(batch_size=4, grads=[torch.tensor([1e20, 1.0, math.nan])])  # B·ĝ² overflows fp32
    h = optimizer.state[p]["hessian"]
    assert math.isinf(h[0]) and h[1] == pytest.approx(0.04) and h[2] == 0
    p.grad = torch.ones(3)
    optimizer.step()
    assert p[0] == 1.0 and torch.isfinite(p).all()


# -- SophiaH ---------------------------------------------------------------------------------------------------
def _hvp_step(optimizer: torch.optim.Optimizer, p: torch.Tensor, a: torch.Tensor = A, b: torch.Tensor = B) -> None:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * (a * p * p).sum() + (b * p).sum()
        loss.backward(create_graph=True)
        return loss

    optimizer.step(closure)


@pytest.mark.parametrize("foreach", [False, True])
def test_sophia_h_refresh_every_k_steps(foreach: bool) -> None:
    """update_every=3, Rademacher probes on a diagonal H (exact): h = 0 for steps 1-3; after step 3's update
    h = (1 − β2)·a; step 4 uses it; after step 6, h = β2(1 − β2)a + (1 − β2)a."""
    lr, betas, rho, eps, wd = 0.05, (0.9, 0.9), 0.2, 1e-12, 0.1
    p = torch.nn.Parameter(P0.clone())
    optimizer = SophiaH([p], lr=lr, betas=betas, rho=rho, eps=eps, weight_decay=wd, update_every=3,
                        probe="rademacher", foreach=foreach)
    ref_p, m, h = P0.clone(), torch.zeros_like(P0), torch.zeros_like(P0)
    for t in range(1, 8):
        _hvp_step(optimizer, p)
        ref_p, m = sophia_reference(
            ref_p, m, h, grad_at(ref_p), lr=lr, beta1=betas[0], rho=rho, eps=eps, wd=wd, clamp=True
        )
        if t % 3 == 0:
            h = betas[1] * h + (1 - betas[1]) * A
        torch.testing.assert_close(p.detach(), ref_p, rtol=1e-12, atol=1e-14, msg=f"step {t}")
        assert float(optimizer.state[p]["hessian_step"]) == t // 3
    torch.testing.assert_close(optimizer.state[p]["hessian"], h, rtol=1e-12, atol=0)


def test_sophia_h_negative_curvature_takes_the_clipped_descent_step() -> None:
    """h < 0: max(ρh, ε) = ε, so the entry takes the full step −η·sign(m), downhill (ρh + ε < 0 would give a
    negative ratio and move it uphill); an entry with h > 0 takes η·min(|m|/(ρh), 1)."""
    a = torch.tensor([-2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([0.5, -1.0], dtype=torch.float64)
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    optimizer = SophiaH([p], lr=0.1, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, update_every=1, probe="rademacher")
    _hvp_step(optimizer, p, a, b)  # h = 0: the sign step; then the refresh: h = a (β2 = 0)
    assert torch.equal(optimizer.state[p]["hessian"], a)
    before = p.detach().clone()
    g = a * before + b  # β1 = 0: m = g
    _hvp_step(optimizer, p, a, b)
    step = before - p.detach()
    assert step[0] == pytest.approx(0.1 * float(g[0].sign()), rel=1e-12)
    assert step[1] == pytest.approx(0.1 * min(abs(float(g[1])) / 3.0, 1.0) * float(g[1].sign()), rel=1e-12)
    loss = lambda q: float(0.5 * (a * q * q).sum() + (b * q).sum())  # noqa: E731
    assert loss(p.detach()) < loss(before)


def test_sophia_h_refresh_without_graph_raises() -> None:
    p = torch.nn.Parameter(P0.clone())
    optimizer = SophiaH([p], update_every=2)
    p.grad = torch.ones_like(p)
    optimizer.step()  # step 1: not a refresh step, plain gradients do
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="HessianEstimator"):
        optimizer.step()


def test_agrees_with_pytorch_optimizer_sophia_h() -> None:
    """pytorch_optimizer.SophiaH computes θ − η'·clip(m / max(h, ε'), ±p'): the same update as ours with
    ρ = p', η = η'·p', ε = p'·ε' (and decoupled decay λ = λ'·η'/η). It refreshes before the update of step T
    (paper: T mod k = 1); ours after it (both authors' codes). Fed the same estimates, each one to its step
    (ours: the estimate of step T, folded after T; theirs: the same numbers passed at step T + 1), the
    weights agree over 6 steps on a float64 MLP. Their defaults (lr 6e-2, p 1e-2) give our η = 6e-4."""
    from pytorch_optimizer import SophiaH as Reference

    p_clip, lr_ref, eps_ref, wd_ref = 0.05, 0.4, 1e-12, 0.01
    ours_model, ref_model = make_mlp(), make_mlp()
    ours = SophiaH(ours_model.parameters(), lr=lr_ref * p_clip, betas=(0.9, 0.95), rho=p_clip, eps=p_clip * eps_ref,
                   weight_decay=wd_ref / p_clip, update_every=1, probe="rademacher")
    ref = Reference(ref_model.parameters(), lr=lr_ref, betas=(0.9, 0.95), p=p_clip, eps=eps_ref, weight_decay=wd_ref,
                    update_period=1)
    previous = [torch.zeros_like(p) for p in ref_model.parameters()]
    for i in range(6):
        gen = torch.Generator().manual_seed(100 + i)
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(8, 3, generator=gen, dtype=torch.float64)
        params = list(ref_model.parameters())
        grads = torch.autograd.grad(torch.nn.functional.mse_loss(ref_model(x), y), params, create_graph=True)
        estimate = hutchinson_diagonal(grads, params, list(range(len(params))), seed=0, step=i + 1, probe="rademacher")
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        ref.step(hessian=previous)
        previous = [e.detach() for e in estimate]

        def closure() -> torch.Tensor:
            ours.zero_grad()
            loss = torch.nn.functional.mse_loss(ours_model(x), y)
            loss.backward(create_graph=True)
            return loss

        ours.step(closure)
    torch.testing.assert_close(flat(ours_model), flat(ref_model), rtol=1e-10, atol=1e-12)


# -- paths with a live curvature EMA ------------------------------------------------------------------------------
def _run(cls, path: dict, steps: range, model: torch.nn.Module | None = None, optimizer=None, dtype=torch.float32):
    """Regression on an MLP (a 64×64 layer, so 8-bit state applies) with refreshes every 2 steps: SophiaH
    from the create_graph=True backward, SophiaG from update_hessian on a stand-in ĝ."""
    if model is None:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).to(dtype)
        optimizer = cls(model.parameters(), lr=0.01, update_every=2, rho=0.05, **path)
    for i in steps:
        gen = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(8, 64, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward(create_graph=cls is SophiaH)
            return loss

        optimizer.step(closure)
        if cls is SophiaG and optimizer.hessian_due(i + 1):
            optimizer.update_hessian(batch_size=8, grads=[p.grad * 0.5 for p in model.parameters()])
    return model, optimizer


@pytest.mark.parametrize("cls", [SophiaG, SophiaH])
def test_paths_agree_with_a_live_estimate(cls) -> None:
    """per-parameter = foreach (tight), 8-bit close to 32-bit (entry-wise within the largest move, on average
    within 5% of the average move), over 6 steps with 3 refreshes."""
    reference = flat(_run(cls, {"foreach": False}, range(6))[0])
    foreach = flat(_run(cls, {"foreach": True}, range(6))[0])
    torch.testing.assert_close(foreach, reference, rtol=1e-5, atol=1e-6)
    model8, opt8 = _run(cls, {"foreach": True, "state_bits": 8}, range(6))
    assert "hessian_codes" in opt8.state[model8[0].weight]
    start = flat(_run(cls, {}, range(0))[0])
    # the contract's bound: clipped (sign-like) steps move an entry by a full η as soon as its 8-bit m rounds
    # to the other side of 0 or to 0, so 8-bit drifts by up to about one step per step where m is tiny
    drift = float((flat(model8) - reference).abs().max())
    assert drift <= 1.0 * float((reference - start).abs().max())
    assert float((flat(model8) - reference).abs().mean()) <= 0.05 * float((reference - start).abs().mean())


def test_compiled_path_agrees_with_a_live_estimate() -> None:
    reference = flat(_run(SophiaH, {"foreach": True}, range(5))[0])
    compiled = flat(_run(SophiaH, {"compile": True}, range(5))[0])
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [SophiaG, SophiaH])
@pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {"state_bits": 8}])
def test_resume_is_bit_identical(cls, path: dict) -> None:
    """Saved after step 3 (h refreshed once, next refresh after step 4): the resumed run continues bit for bit."""
    model, optimizer = _run(cls, path, range(3))
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    _run(cls, path, range(3, 7), model, optimizer)
    torch.manual_seed(5)
    resumed = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    resumed.load_state_dict(saved[0])
    resumed_optimizer = cls(resumed.parameters(), lr=0.01, update_every=2, rho=0.05, **path)
    resumed_optimizer.load_state_dict(saved[1])
    _run(cls, path, range(3, 7), resumed, resumed_optimizer)
    assert torch.equal(flat(resumed), flat(model))
    assert optimizer.state[model[0].weight]["hessian_step"] == 3


def test_bf16_parameters_keep_fp32_state() -> None:
    model, optimizer = _run(SophiaH, {}, range(4), dtype=torch.bfloat16)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        assert optimizer.state[p]["exp_avg"].dtype == optimizer.state[p]["hessian"].dtype == torch.float32


@pytest.mark.parametrize("cls", [SophiaG, SophiaH])
@pytest.mark.parametrize(
    "name, value",
    [("lr", -1.0), ("rho", 0.0), ("rho", math.nan), ("eps", 0.0), ("weight_decay", -0.1), ("update_every", 0),
     ("seed", 1.5), ("betas", (0.9,)), ("state_bits", 4)],
)
def test_validation_names_the_argument(cls, name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        cls([torch.nn.Parameter(torch.zeros(2))], **{name: value})


def test_sophia_h_estimation_arguments_and_update_hessian_are_validated() -> None:
    for name, value in (("n_samples", 0), ("probe", "uniform")):
        with pytest.raises(ValueError, match=name):
            SophiaH([torch.nn.Parameter(torch.zeros(2))], **{name: value})
    optimizer = SophiaG([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="batch_size"):
        optimizer.update_hessian(batch_size=0, grads=[torch.ones(2)])
    with pytest.raises(ValueError, match="2 gradients for 1"):
        optimizer.update_hessian(batch_size=1, grads=[torch.ones(2), torch.ones(2)])
    with pytest.raises(RuntimeError, match="update_hessian"):
        optimizer.set_hessian_estimate({})
