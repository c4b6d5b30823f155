"""DualAdam numeric checks: the α schedule, hand-computed steps, the authors' equations, pytorch_optimizer's
DualAdam as a second opinion, AdamW once α = 0, the overflow guard, paths, exact resume, Lightning's closure."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import flat, make_mlp, restore_from_checkpoint, train
from lightning_optim.dual_adam import DualAdam, dual_adam_mix
from lightning_optim.registry import get

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def authors_dual_adam(
    p0: torch.Tensor,
    grads: list[torch.Tensor],
    *,
    lr: float,
    switch_rate: float,
    betas: tuple[float, float] = (BETA1, BETA2),
    eps: float = EPS,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """The equations of the authors' DualAdam.py written out plainly (float64): Adam's moments and bias
    corrections, D = √v̂ + ε, α = max(0, 1 − ξT), decoupled decay, then the blend of m̂/D and m̂·D while
    α ≥ ξ and Adam's m̂/D afterwards."""
    b1, b2 = betas
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        alpha = max(0.0, 1.0 - t * switch_rate)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        d = v_hat.sqrt() + eps
        p = p - weight_decay * lr * p
        if alpha >= switch_rate:
            p = p - lr * ((1 - alpha) * m_hat / d + alpha * m_hat * d)
        else:
            p = p - lr * m_hat / d
    return p


def _run(p0: torch.Tensor, grads: list[torch.Tensor], **kwargs) -> torch.Tensor:
    p = torch.nn.Parameter(p0.clone())
    opt = DualAdam([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def _grads(n: int, shape: tuple[int, ...] = (7,), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]


# --- the α schedule ------------------------------------------------------------------------------------
def test_alpha_decays_linearly_and_reaches_zero_at_one_over_xi() -> None:
    assert dual_adam_mix(1, 0.01) == pytest.approx(0.99, abs=1e-15)
    assert dual_adam_mix(50, 0.01) == pytest.approx(0.5, abs=1e-15)
    assert dual_adam_mix(99, 0.01) == pytest.approx(0.01, abs=1e-15)  # still >= xi: the blend is used
    assert dual_adam_mix(100, 0.01) == 0.0
    assert dual_adam_mix(10_000, 0.01) == 0.0
    assert [dual_adam_mix(t, 0.25) for t in range(1, 6)] == [0.75, 0.5, 0.25, 0.0, 0.0]
    # the authors' threshold: with 1/xi not an integer, 0 < alpha < xi already gives plain Adam
    assert 0.0 < 1.0 - 33 * 0.03 < 0.03 and dual_adam_mix(33, 0.03) == 0.0
    assert dual_adam_mix(32, 0.03) == pytest.approx(0.04, abs=1e-12)
    assert dual_adam_mix(10**6, 0.0) == 1.0  # xi = 0: pure InvAdam
    assert dual_adam_mix(1, 1.0) == 0.0  # xi = 1: AdamW from the first step


# --- hand-computed steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_first_and_second_step_by_hand(foreach: bool) -> None:
    """θ0 = 1, lr = 0.1, ξ = 0.01, g1 = 0.5, g2 = −1 (float64), derived by hand from the equations:

    T = 1: α = 0.99, m̂ = g = 0.5, D = √0.25 + 1e-8 = 0.50000001, Adam m̂/D = 0.99999998, inverse
    m̂·D = 0.250000005, step 0.01·0.99999998 + 0.99·0.250000005 = 0.25750000475, θ1 = 0.974249999525.
    T = 2: α = 0.98, m = −0.055, m̂ = −0.055/0.19 = −0.2894736842, v = 1.24975e-3, v̂ = v/0.001999,
    D = √v̂ + ε = 0.7906880609, m̂/D = −0.3661035224, m̂·D = −0.2288833860, step = 0.02·(−0.3661035224)
    + 0.98·(−0.2288833860) = −0.2316277888, θ2 = 0.974249999525 + 0.02316277888 = 0.9974127784.
    """
    p = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = DualAdam([p], lr=0.1, switch_rate=0.01, foreach=foreach)
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    assert p.item() == pytest.approx(0.974249999525, abs=1e-13)
    p.grad = torch.tensor([-1.0], dtype=torch.float64)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg"].item() == pytest.approx(-0.055, abs=1e-15)
    assert state["exp_avg_sq"].item() == pytest.approx(1.24975e-3, abs=1e-15)
    assert state["step"].item() == 2 and opt.param_groups[0]["global_step"] == 2
    assert p.item() == pytest.approx(0.9974127784020093, abs=1e-13)


@pytest.mark.parametrize("foreach", [False, True])
def test_first_step_closed_form(foreach: bool) -> None:
    """At T = 1, m̂ = g and D = |g| + ε: the step is (1 − α)·g/(|g| + ε) + α·g·(|g| + ε), α = 1 − ξ."""
    g = torch.tensor([3.0, -0.02, 1e-3, -7.0, 0.0], dtype=torch.float64)
    xi, lr = 0.3, 1e-2
    moved = -_run(torch.zeros(5, dtype=torch.float64), [g], lr=lr, switch_rate=xi, foreach=foreach)
    d = g.abs() + EPS
    torch.testing.assert_close(moved, lr * ((1 - (1 - xi)) * g / d + (1 - xi) * g * d), rtol=1e-14, atol=0)


# --- the authors' equations, pytorch_optimizer, AdamW ----------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("switch_rate", [0.01, 0.15, 0.03])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_the_authors_equations(foreach: bool, switch_rate: float, weight_decay: float) -> None:
    """12 steps: ξ = 0.15 switches to Adam at T = 7 (α = 1 − 7ξ < ξ), ξ = 0.03 keeps the blend throughout."""
    p0 = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = [g * s for g, s in zip(_grads(12), (1, 1e-3, 10, 1, 1e-6, 5, 1, 1, 0.1, 2, 1, 1))]
    kwargs = dict(lr=3e-3, switch_rate=switch_rate, weight_decay=weight_decay)
    ours = _run(p0, grads, **kwargs, foreach=foreach)
    torch.testing.assert_close(ours, authors_dual_adam(p0, grads, **kwargs), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
def test_agrees_with_pytorch_optimizer(foreach: bool) -> None:
    """pytorch_optimizer 4.1's DualAdam, 10 steps crossing the switch (ξ = 0.2: α_4 = 1 − 4·0.2 rounds to
    0.19999999999999996 < ξ, so both take Adam's step from T = 4, as the authors' threshold does).
    Mapping: lr, betas, eps, switch_rate as ours; weight_decay with weight_decouple=True, fixed_decay=False.
    Known disagreement: its default weight_decouple=False adds λθ to the gradient (L2), while the authors'
    code (and ours) decays decoupled, θ ← θ − ηλθ; the defaults therefore differ whenever λ > 0. Its
    bias corrections use the group's step count, ours each parameter's (equal here: every step has a
    gradient)."""
    from pytorch_optimizer import DualAdam as ReferenceDualAdam

    p0 = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = _grads(10, (3, 5), seed=5)
    kwargs = dict(lr=2e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, switch_rate=0.2)
    ours = _run(p0, grads, **kwargs, foreach=foreach)
    p = torch.nn.Parameter(p0.clone())
    reference = ReferenceDualAdam([p], **kwargs, weight_decouple=True, fixed_decay=False, foreach=foreach)
    for g in grads:
        p.grad = g.clone()
        reference.step()
    torch.testing.assert_close(ours, p.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
def test_is_adamw_once_alpha_is_zero(foreach: bool) -> None:
    """ξ = 1: α = 0 from T = 1, so DualAdam is torch AdamW (ε on √v̂) step for step (float64)."""
    ours, theirs = make_mlp(torch.float64), make_mlp(torch.float64)
    train(ours, DualAdam(ours.parameters(), lr=1e-2, weight_decay=0.05, switch_rate=1.0, foreach=foreach), 20)
    train(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, eps=EPS, weight_decay=0.05, foreach=foreach), 20)
    torch.testing.assert_close(flat(ours), flat(theirs), rtol=0, atol=1e-12)


def test_steps_after_the_switch_are_adamw_steps_on_the_same_state() -> None:
    """ξ = 0.25: blend at T = 1..3 (α = 0.75, 0.5, 0.25), then from T = 4 exactly AdamW's step continued
    from DualAdam's moments (torch AdamW given the same exp_avg, exp_avg_sq, step)."""
    p0 = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = _grads(7, (6,), seed=9)
    p = torch.nn.Parameter(p0.clone())
    opt = DualAdam([p], lr=1e-2, weight_decay=0.1, switch_rate=0.25)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    adamw = torch.optim.AdamW([q], lr=1e-2, eps=EPS, weight_decay=0.1, foreach=False)
    adamw.state[q] = {k: v.clone() for k, v in opt.state[p].items()}
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-15)
    assert not torch.allclose(p0, _run(p0, grads, lr=1e-2, weight_decay=0.1, switch_rate=1.0))  # the blend mattered


# --- the overflow guard --------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_overflowing_blend_takes_adams_step_and_ordinary_entries_keep_the_blend(foreach: bool) -> None:
    """fp32, T = 1, α = 0.99, lr = 1e-3: g = 1e20 makes m̂·D = 1e40 overflow, so that entry takes Adam's step
    −lr·g/(|g| + ε) = −1e-3; g = 100 gives a large but representable blend (0.01·1 + 0.99·1e4 = 9900.01,
    θ = −9.90001), which is kept; g = 0.5 gives −lr·(0.01·0.99999998 + 0.99·0.250000005)."""
    out = _run(torch.zeros(3), [torch.tensor([1e20, 100.0, 0.5])], lr=1e-3, foreach=foreach)
    expected = torch.tensor([-1e-3, -1e-3 * 9900.0099999, -1e-3 * 0.25750000475])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_fp16_weights_never_overflow(foreach: bool) -> None:
    """fp16: g = 6e4 (finite) gives a blend of 0.99·3.6e9·lr = 3.6e6, beyond fp16's 65504: Adam's step
    −1e-3 instead; g = 300 gives 0.99·9e4·lr = 89.1, representable and kept."""
    out = _run(torch.zeros(2, dtype=torch.float16), [torch.tensor([6e4, 300.0], dtype=torch.float16)],
               lr=1e-3, foreach=foreach)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.tensor([-1e-3, -1e-3 * (0.01 + 0.99 * 300.0 * 300.0)]),
                               rtol=1e-3, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("value", [1e10, 1e20, 1e30, 3e38])
def test_huge_finite_gradients_on_a_quadratic_keep_weights_finite(foreach: bool, value: float) -> None:
    """The inverse step grows like g², so on the quadratic ½‖θ − y‖² a huge gradient feeds back: weights
    stay finite for 8 steps (gradients computed from the weights, so they grow too)."""
    p = torch.nn.Parameter(torch.full((4,), 0.5))
    opt = DualAdam([p], lr=1e-3, foreach=foreach)
    for t in range(8):
        p.grad = p.detach() - 1.0
        if t == 1:
            p.grad[0] = value
        opt.step()
        assert torch.isfinite(p).all(), t


# --- paths, 8-bit, resume, closure -------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_paths_agree_and_half_precision_keeps_fp32_state(foreach: bool) -> None:
    model, reference = make_mlp(torch.float32), make_mlp(torch.float32)
    kwargs = dict(lr=1e-2, weight_decay=0.1, switch_rate=0.1)  # crosses the switch at T = 10
    train(model, DualAdam(model.parameters(), **kwargs, foreach=foreach), 14, spikes={5: 1e2})
    train(reference, DualAdam(reference.parameters(), **kwargs, foreach=False), 14, spikes={5: 1e2})
    torch.testing.assert_close(flat(model), flat(reference), rtol=1e-6, atol=1e-7)

    half = make_mlp(torch.bfloat16)
    opt = DualAdam(half.parameters(), lr=1e-2, foreach=foreach)
    train(half, opt, 3)
    assert all(s[k].dtype == torch.float32 for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_8bit_state_stays_close_to_32bit() -> None:
    gen = torch.Generator().manual_seed(0)
    p0 = 0.1 * torch.randn(64, 128, generator=gen)
    grads = [0.01 * torch.randn(64, 128, generator=gen) for _ in range(8)]
    w32 = _run(p0, grads, lr=1e-3, switch_rate=0.2, foreach=False)
    w8 = _run(p0, grads, lr=1e-3, switch_rate=0.2, foreach=True, state_bits=8)
    largest_move = (w32 - p0).abs().max().item()
    assert (w8 - w32).abs().max().item() < 0.25 * largest_move


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_crossing_the_switch_is_bit_exact(foreach: bool) -> None:
    """Saved at T = 5 (α = 0.5), resumed in a fresh optimizer: the global step (hence α) comes from the
    checkpoint, and both runs cross the switch at T = 10 identically."""

    def make(m: torch.nn.Module) -> DualAdam:
        return DualAdam(m.parameters(), lr=1e-2, weight_decay=0.1, switch_rate=0.1, foreach=foreach)

    model = make_mlp(torch.float32)
    opt = make(model)
    train(model, opt, 5)
    resumed, opt2 = restore_from_checkpoint(model, opt, make, seed=7)
    assert opt2.param_groups[0]["global_step"] == 5
    train(model, opt, 8, start=5)
    train(resumed, opt2, 8, start=5)
    assert torch.equal(flat(resumed), flat(model))


def test_closure_with_backward_works_inside_no_grad() -> None:
    """Lightning calls ``optimizer.step(closure)`` inside ``torch.no_grad()``. The authors' ``step`` calls the
    closure under its own ``no_grad`` (the control below: that raises); ours runs it under enable_grad."""
    model = make_mlp(torch.float32)
    opt = DualAdam(model.parameters())
    x, y = torch.randn(4, 6), torch.randn(4, 3)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad(), pytest.raises(RuntimeError, match="does not require grad"):
        closure()  # what the authors' step does
    before = flat(model)
    with torch.no_grad():
        loss = opt.step(closure)
    assert loss is not None and loss.requires_grad
    assert all(p.grad is not None for p in model.parameters())
    assert not torch.equal(flat(model), before)


# --- validation and registry ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(eps=-1.0), "eps"),
        (dict(eps=math.nan), "eps"),
        (dict(betas=(0.9, 1.0)), "beta2"),
        (dict(weight_decay=math.inf), "weight_decay"),
        (dict(switch_rate=1.5), "switch_rate"),
        (dict(switch_rate=-0.01), "switch_rate"),
        (dict(switch_rate=math.nan), "switch_rate"),
        (dict(compile="yes"), "compile"),
        (dict(compile=True, state_bits=8), "compile=True with state_bits=8"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DualAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_load_state_dict_revalidates() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = DualAdam([p])
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["switch_rate"] = 2.0
    with pytest.raises(ValueError, match="switch_rate"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["switch_rate"] == 0.01


def test_registry_entry() -> None:
    info = get("dual_adam")
    assert info.cls is DualAdam and get("DualAdam") is info
    assert info.compile and info.state_bits_8 and info.foreach and info.adam_first_moment
    assert info.first_moment == "exp_avg" and info.second_moment_like_grad_sq
    assert info.defaults["switch_rate"] == 0.01 and info.defaults["lr"] == 1e-3


# --- compiled ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_step_matches_eager_across_the_switch() -> None:
    """compile=True (inductor's C++ backend here): ξ = 0.25 switches at T = 4; at most two graphs (blend,
    Adam), α and lr are device scalars (no recompile as they change), agreement with eager, exact resume."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def make(m: torch.nn.Module, **kw) -> DualAdam:
        return DualAdam(m.parameters(), lr=1e-2, weight_decay=0.1, switch_rate=0.25, **kw)

    eager, model = make_mlp(torch.float32), make_mlp(torch.float32)
    eager_opt, opt = make(eager, foreach=True), make(model, compile=True)
    for start in range(0, 6, 3):
        for o in (eager_opt, opt):
            o.param_groups[0]["lr"] = 1e-2 / (1 + start)
        train(eager, eager_opt, 3, start=start)
        train(model, opt, 3, start=start)
    torch.testing.assert_close(flat(model), flat(eager), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 2
    resumed, opt2 = restore_from_checkpoint(model, opt, lambda m: make(m, compile=True), seed=4)
    train(model, opt, 2, start=6)
    train(resumed, opt2, 2, start=6)
    assert torch.equal(flat(resumed), flat(model))
    torch._dynamo.reset()
