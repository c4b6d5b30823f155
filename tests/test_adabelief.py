"""AdaBelief numeric checks (lightning_optim/adabelief.py): hand-computed steps, closed forms, the authors'
equations, pytorch_optimizer as a second opinion, path agreement, exact resume, validation.

The reference :func:`reference_run` below is the update of the authors' adabelief-pytorch 0.2.1 as we read
it (pypi_packages/adabelief_pytorch0.2.1/adabelief_pytorch/AdaBelief.py, lines 174-238), in plain Python
floats, element by element, with one documented change: with amsgrad and rectify, the running max also
divides the rectified update (their PyTorch code divides by s there; their TF 0.2.1 code uses the max).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import flat, make_mlp, restore_from_checkpoint, train
from lightning_optim import state_adapter
from lightning_optim.adabelief import AdaBelief, adabelief_step_size
from lightning_optim.registry import get

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


# -- the authors' equations, in plain floats ------------------------------------------------------------
def reference_run(
    p0: list[list[float]],
    grads: list[list[list[float] | None]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
) -> list[list[float]]:
    """p0: one list of floats per parameter; grads[k][j]: parameter j's gradient at step k (None: no grad).
    Every parameter counts its own steps (the authors' ``state['step']``)."""
    b1, b2 = betas
    params = [list(p) for p in p0]
    m = [[0.0] * len(p) for p in p0]
    s = [[0.0] * len(p) for p in p0]
    s_max = [[0.0] * len(p) for p in p0]
    t = [0] * len(p0)
    for step_grads in grads:
        for j, g in enumerate(step_grads):
            if g is None:
                continue
            t[j] += 1
            bc1, bc2 = 1 - b1 ** t[j], 1 - b2 ** t[j]
            rho_inf = 2 / (1 - b2) - 1
            rho = rho_inf - 2 * t[j] * b2 ** t[j] / bc2
            for i, gi in enumerate(g):
                params[j][i] *= 1 - lr * weight_decay
                m[j][i] = b1 * m[j][i] + (1 - b1) * gi
                r = gi - m[j][i]
                s[j][i] = b2 * s[j][i] + (1 - b2) * r * r + eps
                s_max[j][i] = max(s_max[j][i], s[j][i])
                v = s_max[j][i] if amsgrad else s[j][i]
                if not rectify:
                    params[j][i] -= lr / bc1 * m[j][i] / (math.sqrt(v) / math.sqrt(bc2) + eps)
                elif rho >= 5:
                    rt = math.sqrt(bc2 * (rho - 4) / (rho_inf - 4) * (rho - 2) / rho * rho_inf / (rho_inf - 2))
                    params[j][i] -= lr * rt / bc1 * m[j][i] / (math.sqrt(v) + eps)
                elif degenerated_to_sgd:
                    params[j][i] -= lr / bc1 * m[j][i]
    return params


def run_ours(p0, grads, **kwargs) -> list[list[float]]:
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in p0]
    opt = AdaBelief(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else torch.tensor(g, dtype=torch.float64)
        opt.step()
    return [p.detach().tolist() for p in params]


def random_grads(steps: int, sizes: list[int], seed: int = 0, skip: dict[int, set[int]] | None = None):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        row = []
        for j, n in enumerate(sizes):
            g = (torch.randn(n, generator=gen, dtype=torch.float64) * (1 + k % 3)).tolist()
            row.append(None if skip and k in skip.get(j, set()) else g)
        out.append(row)
    return out


# -- hand-computed steps ----------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_first_two_steps_by_hand_without_rectify(foreach: bool) -> None:
    """lr 0.1, betas (0.9, 0.99), eps 1e-4 (large, so where it enters shows), one entry."""
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = AdaBelief([p], lr=0.1, betas=(0.9, 0.99), eps=1e-4, rectify=False, foreach=foreach)
    # step 1, g = 0.2: m = 0.02, r = 0.18, s = 0.01·0.0324 + 1e-4 = 4.24e-4 (ε inside the EMA)
    # θ = 1 − 0.1/(1 − 0.9)·0.02 / (√(4.24e-4/(1 − 0.99)) + 1e-4) = 1 − 0.02/(√0.0424 + 1e-4)
    p.grad = torch.tensor([0.2], dtype=torch.float64)
    opt.step()
    assert opt.state[p]["exp_avg"].item() == pytest.approx(0.02, rel=1e-14)
    assert opt.state[p]["exp_avg_var"].item() == pytest.approx(4.24e-4, rel=1e-14)
    theta1 = 1 - 0.02 / (math.sqrt(0.0424) + 1e-4)
    assert theta1 == pytest.approx(0.902918561, abs=1e-9)
    assert p.item() == pytest.approx(theta1, rel=1e-14)
    # step 2, g = −0.4: m = 0.9·0.02 − 0.04 = −0.022, r = −0.378, s = 0.99·4.24e-4 + 0.01·0.142884 + 1e-4
    p.grad = torch.tensor([-0.4], dtype=torch.float64)
    opt.step()
    m2, s2 = -0.022, 0.99 * 4.24e-4 + 0.01 * 0.378**2 + 1e-4
    assert s2 == pytest.approx(1.948600e-3, rel=1e-12)
    theta2 = theta1 - 0.1 / (1 - 0.81) * m2 / (math.sqrt(s2 / (1 - 0.99**2)) + 1e-4)
    assert opt.state[p]["exp_avg"].item() == pytest.approx(m2, rel=1e-13)
    assert opt.state[p]["exp_avg_var"].item() == pytest.approx(s2, rel=1e-13)
    assert p.item() == pytest.approx(theta2, rel=1e-13)
    assert p.item() == pytest.approx(0.939909512, abs=1e-9)
    # the test can tell where ε goes: Adam's placement (ε only on √ŝ) would give another θ
    adam_eps = theta1 - 0.1 / 0.19 * m2 / (math.sqrt((s2 - 1e-4 - 0.99e-4) / (1 - 0.99**2)) + 1e-4)
    assert abs(adam_eps - theta2) > 1e-4


@pytest.mark.parametrize("foreach", [False, True])
def test_rectified_run_by_hand(foreach: bool) -> None:
    """Default rectify=True, β2 = 0.999: ρ_t < 5 for t ≤ 5 (SGD steps with bias-corrected momentum),
    t = 6 is the first adaptive step, divided by √s + ε (not bias-corrected) and scaled by r_t."""
    lr, eps = 0.1, 1e-6
    p = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = AdaBelief([p], lr=lr, eps=eps, foreach=foreach)
    gs = [1.0, -0.5, 0.25, 2.0, 1.0, 0.5]
    m = s = theta = 0.0
    for t, g in enumerate(gs, start=1):
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        m = 0.9 * m + 0.1 * g
        s = 0.999 * s + 0.001 * (g - m) ** 2 + eps
        rho = 1999 - 2 * t * 0.999**t / (1 - 0.999**t)
        if t <= 5:
            assert rho < 5
            theta -= lr / (1 - 0.9**t) * m
        else:
            assert rho == pytest.approx(5.994163752, abs=1e-9)
            r = math.sqrt((1 - 0.999**6) * (rho - 4) / 1995 * (rho - 2) / rho * 1999 / 1997)
            theta -= lr * r / (1 - 0.9**6) * m / (math.sqrt(s) + eps)
        assert p.item() == pytest.approx(theta, rel=1e-13, abs=1e-15), t
    assert theta == pytest.approx(-0.300288340, abs=1e-9)
    kw = dict(lr=lr, beta1=0.9, beta2=0.999, rectify=True, degenerated_to_sgd=True)
    assert adabelief_step_size(1, **kw) == ("sgd", pytest.approx(1.0))  # lr/(1 − β1)
    assert adabelief_step_size(5, **kw)[0] == "sgd" and adabelief_step_size(6, **kw)[0] == "rectified"


def test_first_sgd_steps_by_hand() -> None:
    """θ1 = −0.1·m1/(1 − 0.9) = −0.1·g1; θ2 = θ1 − 0.1/0.19·(0.9·0.1 − 0.05)."""
    p = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = AdaBelief([p], lr=0.1)
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    assert p.item() == pytest.approx(-0.1, rel=1e-14)
    p.grad = torch.tensor([-0.5], dtype=torch.float64)
    opt.step()
    assert p.item() == pytest.approx(-0.1 - 0.1 / 0.19 * 0.04, rel=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
def test_not_degenerated_to_sgd_only_decays_before_the_threshold(foreach: bool) -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = AdaBelief([p], lr=0.1, weight_decay=0.5, degenerated_to_sgd=False, foreach=foreach)
    for t in range(1, 7):
        before = p.detach().clone()
        p.grad = torch.tensor([0.3, -0.7], dtype=torch.float64)
        opt.step()
        if t <= 5:  # no update at all, the decoupled decay still applies
            torch.testing.assert_close(p.detach(), before * 0.95, rtol=1e-15, atol=0)
        else:
            assert not torch.allclose(p.detach(), before * 0.95)


@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_amsgrad_divides_by_the_running_max(rectify: bool, foreach: bool) -> None:
    """A large residual at step 1 then small ones: s shrinks, its max does not, so steps are smaller
    with amsgrad (rectified steps included: our deviation from the authors' PyTorch code)."""
    grads = [[[5.0]], [[0.1]], [[0.1]], [[0.1]], [[0.1]], [[0.1]], [[0.1]], [[0.1]]]
    kw = dict(lr=0.1, betas=(0.5, 0.9), eps=1e-8, rectify=rectify)
    with_max = run_ours([[0.0]], grads, amsgrad=True, foreach=foreach, **kw)
    without = run_ours([[0.0]], grads, amsgrad=False, foreach=foreach, **kw)
    assert with_max[0][0] == pytest.approx(reference_run([[0.0]], grads, amsgrad=True, **kw)[0][0], rel=1e-12)
    assert without[0][0] == pytest.approx(reference_run([[0.0]], grads, amsgrad=False, **kw)[0][0], rel=1e-12)
    assert abs(with_max[0][0] - without[0][0]) > 1e-3
    # betas (0.5, 0.9): rho_inf = 19, rho_t >= 5 from t = 7 on, so the rectified run ends with adaptive steps
    assert adabelief_step_size(7, lr=0.1, beta1=0.5, beta2=0.9, rectify=True, degenerated_to_sgd=True)[0] == "rectified"


def test_amsgrad_state_only_when_on() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3))
    opt = AdaBelief([{"params": [p]}, {"params": [q], "amsgrad": True}])
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert set(opt.state[p]) == {"exp_avg", "exp_avg_var", "step"}
    assert set(opt.state[q]) == {"exp_avg", "exp_avg_var", "max_exp_avg_var", "step"}
    torch.testing.assert_close(opt.state[q]["max_exp_avg_var"], opt.state[q]["exp_avg_var"], rtol=0, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_decoupled_decay_before_the_update(foreach: bool) -> None:
    """g = 0 on step 1: m = 0, so θ ← θ(1 − ηλ) exactly; then a full step equals decay-then-update."""
    p = torch.nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))
    opt = AdaBelief([p], lr=0.05, weight_decay=0.2, rectify=False, foreach=foreach)
    p.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.0, -1.0], dtype=torch.float64) * 0.99, rtol=0, atol=0)
    assert opt.state[p]["exp_avg_var"].tolist() == [1e-16, 1e-16]  # s = ε: ε sits inside the EMA
    grads = [[[0.0, 0.0]], [[0.3, 0.4]], [[-0.2, 0.1]]]
    kw = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.2, rectify=False)
    expected = reference_run([[2.0, -1.0]], grads, **kw)
    for g in grads[1:]:
        p.grad = torch.tensor(g[0], dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(p.detach().tolist(), expected[0], rtol=1e-13, atol=0)


def test_closed_form_of_s_for_a_constant_gradient() -> None:
    """g constant: m_t = g(1 − β1^t), r_t = g·β1^t, s_t = Σ_k β2^(t−k)·((1 − β2)·g²·β1^(2k) + ε)."""
    b1, b2, eps, g, steps = 0.9, 0.99, 1e-6, 3.0, 30
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = AdaBelief([p], betas=(b1, b2), eps=eps)
    for _ in range(steps):
        p.grad = torch.full((1,), g, dtype=torch.float64)
        opt.step()
    s = sum(b2 ** (steps - k) * ((1 - b2) * g * g * b1 ** (2 * k) + eps) for k in range(1, steps + 1))
    assert opt.state[p]["exp_avg"].item() == pytest.approx(g * (1 - b1**steps), rel=1e-13)
    assert opt.state[p]["exp_avg_var"].item() == pytest.approx(s, rel=1e-12)


# -- the authors' equations, several steps ------------------------------------------------------------------
@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_the_authors_equations(rectify: bool, amsgrad: bool, foreach: bool) -> None:
    """12 steps, two parameters, the second without gradients on steps 0, 3 and 4 (its own counter lags)."""
    p0 = [[0.5, -1.0, 2.0], [0.1, 0.2]]
    grads = random_grads(12, [3, 2], skip={1: {0, 3, 4}})
    kw = dict(lr=0.02, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, rectify=rectify)
    expected = reference_run(p0, grads, **kw)
    got = run_ours(p0, grads, foreach=foreach, **kw)
    for e, o in zip(expected, got):
        assert o == pytest.approx(e, rel=1e-12, abs=1e-14)


def test_not_degenerated_matches_the_authors_equations() -> None:
    p0 = [[0.5, -1.0]]
    grads = random_grads(9, [2], seed=3)
    kw = dict(lr=0.02, betas=(0.9, 0.999), eps=1e-16, degenerated_to_sgd=False)
    for foreach in (False, True):
        expected = reference_run(p0, grads, **kw)[0]
        assert run_ours(p0, grads, foreach=foreach, **kw)[0] == pytest.approx(expected, rel=1e-12)


# -- pytorch_optimizer, a second opinion -------------------------------------------------------------------
def _pytorch_optimizer_run(model: torch.nn.Module, steps: int, **kw) -> None:
    """pytorch_optimizer.AdaBelief with our arguments mapped: amsgrad → ams_bound, decoupled decay
    (weight_decouple=True, fixed_decay=False), the threshold 5 (n_sma_threshold). Its rectify default is
    False (the authors' 0.2 default, and ours, is True), so it is always passed."""
    amsgrad = kw.pop("amsgrad")
    opt = pytorch_optimizer.AdaBelief(
        model.parameters(), ams_bound=amsgrad, weight_decouple=True, fixed_decay=False, n_sma_threshold=5,
        foreach=False, **kw,
    )
    train(model, opt, steps)


@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_agrees_with_pytorch_optimizer(rectify: bool, amsgrad: bool, foreach: bool) -> None:
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.05, amsgrad=amsgrad, rectify=rectify)
    ours, theirs = make_mlp(torch.float64), make_mlp(torch.float64)
    train(ours, AdaBelief(ours.parameters(), foreach=foreach, **kw), 10)
    _pytorch_optimizer_run(theirs, 10, **kw)
    torch.testing.assert_close(flat(ours), flat(theirs), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(flat(ours), flat(make_mlp(torch.float64)))


def test_pytorch_optimizer_counts_steps_per_group_we_count_per_parameter() -> None:
    """Known disagreement: pytorch_optimizer keeps one step count per group; the authors (and we) one per
    parameter, so a parameter that got no gradient on the first steps is bias-corrected from its own
    first step (a full SGD step g·lr at its t = 1, not lr·m/(1 − β1^T) with T the group's count)."""
    p0 = [[1.0], [1.0]]
    grads = [[[0.5], None], [[0.5], None], [[0.5], [2.0]]]
    kw = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-16, rectify=True)
    ours = run_ours(p0, grads, **kw)
    for o, e in zip(ours, reference_run(p0, grads, **kw)):
        assert o == pytest.approx(e, rel=1e-14)
    assert ours[1][0] == pytest.approx(1.0 - 0.1 * 2.0, rel=1e-14)  # t = 1: m/(1 − β1) = g
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in p0]
    theirs = pytorch_optimizer.AdaBelief(params, lr=0.1, rectify=True)
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else torch.tensor(g, dtype=torch.float64)
        theirs.step()
    assert params[0].item() == pytest.approx(ours[0][0], rel=1e-14)
    assert params[1].item() == pytest.approx(1.0 - 0.1 / (1 - 0.9**3) * 0.2, rel=1e-14)  # their T = 3


# -- paths, resume, state ---------------------------------------------------------------------------------
CONFIGS = {
    "default": {},
    "no_rectify": dict(rectify=False),
    "amsgrad_rectify": dict(amsgrad=True),
    "amsgrad_no_rectify": dict(amsgrad=True, rectify=False),
}


def _skipping_train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    """train() with the last layer's bias getting no gradient on steps ≡ 1 (mod 4): mixed step counts."""
    bias = list(model.parameters())[-1]
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 + i)
        dtype = bias.dtype
        x, y = torch.randn(8, 6, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward()
            if i % 4 == 1:
                bias.grad = None
            return loss

        opt.step(closure)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_equals_per_parameter(config: str, dtype: torch.dtype) -> None:
    kw = dict(lr=1e-2, eps=1e-10, weight_decay=0.1, **CONFIGS[config])
    a, b = make_mlp(dtype), make_mlp(dtype)
    _skipping_train(a, opt_a := AdaBelief(a.parameters(), foreach=False, **kw), 9)
    _skipping_train(b, opt_b := AdaBelief(b.parameters(), foreach=True, **kw), 9)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(flat(b), flat(a), **tol)
    assert not torch.equal(flat(a), flat(make_mlp(dtype)))
    for opt in (opt_a, opt_b):  # fp32 state (and math) for bf16 parameters too
        assert all(t.dtype == torch.float32 for s in opt.state.values() for t in s.values())


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_continues_bit_for_bit(config: str, foreach: bool) -> None:
    """Saved at step 4 (inside the SGD phase), continued past the switch to rectified steps at t = 6."""
    def make(m: torch.nn.Module) -> AdaBelief:
        return AdaBelief(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach, **CONFIGS[config])

    model = make_mlp(torch.float32)
    _skipping_train(model, opt := make(model), 4)
    resumed, opt2 = restore_from_checkpoint(model, opt, make, seed=5)
    _skipping_train(model, opt, 5, start=4)
    _skipping_train(resumed, opt2, 5, start=4)
    assert torch.equal(flat(resumed), flat(model))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert set(opt.state[p]) == set(opt2.state[q])
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key


@pytest.mark.parametrize("amsgrad", [False, True])
def test_8bit_state(amsgrad: bool) -> None:
    """state_bits=8: a 64×64 weight gets 8-bit moments (the max too with amsgrad), the small bias keeps fp32;
    8-bit foreach = 8-bit per-parameter; 8-bit stays close to 32-bit; a round trip is exact."""
    def run(bits: int, foreach: bool, steps: int = 8, opt=None, params=None):
        gen = torch.Generator().manual_seed(0)
        if params is None:
            params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((64, 64), (64,))]
        if opt is None:
            opt = AdaBelief(params, lr=1e-3, eps=1e-12, amsgrad=amsgrad, state_bits=bits, foreach=foreach)
        for k in range(steps):
            g = torch.Generator().manual_seed(100 + k + int(opt.param_groups[0]["global_step"]) * 7)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * 0.1 + 0.05
            opt.step()
        return params, opt

    p32, _ = run(32, False)
    p8, opt8 = run(8, False)
    p8f, _ = run(8, True)
    state = opt8.state[p8[0]]
    expected = {"exp_avg_codes", "exp_avg_var_codes"} | ({"max_exp_avg_var_codes"} if amsgrad else set())
    assert expected <= set(state) and "exp_avg" not in state
    assert "exp_avg" in opt8.state[p8[1]]
    for a, b in zip(p8, p8f):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    start = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    moved = (p32[0] - start).abs().max()
    assert (p8[0] - p32[0]).abs().max() < 0.5 * moved
    # round trip
    saved = copy.deepcopy(([p.detach().clone() for p in p8], opt8.state_dict()))
    run(8, False, steps=3, opt=opt8, params=p8)
    fresh = [torch.nn.Parameter(t.clone()) for t in saved[0]]
    opt_fresh = AdaBelief(fresh, lr=1e-3, eps=1e-12, amsgrad=amsgrad, state_bits=8, foreach=False)
    opt_fresh.load_state_dict(saved[1])
    run(8, False, steps=3, opt=opt_fresh, params=fresh)
    for a, b in zip(p8, fresh):
        assert torch.equal(a, b)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_step_matches_eager(fresh_dynamo) -> None:
    """compile=True (inductor's C++ backend here) resumed from an eager state dict whose counters differ
    per parameter (the first bias skipped step 0): in one graph per group, that bias takes SGD steps
    while its weight is already rectified (t = 6), equal to the eager multi-tensor path. Two groups:
    rectify + amsgrad + decay, and no rectification. (degenerated_to_sgd=False only changes the value
    a torch.where falls back to, 0 instead of the SGD step; the eager tests cover it.)"""
    configs = [dict(amsgrad=True, weight_decay=0.1), dict(rectify=False)]

    def make(model: torch.nn.Module, **kw) -> AdaBelief:
        params = list(model.parameters())
        groups = [{"params": params[:2], **configs[0]}, {"params": params[2:], **configs[1]}]
        return AdaBelief(groups, lr=1e-2, eps=1e-10, **kw)

    def run(model: torch.nn.Module, opt: AdaBelief, steps: range) -> None:
        bias = list(model.parameters())[1]
        for i in steps:
            gen = torch.Generator().manual_seed(1000 + i)
            x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if i == 0:
                bias.grad = None
            opt.step()

    eager = make_mlp(torch.float32)
    run(eager, eager_opt := make(eager, foreach=True), range(3))
    model = make_mlp(torch.float32, seed=3)
    model.load_state_dict(eager.state_dict())
    opt = make(model, compile=True)
    opt.load_state_dict(copy.deepcopy(eager_opt.state_dict()))
    for group in opt.param_groups:  # the checkpoint's groups say compile=False, foreach=True
        group.update(compile=True, foreach=None)
    run(eager, eager_opt, range(3, 8))
    run(model, opt, range(3, 8))
    torch.testing.assert_close(flat(model), flat(eager), rtol=1e-5, atol=1e-6)
    assert not torch.equal(flat(model), flat(make_mlp(torch.float32)))
    weight, bias = list(model.parameters())[:2]
    assert (opt.state[weight]["step"].item(), opt.state[bias]["step"].item()) == (8, 7)
    assert all(s["step"].device == p.device for p, s in opt.state.items())
    assert 1 <= counters["stats"]["unique_graphs"] <= 2  # one per group


# -- validation, registry, adapters -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, value",
    [
        ("lr", -1.0), ("lr", math.nan), ("eps", -1e-16), ("eps", math.inf), ("weight_decay", math.nan),
        ("betas", (0.9, 1.0)), ("betas", (math.nan, 0.999)), ("amsgrad", 1), ("rectify", "yes"),
        ("degenerated_to_sgd", None), ("compile", 1), ("state_bits", 16),
    ],
)
def test_validation_names_the_argument(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name.split("_")[0] if name == "betas" else name):
        AdaBelief([torch.nn.Parameter(torch.ones(2))], **{name: value})


def test_compile_with_8bit_state_is_refused() -> None:
    with pytest.raises(ValueError, match="compile=True with state_bits=8"):
        AdaBelief([torch.nn.Parameter(torch.ones(2))], compile=True, state_bits=8)


def test_defaults_are_the_authors_0_2_defaults() -> None:
    info = get("ada_belief")
    assert info.cls is AdaBelief
    authors = dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, amsgrad=False, rectify=True, degenerated_to_sgd=True
    )
    assert {k: info.defaults[k] for k in authors} == authors
    assert info.first_moment == "exp_avg" and not info.second_moment_like_grad_sq and not info.adam_first_moment
    assert info.compile and info.state_bits_8 and info.moments == 2


def test_state_adapter_resets_every_moment() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdaBelief([p], amsgrad=True)
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    opt.step()
    adapter = state_adapter(opt)
    assert adapter.second_moment(opt.state[p]) is opt.state[p]["exp_avg_var"]
    adapter.reset_(opt.state[p])
    for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
        assert torch.equal(opt.state[p][key], torch.zeros(3)), key
    assert opt.state[p]["step"].item() == 1  # bias-correction bookkeeping is kept


def test_callbacks_that_need_adam_moments_refuse_it() -> None:
    """s is not the EMA of g² (SpikeAwareClipping clips against that) and there is no exp_avg_sq
    (AdaptiveMomentum's metric); both refuse at fit start instead of misreading the state."""
    from lightning_optim.callbacks import AdaptiveMomentum, SpikeAwareClipping

    opt = AdaBelief([torch.nn.Parameter(torch.ones(2))])
    for callback in (SpikeAwareClipping(), AdaptiveMomentum()):
        with pytest.raises(TypeError):
            callback.check_optimizer(opt)
