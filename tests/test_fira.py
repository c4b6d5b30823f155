"""Fira numeric checks (docs/algorithms.md#fira): a hand-computed float64 step, a reference written from
the authors' fira_adamw.py over 12 steps with refreshes and the limiter engaged, zero residual at full
rank (scale 1: GaLore), the limiter on a norm jump, exact resume across a refresh, the moment reset keeps
the limiter's norm, overflow-free norms, validation, and pytorch_optimizer as a second opinion."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lightning_optim
from lightning_optim.fira import Fira, scaled_norm
from lightning_optim.galore import GaLore

F64 = torch.float64


def test_hand_computed_first_step() -> None:
    """W (3×2), rank 1, right: P = v1, R = G v1 (3×1); t = 1: m = (1−β1)R, v = (1−β2)R², the authors'
    N = m/(√v + ε√(1−β2)) (= ours/√(1−β2)), φ_i = |N_i|/(|R_i| + 1e-8) per row, S = φ ⊙ (G − α R v1ᵀ) (no
    limiter at the first step), W ← W(1 − ηλ) − η c_1 (α N v1ᵀ + S), c_1 = √(1−β2)/(1−β1)."""
    w0 = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0]], dtype=F64)
    g = torch.tensor([[3.0, 1.0], [1.0, 3.0], [0.0, 2.0]], dtype=F64)
    lr, wd, alpha, eps, (b1, b2) = 0.1, 0.5, 0.25, 0.05, (0.9, 0.99)
    p = torch.nn.Parameter(w0.clone())
    opt = Fira([p], lr=lr, betas=(b1, b2), weight_decay=wd, rank=1, scale=alpha, eps=eps)
    p.grad = g.clone()
    opt.step()
    v1 = torch.tensor([6.0, 2 + math.sqrt(40)], dtype=F64)  # top eigenvector of GᵀG = [[10, 6], [6, 14]]
    v1 = v1 / v1.norm()
    r = g @ v1
    n = (1 - b1) * r / (math.sqrt(1 - b2) * r.abs() + eps * math.sqrt(1 - b2))
    phi = n.abs() / (r.abs() + 1e-8)
    s = phi[:, None] * (g - alpha * torch.outer(r, v1))
    c1 = math.sqrt(1 - b2) / (1 - b1)
    expected = w0 * (1 - lr * wd) - lr * c1 * (alpha * torch.outer(n, v1) + s)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["residual_norm"], s.norm(), rtol=1e-14, atol=0)


def _reference_run(w0, grads, *, rank, gap, scale, gamma, proj_type, lr=0.02, betas=(0.9, 0.99), eps=1e-8, wd=0.1):
    """Fira from the authors' optimizer_torch/fira_adamw.py + gradient_projection.py, in float64: SVD refresh
    when the 0-based count is a multiple of T, moments kept; N = m/(√v + ε'), step size η√(1−β2^t)/(1−β1^t);
    φ = ‖N‖/(‖R‖ + 1e-8) along dim 0 if R has fewer rows than columns, else dim 1; residual G − α·back(R);
    the limiter max(‖S‖/(s + 1e-8), γ)/γ from the second update on. Our documented deviations: ε' = ε√(1−β2^t)
    (ε on √v̂) and the decay before the update."""
    w = w0.clone()
    m_rows, n_cols = w.shape
    side = {"std": "right" if m_rows >= n_cols else "left"}.get(proj_type, proj_type)
    r = min(rank, m_rows, n_cols)
    exp_avg = exp_avg_sq = proj = previous = None
    limited = 0
    for count, g in enumerate(grads):
        if count % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            proj = u[:, :r] if side == "left" else vh[:r]
        low = proj.T @ g if side == "left" else g @ proj.T
        back = (lambda x: proj @ x) if side == "left" else (lambda x: x @ proj)
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
        t = count + 1
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * low
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * low * low
        n = exp_avg / (exp_avg_sq.sqrt() + eps * math.sqrt(1 - betas[1] ** t))
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        dim = 0 if n.shape[0] < n.shape[1] else 1
        phi = n.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + 1e-8)
        s = (g - scale * back(low)) * phi
        if previous is None:
            previous = s.norm()
        else:
            limiter = max(float(s.norm() / (previous + 1e-8)), gamma) / gamma
            limited += limiter > 1
            s = s / limiter
            previous = s.norm() * 1.0
        w = w * (1 - lr * wd) - step_size * (scale * back(n) + s)
    return w, limited


def _grads(shape, steps, seed=0):
    """Gradients whose size grows 20% a step (so the 1.01 limiter engages) around a fixed direction."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=F64)
    return [1.2**i * (base + 0.5 * torch.randn(shape, generator=gen, dtype=F64)) for i in range(steps)]


@pytest.mark.parametrize("shape, proj_type, foreach", [((6, 4), "std", False), ((3, 7), "std", True), ((6, 4), "left", False)])
def test_agrees_with_a_reference_from_the_authors_code(shape, proj_type, foreach) -> None:
    """12 steps, refreshes at steps 1, 6, 11 (T = 5), α = 0.25, the limiter engaged on most steps."""
    grads = _grads(shape, 12)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    expected, limited = _reference_run(w0, grads, rank=2, gap=5, scale=0.25, gamma=1.01, proj_type=proj_type)
    assert limited >= 5  # the reference exercises the limiter
    p = torch.nn.Parameter(w0.clone())
    bias = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt = Fira([p, bias], lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rank=2, update_proj_gap=5,
               scale=0.25, proj_type=proj_type, foreach=foreach)
    for g in grads:
        p.grad, bias.grad = g.clone(), torch.ones(3, dtype=F64)
        opt.step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)


def test_full_rank_projection_has_zero_residual_and_is_galore() -> None:
    """r = min(m, n) and α = 1: G − P Pᵀ G = 0 (to rounding), so S = 0 and Fira = GaLore."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=gen, dtype=F64)
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    kw = dict(lr=0.05, weight_decay=0.1, rank=3, scale=1.0, update_proj_gap=2)
    fira, galore = Fira([p], **kw), GaLore([q], **kw)
    for _ in range(5):
        p.grad = torch.randn(5, 3, generator=gen, dtype=F64)
        q.grad = p.grad.clone()
        fira.step()
        galore.step()
        assert fira.state[p]["residual_norm"] < 1e-12
    torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    # with the authors' default α = 0.25 the residual keeps (1 − α) of the in-subspace gradient: not zero
    x = torch.nn.Parameter(w.clone())
    quirk = Fira([x], **{**kw, "scale": 0.25})
    x.grad = torch.randn(5, 3, generator=gen, dtype=F64)
    quirk.step()
    assert quirk.state[x]["residual_norm"] > 0.1


def test_limiter_engages_on_a_norm_jump() -> None:
    """Step 2's gradient is 1000× step 1's outside the subspace: its residual is cut to γ·(s1 + 1e-8)."""
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=F64))
    opt = Fira([p], rank=1, scale=1.0, gamma=1.01, lr=0.1, update_proj_gap=100)
    # orthogonal columns: the rank-1 right projector is exactly ±e1, so the jump leaves R unchanged
    # (and every row of R = G e1 is nonzero, so no row's φ is 0)
    g = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.5], [1.0, -1.0, 0.5], [1.0, 0.0, -1.0]], dtype=F64)
    p.grad = g.clone()
    opt.step()
    s1 = opt.state[p]["residual_norm"].clone()
    assert s1 > 0
    jump = g.clone()
    jump[:, 1:] *= 1000.0  # the columns the projector does not keep: the residual alone jumps
    before = p.detach().clone()
    p.grad = jump
    opt.step()
    torch.testing.assert_close(opt.state[p]["residual_norm"], 1.01 * (s1 + 1e-8), rtol=1e-12, atol=0)
    # P = ±e1 and α = 1: the residual lives in columns 2-3 only, so the step there is exactly η c_2 S_lim
    b1, b2 = 0.9, 0.999
    c2 = math.sqrt(1 - b2**2) / (1 - b1**2)
    moved = (p.detach() - before)[:, 1:].norm()
    torch.testing.assert_close(moved, 0.1 * c2 * 1.01 * (s1 + 1e-8), rtol=1e-10, atol=0)
    # without the limiter (γ huge) the same jump goes through
    q = torch.nn.Parameter(torch.zeros(4, 3, dtype=F64))
    free = Fira([q], rank=1, scale=1.0, gamma=1e12, lr=0.1, update_proj_gap=100)
    q.grad = g.clone()
    free.step()
    q.grad = jump.clone()
    free.step()
    assert free.state[q]["residual_norm"] > 100 * s1


def test_scaled_norm_does_not_overflow() -> None:
    x = torch.tensor([[1e20, 3e20], [0.0, 4e20]])
    torch.testing.assert_close(scaled_norm(x), torch.tensor(math.sqrt(26) * 1e20), rtol=1e-6, atol=0)
    torch.testing.assert_close(scaled_norm(x, 0), torch.tensor([[1e20, 5e20]]), rtol=1e-6, atol=0)
    assert torch.isinf(torch.linalg.vector_norm(x))  # what the plain fp32 norm gives
    assert scaled_norm(torch.zeros(2, 2)) == 0


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
    kw = dict(lr=0.01, rank=2, update_proj_gap=3, weight_decay=0.1, foreach=foreach)
    model = _model()
    opt = Fira(model.parameters(), **kw)
    _train(model, opt, 2)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _train(model, opt, 6, start=2)  # refreshes at steps 4 and 7
    resumed = _model(seed=1)
    resumed.load_state_dict(saved[0])
    resumed_opt = Fira(resumed.parameters(), **kw)
    resumed_opt.load_state_dict(saved[1])
    _train(resumed, resumed_opt, 6, start=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for s, r in zip(opt.state.values(), resumed_opt.state.values()):
        assert s.keys() == r.keys() and all(torch.equal(s[k], r[k]) for k in s)


def test_moment_reset_zeroes_the_moments_and_keeps_the_limiter_norm() -> None:
    model = _model()
    opt = Fira(model.parameters(), rank=2)
    _train(model, opt, 3)
    adapter = lightning_optim.state_adapter(opt)
    state = opt.state[model[0].weight]
    kept = {k: state[k].clone() for k in ("projector", "step", "residual_norm")}
    assert kept["residual_norm"] > 0
    for _, _, s in lightning_optim.state_adapters.iter_states(opt):
        adapter.reset_(s)
    assert torch.equal(state["exp_avg"], torch.zeros(8, 2)) and torch.equal(state["exp_avg_sq"], torch.zeros(8, 2))
    assert all(torch.equal(state[k], v) for k, v in kept.items())
    _train(model, opt, 1, start=3)  # the restarted moments' φ jump is limited to γ times the kept norm
    assert state["residual_norm"] <= 1.01 * (kept["residual_norm"] + 1e-8) * (1 + 1e-6)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "name, value", [("gamma", 0.5), ("gamma", math.nan), ("gamma", math.inf), ("rank", 0), ("scale", -1.0), ("proj_type", "full")]
)
def test_validation_names_the_argument(name, value) -> None:
    with pytest.raises(ValueError, match=name):
        Fira([torch.nn.Parameter(torch.zeros(2, 2))], **{name: value})


def test_agrees_with_pytorch_optimizer_between_refreshes() -> None:
    """pytorch_optimizer 4.1.0 Fira, mapped: rank/update_proj_gap/scale group keys, projection_type = our
    proj_type. Neutralised differences: ε on √v (the authors' form; ε = 1e-30 makes both forms equal), decay
    after the update (weight_decay 0), refresh at 1-based steps T, 2T (update_proj_gap 100 > steps: only
    the first SVD). It takes the SVD of fp64 gradients in fp32, so agreement is to fp32 precision. It
    agrees with the authors on φ's axis (by side, as ours), on the α in the residual and on the limiter."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(6, 4, generator=gen, dtype=F64), torch.randn(3, 7, generator=gen, dtype=F64), torch.randn(4, generator=gen, dtype=F64)]
    ps = [torch.nn.Parameter(w.clone()) for w in ws]
    qs = [torch.nn.Parameter(w.clone()) for w in ws]
    group = dict(rank=2, update_proj_gap=100, scale=0.25)
    ours = Fira([{"params": ps, **group, "proj_type": "std"}], lr=0.01, eps=1e-30)
    theirs = pytorch_optimizer.Fira([{"params": qs, **group, "projection_type": "std"}], lr=0.01, eps=1e-30)
    for i in range(6):
        for p, q in zip(ps, qs):
            p.grad = 1.3**i * (torch.randn(p.shape, generator=gen, dtype=F64) + 1.0)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q, w in zip(ps, qs, ws):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert (p - w).abs().max() > 1e-3
