"""APOLLO / APOLLO-Mini numeric checks (docs/algorithms.md#apollo-and-apollo-mini): a hand-computed float64 step, the closed
form of the first channel-scaled step, agreement over 12 steps (two refreshes, the limiter active) with a
reference written from the authors' equations, seeded projections, exact resume across a refresh, the
moment reset, overflow safety, validation.

pytorch_optimizer 4.1.0's APOLLO is not used as a second opinion: it multiplies the scaling factor into the
*projected* gradient and projects the result back (a GaLore-like update, then times `scale` once more in
project_back), where the authors' apollo_torch/apollo.py (line 182) scales the raw full-rank gradient
p.grad; its random projection also comes from the global RNG (not reproducible per step). The authors are
right by their paper's Algorithm 1 (the update is G·s); the two cannot agree on any non-degenerate case."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lightning_optim
from lightning_optim.apollo import APOLLO, APOLLOMini, channel_norms
from lightning_optim.projection import gaussian_projection, projection_seed

F64 = torch.float64


def _grads(shape, steps, seed=0, growth=1.0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=F64)
    return [(base + 0.5 * torch.randn(shape, generator=gen, dtype=F64)) * growth**k for k in range(steps)]


# -- the equations -------------------------------------------------------------------------------------------
def test_hand_computed_first_step() -> None:
    """W 3×2 (right projection), rank 1: P = z/√1 with z the seeded N(0,1) draw, R = G P, M = 0.1 R,
    V = 0.001 R², Ñ = M/(√V + ε√0.001), s_i = |Ñ_i|/(|R_i| + 1e-8), W ← W(1 − ηλ) − η√α·(√0.001/0.1)·s_i G_i."""
    w0 = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0]], dtype=F64)
    g = torch.tensor([[3.0, 1.0], [1.0, 3.0], [0.0, 2.0]], dtype=F64)
    lr, wd, alpha, eps = 0.1, 0.5, 4.0, 1e-6
    p = torch.nn.Parameter(w0.clone())
    opt = APOLLO([p], lr=lr, weight_decay=wd, rank=1, scale=alpha, eps=eps)
    p.grad = g.clone()
    opt.step()
    z = gaussian_projection(2, 1, projection_seed(1, 0), device="cpu", dtype=F64)
    assert torch.equal(opt.state[p]["projector"], z)  # (n, r) = (2, 1), N(0, 1/r) with r = 1
    r = g @ z
    m, v = 0.1 * r, 0.001 * r * r
    n = m / (v.sqrt() + eps * math.sqrt(0.001))
    s = n.abs() / (r.abs() + 1e-8)
    expected = w0 * (1 - lr * wd) - lr * math.sqrt(alpha) * (math.sqrt(0.001) / 0.1) * s * g
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)
    assert opt.state[p]["limiter_norm"] == pytest.approx(float((s * g).norm()), rel=1e-12)


@pytest.mark.parametrize("shape", [(5, 3), (3, 5)])
def test_first_channel_step_closed_form(shape) -> None:
    """ε = 0 at t = 1: Ñ = (0.1/√0.001)·sign(R), so ‖Ñ_c‖ = (0.1/√0.001)·√r and the update of channel c is
    η√α√r·G_c/‖R_c‖, with R_c the c-th row of G P (right, m ≥ n) or column of Pᵀ G (left)."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(shape, generator=gen, dtype=F64) + 0.3
    w0 = torch.randn(shape, generator=gen, dtype=F64)
    p = torch.nn.Parameter(w0.clone())
    opt = APOLLO([p], lr=0.05, eps=0.0, rank=2, scale=2.0, scale_type="channel")
    p.grad = g.clone()
    opt.step()
    proj = opt.state[p]["projector"]
    if shape[0] >= shape[1]:
        r_norm = (g @ proj).norm(dim=1, keepdim=True)
    else:
        r_norm = (proj.T @ g).norm(dim=0, keepdim=True)
    expected = w0 - 0.05 * math.sqrt(2.0) * math.sqrt(2) * g / (r_norm + 1e-8)  # the authors' 1e-8 guard
    torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12)


def test_full_rank_svd_channel_scale_is_row_normalised_gradient() -> None:
    """proj='svd' at r = n: P is orthogonal, ‖(G P)_i‖ = ‖G_i‖, so the first step (ε = 0) is
    W − η√α√n·G_i/‖G_i‖ per row, whatever the singular vectors' signs."""
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(6, 3, generator=gen, dtype=F64)
    p = torch.nn.Parameter(torch.zeros(6, 3, dtype=F64))
    opt = APOLLO([p], lr=0.1, eps=0.0, rank=3, proj="svd")
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), -0.1 * math.sqrt(3) * g / (g.norm(dim=1, keepdim=True) + 1e-8), rtol=1e-10, atol=1e-12)


def test_mini_is_tensor_wise_rank_one_with_scale_128() -> None:
    """APOLLO-Mini's first step (ε = 0): ‖Ñ‖ = 0.1/√0.001·√numel(R), one factor for the whole matrix:
    W − η√128·√numel(R)·G/‖R‖_F with R = G P, P (n, 1)."""
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(4, 3, generator=gen, dtype=F64)
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=F64))
    opt = APOLLOMini([p], lr=0.01, eps=0.0)
    assert opt.defaults["rank"] == 1 and opt.defaults["scale"] == 128.0 and opt.defaults["scale_type"] == "tensor"
    p.grad = g.clone()
    opt.step()
    r = g @ opt.state[p]["projector"]
    assert r.shape == (4, 1)
    torch.testing.assert_close(p.detach(), -0.01 * math.sqrt(128) * 2.0 * g / (r.norm() + 1e-8), rtol=1e-10, atol=1e-12)


def _reference_run(w0, grads, *, rank, gap, scale, scale_type, index=0, lr=0.02, betas=(0.9, 0.99), eps=1e-6, wd=0.1):
    """APOLLO from the authors' apollo_torch/apollo.py in float64, with our documented deviations: the
    projection drawn from projection_seed(step, index) (theirs: a per-parameter seed chain), ε·√(1 − β2^t)
    in their denominator (ε on √V̂), decay before the update."""
    w = w0.clone()
    m_rows, n_cols = w.shape
    right = m_rows >= n_cols
    exp_avg = exp_avg_sq = proj = prev = None
    limited = 0
    for count, g in enumerate(grads):
        t = count + 1
        if count % gap == 0:
            rows = n_cols if right else m_rows
            proj = gaussian_projection(rows, rank, projection_seed(t, index), device="cpu", dtype=F64) / math.sqrt(rank)
        low = g @ proj if right else proj.T @ g
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * low
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * low * low
        bc1, bc2 = 1 - betas[0] ** t, 1 - betas[1] ** t
        n = exp_avg / (exp_avg_sq.sqrt() + eps * math.sqrt(bc2))
        if scale_type == "channel":
            dim = 1 if right else 0
            s = n.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + 1e-8)
        else:
            s = n.norm() / (low.norm() + 1e-8)
        scaled = g * s
        norm = scaled.norm()
        if prev is not None:
            limiter = max(float(norm / (prev + 1e-8)), 1.01) / 1.01
            limited += limiter > 1
            scaled, norm = scaled / limiter, norm / limiter
        prev = norm
        w = w * (1 - lr * wd) - lr * math.sqrt(scale) * math.sqrt(bc2) / bc1 * scaled
    return w, limited


@pytest.mark.parametrize("shape, scale_type", [((6, 4), "channel"), ((3, 7), "channel"), ((6, 4), "tensor")])
def test_agrees_with_a_reference_from_the_authors_equations(shape, scale_type) -> None:
    """12 steps, refreshes at steps 1, 6, 11 (T = 5), gradients growing 1.3x per step (the limiter acts)."""
    grads = _grads(shape, 12, growth=1.3)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    expected, limited = _reference_run(w0, grads, rank=2, gap=5, scale=2.0, scale_type=scale_type)
    assert limited >= 3  # the comparison covers the norm-growth limiter
    for foreach in (False, True):
        p = torch.nn.Parameter(w0.clone())
        opt = APOLLO([p], lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, rank=2, update_proj_gap=5,
                     scale=2.0, scale_type=scale_type, foreach=foreach)
        projectors = []
        for g in grads:
            p.grad = g.clone()
            opt.step()
            projectors.append(opt.state[p]["projector"].clone())
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)
        changed = [i for i in range(1, 12) if not torch.equal(projectors[i], projectors[i - 1])]
        assert changed == [5, 10]


def test_limiter_off_and_limiter_restart_after_a_zero_gradient() -> None:
    """norm_growth_limit=None: no limiting (the authors' disable_nl). After an all-zero gradient the limiter
    restarts (a stored norm of 0 is no history), so the next update is as large as a first step."""
    g = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=F64)
    runs = {}
    for limit in (1.01, None):
        p = torch.nn.Parameter(torch.zeros(3, 2, dtype=F64))
        opt = APOLLO([p], lr=0.1, rank=1, norm_growth_limit=limit)
        moves = []
        for grad in (g * 1e-3, g * 0.0, g * 10.0):
            before = p.detach().clone()
            p.grad = grad.clone()
            opt.step()
            moves.append(float((p.detach() - before).norm()))
        runs[limit] = moves
    assert runs[1.01][1] == 0.0 and runs[1.01][2] > 1e-3  # not ~1e-8 as with the authors' guard
    torch.testing.assert_close(torch.tensor(runs[1.01]), torch.tensor(runs[None]), rtol=1e-12, atol=0)
    # with history, the limited norm never grows by more than 1.01x per step (Ñ grows as the moments fill)
    p = torch.nn.Parameter(torch.zeros(3, 2, dtype=F64))
    opt = APOLLO([p], lr=0.1, rank=1)
    norms = []
    for k in range(6):
        p.grad = g * (1 + k) + 0.1 * k
        opt.step()
        norms.append(float(opt.state[p]["limiter_norm"]))
    ratios = [b / a for a, b in zip(norms, norms[1:])]
    assert max(ratios) <= 1.01 * (1 + 1e-9) and max(ratios) > 1.009  # the limiter acted


def test_unprojected_parameters_are_torch_adamw() -> None:
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(4, generator=gen), torch.randn(3, 2, generator=gen)]
    ps = [torch.nn.Parameter(w.clone()) for w in ws]
    qs = [torch.nn.Parameter(w.clone()) for w in ws]
    ours = APOLLO([{"params": ps[:1]}, {"params": ps[1:], "rank": None}], lr=0.01, weight_decay=0.1, foreach=False)
    ref = torch.optim.AdamW(qs, lr=0.01, weight_decay=0.1, eps=1e-6, foreach=False)
    for _ in range(4):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -- seeds, resume, reset ------------------------------------------------------------------------------------
def test_two_optimizers_draw_the_same_projection() -> None:
    """Seeded from (global step, parameter index): identical on every rank, different per parameter/step."""
    def build():
        torch.manual_seed(123)  # the global RNG must not matter
        ps = [torch.nn.Parameter(torch.zeros(6, 4)) for _ in range(2)]
        return ps, APOLLO(ps, rank=2, update_proj_gap=2)

    (pa, a), (pb, b) = build(), build()
    torch.manual_seed(999)
    history = []
    for k in range(3):
        for ps in (pa, pb):
            for p in ps:
                p.grad = torch.ones(6, 4) * (k + 1)
        a.step()
        b.step()
        assert torch.equal(a.state[pa[0]]["projector"], b.state[pb[0]]["projector"])
        history.append(a.state[pa[0]]["projector"].clone())
    assert not torch.equal(a.state[pa[0]]["projector"], a.state[pa[1]]["projector"])
    assert torch.equal(history[0], history[1]) and not torch.equal(history[1], history[2])  # refresh at step 3


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("cls", [APOLLO, APOLLOMini])
def test_resume_is_bit_exact_across_a_refresh(cls) -> None:
    model = _model()
    kw = dict(lr=0.01, rank=2, update_proj_gap=3, weight_decay=0.1)
    opt = cls(model.parameters(), **kw)
    _train(model, opt, 2)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _train(model, opt, 5, start=2)  # refreshes at steps 4 and 7
    resumed = _model(seed=1)
    resumed.load_state_dict(saved[0])
    resumed_opt = cls(resumed.parameters(), **kw)
    resumed_opt.load_state_dict(saved[1])
    _train(resumed, resumed_opt, 5, start=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for s, r in zip(opt.state.values(), resumed_opt.state.values()):
        assert s.keys() == r.keys() and all(torch.equal(s[k], r[k]) for k in s)


def test_state_adapter_reset_zeroes_the_projected_moments() -> None:
    model = _model()
    opt = APOLLO(model.parameters(), rank=2)
    _train(model, opt, 3)
    adapter = lightning_optim.state_adapter(opt)
    state = opt.state[model[0].weight]
    assert state["exp_avg"].shape == (8, 2)
    kept = {k: state[k].clone() for k in ("projector", "limiter_norm", "step")}
    for _, _, s in lightning_optim.state_adapters.iter_states(opt):
        adapter.reset_(s)
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert all(torch.equal(state[k], v) for k, v in kept.items())
    _train(model, opt, 2, start=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_state_is_fp32_and_huge_entries_stay_finite() -> None:
    p = torch.nn.Parameter(torch.randn(6, 4).to(torch.bfloat16))
    opt = APOLLO([p], rank=2)
    for big in (1.0, 1e20, 1e30):
        g = torch.randn(6, 4)
        g[1, 2] = big
        p.grad = g.to(torch.bfloat16)
        opt.step()
    assert {opt.state[p][k].dtype for k in ("exp_avg", "exp_avg_sq", "projector", "limiter_norm")} == {torch.float32}
    assert torch.isfinite(p.float()).all()


def test_channel_norms_are_exact_and_overflow_safe() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e20, 1e20]])
    torch.testing.assert_close(channel_norms(x, 1).squeeze(1), torch.tensor([5.0, 0.0, 1e20 * math.sqrt(2)]))
    torch.testing.assert_close(channel_norms(x, 0).squeeze(0), torch.tensor([1e20, 1e20]), rtol=1e-6, atol=0)
    assert math.isfinite(float(channel_norms(x, None))) and math.isinf(float(x.norm()))


# -- validation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, value",
    [("rank", 0), ("rank", 1.5), ("update_proj_gap", 0), ("scale", 0.0), ("scale", math.inf), ("scale", math.nan),
     ("scale_type", "row"), ("proj", "gaussian"), ("proj_type", "full"), ("norm_growth_limit", 0.5),
     ("norm_growth_limit", math.nan), ("lr", -1.0), ("eps", math.nan), ("weight_decay", math.inf), ("foreach", "yes")],
)
def test_validation_names_the_argument(name, value) -> None:
    for cls in (APOLLO, APOLLOMini):
        with pytest.raises(ValueError, match=name):
            cls([torch.nn.Parameter(torch.zeros(2, 2))], **{name: value})
