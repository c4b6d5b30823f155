"""FISMO: Muon's orthogonalized momentum inside a Kronecker-factored Fisher trust region (lightning_optim/fismo.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_optim.fismo import FISMO
from lightning_optim.matrix import newton_schulz
from lightning_optim.muon import Muon

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on a busy 2-core machine


def _params(seed: int = 0, dtype: torch.dtype = torch.float32, expert: bool = False) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3, 5), (3, 5), (4,)] + ([(2, 3, 4)] if expert else [])
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _grads(step: int, params: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype) for p in params]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range, scale: float = 1.0) -> None:
    for t in steps:
        for p, g in zip(params, _grads(t, params, scale)):
            p.grad = g
        opt.step()


# -- the equations, written independently (SVD for the roots, explicit inverses) ------------------------
def _root(f: torch.Tensor, power: float) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(f)  # f symmetric positive definite: f = U S Uᵀ
    return (u * s.pow(power)) @ u.mT


def _reference_step(w, g, m, p, q, *, lr, beta, gamma, mu):
    rows, cols = w.shape
    eye_m, eye_n = torch.eye(rows, dtype=w.dtype), torch.eye(cols, dtype=w.dtype)
    big_l = g @ torch.linalg.inv(q) @ g.T / cols + mu * torch.trace(p) / rows * eye_m
    p_t = gamma * p + (1 - gamma) * big_l
    p_new = rows / torch.trace(p_t) * p_t
    p_new = 0.5 * (p_new + p_new.T)
    big_r = g.T @ torch.linalg.inv(p_new) @ g / rows + mu * torch.trace(q) / cols * eye_n
    q_t = gamma * q + (1 - gamma) * big_r
    q_new = cols / torch.trace(q_t) * q_t
    q_new = 0.5 * (q_new + q_new.T)
    g_w = _root(p_new, -0.5) @ g @ _root(q_new, -0.5)
    m_new = beta * m + (1 - beta) * g_w
    delta = _root(p_new, -0.5) @ newton_schulz(m_new, 5, "float32").double() @ _root(q_new, -0.5)
    return w - lr * delta, m_new, p_new, q_new


def test_three_float64_steps_match_the_paper_equations() -> None:
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    param = torch.nn.Parameter(w0.clone())
    opt = FISMO([param], lr=0.05, momentum=0.9, fisher_beta=0.8, damping=1e-2, ns_dtype="float32")
    w, m = w0.clone(), torch.zeros_like(w0)
    p, q = torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    for t in range(3):
        g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        param.grad = g.clone()
        opt.step()
        w, m, p, q = _reference_step(w, g, m, p, q, lr=0.05, beta=0.9, gamma=0.8, mu=1e-2)
        state = opt.state[param]
        torch.testing.assert_close(state["fisher_left"], p, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["fisher_right"], q, rtol=1e-10, atol=1e-12)
        # M goes through a float32 Newton-Schulz: compare at its precision
        torch.testing.assert_close(state["momentum_buffer"], m, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(param.detach(), w, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(p, torch.eye(4, dtype=torch.float64), atol=1e-3)  # the factors did move


def test_factors_are_trace_normalised_symmetric_and_definite() -> None:
    params = _params(expert=True)
    opt = FISMO(params)
    _run(opt, params, range(4))
    for p in (params[0], params[1], params[4]):
        for key, size in (("fisher_left", p.shape[-2]), ("fisher_right", p.shape[-1])):
            f = opt.state[p][key]
            assert f.shape == (*p.shape[:-2], size, size)
            torch.testing.assert_close(torch.diagonal(f, dim1=-2, dim2=-1).sum(-1), torch.full(f.shape[:-2], float(size)))
            torch.testing.assert_close(f, f.mT)
            assert torch.linalg.eigvalsh(f).min() > 0


def test_fisher_beta_one_is_muon_without_nesterov() -> None:
    """γ = 1: P = Q = I forever, G̃ = G, ΔW = NS(M): Muon with the plain EMA (wide matrices: scale 1)."""
    a = [torch.nn.Parameter(torch.randn(3, 5, generator=torch.Generator().manual_seed(i))) for i in range(2)]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    fismo = FISMO(a, fisher_beta=1.0, ns_dtype="float32", weight_decay=0.1)
    muon = Muon(b, nesterov=False, ns_dtype="float32", weight_decay=0.1)
    _run(fismo, a, range(4))
    _run(muon, b, range(4))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fismo.state[x]["fisher_left"], torch.eye(3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paths_agree(dtype: torch.dtype) -> None:
    a, b = _params(dtype=dtype, expert=True), _params(dtype=dtype, expert=True)
    per, multi = FISMO(a, foreach=False), FISMO(b, foreach=True)
    _run(per, a, range(3))
    _run(multi, b, range(3))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)
    if dtype == torch.bfloat16:
        assert per.state[a[0]]["fisher_left"].dtype == torch.float32
        assert per.state[a[0]]["momentum_buffer"].dtype == torch.float32


def test_state_dict_round_trip_is_bit_exact() -> None:
    a = _params()
    opt = FISMO(a)
    _run(opt, a, range(3))
    saved_w, saved_s = copy.deepcopy(([p.detach().clone() for p in a], opt.state_dict()))
    c = _params(seed=5)
    with torch.no_grad():
        for p, w in zip(c, saved_w):
            p.copy_(w)
    resumed = FISMO(c)
    resumed.load_state_dict(saved_s)
    _run(opt, a, range(3, 6))
    _run(resumed, c, range(3, 6))
    for x, y in zip(a, c):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))
        for key in opt.state[x]:
            assert torch.equal(opt.state[x][key], resumed.state[y][key]), key


def test_huge_and_non_finite_gradients() -> None:
    """A finite gradient of 1e30 (squares overflow fp32) keeps weights and factors finite; a NaN gradient
    never raises and leaves the factors as they were."""
    params = _params()
    opt = FISMO(params)
    _run(opt, params, range(2))
    _run(opt, params, range(2, 4), scale=1e30)
    for p in params:
        assert torch.isfinite(p).all()
    for p in params[:3]:
        assert torch.isfinite(opt.state[p]["fisher_left"]).all() and torch.isfinite(opt.state[p]["fisher_right"]).all()
    before = {id(p): opt.state[p]["fisher_left"].clone() for p in params[:3]}
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    for p in params[:3]:
        assert torch.equal(opt.state[p]["fisher_left"], before[id(p)])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"fisher_beta": 1.5}, "fisher_beta"),
        ({"fisher_beta": float("nan")}, "fisher_beta"),
        ({"damping": -1.0}, "damping"),
        ({"momentum": 1.0}, "momentum"),
        ({"adjust_lr": "rms"}, "adjust_lr"),
        ({"ns_steps": 0}, "ns_steps"),
    ],
)
def test_validation_names_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        FISMO(_params(), **kwargs)
