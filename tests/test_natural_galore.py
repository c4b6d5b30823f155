"""NaturalGaLore numeric checks (docs/algorithms.md#natural-galore): the natural-gradient solve against the
dense inverse and the paper's Woodbury form, a hand-computed float64 step, a reference written from the
authors' equations over 12 steps with refreshes and a wrapping history, s = 0 is GaLore exactly, exact
resume across a refresh, the moment reset clears the history, validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lightning_optim
from lightning_optim.galore import GaLore
from lightning_optim.natural_galore import NaturalGaLore, natural_gradient

F64 = torch.float64


def _dense(history: torch.Tensor, current: int, lam: float) -> torch.Tensor:
    """(λI + Σ h hᵀ)⁻¹ g by a dense k × k solve: the definition, not the Woodbury form."""
    g = history.reshape(history.shape[0], -1).T  # k × s
    fisher = lam * torch.eye(g.shape[0], dtype=F64) + g @ g.T
    return torch.linalg.solve(fisher, g[:, current]).reshape(history.shape[1:])


def _woodbury(g_vec: torch.Tensor, columns: list[torch.Tensor], lam: float) -> torch.Tensor:
    """The paper's / authors' form: S = I + GᵀG/λ, z = S⁻¹ Gᵀ g, g̃ = g/λ − G z/λ² (float64)."""
    g = torch.stack(columns, dim=1)
    s = torch.eye(g.shape[1], dtype=F64) + g.T @ g / lam
    z = torch.linalg.solve(s, g.T @ g_vec)
    return g_vec / lam - g @ z / lam**2


# -- the solve ------------------------------------------------------------------------------------------------
def test_natural_gradient_is_the_damped_fisher_inverse() -> None:
    gen = torch.Generator().manual_seed(0)
    history = torch.randn(4, 3, 5, generator=gen, dtype=F64)
    history[3] = 0.0  # an empty slot changes nothing
    for lam in (1e-3, 0.5, 10.0):
        got = natural_gradient(history, 1, lam)
        torch.testing.assert_close(got, _dense(history, 1, lam), rtol=1e-9, atol=1e-12)
        columns = [h.reshape(-1) for h in history[:3]]
        torch.testing.assert_close(got.reshape(-1), _woodbury(history[1].reshape(-1), columns, lam), rtol=1e-7, atol=1e-9)


def test_natural_gradient_of_repeated_and_huge_gradients_is_finite() -> None:
    g = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    repeated = torch.stack([g, g, g])  # GᵀG of rank 1: λ alone keeps the system definite
    expected = g / (1e-3 + 3 * g.square().sum())  # (λI + 3 g gᵀ)⁻¹ g in closed form
    torch.testing.assert_close(natural_gradient(repeated, 0, 1e-3), expected, rtol=1e-6, atol=0)
    huge = repeated.clone()
    huge[1, 0, 1] = 1e20  # its square overflows fp32; the solve runs in float64
    assert torch.isfinite(natural_gradient(huge, 1, 1e-3)).all()
    bad = repeated.clone()
    bad[2, 0, 0] = math.nan
    torch.testing.assert_close(natural_gradient(bad, 0, 1e-3), g / 1e-3)  # the empty-history fallback g/λ


# -- steps ----------------------------------------------------------------------------------------------------
def test_hand_computed_first_two_steps() -> None:
    """W (3×2), rank 1, right: P = v1 (top right singular vector of G1, kept: T = 10), R_t = G_t v1;
    g̃1 = R1/(λ + |R1|²) (closed form), g̃2 = (λI + R1R1ᵀ + R2R2ᵀ)⁻¹ R2 (dense), then Adam and W −= ηα N v1ᵀ."""
    w0 = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0]], dtype=F64)
    g1 = torch.tensor([[3.0, 1.0], [1.0, 3.0], [0.0, 2.0]], dtype=F64)
    g2 = torch.tensor([[1.0, -1.0], [2.0, 0.5], [1.0, 1.0]], dtype=F64)
    lr, wd, alpha, eps, lam, (b1, b2) = 0.1, 0.5, 0.25, 0.05, 2.0, (0.9, 0.99)
    p = torch.nn.Parameter(w0.clone())
    opt = NaturalGaLore([p], lr=lr, betas=(b1, b2), weight_decay=wd, rank=1, scale=alpha, eps=eps, damping=lam,
                        natural_history=3, update_proj_gap=10)
    # v1 from the eigenproblem of G1ᵀG1 = [[10, 6], [6, 14]]: μ = 12 + √40, v1 ∝ (6, μ − 10)
    v1 = torch.tensor([6.0, 2 + math.sqrt(40)], dtype=F64)
    v1 = v1 / v1.norm()
    sign = None
    w, m, v = w0.clone(), torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    r1 = g1 @ v1
    for t, g in ((1, g1), (2, g2)):
        p.grad = g.clone()
        opt.step()
        if sign is None:
            sign = torch.sign(opt.state[p]["projector"][0, 0])
            torch.testing.assert_close(opt.state[p]["projector"][:, 0] * sign, v1, rtol=0, atol=1e-12)
        r = g @ v1
        if t == 1:
            nat = r / (lam + r.dot(r))
        else:
            nat = torch.linalg.solve(lam * torch.eye(3, dtype=F64) + torch.outer(r1, r1) + torch.outer(r, r), r)
        m = b1 * m + (1 - b1) * nat
        v = b2 * v + (1 - b2) * nat * nat
        n = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * alpha * torch.outer(n, v1)
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-12)  # P's sign cancels in P·Adam(Pᵀ…)
    torch.testing.assert_close(opt.state[p]["grad_history"][1, :, 0] * sign, g2 @ v1, rtol=0, atol=1e-12)


def _reference_run(w0, grads, *, rank, gap, scale, s, lam, proj_type, lr=0.02, betas=(0.9, 0.99), eps=1e-8, wd=0.1):
    """Natural GaLore from the authors' equations (subspace_adamw.py + galore_projector_tensor.py
    ``_natural_gradient_transform``, with GaLore's one-sided projector as the paper): a FIFO of the last s
    projected gradients, the current one appended before the Woodbury solve, kept across refreshes; Adam
    on g̃; in float64, with our documented deviations (ε on √v̂, decay before the update)."""
    w = w0.clone()
    m_rows, n_cols = w.shape
    side = {"std": "right" if m_rows >= n_cols else "left"}.get(proj_type, proj_type)
    r = min(rank, m_rows, n_cols)
    exp_avg = exp_avg_sq = proj = None
    fifo: list[torch.Tensor] = []
    for count, g in enumerate(grads):
        if count % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            proj = u[:, :r] if side == "left" else vh[:r]
        low = proj.T @ g if side == "left" else g @ proj.T
        if len(fifo) >= s:
            fifo.pop(0)
        fifo.append(low.reshape(-1))
        nat = _woodbury(low.reshape(-1), fifo, lam).reshape(low.shape)
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
        t = count + 1
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * nat
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * nat * nat
        n = (exp_avg / (1 - betas[0] ** t)) / ((exp_avg_sq / (1 - betas[1] ** t)).sqrt() + eps)
        back = proj @ n if side == "left" else n @ proj
        w = w * (1 - lr * wd) - lr * scale * back
    return w


def _grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=F64)
    return [base + 0.5 * torch.randn(shape, generator=gen, dtype=F64) for _ in range(steps)]


@pytest.mark.parametrize("shape, proj_type, foreach", [((6, 4), "std", False), ((3, 7), "std", True), ((6, 4), "left", False)])
def test_agrees_with_a_reference_from_the_authors_equations(shape, proj_type, foreach) -> None:
    """12 steps, refreshes at steps 1, 6, 11 (T = 5), a history of s = 3 that wraps four times; λ = 0.5
    so the Fisher term and the damping both matter (|R|² ~ λ … 10λ)."""
    grads = [0.3 * g for g in _grads(shape, 12)]
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    expected = _reference_run(w0, grads, rank=2, gap=5, scale=0.25, s=3, lam=0.5, proj_type=proj_type)
    p = torch.nn.Parameter(w0.clone())
    bias = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt = NaturalGaLore([p, bias], lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rank=2, update_proj_gap=5,
                        scale=0.25, proj_type=proj_type, natural_history=3, damping=0.5, foreach=foreach)
    for g in grads:
        p.grad, bias.grad = g.clone(), torch.ones(3, dtype=F64)
        opt.step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-11)
    assert (p.detach() - w0).abs().max() > 1e-2


def test_history_zero_is_galore_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(6, 4, generator=gen), torch.randn(3, 7, generator=gen), torch.randn(4, generator=gen)]
    ps, qs = [torch.nn.Parameter(w.clone()) for w in ws], [torch.nn.Parameter(w.clone()) for w in ws]
    kw = dict(lr=0.01, weight_decay=0.1, rank=2, update_proj_gap=3)
    ours, galore = NaturalGaLore(ps, natural_history=0, **kw), GaLore(qs, **kw)
    for _ in range(7):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        galore.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    assert "grad_history" not in ours.state[ps[0]]


def test_the_correction_changes_the_step() -> None:
    """A test that could fail: with s > 0 the trajectory differs from GaLore's."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, generator=gen)
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours, galore = NaturalGaLore([p], rank=2, natural_history=4, lr=0.01), GaLore([q], rank=2, lr=0.01)
    for _ in range(4):
        p.grad = torch.randn(6, 4, generator=gen)
        q.grad = p.grad.clone()
        ours.step()
        galore.step()
    assert (p - q).abs().max() > 1e-4


# -- state ----------------------------------------------------------------------------------------------------
def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("foreach", [False, True])
def test_resume_is_bit_exact_across_a_refresh(foreach: bool) -> None:
    kw = dict(lr=0.01, rank=2, update_proj_gap=3, weight_decay=0.1, natural_history=3, foreach=foreach)
    model = _model()
    opt = NaturalGaLore(model.parameters(), **kw)
    _train(model, opt, 2)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _train(model, opt, 6, start=2)  # refreshes at steps 4 and 7; the history wraps
    resumed = _model(seed=1)
    resumed.load_state_dict(saved[0])
    resumed_opt = NaturalGaLore(resumed.parameters(), **kw)
    resumed_opt.load_state_dict(saved[1])
    _train(resumed, resumed_opt, 6, start=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for s, r in zip(opt.state.values(), resumed_opt.state.values()):
        assert s.keys() == r.keys() and all(torch.equal(s[k], r[k]) for k in s)


def test_moment_reset_clears_the_history_and_keeps_the_projector() -> None:
    model = _model()
    opt = NaturalGaLore(model.parameters(), rank=2, natural_history=4)
    _train(model, opt, 3)
    adapter = lightning_optim.state_adapter(opt)
    state = opt.state[model[0].weight]
    assert state["grad_history"].shape == (4, 8, 2) and state["grad_history"].abs().sum() > 0
    kept = {k: state[k].clone() for k in ("projector", "step")}
    adapter.reset_(state, mask=torch.tensor(False))
    assert state["grad_history"].abs().sum() > 0
    for _, _, s in lightning_optim.state_adapters.iter_states(opt):
        adapter.reset_(s)
    for key in ("exp_avg", "exp_avg_sq", "grad_history"):
        assert torch.equal(state[key], torch.zeros_like(state[key]))
    assert all(torch.equal(state[k], v) for k, v in kept.items())
    _train(model, opt, 2, start=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_parameters_get_fp32_state() -> None:
    p = torch.nn.Parameter(torch.randn(6, 4).to(torch.bfloat16))
    opt = NaturalGaLore([p], rank=2, natural_history=2)
    p.grad = torch.randn(6, 4).to(torch.bfloat16)
    opt.step()
    state = opt.state[p]
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "projector", "grad_history")} == {torch.float32}
    assert p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all()


@pytest.mark.parametrize(
    "name, value",
    [("natural_history", -1), ("natural_history", 1.5), ("natural_history", True), ("damping", 0.0),
     ("damping", -1.0), ("damping", math.nan), ("damping", math.inf), ("rank", 0), ("scale", 0.0)],
)
def test_validation_names_the_argument(name, value) -> None:
    with pytest.raises(ValueError, match=name):
        NaturalGaLore([torch.nn.Parameter(torch.zeros(2, 2))], **{name: value})
