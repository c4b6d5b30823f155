"""Conda: numerics against the authors' equations (jie040109/Conda conda_torch/conda.py + projector.py)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import lightning_optim
from lightning_optim.conda import Conda

LR, BETAS, EPS, SCALE, GAP = 0.01, (0.9, 0.99), 1e-8, 0.25, 5


def _grads(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def reference_conda(w0, grads, *, lr, betas, eps, weight_decay, scale, gap):
    """The authors' Conda for one matrix, written from their equations, with torch's ε placement (ε added to
    √v̂, our documented deviation) and decay before the update (our convention): float64."""
    b1, b2 = betas
    w = w0.clone()
    m, n = w.shape
    exp_avg = torch.zeros_like(w)
    exp_avg_sq = torch.zeros_like(w)
    proj = None
    for k, g in enumerate(grads):  # k: the authors' 0-based state["step"] before its increment
        exp_avg = b1 * exp_avg + (1 - b1) * g
        if proj is None or k % gap == 0:  # SVD of the (updated) momentum, full rank
            u, _, vh = torch.linalg.svd(exp_avg, full_matrices=False)
            proj = vh.T if m >= n else u  # std: right (V, n x n) when m >= n, left (U, m x m) otherwise
        if m >= n:
            g_rot, m_rot = g @ proj, exp_avg @ proj
        else:
            g_rot, m_rot = proj.T @ g, proj.T @ exp_avg
        exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * g_rot * g_rot
        t = k + 1
        direction = (m_rot / (1 - b1**t)) / ((exp_avg_sq / (1 - b2**t)).sqrt() + eps)
        back = direction @ proj.T if m >= n else proj @ direction
        w = w * (1 - lr * weight_decay) - lr * scale * back
    return w


@pytest.mark.parametrize("shape", [(6, 4), (3, 5)])
def test_matches_reference_over_12_steps_with_refreshes(shape):
    """12 steps with T = 5: P is recomputed at steps 1, 6 and 11 (right side for 6x4, left for 3x5)."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = _grads(shape, 12)
    p = torch.nn.Parameter(w0.clone())
    opt = Conda([{"params": [p], "use_muon": True}], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1, scale=SCALE,
                update_proj_gap=GAP, foreach=False)
    projectors = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        projectors.append(opt.state[p]["projector"].clone())
    expected = reference_conda(w0, grads, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1, scale=SCALE, gap=GAP)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)
    changed = [i + 1 for i in range(1, 12) if not torch.equal(projectors[i], projectors[i - 1])]
    assert changed == [6, 11]
    k = min(shape)
    assert projectors[-1].shape == (k, k)
    torch.testing.assert_close(projectors[-1].T @ projectors[-1], torch.eye(k, dtype=torch.float64))


def test_first_step_closed_form():
    """Step 1 with ε = 0: M = (1-β1)G, P = V of G, G P = U S, so N/(1-β1) = sign(U S) and
    W1 = W0 − η·α·sign(U S)·Vᵀ (right side)."""
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = Conda([{"params": [p], "use_muon": True}], lr=0.1, eps=0.0, scale=0.5, foreach=False)
    p.grad = g.clone()
    opt.step()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    expected = w0 - 0.1 * 0.5 * torch.sign(u * s) @ vh
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * g)  # the first moment stays in W's basis


def test_adamw_rule_for_vectors_is_torch_adamw():
    gen = torch.Generator().manual_seed(3)
    b0 = torch.randn(4, generator=gen)
    ours, ref = torch.nn.Parameter(b0.clone()), torch.nn.Parameter(b0.clone())
    opt = Conda([ours], adamw_lr=1e-2, adamw_betas=(0.9, 0.99), adamw_weight_decay=0.1)
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for i in range(4):
        g = torch.randn(4, generator=gen)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach())


def _run(params, steps, **kw):
    opt = Conda([{"params": params, "use_muon": True}], update_proj_gap=3, **kw)
    for i in range(steps):
        for q in params:
            q.grad = torch.sin(3 * q.detach().float() + i).to(q.dtype)
        opt.step()
    return opt


def test_foreach_equals_per_parameter_bitwise():
    """Same-shaped matrices stacked, a conv kernel (viewed 2-D) and a 3-D expert weight (one P per expert)."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(4, 3), (4, 3), (2, 5), (3, 2, 4), (4, 2, 2, 2)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for foreach in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = _run(params, 7, foreach=foreach, weight_decay=0.1)
        runs.append((params, opt))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    assert runs[0][1].state[runs[0][0][3]]["projector"].shape == (3, 2, 2)
    assert runs[0][1].state[runs[0][0][4]]["projector"].shape == (4, 4)  # (4, 8) view: left, m x m


def test_bf16_params_get_fp32_state_and_math():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=gen)
    p16, p32 = torch.nn.Parameter(x.to(torch.bfloat16)), torch.nn.Parameter(x.to(torch.bfloat16).float())
    opt16, opt32 = _run([p16], 4), _run([p32], 4)
    state = opt16.state[p16]
    assert p16.dtype == torch.bfloat16
    assert all(state[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "projector"))
    torch.testing.assert_close(p16.float(), p32.detach(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(state["exp_avg_sq"], opt32.state[p32]["exp_avg_sq"], rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_is_bit_exact_across_a_refresh(foreach):
    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(5, 3, generator=gen), torch.randn(3, generator=gen)]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = Conda(params, update_proj_gap=3, foreach=foreach)

    def steps(ps, o, rng):
        for i in rng:
            for q in ps:
                q.grad = torch.cos(2 * q.detach() + i)
            o.step()

    steps(params, opt, range(2))
    saved = copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in params]))
    resumed = [torch.nn.Parameter(w.clone()) for w in saved[1]]
    opt2 = Conda(resumed, update_proj_gap=3, foreach=foreach)
    opt2.load_state_dict(saved[0])
    steps(params, opt, range(2, 6))  # a refresh at step 4
    steps(resumed, opt2, range(2, 6))
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    assert torch.equal(opt.state[params[0]]["projector"], opt2.state[resumed[0]]["projector"])


def test_svd_failure_falls_back_with_a_warning(monkeypatch):
    """A failing SVD at the first refresh: a RuntimeWarning, a seeded orthonormal P, finite weights; the same
    P on a second run (deterministic, as on every DDP rank)."""

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("no convergence")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    projectors = []
    for _ in range(2):
        p = torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(7)))
        opt = Conda([p])
        p.grad = torch.ones(5, 3)
        with pytest.warns(RuntimeWarning, match="SVD"):
            opt.step()
        assert torch.isfinite(p).all()
        projectors.append(opt.state[p]["projector"])
    torch.testing.assert_close(projectors[0].T @ projectors[0], torch.eye(3), atol=1e-5, rtol=0)
    assert torch.equal(projectors[0], projectors[1])


def test_non_finite_gradient_keeps_the_projector_finite():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Conda([p], update_proj_gap=1, foreach=False)
    p.grad = torch.ones(4, 3)
    opt.step()
    g = torch.ones(4, 3)
    g[0, 0] = math.nan
    p.grad = g
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert torch.isfinite(opt.state[p]["projector"]).all()


def test_agrees_with_pytorch_optimizer_until_its_first_refresh():
    """pytorch_optimizer 4.1.0's Conda, mapped: same lr/betas/scale, weight_decay 0 (it decays after the
    update), ε = 1e-12 (it adds ε to √v, we to √v̂), update_proj_gap larger than the run. Known disagreement
    (not tested): it recomputes P when its 1-based step is a multiple of T (steps T, 2T, ...), the authors
    (and we) at steps 1, T+1, 2T+1 (their 0-based `state["step"] % T`); the authors' code is followed."""
    po = pytest.importorskip("pytorch_optimizer")
    gen = torch.Generator().manual_seed(8)
    w0 = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = Conda([{"params": [ours], "use_muon": True}], lr=0.01, betas=(0.9, 0.99), eps=1e-12, scale=0.25,
                update_proj_gap=100)
    ref = po.Conda([theirs], lr=0.01, betas=(0.9, 0.99), eps=1e-12, scale=0.25, update_proj_gap=100, foreach=False)
    for g in _grads((6, 4), 8, seed=9):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-7, atol=1e-9)


def test_validation_names_the_argument():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    for name, value in [("update_proj_gap", 0), ("scale", -1.0), ("betas", (0.9, 1.0)), ("eps", math.nan),
                        ("adamw_lr", math.inf), ("lr", -1.0)]:
        with pytest.raises(ValueError, match=name.split("_")[0] if name == "betas" else name):
            Conda(p, **{name: value})


def test_registered_with_its_capabilities():
    info = lightning_optim.registry.get("conda")
    assert info.cls is Conda and info.family == "matrix" and info.foreach and not info.compile
    assert info.first_moment == "exp_avg" and not info.second_moment_like_grad_sq
