"""FRUGAL numeric checks (docs/algorithms.md#frugal): a hand-computed float64 step, density 1 = AdamW and
density 0 = signSGD, agreement over 12 steps (two refreshes) with references written from the authors'
equations (block mode and SVD mode), the block orders, seeded subspaces, exact resume across a refresh, the
moment reset, overflow safety, validation. pytorch_optimizer 4.1.0 has no FRUGAL (no second opinion)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lightning_optim
from lightning_optim.frugal import FRUGAL

F64 = torch.float64


def _grads(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=F64) + 0.3 for s in shapes] for _ in range(steps)]


def test_hand_computed_svd_step() -> None:
    """W 3×2, svd, density 0.5 → right projection of rank round(0.5·2) = 1: P = v1, R = G v1, N̂ = R/(|R| + ε),
    W ← W(1 − ηλ) − η N̂ v1ᵀ − η sign(G − R v1ᵀ)."""
    w0 = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0]], dtype=F64)
    g = torch.tensor([[3.0, 1.0], [1.0, 3.0], [0.0, 2.0]], dtype=F64)
    lr, wd, eps = 0.1, 0.5, 1e-8
    p = torch.nn.Parameter(w0.clone())
    opt = FRUGAL([p], lr=lr, weight_decay=wd, eps=eps, density=0.5, proj_type="svd")
    p.grad = g.clone()
    opt.step()
    lam = 12 + math.sqrt(40)  # GᵀG = [[10, 6], [6, 14]]
    v1 = torch.tensor([6.0, lam - 10], dtype=F64)
    v1 = v1 / v1.norm()
    r = g @ v1
    n = r / (r.abs() + eps)
    expected = w0 * (1 - lr * wd) - lr * torch.outer(n, v1) - lr * torch.sign(g - torch.outer(r, v1))
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("proj_type", ["block", "columns"])
def test_density_one_is_adamw(proj_type) -> None:
    """ρ = 1: every matrix (block) or every column (columns) is state-full: torch AdamW (ε on √v̂, decay
    before the update, as the authors), until the refresh at step T + 1 restarts the moments."""
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(2, 4, generator=gen, dtype=F64), torch.randn(4, generator=gen, dtype=F64)]
    ps = [torch.nn.Parameter(w.clone()) for w in ws]
    qs = [torch.nn.Parameter(w.clone()) for w in ws]
    ours = FRUGAL(ps, lr=0.01, weight_decay=0.1, density=1.0, proj_type=proj_type, update_gap=5)
    ref = torch.optim.AdamW(qs, lr=0.01, weight_decay=0.1, eps=1e-8)
    for k in range(5):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    # step 6 = T + 1: the matrices' Adam restarts (t = 1), the vector's AdamW carries on
    fresh = torch.optim.AdamW([torch.nn.Parameter(ps[0].detach().clone())], lr=0.01, weight_decay=0.1, eps=1e-8)
    g = torch.randn(4, 3, generator=gen, dtype=F64)
    fresh.param_groups[0]["params"][0].grad = g.clone()
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen, dtype=F64) if p is not ps[0] else g.clone()
    ours.step()
    fresh.step()
    torch.testing.assert_close(ps[0], fresh.param_groups[0]["params"][0], rtol=1e-12, atol=1e-14)
    assert ours.state[ps[0]]["step"].item() == 1.0 and ours.state[ps[2]]["step"].item() == 6.0


@pytest.mark.parametrize("proj_type", ["block", "svd", "random", "columns"])
def test_density_zero_is_sign_sgd(proj_type) -> None:
    """ρ = 0: no state-full part, W ← W(1 − ηλ) − η·scale_p·scale_f·sign(G), and no moments are kept."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(5, 3, generator=gen, dtype=F64)
    p = torch.nn.Parameter(w0.clone())
    opt = FRUGAL([p], lr=0.02, weight_decay=0.1, density=0.0, proj_type=proj_type, proj_params_lr_scale=0.5, inactive_lr_scale=0.3)
    w = w0.clone()
    for _ in range(3):
        g = torch.randn(5, 3, generator=gen, dtype=F64)
        p.grad = g.clone()
        opt.step()
        w = w * (1 - 0.02 * 0.1) - 0.02 * 0.5 * 0.3 * torch.sign(g)
    torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-14)
    assert "exp_avg" not in opt.state[p]


def _adam(state, g, t, betas, eps):
    state["m"] = betas[0] * state["m"] + (1 - betas[0]) * g
    state["v"] = betas[1] * state["v"] + (1 - betas[1]) * g * g
    return (state["m"] / (1 - betas[0] ** t)) / ((state["v"] / (1 - betas[1] ** t)).sqrt() + eps)


def _reference(ws, grads, *, mode, density, gap, lr=0.02, betas=(0.9, 0.99), eps=1e-8, wd=0.1):
    """FRUGAL from the authors' frugal/proj_optimizer_templates.py + adamw.py in float64: decay first; at
    every refresh (0-based count a multiple of T) the states restart; block mode in descending order
    (next_block_start from K − 1, moving down by round(ρK)); svd mode: P = top-r right/left singular
    vectors of the refresh step's G, r = round(ρ·dim), Adam on R, signSGD on G − back(R)."""
    ws = [w.clone() for w in ws]
    states, count = [None] * len(ws), len(ws)
    n_active = round(count * density)
    next_start = count - 1
    active = set()
    for c, gs in enumerate(grads):
        if c % gap == 0:
            if mode == "block":
                active = {(next_start - j) % count for j in range(n_active)}
                next_start = (next_start - n_active) % count
            for i, (w, g) in enumerate(zip(ws, gs)):
                if mode == "block":
                    states[i] = {"t": 0, "m": torch.zeros_like(w), "v": torch.zeros_like(w)} if i in active else {"t": 0}
                else:
                    m_rows, n_cols = w.shape
                    right = m_rows >= n_cols
                    r = round((n_cols if right else m_rows) * density)
                    u, _, vh = torch.linalg.svd(g, full_matrices=False)
                    proj = vh[:r] if right else u[:, :r]
                    low = g @ proj.T if right else proj.T @ g
                    states[i] = {"t": 0, "m": torch.zeros_like(low), "v": torch.zeros_like(low), "P": proj, "right": right}
        for i, (w, g) in enumerate(zip(ws, gs)):
            st = states[i]
            st["t"] += 1
            w = w * (1 - lr * wd)
            if mode == "block":
                w = w - lr * _adam(st, g, st["t"], betas, eps) if i in active else w - lr * torch.sign(g)
            else:
                proj, right = st["P"], st["right"]
                low = g @ proj.T if right else proj.T @ g
                n = _adam(st, low, st["t"], betas, eps)
                back = (lambda x: x @ proj) if right else (lambda x: proj @ x)
                w = w - lr * back(n) - lr * torch.sign(g - back(low))
            ws[i] = w
    return ws


@pytest.mark.parametrize("mode, density", [("block", 1 / 3), ("block", 2 / 3), ("svd", 0.5)])
def test_agrees_with_a_reference_from_the_authors_equations(mode, density) -> None:
    """12 steps, refreshes at 1, 6, 11 (T = 5): the active block rotates / the projector changes, Adam restarts."""
    shapes = [(6, 4), (3, 7), (5, 5)]
    gen = torch.Generator().manual_seed(7)
    ws = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = _grads(shapes, 12)
    expected = _reference(ws, grads, mode=mode, density=density, gap=5)
    for foreach in (False, True):
        ps = [torch.nn.Parameter(w.clone()) for w in ws]
        opt = FRUGAL(ps, lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, density=density, update_gap=5,
                     proj_type=mode, foreach=foreach)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        for p, e in zip(ps, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_block_orders() -> None:
    """The authors' loops: descending starts at K − 1 and moves down, ascending starts at 0, cyclically."""
    assert [sorted(FRUGAL.active_blocks(5, 0.4, "descending", k, 0)) for k in range(3)] == [[3, 4], [1, 2], [0, 4]]
    assert [sorted(FRUGAL.active_blocks(5, 0.4, "ascending", k, 0)) for k in range(3)] == [[0, 1], [2, 3], [0, 4]]
    assert FRUGAL.active_blocks(5, 0.4, "random", 0, 3) == FRUGAL.active_blocks(5, 0.4, "random", 0, 3)
    assert len(FRUGAL.active_blocks(5, 0.4, "random", 0, 3)) == 2 and FRUGAL.active_blocks(4, 0.1, "descending", 0, 0) == set()


@pytest.mark.parametrize("proj_type", ["random", "columns", "block"])
def test_two_optimizers_draw_the_same_subspace(proj_type) -> None:
    def build():
        torch.manual_seed(321)  # the global RNG must not matter
        ps = [torch.nn.Parameter(torch.zeros(6, 8)) for _ in range(3)]
        return ps, FRUGAL(ps, density=0.5, proj_type=proj_type, block_order="random", update_gap=2)

    (pa, a), (pb, b) = build(), build()
    torch.manual_seed(999)
    key = {"random": "projector", "columns": "indices", "block": "exp_avg"}[proj_type]
    seen = []
    for k in range(3):
        for ps in (pa, pb):
            for p in ps:
                p.grad = torch.ones(6, 8) * (k + 1)
        a.step()
        b.step()
        layout_a = [key in a.state[p] and a.state[p][key].clone() for p in pa]
        layout_b = [key in b.state[p] and b.state[p][key].clone() for p in pb]
        assert all((x is False and y is False) or torch.equal(x, y) for x, y in zip(layout_a, layout_b))
        seen.append(layout_a)
    if proj_type != "block":
        assert not torch.equal(seen[0][0], seen[0][1])  # per parameter
        assert torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[1][0], seen[2][0])  # refresh at step 3


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


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


@pytest.mark.parametrize("proj_type, reset", [("block", True), ("columns", True), ("random", False), ("svd", True)])
def test_resume_is_bit_exact_across_a_refresh(proj_type, reset) -> None:
    model = _model()
    kw = dict(lr=0.01, density=0.5, update_gap=3, weight_decay=0.1, proj_type=proj_type, reset_statistics=reset)
    opt = FRUGAL(model.parameters(), **kw)
    _train(model, opt, 2)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _train(model, opt, 5, start=2)  # refreshes at steps 4 and 7
    resumed = _model(seed=1)
    resumed.load_state_dict(saved[0])
    resumed_opt = FRUGAL(resumed.parameters(), **kw)
    resumed_opt.load_state_dict(saved[1])
    _train(resumed, resumed_opt, 5, start=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for s, r in zip(opt.state.values(), resumed_opt.state.values()):
        assert s.keys() == r.keys() and all(torch.equal(s[k], r[k]) for k in s)


def test_reset_statistics_false_keeps_the_moments_across_a_refresh() -> None:
    p = torch.nn.Parameter(torch.zeros(6, 4, dtype=F64))
    opt = FRUGAL([p], density=0.5, proj_type="random", update_gap=2, reset_statistics=False)
    for k in range(3):
        p.grad = torch.full((6, 4), 1.0 + k, dtype=F64)
        opt.step()
    assert opt.state[p]["step"].item() == 3.0 and opt.state[p]["exp_avg"].abs().sum() > 0
    opt2 = FRUGAL([q := torch.nn.Parameter(torch.zeros(6, 4, dtype=F64))], density=0.5, proj_type="random", update_gap=2)
    for k in range(3):
        q.grad = torch.full((6, 4), 1.0 + k, dtype=F64)
        opt2.step()
    assert opt2.state[q]["step"].item() == 1.0


def test_state_adapter_reset_zeroes_the_moments() -> None:
    model = _model()
    opt = FRUGAL(model.parameters(), density=0.5, proj_type="svd")
    _train(model, opt, 3)
    adapter = lightning_optim.state_adapter(opt)
    state = opt.state[model[0].weight]
    assert state["exp_avg"].shape == (8, 3)  # right projection of an 8×6 matrix, r = round(0.5·6)
    kept = {k: state[k].clone() for k in ("projector", "step", "subspace")}
    for _, _, s in lightning_optim.state_adapters.iter_states(opt):
        adapter.reset_(s)
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert all(torch.equal(state[k], v) for k, v in kept.items())
    _train(model, opt, 2, start=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("proj_type", ["block", "svd", "random", "columns"])
def test_huge_finite_gradients_keep_bf16_weights_finite(proj_type) -> None:
    ps = [torch.nn.Parameter(torch.randn(6, 4).to(torch.bfloat16)) for _ in range(2)]
    opt = FRUGAL(ps, density=0.5, proj_type=proj_type, update_gap=2)
    for big in (1.0, 1e20, 1e30, 1.0):
        for p in ps:
            g = torch.randn(6, 4)
            g[1, 2] = big
            p.grad = g.to(torch.bfloat16)
        opt.step()
    for p in ps:
        assert torch.isfinite(p.float()).all()
        assert all(v.dtype in (torch.float32, torch.int64) for v in opt.state[p].values())


@pytest.mark.parametrize(
    "name, value",
    [("density", 1.5), ("density", -0.1), ("density", math.nan), ("update_gap", 0), ("proj_type", "randperm"),
     ("block_order", "mirror"), ("proj_side", "full"), ("reset_statistics", 1), ("inactive_update_rule", "adam"),
     ("proj_params_lr_scale", -1.0), ("inactive_lr_scale", math.inf), ("lr", -1.0), ("eps", math.nan),
     ("betas", (0.9, 1.0)), ("weight_decay", math.inf), ("foreach", "yes")],
)
def test_validation_names_the_argument(name, value) -> None:
    with pytest.raises(ValueError, match=name.split("s")[0] if name == "betas" else name):
        FRUGAL([torch.nn.Parameter(torch.zeros(2, 2))], **{name: value})


def test_density_none_group_is_adamw() -> None:
    p = torch.nn.Parameter(torch.ones(3, 2))
    q = torch.nn.Parameter(torch.ones(3, 2))
    ours = FRUGAL([{"params": [p], "density": None}], lr=0.01, weight_decay=0.1, foreach=False)
    ref = torch.optim.AdamW([q], lr=0.01, weight_decay=0.1, eps=1e-8, foreach=False)
    for k in range(3):
        p.grad = torch.randn(3, 2, generator=torch.Generator().manual_seed(k))
        q.grad = p.grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
