"""EXAdam numeric checks: hand-computed steps, the step-1 closed form, the dynamic step size, the authors'
equations, pytorch_optimizer's EXAdam as a second opinion, path agreement, overflow safety, exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import flat, make_mlp, restore_from_checkpoint, train
from lightning_optim.exadam import EXAdam, cross_factor, exadam_growth
from lightning_optim.registry import get

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def authors_exadam(
    p0: torch.Tensor,
    grads: list[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float] = (BETA1, BETA2),
    eps: float = EPS,
    weight_decay: float = 0.0,
    dynamic: bool = False,
) -> torch.Tensor:
    """The equations of the authors' exadam.py (current code; ``dynamic``: the first release's step size
    lr·ln(√2·√(t+1))), written out plainly in float64: decay with the base lr, then the moments, the
    cross-moment factors d1, d2, the debiased m̃, ṽ, g̃ and the step."""
    b1, b2 = betas
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        p = p - lr * weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        d1 = 1 + v / (v + eps) * b2**t
        d2 = 1 + m * m / (m * m + eps) * b1**t
        m_tilde = m / (1 - b1**t) * d1
        v_tilde = v / (1 - b2**t) * d2
        g_tilde = g / (1 - b1**t) * d1
        step_size = lr * math.log(math.sqrt(t + 1) * math.sqrt(2)) if dynamic else lr
        p = p - step_size * (m_tilde + g_tilde) / (v_tilde.sqrt() + eps)
    return p


def _run(p0: torch.Tensor, grads: list[torch.Tensor], **kwargs) -> torch.Tensor:
    p = torch.nn.Parameter(p0.clone())
    opt = EXAdam([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def _grads(n: int, shape: tuple[int, ...] = (7,), seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(n)]


# --- hand-computed steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_first_and_second_step_by_hand(foreach: bool) -> None:
    """θ0 = 1, lr = 0.1, g1 = 0.5, g2 = −1 (float64), every number derived by hand from the equations:

    t = 1: m = 0.05, v = 2.5e-4, d1 = 1 + 0.999·v/(v + 1e-8) = 1.998960042, d2 = 1 + 0.9·m²/(m² + 1e-8)
    = 1.899996400; m̃ + g̃ = (m + g)·d1/0.1 = 5.5·d1; √ṽ = √(v/0.001·d2) = 0.5·√d2, so the step is
    11·d1/√d2 = 15.952193267 and θ1 = 1 − 1.5952193267 = −0.5952193267.
    t = 2: m = 0.9·0.05 − 0.1 = −0.055, v = 0.999·2.5e-4 + 0.001 = 1.24975e-3, d1 = 1 + 0.998001·v/(v + ε)
    = 1.997993014, d2 = 1 + 0.81·m²/(m² + ε) = 1.809997322; step = (m + g)·d1/0.19 / (√(v/0.001999·d2) + ε)
    = −1.055·d1/0.19/1.063751… = −10.429144342, θ2 = −0.5952193267 + 1.0429144342 = 0.4476951075.
    """
    p = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = EXAdam([p], lr=0.1, foreach=foreach)
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg"].item() == pytest.approx(0.05, abs=1e-15)
    assert state["exp_avg_sq"].item() == pytest.approx(2.5e-4, abs=1e-15)
    assert p.item() == pytest.approx(-0.5952193267175763, abs=1e-12)
    p.grad = torch.tensor([-1.0], dtype=torch.float64)
    opt.step()
    assert state["exp_avg"].item() == pytest.approx(-0.055, abs=1e-15)
    assert state["exp_avg_sq"].item() == pytest.approx(1.24975e-3, abs=1e-15)
    assert state["step"].item() == 2
    assert p.item() == pytest.approx(0.4476951074501707, abs=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
def test_first_step_closed_form(foreach: bool, dynamic: bool) -> None:
    """At t = 1, m̂ = g and v̂ = g², so (ε → 0) the step of every non-zero entry is
    η1·(1 + 1/(1 − β1))·(1 + β2)/√(1 + β1)·sign(g) = 15.95·η1·sign(g) whatever |g|, η1 = η or η·ln 2;
    a zero entry does not move."""
    g = torch.tensor([3.0, -0.02, 1e-2, -7.0, 0.0], dtype=torch.float64)
    lr = 1e-3
    moved = torch.zeros(5, dtype=torch.float64) - _run(torch.zeros(5, dtype=torch.float64), [g], lr=lr, eps=1e-30,
                                                       dynamic_step_size=dynamic, foreach=foreach)
    size = lr * (math.log(2.0) if dynamic else 1.0) * (1 + 1 / (1 - BETA1)) * (1 + BETA2) / math.sqrt(1 + BETA1)
    torch.testing.assert_close(moved, size * g.sign(), rtol=1e-12, atol=0)


def test_dynamic_step_size_multiplies_each_step_by_the_log_growth() -> None:
    """Without weight decay the moments do not depend on θ, so the step of step t with the dynamic step size
    is exactly ln(√2·√(t + 1)) times the step without it: ln 2 at t = 1, ln √6 at t = 2, ... 2.654 at 100."""
    grads = _grads(6)
    expected = [math.log(2.0), math.log(math.sqrt(6.0)), math.log(math.sqrt(8.0))]
    assert [exadam_growth(t, True) for t in (1, 2, 3)] == pytest.approx(expected, rel=1e-15)
    assert exadam_growth(100, True) == pytest.approx(0.5 * math.log(202.0), rel=1e-15)  # 2.6541
    assert exadam_growth(100, False) == 1.0
    p0 = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    plain, grown = [EXAdam([torch.nn.Parameter(p0.clone())], lr=1e-2, dynamic_step_size=d) for d in (False, True)]
    for t, g in enumerate(grads, start=1):
        moves = []
        for opt in (plain, grown):
            p = opt.param_groups[0]["params"][0]
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
            moves.append(p.detach() - before)
        torch.testing.assert_close(moves[1], moves[0] * exadam_growth(t, True), rtol=1e-12, atol=0)


# --- the authors' equations and pytorch_optimizer ------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_the_authors_equations(foreach: bool, dynamic: bool, weight_decay: float) -> None:
    p0 = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = [g * s for g, s in zip(_grads(12), (1, 1e-3, 10, 1, 1e-6, 5, 1, 1, 0.1, 2, 1, 1))]
    ours = _run(p0, grads, lr=3e-3, weight_decay=weight_decay, dynamic_step_size=dynamic, foreach=foreach)
    theirs = authors_exadam(p0, grads, lr=3e-3, weight_decay=weight_decay, dynamic=dynamic)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
def test_agrees_with_pytorch_optimizer(foreach: bool) -> None:
    """pytorch_optimizer 4.1's EXAdam follows the authors' current code. Mapping: lr, betas, eps,
    weight_decay as ours with weight_decouple=True, fixed_decay=False (θ ← θ(1 − ηλ) first); our
    dynamic_step_size=False (it has no dynamic step size). No known deviation on finite, non-overflowing
    numbers (ours differs only where v or m² overflowed: it uses the ratio's limit 1, theirs gives NaN)."""
    from pytorch_optimizer import EXAdam as ReferenceEXAdam

    p0 = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = _grads(10, (3, 5), seed=5)
    kwargs = dict(lr=2e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    ours = _run(p0, grads, **kwargs, foreach=foreach)
    p = torch.nn.Parameter(p0.clone())
    reference = ReferenceEXAdam([p], **kwargs, weight_decouple=True, fixed_decay=False)
    for g in grads:
        p.grad = g.clone()
        reference.step()
    torch.testing.assert_close(ours, p.detach(), rtol=1e-12, atol=1e-14)


# --- numerics ------------------------------------------------------------------------------------------
def test_cross_factor_is_finite_at_zero_and_at_overflow() -> None:
    x = torch.tensor([0.0, 1e-8, 1.0, 3e38, math.inf], dtype=torch.float32)
    d = cross_factor(x, 0.5, 1e-8)
    naive = 1 + 0.5 * x / (x + 1e-8)
    assert torch.isnan(naive[-1])  # the authors' form at an overflowed moment
    torch.testing.assert_close(d[:-1], naive[:-1], rtol=1e-6, atol=0)
    assert d[0].item() == 1.0 and d[-1].item() == 1.5


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("value", [1e20, 1e30, 3e38])
def test_huge_finite_gradient_entries_keep_weights_finite(foreach: bool, value: float) -> None:
    """1e20 (its square overflows fp32), 1e30 (v overflows) and 3e38 (near the largest fp32): finite
    weights; the other entries move as in a run without the huge entry's neighbour (element-wise)."""
    p0 = torch.full((4,), 0.5)
    grads = [torch.tensor(g) for g in ([value, -1.0, 0.3, 0.0], [value, 0.5, 0.3, 0.0], [1.0, -1.0, 0.3, 0.0])]
    out = _run(p0, grads, foreach=foreach)
    assert torch.isfinite(out).all()
    alone = _run(p0[1:], [g[1:] for g in grads], foreach=foreach)
    torch.testing.assert_close(out[1:], alone, rtol=0, atol=0)
    assert out[3].item() == 0.5  # zero gradients: no move


@pytest.mark.parametrize("foreach", [False, True])
def test_paths_agree_and_half_precision_keeps_fp32_state(foreach: bool) -> None:
    model, reference = make_mlp(torch.float32), make_mlp(torch.float32)
    train(model, EXAdam(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach), 15, spikes={5: 1e4})
    train(reference, EXAdam(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=False), 15, spikes={5: 1e4})
    torch.testing.assert_close(flat(model), flat(reference), rtol=1e-6, atol=1e-7)

    half = make_mlp(torch.bfloat16)
    opt = EXAdam(half.parameters(), lr=1e-2, foreach=foreach)
    train(half, opt, 3)
    assert all(s[k].dtype == torch.float32 for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_8bit_state_stays_close_to_32bit() -> None:
    gen = torch.Generator().manual_seed(0)
    p0 = 0.1 * torch.randn(64, 128, generator=gen)
    grads = [0.01 * torch.randn(64, 128, generator=gen) for _ in range(8)]
    w32 = _run(p0, grads, lr=1e-3, foreach=False)
    w8 = _run(p0, grads, lr=1e-3, foreach=True, state_bits=8)
    largest_move = (w32 - p0).abs().max().item()
    assert (w8 - w32).abs().max().item() < 0.25 * largest_move
    opt = EXAdam([torch.nn.Parameter(p0.clone())], state_bits=8)
    opt.param_groups[0]["params"][0].grad = grads[0]
    opt.step()
    assert {"exp_avg_codes", "exp_avg_sq_codes"} <= set(next(iter(opt.state.values())))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
def test_state_dict_round_trip_is_bit_exact(foreach: bool, dynamic: bool) -> None:
    def make(m: torch.nn.Module) -> EXAdam:
        return EXAdam(m.parameters(), lr=1e-2, weight_decay=0.1, dynamic_step_size=dynamic, foreach=foreach)

    model = make_mlp(torch.float32)
    opt = make(model)
    train(model, opt, 5)
    resumed, opt2 = restore_from_checkpoint(model, opt, make, seed=7)
    train(model, opt, 4, start=5)
    train(resumed, opt2, 4, start=5)
    assert torch.equal(flat(resumed), flat(model))
    assert all(s["step"].item() == 9 and s["step"].device.type == "cpu" for s in opt2.state.values())


def test_closure_with_backward_works_inside_no_grad() -> None:
    """Lightning calls ``optimizer.step(closure)`` inside ``torch.no_grad()``; the closure's backward runs."""
    model = make_mlp(torch.float32)
    opt = EXAdam(model.parameters())
    x, y = torch.randn(4, 6), torch.randn(4, 3)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = flat(model)
    with torch.no_grad():
        loss = opt.step(closure)
    assert loss is not None and loss.requires_grad
    assert not torch.equal(flat(model), before)


# --- validation and registry ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(eps=0.0), "eps"),  # ε enters v/(v + ε): 0/0 at a zero entry
        (dict(eps=math.inf), "eps"),
        (dict(betas=(1.0, 0.999)), "beta1"),
        (dict(betas=(0.9, math.nan)), "beta2"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(dynamic_step_size="yes"), "dynamic_step_size"),
        (dict(state_bits=4), "state_bits"),
        (dict(compile=True, state_bits=8), "compile=True with state_bits=8"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name.replace("(", r"\(")):
        EXAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_load_state_dict_revalidates() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = EXAdam([p])
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["eps"] = 0.0
    with pytest.raises(ValueError, match="eps"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["eps"] == EPS


def test_registry_entry() -> None:
    info = get("exadam")
    assert info.cls is EXAdam and info.compile and info.state_bits_8 and info.foreach
    assert info.first_moment == "exp_avg" and info.adam_first_moment and info.second_moment_like_grad_sq
    assert info.defaults["lr"] == 1e-3 and info.defaults["eps"] == 1e-8 and info.defaults["dynamic_step_size"] is False


# --- compiled ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_step_matches_eager_without_recompiling() -> None:
    """compile=True (inductor's C++ backend here) with the dynamic step size: within a few ulps of the eager
    multi-tensor path, one graph across lr changes, and a bit-exact resume."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def make(m: torch.nn.Module, **kw) -> EXAdam:
        return EXAdam(m.parameters(), lr=1e-2, weight_decay=0.1, dynamic_step_size=True, **kw)

    eager, model = make_mlp(torch.float32), make_mlp(torch.float32)
    eager_opt, opt = make(eager, foreach=True), make(model, compile=True)
    for start in range(0, 8, 4):
        for o in (eager_opt, opt):
            o.param_groups[0]["lr"] = 1e-2 / (1 + start)  # a scheduler's change: a device scalar
        train(eager, eager_opt, 4, start=start, spikes={2: 1e4})
        train(model, opt, 4, start=start, spikes={2: 1e4})
    torch.testing.assert_close(flat(model), flat(eager), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 1
    resumed, opt2 = restore_from_checkpoint(model, opt, lambda m: make(m, compile=True), seed=4)
    train(model, opt, 2, start=8)
    train(resumed, opt2, 2, start=8)
    assert torch.equal(flat(resumed), flat(model))
    torch._dynamo.reset()
