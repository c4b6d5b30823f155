"""Lion (Chen et al. 2023, arXiv 2302.06675): the equations checked by hand, in closed form, against the
authors' operation order (google/automl lion/lion_pytorch.py) and against pytorch_optimizer.Lion."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_optimizer
import torch
from torch._dynamo.utils import counters

from conftest import flat, make_mlp, restore_from_checkpoint, train
from lightning_optim.lion import Lion
from lightning_optim.registry import get

F64 = torch.float64


def _param(values: list[float], dtype: torch.dtype = F64) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=dtype))


@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(foreach=False, state_bits=8)])
def test_two_steps_by_hand(path: dict) -> None:
    """β1 only weights the signed interpolation, β2 is the momentum's EMA: with betas (0.9, 0.5) the second
    step's first entry has sign(0.9·0.5·1 + 0.1·(−2)) = +1, while swapped roles would give
    sign(0.5·0.1·1 + 0.5·(−2)) = −1. A zero c (third entry, step 1) moves nothing but the decay."""
    p = _param([1.0, -2.0, 0.5])
    opt = Lion([p], lr=0.1, betas=(0.9, 0.5), weight_decay=0.5, **path)  # 3 entries: 8-bit keeps fp32
    p.grad = torch.tensor([1.0, -1.0, 0.0], dtype=F64)
    opt.step()
    # c = 0.1·g = [0.1, −0.1, 0]; p ← p·(1 − 0.05) − 0.1·sign(c); m = 0.5·g
    torch.testing.assert_close(p.detach(), torch.tensor([0.85, -1.8, 0.475], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.5, -0.5, 0.0], dtype=F64), rtol=0, atol=0)
    p.grad = torch.tensor([-2.0, -2.0, 3.0], dtype=F64)
    opt.step()
    # c = 0.9·m + 0.1·g = [0.25, −0.65, 0.3]; p ← p·0.95 − 0.1·[1, −1, 1]; m = 0.5·m + 0.5·g
    torch.testing.assert_close(p.detach(), torch.tensor([0.7075, -1.61, 0.35125], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        opt.state[p]["exp_avg"], torch.tensor([-0.75, -1.25, 1.5], dtype=F64), rtol=0, atol=1e-15
    )
    assert set(opt.state[p]) == {"exp_avg"}  # one moment, no counter


@pytest.mark.parametrize("foreach", [False, True])
def test_closed_form_constant_gradient(foreach: bool) -> None:
    """A constant gradient g: c and m keep sign(g), so after k steps
    θ_k = θ_0·(1 − ηλ)^k − η·sign(g)·Σ_{j<k} (1 − ηλ)^j."""
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(7, generator=gen, dtype=F64)
    g = torch.randn(7, generator=gen, dtype=F64)
    p = torch.nn.Parameter(start.clone())
    lr, wd, k = 0.01, 0.3, 12
    opt = Lion([p], lr=lr, weight_decay=wd, foreach=foreach)
    for _ in range(k):
        p.grad = g.clone()
        opt.step()
    keep = 1 - lr * wd
    expected = start * keep**k - lr * g.sign() * sum(keep**j for j in range(k))
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-14)
    # the momentum is the β2-EMA of a constant: m_k = (1 − β2^k)·g
    torch.testing.assert_close(opt.state[p]["exp_avg"], (1 - 0.99**k) * g, rtol=1e-14, atol=0)


def _authors_lion(model: torch.nn.Module, lr: float, betas: tuple[float, float], wd: float):
    """Lion as the authors' PyTorch code orders the operations (our own transcription of the equations):
    decay, c = m·β1 + g·(1 − β1), θ −= lr·sign(c), m = m·β2 + g·(1 − β2)."""
    moments = {p: torch.zeros_like(p) for p in model.parameters()}

    class _Reference(torch.optim.Optimizer):
        def __init__(self) -> None:
            super().__init__(model.parameters(), dict(lr=lr))

        @torch.no_grad()
        def step(self, closure=None):  # type: ignore[override]
            with torch.enable_grad():
                loss = closure()
            for p in model.parameters():
                m = moments[p]
                p.mul_(1 - lr * wd)
                p.add_((m * betas[0] + p.grad * (1 - betas[0])).sign(), alpha=-lr)
                m.mul_(betas[1]).add_(p.grad, alpha=1 - betas[1])
            return loss

    return _Reference()


@pytest.mark.parametrize("foreach", [False, True])
def test_bit_exact_with_the_authors_operation_order(foreach: bool) -> None:
    ours, ref = make_mlp(torch.float32), make_mlp(torch.float32)
    kwargs = dict(lr=3e-3, betas=(0.95, 0.98), wd=0.1)
    train(ours, Lion(ours.parameters(), lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1, foreach=foreach), 10)
    train(ref, _authors_lion(ref, **kwargs), 10)
    assert torch.equal(flat(ours), flat(ref))


@pytest.mark.parametrize("foreach", [False, True])
def test_agrees_with_pytorch_optimizer(foreach: bool) -> None:
    """pytorch_optimizer.Lion (weight_decouple=True, fixed_decay=False: θ·(1 − ηλ), the same decay) forms c
    and m with lerp instead of products: the same numbers up to rounding (a sign flip would need c ≈ 0)."""
    ours, ref = make_mlp(F64), make_mlp(F64)
    train(ours, Lion(ours.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.2, foreach=foreach), 10)
    reference = pytorch_optimizer.Lion(ref.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.2, foreach=foreach)
    train(ref, reference, 10)
    moved = (flat(ours) - flat(make_mlp(F64))).abs()
    assert moved.min() > 0  # every entry moved (sign steps of 1e-3, ten of them)
    torch.testing.assert_close(flat(ours), flat(ref), rtol=0, atol=1e-12)


def test_paths_agree_with_mixed_dtypes_and_8bit() -> None:
    """per-parameter = foreach on fp32 and bf16 params; 8-bit momentum on a 64×64 weight stays within a
    few sign flips of fp32 (a flip moves an entry by 2η) and is stored as codes."""
    torch.manual_seed(0)
    shapes = [(64, 64), (64,), (3, 5)]
    base = [torch.randn(s) for s in shapes] + [torch.randn(4, 4).bfloat16()]
    grads = [[torch.randn(s.shape).to(s.dtype) for s in base] for _ in range(6)]
    results = {}
    for name, kwargs in {"ref": dict(foreach=False), "fe": dict(foreach=True), "8bit": dict(state_bits=8)}.items():
        params = [torch.nn.Parameter(t.clone()) for t in base]
        opt = Lion(params, lr=1e-2, weight_decay=0.1, **kwargs)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results[name] = (params, opt)
    (ref, ref_opt), (fe, _), (q8, opt8) = results["ref"], results["fe"], results["8bit"]
    for a, b in zip(ref, fe):
        assert torch.equal(a, b)
    assert ref_opt.state[ref[3]]["exp_avg"].dtype == torch.float32  # fp32 state for a bf16 param
    assert ref[3].dtype == torch.bfloat16
    assert "exp_avg_codes" in opt8.state[q8[0]] and "exp_avg" in opt8.state[q8[1]]
    flips = ((q8[0] - ref[0]).abs() > 1e-2).float().mean()
    assert flips < 0.01
    for a, b in zip(ref[1:], q8[1:]):  # small tensors keep fp32 momentum: identical
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_matches_eager_without_recompiling_on_lr_change() -> None:
    torch._dynamo.reset()
    counters.clear()
    eager, model = make_mlp(torch.float32), make_mlp(torch.float32)
    eager_opt = Lion(eager.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1, compile=True)
    for net, o in ((eager, eager_opt), (model, opt)):
        train(net, o, 5)
        o.param_groups[0]["lr"] = 3e-3  # a scheduler's change: a device scalar, no recompile
        train(net, o, 5, start=5)
    torch.testing.assert_close(flat(model), flat(eager), rtol=1e-6, atol=1e-7)
    assert counters["stats"]["unique_graphs"] <= 1
    torch._dynamo.reset()


@pytest.mark.parametrize("kwargs", [dict(foreach=False), dict(foreach=True), dict(state_bits=8)])
def test_state_dict_round_trip_is_bit_exact(kwargs: dict) -> None:
    def make(m: torch.nn.Module) -> Lion:
        return Lion(m.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)

    model = make_mlp(torch.float32)
    train(model, make(model), 14)
    first = make_mlp(torch.float32)
    opt = make(first)
    train(first, opt, 8)
    resumed, opt2 = restore_from_checkpoint(first, opt, make, seed=5)
    train(resumed, opt2, 6, start=8)
    assert torch.equal(flat(resumed), flat(model))


def test_8bit_round_trip_with_codes() -> None:
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = Lion([p], lr=1e-2, state_bits=8)
    for i in range(3):
        p.grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(i))
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = Lion([q], lr=1e-2, state_bits=8)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, t in ((opt, p), (opt2, q)):
        t.grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(9))
        o.step()
    assert torch.equal(p, q)
    assert opt2.state[q]["exp_avg_codes"].dtype == torch.uint8


def test_non_finite_gradient_entries() -> None:
    """torch.sign(NaN) = 0: a NaN entry leaves its weight in place (its m turns NaN); an inf entry moves by
    η; every other entry takes its ordinary step; a 1e20 entry keeps everything finite."""
    p = _param([1.0, 1.0, 1.0, 1.0], torch.float32)
    opt = Lion([p], lr=0.1)
    p.grad = torch.tensor([math.nan, math.inf, 1e20, -1.0])
    opt.step()
    assert p.detach().tolist() == pytest.approx([1.0, 0.9, 0.9, 1.1])
    m = opt.state[p]["exp_avg"]
    assert math.isnan(m[0]) and math.isinf(m[1]) and math.isfinite(m[2])
    p.grad = torch.tensor([1.0, 1.0, -1e20, -1.0])
    opt.step()
    assert torch.isfinite(p).all()
    assert p[0].item() == 1.0  # NaN momentum: frozen


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=math.nan), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.99)), "betas"),
        (dict(betas=(0.9, math.inf)), "betas"),
        (dict(betas=(0.9,)), "betas"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(weight_decay=math.inf), "weight_decay"),
        (dict(state_bits=4), "state_bits"),
        (dict(compile="yes"), "compile"),
        (dict(compile=True, state_bits=8), "compile=True with state_bits=8"),
    ],
)
def test_validation_names_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name.replace("(", r"\(")):
        Lion([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_registry_entry() -> None:
    info = get("lion")
    assert info.cls is Lion and info.family == "sign"
    assert not info.adam_first_moment and info.first_moment == "exp_avg"
    assert not info.second_moment_like_grad_sq
    assert info.compile and info.state_bits_8 and info.foreach
    assert info.state_bytes_per_param() == 4.0
    assert info.defaults["lr"] == 1e-4 and info.defaults["betas"] == (0.9, 0.99)
    assert info.defaults["weight_decay"] == 0.0
