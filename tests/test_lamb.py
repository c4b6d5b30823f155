"""LAMB (You et al., ICLR 2020, arXiv 1904.00962, Algorithm 2): steps by hand, the trust ratio and its
zero-norm cases, the update-norm closed form, global gradient-norm clipping, and agreement with an
independent scalar transcription of Algorithm 2 and with pytorch_optimizer.Lamb."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_optimizer
import torch
from torch._dynamo.utils import counters

from conftest import flat, make_mlp, restore_from_checkpoint, train
from lightning_optim.lamb import LAMB, trust_factors
from lightning_optim.registry import get

F64 = torch.float64
PATHS = [dict(foreach=False), dict(foreach=True), dict(foreach=False, state_bits=8)]


def _algorithm2(w, grads, *, lr, beta1, beta2, eps, wd, bias_correction=True, clamp=None):
    """Algorithm 2 on one tensor given as a list of Python floats, every number by hand (float64).

    Returns the weights after each step."""
    m, v, out = [0.0] * len(w), [0.0] * len(w), []
    for t, g in enumerate(grads, start=1):
        m = [beta1 * mi + (1 - beta1) * gi for mi, gi in zip(m, g)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g)]
        bc1, bc2 = (1 - beta1**t, 1 - beta2**t) if bias_correction else (1.0, 1.0)
        r = [(mi / bc1) / (math.sqrt(vi / bc2) + eps) + wd * wi for mi, vi, wi in zip(m, v, w)]
        w_norm, r_norm = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in r))
        ratio = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
        if clamp is not None:
            ratio = min(ratio, clamp)
        w = [wi - lr * ratio * ri for wi, ri in zip(w, r)]
        out.append(w)
    return out


@pytest.mark.parametrize("path", PATHS)
def test_two_steps_by_hand(path: dict) -> None:
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=F64))  # ‖w‖ = 5
    opt = LAMB([p], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.1, **path)
    p.grad = torch.tensor([1.0, -2.0], dtype=F64)
    opt.step()
    # t = 1: m̂ = g, v̂ = g², r = sign(g) + λw = [1.3, −0.6], ρ = 5/√2.05
    rho = 5 / math.sqrt(2.05)
    expected = [3.0 - 0.1 * rho * 1.3, 4.0 + 0.1 * rho * 0.6]
    assert p.detach().tolist() == pytest.approx(expected, rel=0, abs=1e-14)
    assert opt.state[p]["step"].item() == 1.0
    p.grad = torch.tensor([0.5, 1.0], dtype=F64)
    opt.step()
    # t = 2: m = [0.14, −0.08], m̂ = m/0.19; v = [0.001249, 0.004996], v̂ = v/0.001999; r = m̂/√v̂ + λw
    w = expected
    r = [(0.14 / 0.19) / math.sqrt(0.001249 / 0.001999) + 0.1 * w[0],
         (-0.08 / 0.19) / math.sqrt(0.004996 / 0.001999) + 0.1 * w[1]]
    rho = math.hypot(*w) / math.hypot(*r)
    expected = [w[0] - 0.1 * rho * r[0], w[1] - 0.1 * rho * r[1]]
    assert p.detach().tolist() == pytest.approx(expected, rel=0, abs=1e-13)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.14, -0.08], dtype=F64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("clamp", [None, 0.5])
def test_matches_algorithm2_by_hand_over_ten_steps(path: dict, bias_correction: bool, clamp: float | None) -> None:
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(6, generator=gen, dtype=F64)
    grads = [torch.randn(6, generator=gen, dtype=F64) * 10 ** (i % 3 - 1) for i in range(10)]
    hyper = dict(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, wd=0.02, bias_correction=bias_correction, clamp=clamp)
    expected = _algorithm2(w0.tolist(), [g.tolist() for g in grads], **hyper)
    p = torch.nn.Parameter(w0.clone())
    opt = LAMB(
        [p], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02, bias_correction=bias_correction,
        clamp_trust_ratio=clamp, **path,
    )
    for g, w in zip(grads, expected):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), torch.tensor(w, dtype=F64), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
def test_trust_ratio_zero_norm_cases(foreach: bool) -> None:
    """ρ = 1 where ‖w‖ = 0 (a fresh bias: a plain Adam step) and where ‖r‖ = 0 (zero gradient, λ = 0: no
    move); nothing is NaN."""
    zero_w = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    zero_r = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=F64))
    both = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    opt = LAMB([zero_w, zero_r, both], lr=0.1, eps=1e-6, weight_decay=0.0, foreach=foreach)
    zero_w.grad = torch.tensor([2.0, -0.5, 0.0], dtype=F64)
    zero_r.grad = torch.zeros(2, dtype=F64)
    both.grad = torch.zeros(2, dtype=F64)
    opt.step()
    # t = 1: r = g/(|g| + ε)
    g = zero_w.grad
    torch.testing.assert_close(zero_w.detach(), -0.1 * g / (g.abs() + 1e-6), rtol=1e-15, atol=0)
    assert zero_r.detach().tolist() == [1.0, -1.0]
    assert both.detach().tolist() == [0.0, 0.0]
    assert trust_factors(torch.tensor([0.0, 2.0, 2.0]), torch.tensor([3.0, 0.0, 4.0]), None)[0].tolist() == [1, 1, 2]


@pytest.mark.parametrize("path", PATHS)
def test_every_tensor_moves_by_lr_times_its_norm(path: dict) -> None:
    """Closed form of the trust ratio: ‖Δw‖ = η·‖w‖ for every tensor and step, whatever the gradients."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=F64)) for s in ((5, 3), (7,), (64, 64))]
    opt = LAMB(params, lr=0.03, weight_decay=0.1, **path)
    for step in range(5):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape, dtype=F64) * 10.0**step
        opt.step()
        for p, b in zip(params, before):
            assert (p.detach() - b).norm().item() == pytest.approx(0.03 * b.norm().item(), rel=1e-12)


def test_clamp_trust_ratio_bounds_the_ratio() -> None:
    """With ‖w‖ ≫ ‖r‖ the ratio is capped: Δw = −η·c·r with c = 1 and, at t = 1, r = g/(|g| + ε)."""
    p = torch.nn.Parameter(torch.full((4,), 100.0, dtype=F64))
    opt = LAMB([p], lr=1e-3, weight_decay=0.0, clamp_trust_ratio=1.0)
    p.grad = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=F64)
    opt.step()
    r = p.grad / (p.grad.abs() + 1e-6)  # step 1: m̂ = g, √v̂ = |g|
    torch.testing.assert_close(p.detach(), 100.0 - 1e-3 * r, rtol=0, atol=1e-14)


# --- max_grad_norm --------------------------------------------------------------------------------------
def test_max_grad_norm_clips_by_the_global_norm_of_all_groups() -> None:
    a = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=F64))
    b = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=F64))
    opt = LAMB([{"params": [a], "max_grad_norm": 1.0}, {"params": [b]}], lr=0.1, weight_decay=0.0)
    a.grad = torch.tensor([3.0, 0.0], dtype=F64)
    b.grad = torch.tensor([0.0, 4.0], dtype=F64)
    opt.step()
    # global norm 5 over both groups; only the group with max_grad_norm = 1 is scaled by 1/5
    assert a.grad.tolist() == pytest.approx([0.6, 0.0], abs=1e-15)
    assert b.grad.tolist() == [0.0, 4.0]
    assert opt.state[a]["exp_avg"].tolist() == pytest.approx([0.06, 0.0], abs=1e-15)


@pytest.mark.parametrize("path", PATHS)
def test_clipping_equals_prescaled_gradients(path: dict) -> None:
    """A clipped run is the unclipped run on gradients scaled by c/n (and unchanged below the limit)."""
    torch.manual_seed(0)
    shapes = ((64, 64), (5,))
    base = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * (3.0 if i % 2 else 0.01) for s in shapes] for i in range(4)]
    clipped = [torch.nn.Parameter(t.clone()) for t in base]
    plain = [torch.nn.Parameter(t.clone()) for t in base]
    opt_c = LAMB(clipped, lr=0.01, max_grad_norm=2.0, **path)
    opt_p = LAMB(plain, lr=0.01, **path)
    for step_grads in grads:
        norm = torch.cat([g.reshape(-1) for g in step_grads]).double().norm()
        scale = float(2.0 / max(norm.item(), 2.0))
        for p, q, g in zip(clipped, plain, step_grads):
            p.grad = g.clone()
            q.grad = g * scale if scale < 1 else g.clone()
        opt_c.step()
        opt_p.step()
        for p, q in zip(clipped, plain):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        if scale == 1:
            assert all(torch.equal(p.grad, g) for p, g in zip(clipped, step_grads))


@pytest.mark.parametrize("dtype, big", [(torch.float32, 1e20), (torch.bfloat16, 1e20), (torch.float16, 6e4)])
@pytest.mark.parametrize("foreach", [False, True])
def test_clipping_with_an_entry_whose_square_overflows(dtype: torch.dtype, big: float, foreach: bool) -> None:
    """The global norm of a gradient whose fp32 (fp16) square overflows stays finite: the clip scales the
    gradient to about max_grad_norm and every weight stays finite."""
    p = torch.nn.Parameter(torch.ones(4, 3, dtype=dtype))
    q = torch.nn.Parameter(torch.ones(5, dtype=dtype))
    opt = LAMB([p, q], lr=0.01, max_grad_norm=1.0, foreach=foreach)
    g = torch.full((4, 3), 0.5, dtype=dtype)
    g[1, 1] = big
    p.grad, q.grad = g, torch.ones(5, dtype=dtype)
    opt.step()
    total = torch.cat([p.grad.float().reshape(-1), q.grad.float()]).double().norm().item()
    # exact n ≈ big; the overflow-safe bound used for the tensor is peak·√numel, within √12 of it
    assert 1 / math.sqrt(12) - 1e-2 <= total <= 1.0 + 1e-2
    assert torch.isfinite(p).all() and torch.isfinite(q).all()
    assert (p.detach() != 1).any() and torch.isfinite(opt.state[p]["exp_avg_sq"]).all()


def test_non_finite_gradient_is_not_clipped_and_stays_local() -> None:
    """A NaN entry makes the global norm NaN: nothing is clipped, other tensors step as without it, and
    the NaN tensor (‖r‖ NaN: ρ = 1) keeps its other entries finite."""
    a, b = (torch.nn.Parameter(torch.ones(3)) for _ in range(2))
    ref = torch.nn.Parameter(torch.ones(3))
    opt = LAMB([a, b], lr=0.1, max_grad_norm=1e-3)
    ref_opt = LAMB([ref], lr=0.1)
    a.grad = torch.tensor([math.nan, 2.0, -3.0])
    b.grad = torch.tensor([5.0, 6.0, 7.0])
    ref.grad = b.grad.clone()
    opt.step()
    ref_opt.step()
    assert b.grad.tolist() == [5.0, 6.0, 7.0]
    assert torch.equal(b, ref)
    assert math.isnan(a[0].item()) and torch.isfinite(a.detach()[1:]).all()


# --- references -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("eps", [1e-6, 1e-10])
def test_agrees_with_pytorch_optimizer_without_bias_correction(foreach: bool, eps: float) -> None:
    """pytorch_optimizer.Lamb mapped to the paper's variant: weight_decouple=False (λw inside r),
    adam_debias=True (no 1/(1 − β1^t) on the step), clamp = inf (it clamps ‖w‖ to 10 by default); it has
    no bias correction of v, so it matches ours with bias_correction=False. It divides by ‖r‖ + ε where
    we divide by ‖r‖: a difference of order ε."""
    ours, ref = make_mlp(F64), make_mlp(F64)
    opt = LAMB(ours.parameters(), lr=1e-2, eps=eps, weight_decay=0.05, bias_correction=False, foreach=foreach)
    train(ours, opt, 10)
    reference = pytorch_optimizer.Lamb(
        ref.parameters(), lr=1e-2, eps=eps, weight_decay=0.05, weight_decouple=False, adam_debias=True, foreach=foreach
    )
    reference.clamp = math.inf
    train(ref, reference, 10)
    assert (flat(ours) - flat(make_mlp(F64))).abs().max() > 0.1
    torch.testing.assert_close(flat(ours), flat(ref), rtol=0, atol=0.05 * eps)


def test_pytorch_optimizer_default_step_is_larger_by_one_over_bc1() -> None:
    """Known disagreement: pytorch_optimizer.Lamb's default (adam_debias=False) divides the step size by
    1 − β1^t outside the trust ratio, so a tensor moves by η‖w‖/(1 − β1^t), 10x at t = 1, where
    Algorithm 2 (and tensorflow/addons, apex) move it by η‖w‖: the trust ratio cancels any scale of m̂."""
    w0 = torch.tensor([3.0, 4.0, 0.5], dtype=F64)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = LAMB([ours], lr=0.01, weight_decay=0.0)
    ref = pytorch_optimizer.Lamb([theirs], lr=0.01, weight_decay=0.0)
    ref.clamp = math.inf
    for t in (1, 2):
        before = ours.detach().clone(), theirs.detach().clone()
        ours.grad = torch.tensor([1.0, -2.0, 0.3], dtype=F64) * t
        theirs.grad = ours.grad.clone()
        opt.step()
        ref.step()
        step_theirs = (theirs - before[1]).norm() / before[1].norm()  # relative step: η/(1 − β1^t)
        step_ours = (ours - before[0]).norm() / before[0].norm()  # η
        assert step_ours.item() == pytest.approx(0.01, rel=1e-12)
        assert (step_theirs / step_ours).item() == pytest.approx(1 / (1 - 0.9**t), rel=1e-5)  # their ‖r‖ + ε


@pytest.mark.parametrize("path", PATHS)
def test_agrees_with_algorithm2_on_an_mlp(path: dict) -> None:
    """Ten steps on an MLP (weights, biases at 0, LayerNorm) against the scalar transcription, per tensor."""
    model = make_mlp(F64)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads: dict[str, list[list[float]]] = {n: [] for n in start}
    opt = LAMB(model.parameters(), lr=1e-2, weight_decay=0.05, **path)
    for i in range(10):
        gen = torch.Generator().manual_seed(1000 + i)
        x, y = torch.randn(8, 6, generator=gen, dtype=F64), torch.randn(8, 3, generator=gen, dtype=F64)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        for n, p in model.named_parameters():
            grads[n].append(p.grad.reshape(-1).tolist())
        opt.step()
        # the reference needs this step's gradient at this step's weights: replay it per tensor
        for n, p in model.named_parameters():
            w = _algorithm2(start[n].reshape(-1).tolist(), grads[n], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, wd=0.05)
            torch.testing.assert_close(p.detach().reshape(-1), torch.tensor(w[-1], dtype=F64), rtol=1e-11, atol=1e-13)


# --- paths, compile, resume, state -------------------------------------------------------------------------
def test_paths_agree_with_mixed_dtypes() -> None:
    torch.manual_seed(0)
    base = [torch.randn(64, 64), torch.zeros(64), torch.randn(4, 4).bfloat16(), torch.randn(6).half()]
    grads = [[torch.randn(t.shape).to(t.dtype) for t in base] for _ in range(5)]
    results = {}
    for name, kwargs in {"ref": dict(foreach=False), "fe": dict(foreach=True), "8bit": dict(state_bits=8)}.items():
        params = [torch.nn.Parameter(t.clone()) for t in base]
        opt = LAMB(params, lr=1e-2, max_grad_norm=5.0, clamp_trust_ratio=10.0, **kwargs)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results[name] = params, opt
    (ref, ref_opt), (fe, _), (q8, opt8) = results["ref"], results["fe"], results["8bit"]
    for a, b in zip(ref, fe):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(ref_opt.state[p]["exp_avg_sq"].dtype == torch.float32 for p in ref[2:])
    assert "exp_avg_codes" in opt8.state[q8[0]] and "exp_avg_sq_codes" in opt8.state[q8[0]]
    # 8-bit moments change r's direction a little, never the per-tensor step length η‖w‖
    moved = (ref[0] - base[0]).abs().max()
    assert (q8[0] - ref[0]).abs().max() < 0.5 * moved
    for a, b in zip(ref[1:], q8[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compiled_matches_eager_and_resumes() -> None:
    """The options the fault contract leaves at their defaults (clipping, no bias correction, a clamp),
    compiled: agrees with eager, one graph across an lr change, exact resume."""
    kwargs = dict(max_grad_norm=0.5, bias_correction=False, clamp_trust_ratio=2.0)
    torch._dynamo.reset()
    counters.clear()

    def make(m: torch.nn.Module, **extra) -> LAMB:
        return LAMB(m.parameters(), lr=1e-2, weight_decay=0.1, **kwargs, **extra)

    eager, model = make_mlp(torch.float32), make_mlp(torch.float32)
    eager_opt, opt = make(eager, foreach=True), make(model, compile=True)
    for net, o in ((eager, eager_opt), (model, opt)):
        train(net, o, 6, spikes={3: 1e4})
        o.param_groups[0]["lr"] = 3e-3  # a device scalar: no recompile
        train(net, o, 4, start=6)
    torch.testing.assert_close(flat(model), flat(eager), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 1
    assert all(s["step"].device == p.device for p, s in opt.state.items())
    resumed, opt2 = restore_from_checkpoint(model, opt, lambda m: make(m, compile=True), seed=4)
    train(model, opt, 3, start=10)
    train(resumed, opt2, 3, start=10)
    assert torch.equal(flat(resumed), flat(model))
    torch._dynamo.reset()


@pytest.mark.parametrize("kwargs", [dict(foreach=False), dict(foreach=True, max_grad_norm=0.1), dict(state_bits=8)])
def test_state_dict_round_trip_is_bit_exact(kwargs: dict) -> None:
    def make(m: torch.nn.Module) -> LAMB:
        return LAMB(m.parameters(), lr=1e-2, **kwargs)

    model = make_mlp(torch.float32)
    train(model, make(model), 14, spikes={4: 1e3})
    first = make_mlp(torch.float32)
    opt = make(first)
    train(first, opt, 8, spikes={4: 1e3})
    resumed, opt2 = restore_from_checkpoint(first, opt, make, seed=5)
    train(resumed, opt2, 6, start=8)
    assert torch.equal(flat(resumed), flat(model))


def test_step_counter_is_per_parameter() -> None:
    """A parameter without a gradient skips the step and its bias-correction count (as torch Adam)."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = LAMB([a, b])
    for i in range(3):
        a.grad = torch.ones(2)
        b.grad = torch.ones(2) if i != 1 else None
        opt.step()
    assert opt.state[a]["step"].item() == 3 and opt.state[b]["step"].item() == 2
    assert opt.param_groups[0]["global_step"] == 3


def test_adamw_state_dict_converts() -> None:
    model = make_mlp(torch.float32)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, adamw, 3)
    opt = LAMB(model.parameters())
    with pytest.warns(UserWarning, match="converting a state dict"):
        opt.load_state_dict(copy.deepcopy(adamw.state_dict()))
    train(model, opt, 2, start=3)
    assert opt.param_groups[0]["global_step"] == 5


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=math.nan), "lr"),
        (dict(eps=-1.0), "eps"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(weight_decay=math.inf), "weight_decay"),
        (dict(bias_correction=1), "bias_correction"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=math.nan), "max_grad_norm"),
        (dict(max_grad_norm=math.inf), "max_grad_norm"),
        (dict(clamp_trust_ratio=-1.0), "clamp_trust_ratio"),
        (dict(clamp_trust_ratio=math.inf), "clamp_trust_ratio"),
        (dict(state_bits=16), "state_bits"),
        (dict(compile=True, state_bits=8), "compile=True with state_bits=8"),
    ],
)
def test_validation_names_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name.replace("(", r"\(")):
        LAMB([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_load_state_dict_rejects_a_bad_max_grad_norm() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = LAMB([p])
    p.grad = torch.ones(2)
    opt.step()
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["max_grad_norm"] = -1.0
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["max_grad_norm"] is None


def test_registry_entry() -> None:
    info = get("lamb")
    assert info.cls is LAMB and info.family == "adam"
    assert info.adam_first_moment and info.first_moment == "exp_avg" and info.second_moment_like_grad_sq
    assert info.compile and info.state_bits_8 and info.foreach
    assert info.state_bytes_per_param() == 8.0
    assert info.defaults["eps"] == 1e-6 and info.defaults["max_grad_norm"] is None
