"""AdamP and SGDP (Heo et al., ICLR 2021; authors' code clovaai/AdamP adamp/adamp.py, adamp/sgdp.py).

Hand-computed steps (float64) with and without the projection, in the channel and in the layer view, the
wd_ratio path, a reference written from the authors' equations over ten steps on a network with
scale-invariant weights, pytorch_optimizer as a second opinion (with the two places where it departs from
the authors' code), the paths (per-parameter, foreach, 8-bit, compiled), exact resume, overflow, no host
reads, validation.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from lightning_optim.adamp import SGDP, AdamP, radial_projection_
from test_sync_free import HostReadRecorder

F64 = torch.float64
EPS = 1e-8


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny tensors: one intra-op thread (see tests/conftest.py)."""


# --- references written from the authors' equations ------------------------------------------------
def authors_projection(w: torch.Tensor, g: torch.Tensor, u: torch.Tensor, delta: float, eps: float):
    """The scale-invariance test and projection as the authors define them: channel view (one row per
    output index) first, then the layer view; |cos| from F.cosine_similarity(g, w, eps); ŵ = w/(‖w‖+ε) per
    row, u ← u − ŵ⟨ŵ, u⟩. Returns (u, view name or None)."""
    for name, rows in (("channel", w.shape[0]), ("layer", 1)):
        wv, gv, uv = w.reshape(rows, -1), g.reshape(rows, -1), u.reshape(rows, -1)
        cos = F.cosine_similarity(gv, wv, dim=1, eps=eps).abs()
        if cos.max() < delta / math.sqrt(wv.shape[1]):
            w_hat = wv / (wv.norm(dim=1, keepdim=True) + eps)
            return (uv - w_hat * (w_hat * uv).sum(dim=1, keepdim=True)).reshape(w.shape), name
    return u, None


class ReferenceAdamP:
    """AdamP written out from the equations (per parameter, plain tensor ops)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=EPS, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
                 nesterov=False):
        self.params = list(params)
        self.hp = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio,
                       nesterov=nesterov)
        self.state = {p: dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in self.params}
        self.views: list[str | None] = []

    @torch.no_grad()
    def step(self) -> None:
        lr, (b1, b2), eps = self.hp["lr"], self.hp["betas"], self.hp["eps"]
        for p in self.params:
            s, g = self.state[p], p.grad
            s["t"] += 1
            t = s["t"]
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            denom = s["v"].sqrt() / math.sqrt(1 - b2**t) + eps
            u = ((b1 * s["m"] + (1 - b1) * g) if self.hp["nesterov"] else s["m"]) / denom
            ratio = 1.0
            if p.ndim > 1:
                u, view = authors_projection(p, g, u, self.hp["delta"], eps)
                self.views.append(view)
                ratio = self.hp["wd_ratio"] if view else 1.0
            p.mul_(1 - lr * self.hp["weight_decay"] * ratio)
            p.sub_(lr / (1 - b1**t) * u)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class ReferenceSGDP:
    """SGDP written out from the authors' equations; ``project_buffer``: the authors' code projects the
    momentum buffer itself when nesterov is off (the paper and pytorch_optimizer project only the step)."""

    def __init__(self, params, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, eps=EPS,
                 delta=0.1, wd_ratio=0.1, project_buffer=True):
        self.params = list(params)
        self.hp = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                       eps=eps, delta=delta, wd_ratio=wd_ratio)
        self.project_buffer = project_buffer
        self.state = {p: torch.zeros_like(p) for p in self.params}
        self.views: list[str | None] = []

    @torch.no_grad()
    def step(self) -> None:
        hp = self.hp
        mu = hp["momentum"]
        for p in self.params:
            g = p.grad
            b = mu * self.state[p] + (1 - hp["dampening"]) * g
            u = g + mu * b if hp["nesterov"] else b
            ratio = 1.0
            if p.ndim > 1:
                u, view = authors_projection(p, g, u, hp["delta"], hp["eps"])
                self.views.append(view)
                ratio = hp["wd_ratio"] if view else 1.0
            self.state[p] = u if (self.project_buffer and not hp["nesterov"]) else b
            p.mul_(1 - hp["lr"] * hp["weight_decay"] * ratio / (1 - mu))
            p.sub_(hp["lr"] * u)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


# --- a network with scale-invariant weights -------------------------------------------------------------
def scale_invariant_net(dtype: torch.dtype = F64, seed: int = 0) -> torch.nn.Module:
    """Linear → BatchNorm (each row of the first weight is scale-invariant: channel view), Linear →
    LayerNorm without affine (the whole second weight is scale-invariant, its rows are not: layer view),
    then an ordinary Linear with a bias (no invariance; 1-D bias never projected)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8, bias=False), torch.nn.BatchNorm1d(8, affine=False), torch.nn.Tanh(),
        torch.nn.Linear(8, 8, bias=False), torch.nn.LayerNorm(8, elementwise_affine=False), torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    ).to(dtype)


def run(model: torch.nn.Module, opt, steps: int, start: int = 0) -> None:
    dtype = next(model.parameters()).dtype
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(16, 6, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def assert_weights_close(a: torch.nn.Module, b: torch.nn.Module, **tol) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol)


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def one_step(opt_cls, w: list[list[float]], g: list[list[float]], **kwargs) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    p = torch.nn.Parameter(torch.tensor(w, dtype=F64))
    opt = opt_cls([p], **kwargs)
    p.grad = torch.tensor(g, dtype=F64)
    opt.step()
    return p.detach(), opt


# --- hand-computed steps ------------------------------------------------------------------------------
# Step 1 of AdamP: m = (1-β1)g, v = (1-β2)g², D = |g| + ε, so u = (1-β1)·g/(|g|+ε) and the step is
# lr/(1-β1)·Π(u) = lr·Π(g/(|g|+ε)).
LR, WD, RATIO = 0.01, 0.5, 0.1


@pytest.mark.parametrize("foreach", [False, True])
def test_adamp_channel_view_projection_by_hand(foreach: bool) -> None:
    """Each row of g is orthogonal to its row of w (cos 0 < 0.1/√2): the radial part of u is removed per
    row and the decay is λ·wd_ratio."""
    w = [[3.0, 4.0], [4.0, -3.0]]
    g = [[4.0, -3.0], [6.0, 8.0]]
    got, _ = one_step(AdamP, w, g, lr=LR, weight_decay=WD, foreach=foreach)
    expected = []
    for w_row, g_row in zip(w, g):
        u = [0.1 * x / (abs(x) + EPS) for x in g_row]
        w_hat = [x / (5.0 + EPS) for x in w_row]
        radial = sum(a * b for a, b in zip(w_hat, u))
        u = [a - h * radial for a, h in zip(u, w_hat)]
        expected.append([x * (1 - LR * WD * RATIO) - LR / 0.1 * a for x, a in zip(w_row, u)])
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-14)
    # the numbers of row 0: u = 0.1·(1, −1), ⟨ŵ, u⟩ = −0.02, so u' = (0.112, −0.084) and the step is 10·lr·u'
    assert got[0, 0].item() == pytest.approx(3 * 0.9995 - 0.1 * 0.112, abs=1e-9)
    assert got[0, 1].item() == pytest.approx(4 * 0.9995 + 0.1 * 0.084, abs=1e-9)


@pytest.mark.parametrize("foreach", [False, True])
def test_adamp_layer_view_projection_by_hand(foreach: bool) -> None:
    """Rows not orthogonal (|cos| 0.8 and 0.89 > 0.1/√2) but ⟨g, w⟩ = 0 over the layer (cos 0 < 0.1/√4):
    the layer view projects with ŵ = w/(‖w‖_F + ε)."""
    w = [[1.0, 2.0], [3.0, 1.0]]
    g = [[2.0, 1.0], [-1.0, -1.0]]
    got, _ = one_step(AdamP, w, g, lr=LR, weight_decay=WD, foreach=foreach)
    flat_w, flat_g = [x for r in w for x in r], [x for r in g for x in r]
    u = [0.1 * x / (abs(x) + EPS) for x in flat_g]
    w_hat = [x / (math.sqrt(15.0) + EPS) for x in flat_w]
    radial = sum(a * b for a, b in zip(w_hat, u))
    assert abs(radial) > 0.01  # u = 0.1·sign(g) is not orthogonal to w although g is
    u = [a - h * radial for a, h in zip(u, w_hat)]
    expected = [x * (1 - LR * WD * RATIO) - LR / 0.1 * a for x, a in zip(flat_w, u)]
    torch.testing.assert_close(got.reshape(-1), torch.tensor(expected, dtype=F64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
def test_adamp_without_projection_is_adamw_step_by_hand(foreach: bool) -> None:
    """g parallel to w (cos 1): no projection, the decay is the full λ (AdamW's step)."""
    w = [[3.0, 4.0], [1.0, -2.0]]
    g = [[0.3, 0.4], [2.0, -4.0]]
    got, _ = one_step(AdamP, w, g, lr=LR, weight_decay=WD, foreach=foreach)
    expected = [[x * (1 - LR * WD) - LR * y / (abs(y) + EPS) for x, y in zip(rw, rg)] for rw, rg in zip(w, g)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
def test_adamp_nesterov_step_by_hand(foreach: bool) -> None:
    """Nesterov: u = (β1·m + (1-β1)·g)/D = 0.19·g/(|g|+ε) at step 1, then the same projection."""
    w, g = [[3.0, 4.0]], [[4.0, -3.0]]
    got, _ = one_step(AdamP, w, g, lr=LR, nesterov=True, foreach=foreach)
    u = [0.19 * x / (abs(x) + EPS) for x in g[0]]
    w_hat = [x / (5.0 + EPS) for x in w[0]]
    radial = sum(a * b for a, b in zip(w_hat, u))
    expected = [x - LR / 0.1 * (a - h * radial) for x, a, h in zip(w[0], u, w_hat)]
    torch.testing.assert_close(got[0], torch.tensor(expected, dtype=F64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
@pytest.mark.parametrize("foreach", [False, True])
def test_wd_ratio_path_with_zero_gradient(cls, foreach: bool) -> None:
    """A zero gradient has cos 0 (below every threshold): a matrix decays by λ·wd_ratio, a bias by λ
    (never projected), and nothing else moves (u = 0). SGDP divides the decay by 1 − μ."""
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64))
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=F64))
    extra = dict(momentum=0.5) if cls is SGDP else {}
    opt = cls([w, b], lr=LR, weight_decay=WD, wd_ratio=0.25, foreach=foreach, **extra)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()
    scale = 0.5 if cls is SGDP else 1.0  # 1 - momentum
    torch.testing.assert_close(w.detach(), w0 * (1 - LR * WD * 0.25 / scale), rtol=0, atol=1e-15)
    torch.testing.assert_close(b.detach(), b0 * (1 - LR * WD / scale), rtol=0, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
def test_sgdp_two_steps_by_hand_projects_the_buffer(foreach: bool) -> None:
    """Step 1: g ∥ w, no projection; step 2: g ⊥ w, so u = b = μ·b1 + g2 loses its radial part μ·b1
    (b1 ∥ w). Without Nesterov the authors' code projects b itself: the stored buffer is the projected u.
    Decay λ/(1−μ), times wd_ratio on the projected step."""
    lr, wd, mu = 0.1, 0.01, 0.9
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=F64))
    opt = SGDP([p], lr=lr, momentum=mu, weight_decay=wd, foreach=foreach)
    g1, g2 = [0.3, 0.4], [0.4, -0.3]
    p.grad = torch.tensor([g1], dtype=F64)
    opt.step()
    w1 = [x * (1 - lr * wd / (1 - mu)) - lr * y for x, y in zip([3.0, 4.0], g1)]
    torch.testing.assert_close(p.detach()[0], torch.tensor(w1, dtype=F64), rtol=0, atol=1e-15)
    p.grad = torch.tensor([g2], dtype=F64)
    opt.step()
    b2 = [mu * a + b for a, b in zip(g1, g2)]
    norm = math.hypot(*w1)
    w_hat = [x / (norm + EPS) for x in w1]
    radial = sum(a * b for a, b in zip(w_hat, b2))
    u = [a - h * radial for a, h in zip(b2, w_hat)]
    w2 = [x * (1 - lr * wd * 0.1 / (1 - mu)) - lr * a for x, a in zip(w1, u)]
    torch.testing.assert_close(p.detach()[0], torch.tensor(w2, dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"][0], torch.tensor(u, dtype=F64), rtol=0, atol=1e-14)
    assert abs(u[0] - b2[0]) > 0.1  # the buffer did lose its radial part


@pytest.mark.parametrize("foreach", [False, True])
def test_sgdp_nesterov_keeps_the_buffer(foreach: bool) -> None:
    """Nesterov: u = g + μ·b is a new tensor; b = μ·b + (1−τ)·g is stored unprojected."""
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=F64))
    opt = SGDP([p], lr=0.1, momentum=0.9, dampening=0.5, nesterov=True, foreach=foreach)
    p.grad = torch.tensor([[4.0, -3.0]], dtype=F64)  # ⊥ w: projected
    opt.step()
    b = torch.tensor([[2.0, -1.5]], dtype=F64)  # (1 - τ)·g from a zero buffer (torch SGD would store g)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=0, atol=0)
    u = torch.tensor([[4.0, -3.0]], dtype=F64) + 0.9 * b  # ⊥ w already: the projection removes ~nothing
    torch.testing.assert_close(p.detach(), torch.tensor([[3.0, 4.0]], dtype=F64) - 0.1 * u, rtol=0, atol=1e-14)


# --- closed forms: no projection means the base optimizer ---------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_with_delta_zero_is_adamw(foreach: bool, nesterov: bool) -> None:
    """δ = 0 never projects: AdamP is torch AdamW (same ε on √v̂, same decoupled decay) up to rounding. Its
    Nesterov form (β1·m + (1−β1)·g)/D is no torch optimizer's, so it is checked against the reference."""
    a, b = scale_invariant_net(), scale_invariant_net()
    opt = AdamP(a.parameters(), lr=1e-2, weight_decay=0.1, delta=0.0, nesterov=nesterov, foreach=foreach)
    if nesterov:
        ref = ReferenceAdamP(b.parameters(), lr=1e-2, weight_decay=0.1, delta=0.0, nesterov=True)
    else:
        ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, eps=EPS, foreach=foreach)
    run(a, opt, 10)
    run(b, ref, 10)
    assert_weights_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgdp_with_delta_zero_is_torch_sgd(foreach: bool, nesterov: bool) -> None:
    """δ = 0 and no decay: SGDP is torch SGD (zero dampening: torch's first buffer g equals 0·μ + g)."""
    a, b = scale_invariant_net(), scale_invariant_net()
    run(a, SGDP(a.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov, delta=0.0, foreach=foreach), 10)
    run(b, torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov, foreach=foreach), 10)
    assert_weights_close(a, b, rtol=0, atol=1e-13)


# --- the reference over ten steps ---------------------------------------------------------------------
ADAMP_CASES = [
    dict(lr=1e-2),
    dict(lr=1e-2, weight_decay=0.1, nesterov=True),
    dict(lr=3e-2, betas=(0.8, 0.99), weight_decay=0.05, wd_ratio=0.3, delta=0.2),
]
SGDP_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, wd_ratio=0.5),
    dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-3, delta=0.2),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kwargs", ADAMP_CASES, ids=str)
def test_adamp_matches_the_reference_over_ten_steps(foreach: bool, kwargs: dict) -> None:
    a, b = scale_invariant_net(), scale_invariant_net()
    ref = ReferenceAdamP(b.parameters(), **kwargs)
    run(a, AdamP(a.parameters(), foreach=foreach, **kwargs), 10)
    run(b, ref, 10)
    assert_weights_close(a, b, rtol=0, atol=1e-12)
    assert {"channel", "layer", None} <= set(ref.views)  # every branch was taken


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kwargs", SGDP_CASES, ids=str)
def test_sgdp_matches_the_reference_over_ten_steps(foreach: bool, kwargs: dict) -> None:
    a, b = scale_invariant_net(), scale_invariant_net()
    ref = ReferenceSGDP(b.parameters(), **kwargs)
    run(a, SGDP(a.parameters(), foreach=foreach, **kwargs), 10)
    run(b, ref, 10)
    assert_weights_close(a, b, rtol=0, atol=1e-12)
    assert {"channel", "layer"} <= set(ref.views)


@pytest.mark.parametrize("shape", [(3, 2, 2, 2), (1, 5), (6, 1), (4, 3)])
def test_projection_matches_the_authors_rule_on_random_tensors(shape: tuple[int, ...]) -> None:
    """Conv-shaped, one-row and one-column tensors, with g near-orthogonal per row, per layer, or random."""
    gen = torch.Generator().manual_seed(sum(shape))
    hits = set()
    for trial in range(60):
        w, g, u = (torch.randn(shape, generator=gen, dtype=F64) for _ in range(3))
        rows_w, rows_g = w.reshape(shape[0], -1), g.reshape(shape[0], -1)
        if trial % 3 == 0:  # orthogonal per row
            rows_g -= (rows_g * rows_w).sum(1, keepdim=True) / (rows_w * rows_w).sum(1, keepdim=True) * rows_w
        elif trial % 3 == 1:  # orthogonal over the layer
            g -= (g * w).sum() / (w * w).sum() * w
        g += 1e-4 * torch.randn(shape, generator=gen, dtype=F64)
        expected, view = authors_projection(w, g, u, 0.1, EPS)
        got = u.clone()
        projected = radial_projection_(got, w, g, 0.1, EPS)
        assert bool(projected) == (view is not None)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        hits.add(view)
    assert None in hits and len(hits) >= 2


# --- pytorch_optimizer as a second opinion ----------------------------------------------------------------
def test_adamp_agrees_with_pytorch_optimizer_except_for_eps_placement() -> None:
    """pytorch_optimizer.AdamP (4.1.0; weight_decouple=True, fixed_decay=False map to our decay) divides by
    (√v + ε)/√(1 − β2^t), i.e. ε/√(1 − β2^t) on √v̂, while the authors (and we) use √v̂ + ε. With ε = 0
    the two agree; with ε = 1e-8 they differ, and the authors' form is ours (the reference)."""
    from pytorch_optimizer import AdamP as ThirdPartyAdamP

    kwargs = dict(lr=1e-2, weight_decay=0.1, nesterov=True)
    a, b = scale_invariant_net(), scale_invariant_net()
    run(a, AdamP(a.parameters(), eps=0.0, **kwargs), 10)
    run(b, ThirdPartyAdamP(b.parameters(), eps=0.0, **kwargs), 10)
    assert_weights_close(a, b, rtol=0, atol=1e-12)

    a, b, c = scale_invariant_net(), scale_invariant_net(), scale_invariant_net()
    run(a, AdamP(a.parameters(), **kwargs), 10)
    run(b, ThirdPartyAdamP(b.parameters(), **kwargs), 10)
    run(c, ReferenceAdamP(c.parameters(), **kwargs), 10)
    assert max_diff(a, c) < 1e-12
    assert max_diff(a, b) > 1e-9


@pytest.mark.parametrize("foreach", [False, True])
def test_sgdp_agrees_with_pytorch_optimizer_where_it_follows_the_authors(foreach: bool) -> None:
    """pytorch_optimizer.SGDP (4.1.0; its lr default is 1e-3, ours 0.1, always passed here) agrees with
    Nesterov and with μ = 0. Without Nesterov and μ > 0 it projects a copy of the buffer (as the paper's
    algorithm), the authors' code projects the buffer in place (as we do): the runs differ, and
    pytorch_optimizer equals the reference with ``project_buffer=False``."""
    from pytorch_optimizer import SGDP as ThirdPartySGDP

    for kwargs in (dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2), dict(lr=0.1, weight_decay=1e-2)):
        a, b = scale_invariant_net(), scale_invariant_net()
        run(a, SGDP(a.parameters(), foreach=foreach, **kwargs), 10)
        run(b, ThirdPartySGDP(b.parameters(), foreach=foreach, **kwargs), 10)
        assert_weights_close(a, b, rtol=0, atol=1e-12)

    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    a, b, c = scale_invariant_net(), scale_invariant_net(), scale_invariant_net()
    run(a, SGDP(a.parameters(), foreach=foreach, **kwargs), 10)
    run(b, ThirdPartySGDP(b.parameters(), foreach=foreach, **kwargs), 10)
    run(c, ReferenceSGDP(c.parameters(), project_buffer=False, **kwargs), 10)
    assert max_diff(b, c) < 1e-12
    assert max_diff(a, b) > 1e-6


# --- paths ------------------------------------------------------------------------------------------
FACTORIES = {
    "AdamP": lambda params, **kw: AdamP(params, lr=1e-2, weight_decay=0.1, nesterov=True, **kw),
    "SGDP": lambda params, **kw: SGDP(params, lr=0.05, momentum=0.9, weight_decay=1e-2, **kw),
}


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_equals_per_parameter(name: str, dtype: torch.dtype) -> None:
    a, b = scale_invariant_net(dtype), scale_invariant_net(dtype)
    run(a, FACTORIES[name](a.parameters(), foreach=False), 8)
    run(b, FACTORIES[name](b.parameters(), foreach=True), 8)
    assert_weights_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", FACTORIES)
def test_half_precision_parameters_keep_fp32_state(name: str) -> None:
    model = scale_invariant_net(torch.bfloat16)
    opt = FACTORIES[name](model.parameters())
    run(model, opt, 2)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


def big_net(seed: int = 0) -> torch.nn.Module:
    """A 64×64 weight (8-bit eligible) behind a LayerNorm, and small ones."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64, bias=False),
        torch.nn.LayerNorm(64, elementwise_affine=False), torch.nn.Linear(64, 3),
    )


@pytest.mark.parametrize("name", FACTORIES)
def test_8bit_state_stays_close_and_paths_agree(name: str) -> None:
    full, low, low_foreach = big_net(), big_net(), big_net()
    opt_low = FACTORIES[name](low.parameters(), state_bits=8, foreach=False)
    run(full, FACTORIES[name](full.parameters(), foreach=False), 8)
    run(low, opt_low, 8)
    run(low_foreach, FACTORIES[name](low_foreach.parameters(), state_bits=8, foreach=True), 8)
    assert_weights_close(low, low_foreach, rtol=0, atol=0)
    big = low[2].weight
    assert any(k.endswith("_codes") for k in opt_low.state[big])
    moved = (full[2].weight - big_net()[2].weight).abs().max()
    assert (low[2].weight - full[2].weight).abs().max() < 0.1 * moved


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", FACTORIES)
def test_compiled_step_matches_eager_and_resumes_exactly(name: str, fresh_dynamo) -> None:
    """compile=True on the scale-invariant net (both views and no projection occur): one graph, agrees with
    foreach, and a resumed copy continues bit for bit."""
    eager, model = scale_invariant_net(torch.float32), scale_invariant_net(torch.float32)
    run(eager, FACTORIES[name](eager.parameters(), foreach=True), 6)
    opt = FACTORIES[name](model.parameters(), compile=True)
    run(model, opt, 6)
    assert_weights_close(model, eager, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 1
    resumed = scale_invariant_net(torch.float32, seed=3)
    resumed.load_state_dict(model.state_dict())
    opt2 = FACTORIES[name](resumed.parameters(), compile=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(model, opt, 3, start=6)
    run(resumed, opt2, 3, start=6)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    assert counters["stats"]["unique_graphs"] <= 1


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("overrides", [dict(foreach=False), dict(foreach=True), dict(state_bits=8)], ids=str)
def test_state_dict_round_trip_is_exact(name: str, overrides: dict) -> None:
    make = big_net if "state_bits" in overrides else scale_invariant_net
    model = make()
    opt = FACTORIES[name](model.parameters(), **overrides)
    run(model, opt, 4)
    saved_model, saved_opt = copy.deepcopy((model.state_dict(), opt.state_dict()))
    resumed = make(seed=7)
    resumed.load_state_dict(saved_model)
    opt2 = FACTORIES[name](resumed.parameters(), **overrides)
    opt2.load_state_dict(saved_opt)
    run(model, opt, 4, start=4)
    run(resumed, opt2, 4, start=4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt2.state[q][key]), key


def test_sgdp_converts_a_torch_sgd_state_dict() -> None:
    """SGDP keeps torch SGD's key: a config switched from SGD resumes its momentum (with a warning)."""
    a, b = scale_invariant_net(), scale_invariant_net()
    sgd = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    run(a, sgd, 3)
    b.load_state_dict(a.state_dict())
    opt = SGDP(b.parameters(), lr=0.05, momentum=0.9)
    with pytest.warns(UserWarning, match="converting"):
        opt.load_state_dict(copy.deepcopy(sgd.state_dict()))
    p = next(b.parameters())
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], sgd.state[next(a.parameters())]["momentum_buffer"])


# --- overflow, non-finite gradients, host reads -------------------------------------------------------
def test_cosine_of_an_overflowing_gradient_is_the_true_one() -> None:
    """A 1e20 entry: its square overflows fp32. torch's fp32 cosine reads 0 (its norm is inf) and the
    authors' code would project; ours gives the float64 value of the exact cosine (large here: no
    projection) and a finite update equal to the float64 one."""
    gen = torch.Generator().manual_seed(0)
    w, g, u = (torch.randn(4, 3, generator=gen) for _ in range(3))
    g[0, 1] = 1e20
    assert F.cosine_similarity(g, w, dim=1, eps=EPS)[0] == 0  # what the authors' code sees in fp32
    expected, view = authors_projection(w.double(), g.double(), u.double(), 0.1, EPS)
    got = u.clone()
    assert bool(radial_projection_(got, w, g, 0.1, EPS)) == (view is not None)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    # and where the true cosine is small, the projection happens and stays finite
    g = torch.zeros(4, 3)
    g[0] = torch.tensor([4e20, -3e20, 0.0])
    w = torch.tensor([[3.0, 4.0, 0.0], [1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [1.0, 0.0, 0.0]])
    got = u.clone()
    assert bool(radial_projection_(got, w, g, 0.1, EPS))
    expected, view = authors_projection(w.double(), g.double(), u.double(), 0.1, EPS)
    assert view == "channel"
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("foreach", [False, True])
def test_huge_finite_gradients_keep_weights_finite(name: str, foreach: bool) -> None:
    """Gradients (set directly, not from a loss the huge weights would overflow) with entries up to 1e30:
    the weights stay finite."""
    model = scale_invariant_net(torch.float32)
    opt = FACTORIES[name](model.parameters(), foreach=foreach)
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e20, 1e30, 1.0):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
            p.grad.view(-1)[0] = scale
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_gradient_entry_spoils_only_its_own_entry(name: str, bad: float) -> None:
    """No raise; the bad entry makes the cosine NaN, which never projects, so the other entries of that
    tensor (and every other tensor) step as usual."""
    model = scale_invariant_net(torch.float32)
    opt = FACTORIES[name](model.parameters())
    F.mse_loss(model(torch.randn(16, 6)), torch.randn(16, 3)).backward()
    model[0].weight.grad[0, 0] = bad
    opt.step()
    assert int((~torch.isfinite(model[0].weight)).sum()) == 1
    assert all(torch.isfinite(p).all() for p in list(model.parameters())[1:])


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("foreach", [False, True])
def test_step_reads_only_cpu_counters_on_the_host(name: str, foreach: bool) -> None:
    """The "cos < threshold" decisions and the decay factor stay on the device (torch.where)."""
    model = scale_invariant_net(torch.float32)
    opt = FACTORIES[name](model.parameters(), foreach=foreach)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(16, 6)), torch.randn(16, 3)).backward()
        recorder = HostReadRecorder()
        with recorder:
            opt.step()
        allowed = {id(s["step"]) for s in opt.state.values() if "step" in s}
        offending = [(fn, tuple(t.shape)) for fn, t in recorder.reads if id(t) not in allowed]
        assert not offending, offending


def test_non_contiguous_parameter() -> None:
    """A transposed (non-contiguous) weight steps like its contiguous copy."""
    base = torch.randn(3, 4, dtype=F64)
    a = torch.nn.Parameter(base.t().contiguous())
    b = torch.nn.Parameter(base.clone().t())
    assert not b.is_contiguous()
    opt_a, opt_b = AdamP([a], lr=0.1), AdamP([b], lr=0.1)
    for _ in range(3):
        g = torch.randn(4, 3, dtype=F64)
        g -= (g * a.detach()).sum(1, keepdim=True) / (a.detach() ** 2).sum(1, keepdim=True) * a.detach()
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-14)


# --- validation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,name,value",
    [
        (AdamP, "delta", -0.1),
        (AdamP, "wd_ratio", 1.5),
        (AdamP, "wd_ratio", -0.1),
        (AdamP, "nesterov", "yes"),
        (AdamP, "betas", (0.9, 1.0)),
        (SGDP, "momentum", 1.0),
        (SGDP, "dampening", 1.5),
        (SGDP, "nesterov", 1),
        (SGDP, "delta", math.nan),
        (SGDP, "lr", -1.0),
    ],
)
def test_validation_names_the_argument(cls, name: str, value) -> None:
    with pytest.raises(ValueError, match=name):
        cls([torch.nn.Parameter(torch.zeros(2, 2))], **{name: value})


def test_defaults_are_the_authors() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    adamp = AdamP(p).defaults
    assert (adamp["lr"], adamp["betas"], adamp["eps"], adamp["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert (adamp["delta"], adamp["wd_ratio"], adamp["nesterov"]) == (0.1, 0.1, False)
    sgdp = SGDP(p).defaults
    assert (sgdp["momentum"], sgdp["dampening"], sgdp["weight_decay"], sgdp["nesterov"]) == (0.0, 0.0, 0.0, False)
    assert (sgdp["eps"], sgdp["delta"], sgdp["wd_ratio"], sgdp["lr"]) == (1e-8, 0.1, 0.1, 0.1)
