"""SGD-SaI numeric checks: the g-SNR definition, hand-computed steps, the robust measuring rule, paths,
resume, validation, and agreement with pytorch_optimizer.SGDSaI (mapping and disagreements below).

The spec is the authors' code (AnonymousAlethiometer/SGD_SaI, sgd_sai/sgd_sai.py v1.0.3):
s = ‖g‖ / (std(g) + ε) of the first gradient (torch's unbiased std, NaN → 0 for one entry), m = g on the
first step, then m ← μm + (1 − μ)g, and θ ← θ(1 − ηλ) − η·s·m.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import flat, make_mlp, restore_from_checkpoint, train
from lightning_optim.sgd_sai import PENDING, SGDSaI, gsnr_candidates
from test_sync_free import HostReadRecorder

DTYPE = torch.float64


def _authors_snr(g: torch.Tensor, eps: float) -> float:
    """The authors' formula, literally: g.std().nan_to_num(), g.norm() / (sigma + eps), in float64."""
    g = g.double()
    sigma = g.std().nan_to_num()
    return float(g.norm() / (sigma + eps))


# --- the g-SNR ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_gsnr_by_hand(foreach: bool) -> None:
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DTYPE)
    # ‖g‖ = √30; mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25)/3 = 5/3
    expected = math.sqrt(30.0) / (math.sqrt(5.0 / 3.0) + 1e-8)
    assert expected == pytest.approx(4.2426406543, abs=1e-9)  # ≈ √18: ‖g‖/σ = √(30·3/5)
    (got,) = gsnr_candidates([g], 1e-8, foreach=foreach)
    assert float(got) == pytest.approx(expected, rel=1e-13)
    # eps=0.5 moves it visibly: the ε sits in the denominator next to σ (not next to ‖g‖)
    (got,) = gsnr_candidates([g], 0.5, foreach=foreach)
    assert float(got) == pytest.approx(math.sqrt(30.0) / (math.sqrt(5.0 / 3.0) + 0.5), rel=1e-13)


@pytest.mark.parametrize("foreach", [False, True])
def test_gsnr_matches_the_authors_formula_on_mixed_shapes(foreach: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(5, 7, generator=gen, dtype=DTYPE) * 3 + 1,
        torch.randn(11, generator=gen, dtype=DTYPE),  # 1-D: a plain std like any other tensor
        torch.randn(1, 9, generator=gen, dtype=DTYPE),  # leading dim 1: the same
        torch.tensor([0.3], dtype=DTYPE),  # one entry: σ = 0, s = |g|/ε
        torch.randn(2, 3, 4, generator=gen, dtype=DTYPE) * 1e-6,
    ]
    got = gsnr_candidates(grads, 1e-8, foreach=foreach)
    for g, s in zip(grads, got):
        assert float(s) == pytest.approx(_authors_snr(g, 1e-8), rel=1e-12), tuple(g.shape)
    assert float(got[3]) == pytest.approx(0.3 / 1e-8, rel=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_gsnr_is_finite_for_an_entry_whose_square_overflows(foreach: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(4, 3, generator=gen)
    g[0, 1] = 1e20  # g² overflows fp32; ‖g‖ and σ themselves are representable
    assert not torch.isfinite(g.norm())  # the naive fp32 formula gives inf/inf
    (got,) = gsnr_candidates([g], 1e-8, foreach=foreach)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert float(got) == pytest.approx(_authors_snr(g, 1e-8), rel=1e-6)  # √12 for one dominating entry
    assert float(got) == pytest.approx(math.sqrt(12), rel=1e-5)


@pytest.mark.parametrize("foreach", [False, True])
def test_gsnr_of_bad_gradients(foreach: bool) -> None:
    nan = torch.tensor([1.0, math.nan, 2.0])
    inf = torch.tensor([1.0, math.inf, 2.0])
    zeros = torch.zeros(3)
    got = gsnr_candidates([nan, inf, zeros], 1e-8, foreach=foreach)
    assert not torch.isfinite(got[0]) and not torch.isfinite(got[1])
    assert float(got[2]) == 0.0  # the authors' code keeps this 0 for good; ours re-measures (below)


def test_gsnr_foreach_chunks_agree_with_single_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_optim.sgd_sai as module

    monkeypatch.setattr(module, "_CHUNK", 40)  # several chunks, one tensor larger than a chunk
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(n, generator=gen, dtype=DTYPE) for n in (3, 30, 17, 64, 5, 1)]
    single = gsnr_candidates(grads, 1e-8, foreach=False)
    multi = gsnr_candidates(grads, 1e-8, foreach=True)
    torch.testing.assert_close(torch.stack(multi), torch.stack(single), rtol=1e-13, atol=0)


# --- hand-computed steps ----------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_first_two_steps_by_hand(foreach: bool) -> None:
    lr, mu, wd, eps = 0.1, 0.9, 0.01, 1e-8
    theta0 = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=DTYPE)
    g1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DTYPE)
    g2 = torch.tensor([[-2.0, 0.0], [1.0, 1.0]], dtype=DTYPE)
    s = math.sqrt(30.0) / (math.sqrt(5.0 / 3.0) + eps)  # from g1 only
    p = torch.nn.Parameter(theta0.clone())
    opt = SGDSaI([p], lr=lr, momentum=mu, eps=eps, weight_decay=wd, foreach=foreach)

    p.grad = g1.clone()
    opt.step()
    m1 = g1  # the first momentum is the gradient itself (no (1 − μ) factor)
    theta1 = theta0 * (1 - lr * wd) - lr * s * m1
    torch.testing.assert_close(p.detach(), theta1, rtol=0, atol=1e-12)
    assert float(opt.state[p]["gsnr"]) == pytest.approx(s, rel=1e-13)
    # numbers, for a reader: θ1[0,0] = 1·0.999 − 0.1·4.2426406543·1
    assert float(p[0, 0]) == pytest.approx(0.999 - 0.42426406543, abs=1e-9)

    p.grad = g2.clone()
    opt.step()
    m2 = mu * m1 + (1 - mu) * g2
    theta2 = theta1 * (1 - lr * wd) - lr * s * m2  # s is not re-measured on g2
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], m2, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.detach(), theta2, rtol=0, atol=1e-12)
    assert float(opt.state[p]["gsnr"]) == pytest.approx(s, rel=1e-13)


@pytest.mark.parametrize("foreach", [False, True])
def test_scale_is_fixed_after_the_first_step(foreach: bool) -> None:
    p = torch.nn.Parameter(torch.zeros(3, 4, dtype=DTYPE))
    opt = SGDSaI([p], foreach=foreach)
    gen = torch.Generator().manual_seed(3)
    first = torch.randn(3, 4, generator=gen, dtype=DTYPE)
    p.grad = first.clone()
    opt.step()
    for scale in (1e3, 1e-3, 7.0):
        p.grad = torch.randn(3, 4, generator=gen, dtype=DTYPE) * scale + scale
        opt.step()
    assert float(opt.state[p]["gsnr"]) == pytest.approx(_authors_snr(first, 1e-8), rel=1e-13)


@pytest.mark.parametrize("foreach", [False, True])
def test_momentum_zero_is_scaled_sgd(foreach: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    theta0 = torch.randn(2, 5, generator=gen, dtype=DTYPE)
    grads = [torch.randn(2, 5, generator=gen, dtype=DTYPE) for _ in range(3)]
    p = torch.nn.Parameter(theta0.clone())
    opt = SGDSaI([p], lr=0.05, momentum=0.0, weight_decay=0.1, foreach=foreach)
    expected = theta0.clone()
    s = _authors_snr(grads[0], 1e-8)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        expected = expected * (1 - 0.05 * 0.1) - 0.05 * s * g
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


# --- the measuring rule: late, non-finite and zero first gradients -------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_late_parameter_is_measured_on_its_own_first_gradient(foreach: bool) -> None:
    a = torch.nn.Parameter(torch.zeros(3, 3, dtype=DTYPE))
    b = torch.nn.Parameter(torch.ones(2, 4, dtype=DTYPE))
    opt = SGDSaI([a, b], lr=0.1, weight_decay=0.0, foreach=foreach)
    gen = torch.Generator().manual_seed(5)
    a.grad = torch.randn(3, 3, generator=gen, dtype=DTYPE)
    opt.step()  # b has no gradient: no state, untouched
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(2, 4, dtype=DTYPE))
    g_b = torch.randn(2, 4, generator=gen, dtype=DTYPE)
    a.grad = torch.randn(3, 3, generator=gen, dtype=DTYPE)
    b.grad = g_b.clone()
    opt.step()
    s_b = _authors_snr(g_b, 1e-8)
    assert float(opt.state[b]["gsnr"]) == pytest.approx(s_b, rel=1e-13)
    torch.testing.assert_close(b.detach(), 1 - 0.1 * s_b * g_b, rtol=0, atol=1e-12)  # first m = g


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0])
@pytest.mark.parametrize("foreach", [False, True])
def test_bad_first_gradient_is_measured_again_on_the_next_one(foreach: bool, bad: float) -> None:
    """A NaN/inf entry (or an all-zero gradient, e.g. zeroed by a guard) measures nothing: the tensor
    stays pending (no step, momentum 0, only weight decay) and is measured on the next good gradient."""
    lr, wd = 0.1, 0.01
    theta0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DTYPE)
    p = torch.nn.Parameter(theta0.clone())
    opt = SGDSaI([p], lr=lr, weight_decay=wd, foreach=foreach)
    g = torch.zeros(2, 2, dtype=DTYPE) if bad == 0.0 else torch.tensor([[1.0, bad], [0.5, -1.0]], dtype=DTYPE)
    p.grad = g
    opt.step()
    state = opt.state[p]
    assert float(state["gsnr"]) == PENDING
    assert torch.equal(state["momentum_buffer"], torch.zeros(2, 2, dtype=DTYPE))
    torch.testing.assert_close(p.detach(), theta0 * (1 - lr * wd), rtol=0, atol=1e-12)

    g2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DTYPE)
    p.grad = g2.clone()
    opt.step()
    s = math.sqrt(30.0) / (math.sqrt(5.0 / 3.0) + 1e-8)
    assert float(state["gsnr"]) == pytest.approx(s, rel=1e-13)
    torch.testing.assert_close(state["momentum_buffer"], g2)  # a fresh start: m = g
    torch.testing.assert_close(p.detach(), theta0 * (1 - lr * wd) ** 2 - lr * s * g2, rtol=0, atol=1e-12)


def test_non_finite_gradient_after_measuring_keeps_the_scale() -> None:
    p = torch.nn.Parameter(torch.zeros(2, 3))
    opt = SGDSaI([p])
    p.grad = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    opt.step()
    s = float(opt.state[p]["gsnr"])
    p.grad = torch.full((2, 3), math.nan)
    opt.step()  # does not raise; the (poisoned) step keeps the measured scale
    assert float(opt.state[p]["gsnr"]) == s


# --- paths ------------------------------------------------------------------------------------------------
def _grouped(model: torch.nn.Module) -> list[dict]:
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": matrices}, {"params": vectors, "lr": 3e-3, "weight_decay": 0.0}]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_foreach_matches_reference(dtype: torch.dtype, tol: float) -> None:
    results = []
    for foreach in (False, True):
        model = make_mlp(dtype)
        model[1].bias.requires_grad_(False)  # a parameter that never has a gradient
        opt = SGDSaI(_grouped(model), lr=1e-2, foreach=foreach)
        train(model, opt, 20, spikes={7: 1e3})
        results.append(flat(model))
    assert torch.isfinite(results[0]).all()
    torch.testing.assert_close(results[1], results[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("foreach", [False, True])
def test_8bit_momentum_tracks_32bit(foreach: bool) -> None:
    gen = torch.Generator().manual_seed(6)
    start = torch.randn(64, 80, generator=gen)  # 5120 entries: 8-bit eligible
    runs = {}
    for bits in (32, 8):
        p = torch.nn.Parameter(start.clone())
        opt = SGDSaI([p], lr=1e-3, state_bits=bits, foreach=foreach)
        g = torch.Generator().manual_seed(7)
        for _ in range(5):
            p.grad = torch.randn(64, 80, generator=g) + 0.3
            opt.step()
        runs[bits] = (p.detach().clone(), opt)
    assert "momentum_buffer_codes" in runs[8][1].state[next(iter(runs[8][1].state))]
    move = (runs[32][0] - start).abs().max()
    assert float((runs[8][0] - runs[32][0]).abs().max()) < 0.05 * float(move)


def test_hint_never_changes_the_result() -> None:
    """The host cache of measured tensors only skips work: clearing it before every step (so every step
    takes the masked, measuring path) gives bit-identical weights and state."""
    outcomes = []
    for clear in (False, True):
        model = make_mlp(torch.float32)
        opt = SGDSaI(_grouped(model), foreach=True)
        for i in range(6):
            if clear:
                opt.__dict__.pop("_measured", None)
            train(model, opt, 1, start=i)
        outcomes.append((flat(model), copy.deepcopy(opt.state_dict())))
    assert torch.equal(outcomes[0][0], outcomes[1][0])
    for a, b in zip(outcomes[0][1]["state"].values(), outcomes[1][1]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("foreach", [False, True])
def test_resume_is_bit_identical(foreach: bool) -> None:
    def make(m: torch.nn.Module) -> SGDSaI:
        return SGDSaI(_grouped(m), foreach=foreach)

    model = make_mlp(torch.float32)
    opt = make(model)
    train(model, opt, 12, spikes={4: 1e3})
    first = make_mlp(torch.float32)
    opt1 = make(first)
    train(first, opt1, 5, spikes={4: 1e3})
    resumed, opt2 = restore_from_checkpoint(first, opt1, make)
    train(resumed, opt2, 7, start=5)
    assert torch.equal(flat(resumed), flat(model))


@pytest.mark.parametrize("foreach", [False, True])
def test_step_reads_nothing_on_the_host(foreach: bool) -> None:
    model = make_mlp(torch.float32)
    opt = SGDSaI(model.parameters(), foreach=foreach)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    for step in range(4):  # the measuring first step included
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        recorder = HostReadRecorder()
        with recorder:
            opt.step()
        assert not recorder.reads, f"step {step}: host reads {[(fn, tuple(t.shape)) for fn, t in recorder.reads]}"


# --- validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,value",
    [("lr", -1.0), ("lr", math.nan), ("momentum", 1.0), ("momentum", -0.1), ("eps", -1.0),
     ("weight_decay", math.inf), ("state_bits", 4), ("compile", "yes")],
)
def test_bad_arguments_are_named(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        SGDSaI([torch.nn.Parameter(torch.zeros(2))], **{name: value})


# --- pytorch_optimizer, as a second opinion --------------------------------------------------------------------
# Mapping: pytorch_optimizer.SGDSaI(lr, momentum, weight_decay, weight_decouple=True, eps) has our
# arguments and defaults. Disagreements (the authors' code decides, so ours follows it):
#  1. its momentum starts at 0, so its first step moves by (1 − μ)·η·s·g; the authors' starts at m = g;
#  2. its g-SNR is ‖g‖ (no σ) for every 1-D tensor and every tensor whose first dim is 1, and wherever
#     σ = 0; the authors' divides by σ + ε for every tensor (σ = 0 only for one-element tensors).
# Agreement is therefore checked on matrices with a leading dim > 1 and its buffer seeded with g1.
def _po_run(seed_buffer: bool, shapes: tuple[tuple[int, ...], ...], steps: int = 10) -> tuple[list, list]:
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    gen = torch.Generator().manual_seed(8)
    start = [torch.randn(s, generator=gen, dtype=DTYPE) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=DTYPE) + 0.2 for s in shapes] for _ in range(steps)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    opt = SGDSaI(ours, lr=0.02, momentum=0.9, weight_decay=0.05, foreach=False)
    ref = pytorch_optimizer.SGDSaI(
        theirs, lr=0.02, momentum=0.9, weight_decay=0.05, weight_decouple=True, foreach=False
    )
    for i, gs in enumerate(grads):
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = g.clone(), g.clone()
            if i == 0 and seed_buffer:
                ref.state[q]["momentum_buffer"] = g.clone()  # lerp(g, g, ·) = g: its first m becomes g
        opt.step()
        ref.step()
    return ours, theirs


def test_agrees_with_pytorch_optimizer_on_matrices() -> None:
    ours, theirs = _po_run(seed_buffer=True, shapes=((4, 5), (3, 2, 2)))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)


def test_pytorch_optimizer_disagreements_are_the_documented_ones() -> None:
    ours, theirs = _po_run(seed_buffer=False, shapes=((4, 5),), steps=1)
    assert not torch.allclose(ours[0], theirs[0], rtol=1e-6)  # 1: m = g vs m = (1 − μ)·g
    ours, theirs = _po_run(seed_buffer=True, shapes=((6,),), steps=1)
    assert not torch.allclose(ours[0], theirs[0], rtol=1e-6)  # 2: 1-D tensor, ‖g‖/(σ + ε) vs ‖g‖


def test_compiled_matches_foreach_with_pending_tensors() -> None:
    """compile=True (one graph; the contract's shapes, so a full run compiles it once) against the eager
    multi-tensor path, with a zero and a NaN-entry first gradient: those tensors stay pending for a step
    and are measured on the next one. Clearing the host cache each step changes no bit."""
    shapes = {"w1": (4, 3), "b1": (4,), "w2": (2, 4)}

    def run(clear: bool = False, **kw: object) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(9)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes.values()]
        opt = SGDSaI(params, lr=0.05, **kw)
        for i in range(5):
            if clear:
                opt.__dict__.pop("_measured", None)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if i == 0:
                params[1].grad.zero_()
                params[2].grad.view(-1)[1] = math.nan
            opt.step()
        return [p.detach().clone() for p in params], [opt.state[p]["gsnr"].clone() for p in params]

    eager_w, eager_s = run(foreach=True)
    compiled_w, compiled_s = run(compile=True)
    assert all(torch.isfinite(w).all() for w in compiled_w)
    for a, b in zip(compiled_w + compiled_s, eager_w + eager_s):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    cleared_w, cleared_s = run(clear=True, compile=True)
    assert all(torch.equal(a, b) for a, b in zip(cleared_w + cleared_s, compiled_w + compiled_s))
