"""Numeric checks of the softmax safety radius (docs/lr_safety_radius.md, "Checks" 1-5 and 8)."""

from __future__ import annotations

import math
import warnings

import mpmath
import numpy as np
import pytest
import torch
from torch import nn

from lightning_optim.examples.gpt import GPT
from lightning_optim.monitors import (
    binary_exact_radius,
    controller_scale,
    logit_slope_spread,
    safety_radius,
)
from lightning_optim.monitors.safety_radius import eval_mode, functional_logits

V = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 1.0]], dtype=torch.float64)
X = torch.eye(2, dtype=torch.float64)  # samples x1 = (1, 0), x2 = (0, 1) as rows


def linear_logits(params: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    return X @ params["W"].T / temperature


def linear_params(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"W": torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))}


# --------------------------------------------------------------------------- 1. linear model, exact
@pytest.mark.parametrize("method", ["jvp", "finite_difference"])
def test_linear_model_radius_is_exact(method: str) -> None:
    res = safety_radius(linear_logits, linear_params(), {"W": V}, method=method)
    tol = 1e-12 if method == "jvp" else 1e-6
    assert res.method == method
    assert res.spread.item() == pytest.approx(3.0, abs=tol)
    assert res.tau.item() == pytest.approx(math.sqrt(12), abs=1e-12)
    assert res.rho.item() == pytest.approx(3.627599, abs=1e-6)
    assert res.ratio.item() == pytest.approx(0.954930, abs=1e-6)
    assert res.ratio.item() == pytest.approx(3 / math.pi, abs=tol)
    assert controller_scale(res.ratio, 1.0).item() == 1.0


def test_linear_model_per_sample_spreads() -> None:
    a = X @ V.T  # a(x) = V x
    assert logit_slope_spread(a).tolist() == [2.0, 3.0]


def test_doubled_update_is_scaled_back_to_the_radius() -> None:
    res = safety_radius(linear_logits, linear_params(), {"W": 2 * V}, method="jvp")
    assert res.tau.item() == pytest.approx(6.928203, abs=1e-6)
    assert res.ratio.item() == pytest.approx(6 / math.pi, abs=1e-12)
    assert res.ratio.item() == pytest.approx(1.909859, abs=1e-6)
    s = controller_scale(res.ratio, 1.0)
    assert s.item() == pytest.approx(math.pi / 6, abs=1e-12)
    assert s.item() == pytest.approx(0.523599, abs=1e-6)
    scaled = s * 2 * V
    assert torch.linalg.vector_norm(scaled).item() == pytest.approx(res.rho.item(), rel=1e-12)
    again = safety_radius(linear_logits, linear_params(), {"W": scaled}, method="jvp")
    assert again.ratio.item() == pytest.approx(1.0, abs=1e-12)


def test_zero_update_gives_infinite_radius() -> None:
    for method in ("jvp", "finite_difference"):
        res = safety_radius(linear_logits, linear_params(), {"W": torch.zeros_like(V)}, method=method)
        assert res.rho.item() == math.inf and res.ratio.item() == 0.0 and res.tau.item() == 0.0
    assert controller_scale(torch.tensor(0.0), 1.0).item() == 1.0


def test_controller_scale_values_and_validation() -> None:
    ratios = torch.tensor([0.0, 0.5, 1.0, 4.0, math.inf])
    assert controller_scale(ratios, 1.0).tolist() == [1.0, 1.0, 1.0, 0.25, 0.0]
    assert controller_scale(ratios, 0.5).tolist() == [1.0, 1.0, 0.5, 0.125, 0.0]
    with pytest.raises(ValueError, match="target_ratio"):
        controller_scale(ratios, 0.0)


def test_missing_parameters_get_a_zero_tangent() -> None:
    params = {"W": linear_params()["W"], "b": torch.zeros(3, dtype=torch.float64)}

    def logits(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return X @ p["W"].T + p["b"]

    res = safety_radius(logits, params, {"W": V}, method="jvp")
    assert res.spread.item() == pytest.approx(3.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown parameters"):
        safety_radius(logits, params, {"W": V, "c": V}, method="jvp")


# --------------------------------------------------------------------------- 2. temperature, sign
@pytest.mark.parametrize("method", ["jvp", "finite_difference"])
def test_temperature_scales_the_radius_and_sign_does_not_matter(method: str) -> None:
    params = linear_params(1)
    base = safety_radius(linear_logits, params, {"W": V}, method=method)
    hot = safety_radius(lambda p: linear_logits(p, temperature=2.0), params, {"W": V}, method=method)
    assert hot.rho.item() == pytest.approx(2 * base.rho.item(), rel=1e-6)
    flipped = safety_radius(linear_logits, params, {"W": -V}, method=method)
    for field in ("spread", "rho", "ratio"):
        assert getattr(flipped, field).item() == pytest.approx(getattr(base, field).item(), rel=1e-9)


# --------------------------------------------------------------------------- 3. binary exact radius
def test_binary_exact_radius_matches_the_complex_zero() -> None:
    exact = binary_exact_radius(torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    assert exact.item() == pytest.approx(math.sqrt(9 + math.pi**2) / 2, abs=1e-12)
    assert exact.item() == pytest.approx(2.171958, abs=1e-6)
    root = mpmath.findroot(lambda t: mpmath.exp(3 + 2 * t) + 1, mpmath.mpc(-1.5, 1.5))
    assert float(root.real) == pytest.approx(-1.5, abs=1e-12)
    assert float(root.imag) == pytest.approx(math.pi / 2, abs=1e-12)
    assert float(abs(root)) == pytest.approx(exact.item(), abs=1e-12)
    # the linearised bound pi / spread never exceeds the exact radius; equal logits make it tight
    assert math.pi / 2 <= exact.item()
    tight = binary_exact_radius(torch.tensor(0.0), torch.tensor(2.0))
    assert tight.item() == pytest.approx(math.pi / 2, rel=1e-7)


# --------------------------------------------------------------------------- 4. multiclass integer slopes
def smallest_zero(weights: list[float], slopes: list[int]) -> float:
    """min |t| over the zeros of sum_k w_k e^{a_k t}: with u = e^t a polynomial in u, t = log u + 2 pi i n."""
    low = min(slopes)
    coeffs = np.zeros(max(slopes) - low + 1)
    for w, a in zip(weights, slopes):
        coeffs[a - low] += w
    roots = np.roots(coeffs[::-1])
    return float(min(abs(np.log(complex(u))) for u in roots))  # principal log: the nearest branch


@pytest.mark.parametrize(
    ("weights", "slopes", "expected"),
    [((1, 1, 1), (0, 1, 2), 2 * math.pi / 3), ((1, 2, 1), (0, 1, 2), math.pi), ((1, 1), (0, 1), math.pi)],
)
def test_multiclass_zero_examples(weights, slopes, expected) -> None:
    found = smallest_zero(list(weights), list(slopes))
    assert found == pytest.approx(expected, abs=1e-6)
    assert found >= math.pi / (max(slopes) - min(slopes)) - 1e-9


def test_multiclass_zeros_never_inside_the_linearised_radius() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        k = int(rng.integers(2, 7))
        slopes = rng.integers(0, 9, size=k).tolist()
        if max(slopes) == min(slopes):
            continue
        weights = rng.uniform(0.05, 5.0, size=k).tolist()
        bound = math.pi / (max(slopes) - min(slopes))
        assert smallest_zero(weights, slopes) >= bound * (1 - 1e-6)


# --------------------------------------------------------------------------- 5. JVP versus finite differences
def small_mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 5)).to(dtype)


def random_update(params: dict[str, torch.Tensor], scale: float = 1e-2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {k: scale * torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in params.items()}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 5e-3), (torch.float64, 1e-6)])
def test_jvp_and_finite_difference_agree_on_an_mlp(dtype: torch.dtype, tol: float) -> None:
    from lightning_optim.monitors.safety_radius import directional_slopes

    model = small_mlp(dtype)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}
    update = random_update(params)
    logits_fn = functional_logits(model, lambda m: m(x))
    a_jvp, _ = directional_slopes(logits_fn, params, update, method="jvp")
    a_fd, _ = directional_slopes(logits_fn, params, update, method="finite_difference")
    assert a_jvp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert relative_difference(a_fd, a_jvp) <= tol
    jvp = safety_radius(logits_fn, params, update, method="jvp")
    fd = safety_radius(logits_fn, params, update, method="finite_difference")
    assert fd.ratio.item() == pytest.approx(jvp.ratio.item(), rel=min(tol, 1e-3))


def test_jvp_and_finite_difference_agree_on_a_small_transformer() -> None:
    torch.manual_seed(0)
    model = GPT(size="tiny", seq_len=32)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    params = {k: v.detach() for k, v in model.named_parameters()}
    update = random_update(params, scale=1e-3)
    logits_fn = functional_logits(model, lambda m: m(x))
    jvp = safety_radius(logits_fn, params, update, method="jvp")
    fd = safety_radius(logits_fn, params, update, method="finite_difference")
    assert jvp.spread.item() > 0
    assert fd.spread.item() == pytest.approx(jvp.spread.item(), rel=1e-3)
    assert fd.ratio.item() == pytest.approx(jvp.ratio.item(), rel=1e-3)


def test_autocast_is_off_inside_the_probe() -> None:
    model = small_mlp(torch.float32)
    x = torch.randn(4, 8)
    params = {k: v.detach() for k, v in model.named_parameters()}
    seen = []
    logits_fn = functional_logits(model, lambda m: seen.append(torch.is_autocast_enabled("cpu")) or m(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = safety_radius(logits_fn, params, random_update(params), method="finite_difference")
    assert seen == [False, False] and res.spread.dtype == torch.float32


# --------------------------------------------------------------------------- 6 (pure torch part). eval mode
def test_eval_mode_restores_each_flag() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model.train()
    model[2].eval()  # a mixed model: the BatchNorm was frozen by the user
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False]


# --------------------------------------------------------------------------- 8. "auto" falls back once
class NoForwardRule(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


def test_auto_falls_back_to_finite_differences_with_a_warning() -> None:
    model = small_mlp(torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    update = random_update(params)
    logits_fn = functional_logits(model, lambda m: NoForwardRule.apply(m(x)))
    with pytest.warns(UserWarning, match="finite differences"):
        res = safety_radius(logits_fn, params, update, method="auto")
    assert res.method == "finite_difference"
    reference = safety_radius(functional_logits(model, lambda m: 2 * m(x)), params, update, method="jvp")
    assert res.ratio.item() == pytest.approx(reference.ratio.item(), rel=1e-6)
    with pytest.raises(NotImplementedError):
        safety_radius(logits_fn, params, update, method="jvp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model with forward-mode rules never warns
        assert safety_radius(functional_logits(model, lambda m: m(x)), params, update).method == "jvp"


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="method"):
        safety_radius(linear_logits, linear_params(), {"W": V}, method="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fd_epsilon"):
        safety_radius(linear_logits, linear_params(), {"W": V}, fd_epsilon=0.0)
