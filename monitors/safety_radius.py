"""Learning-rate safety radius of cross-entropy along an update (Ghosts of Softmax), pure torch.

Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes in Cross-Entropy",
arXiv 2603.13552 (docs/lr_safety_radius.md). Along an update p of length τ = ‖p‖ the logits of a
sample x move, to first order, by a(x) = J_z(x)·p. The Taylor series of the cross-entropy in the step size
converges only inside the distance to the nearest complex zero of the softmax partition function; under
logit linearisation that distance is at least

    ρ_a = π / max_x Δa_v(x),    Δa_v(x) = (max_k a_k(x) − min_k a_k(x)) / τ,

so r = τ/ρ_a = max_x Δa(x) / π. Steps with r < 1 stay inside the radius; in the paper no step with r < 1
broke training. Scaling the update by s = min(1, target/r) caps r at the target.

Every value here stays on the device: nothing reads a tensor back to the host.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_optim.monitors.modes import eval_mode

__all__ = [
    "SafetyRadius",
    "binary_exact_radius",
    "controller_scale",
    "directional_slopes",
    "eval_mode",
    "functional_logits",
    "logit_slope_spread",
    "radius_from_spread",
    "safety_radius",
    "update_norm",
]

Method = Literal["auto", "jvp", "finite_difference"]
METHODS = ("auto", "jvp", "finite_difference")

# the spread is floored at this fraction of τ, so a zero spread gives a finite (huge) radius, not 0/0
_SPREAD_FLOOR = 1e-12


class SafetyRadius(NamedTuple):
    """Result of :func:`safety_radius`; every tensor is 0-dim on the model's device."""

    rho: Tensor  # ρ_a, the safe step length along the update's direction
    tau: Tensor  # τ = ‖p‖₂, the update's length
    ratio: Tensor  # r = τ/ρ_a (< 1: inside the radius)
    spread: Tensor  # max over samples of Δ(J·p), for the tangent p itself (not normalised)
    method: str  # "jvp" or "finite_difference": what actually ran


def logit_slope_spread(a: Tensor) -> Tensor:
    """Per-sample spread of directional logit derivatives: ``a.amax(-1) - a.amin(-1)`` (classes last)."""
    return a.amax(-1) - a.amin(-1)


def binary_exact_radius(logit_gap: Tensor, slope_gap: Tensor) -> Tensor:
    """Exact convergence radius for two classes: √(δ² + π²)/|Δa|.

    For logits z + t·a of two classes the partition function e^{z₁+a₁t} + e^{z₂+a₂t} vanishes at
    t = (−δ + iπ(2n+1))/Δa with δ = z₁ − z₂ and Δa = a₁ − a₂; the nearest zero has this modulus, which
    the linearised bound π/|Δa| never exceeds (equal logits make the bound tight).
    """
    logit_gap = torch.as_tensor(logit_gap)
    return torch.sqrt(logit_gap**2 + math.pi**2) / torch.as_tensor(slope_gap).abs()


def controller_scale(ratio: Tensor, target_ratio: float) -> Tensor:
    """s = min(1, target_ratio / r), and 1 where r = 0 (or is not a number: nothing to act on)."""
    if not target_ratio > 0:
        raise ValueError(f"Invalid target_ratio: {target_ratio!r}; allowed range is (0, inf).")
    ratio = torch.as_tensor(ratio)
    scale = (target_ratio / ratio).clamp(max=1.0)
    return torch.where(ratio > 0, scale, torch.ones_like(scale))


def update_norm(update: Iterable[Tensor]) -> Tensor:
    """τ = ‖p‖₂ over every entry of every tensor, accumulated in (at least) float32."""
    tensors = [u for u in update if u.numel() > 0]
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm([u.to(_wide(u.dtype)) for u in tensors])
    return torch.linalg.vector_norm(torch.stack(norms))


def radius_from_spread(spread: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """(ρ_a, r) from the spread of J·p and τ: ρ_a = π·τ / max(spread, 1e-12·τ), r = τ/ρ_a; τ = 0 gives (∞, 0)."""
    tau = tau.to(spread.dtype)
    floored = torch.maximum(spread, _SPREAD_FLOOR * tau)
    moving = tau > 0
    rho = torch.where(moving, math.pi * tau / torch.where(moving, floored, 1.0), math.inf)
    ratio = torch.where(moving, floored / math.pi, 0.0)
    return rho, ratio


def directional_slopes(
    logits_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    *,
    method: Method = "auto",
    fd_epsilon: float = 1e-4,
    tau: Tensor | None = None,
) -> tuple[Tensor, str]:
    """a = J_z·p at ``params`` for the tangent ``update``, in float32 (float64 for a float64 model).

    ``logits_fn(params)`` returns logits with classes on the last dimension. Parameters missing from
    ``update`` get a zero tangent. Returns ``(a, method_used)``; ``"auto"`` tries forward-mode AD and falls
    back to central finite differences (with a warning) when the model has no forward-mode rule.
    """
    check_method(method)
    check_fd_epsilon(fd_epsilon)
    unknown = sorted(set(update) - set(params))
    if unknown:
        raise ValueError(f"update has entries for unknown parameters: {unknown[:5]}")
    names = [name for name in params if name in update]
    if method in ("auto", "jvp"):
        try:
            return _jvp_slopes(logits_fn, params, update, names), "jvp"
        except (NotImplementedError, RuntimeError) as error:
            if method == "jvp" or not _is_forward_ad_error(error):
                raise
            warnings.warn(
                f"Forward-mode AD is not available for this model ({type(error).__name__}: {str(error)[:200]}); "
                "the safety radius falls back to finite differences (method='finite_difference').",
                stacklevel=2,
            )
    if tau is None:
        tau = update_norm(update[name] for name in names)
    return _finite_difference_slopes(logits_fn, params, update, names, fd_epsilon, tau), "finite_difference"


def safety_radius(
    logits_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    *,
    method: Method = "auto",
    fd_epsilon: float = 1e-4,
) -> SafetyRadius:
    """ρ_a, τ and r = τ/ρ_a of the step ``params → params + update`` (spec "Algorithm", steps 1-4).

    Every position of the logits except the last (class) dimension is one sample: rows of a classifier's
    ``(B, C)``, every token of a language model's ``(B, T, V)``. The maximum over samples is taken, not a
    quantile. Runs under ``no_grad`` with autocast off (float32 logits: finite differences are meaningless
    in bf16) and, for forward-mode AD, with the math attention kernel (the flash and cuDNN kernels have no
    forward-mode rule).
    """
    tau = update_norm(update.values())
    a, used = directional_slopes(logits_fn, params, update, method=method, fd_epsilon=fd_epsilon, tau=tau)
    spread = logit_slope_spread(a).amax()
    rho, ratio = radius_from_spread(spread, tau.to(spread.device))
    return SafetyRadius(rho=rho, tau=tau.to(spread.device, spread.dtype), ratio=ratio, spread=spread, method=used)


def functional_logits(
    module: torch.nn.Module, forward: Callable[[torch.nn.Module], Tensor]
) -> Callable[[dict[str, Tensor]], Tensor]:
    """A ``logits_fn(params)`` for :func:`safety_radius`: ``forward(module)`` with some of ``module``'s
    parameters replaced by ``params`` (keys as in ``module.named_parameters()``; tied weights follow).

    ``forward`` may call any method of ``module`` (``module(x)``, ``module.probe_logits(batch)``, ...): the
    substitution (``torch.func.functional_call``) happens on a thin wrapper holding ``module``.
    """
    bound = _BoundForward(module, forward)

    def logits_fn(params: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(bound, {f"module.{name}": value for name, value in params.items()}, ())

    return logits_fn


class _BoundForward(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, forward: Callable[[torch.nn.Module], Tensor]) -> None:
        super().__init__()
        self.module = module
        self._forward = forward

    def forward(self) -> Tensor:
        return self._forward(self.module)


# --------------------------------------------------------------------------------------------------------
# the two ways to get J·p


def _jvp_slopes(
    logits_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    names: list[str],
) -> Tensor:
    fixed = {name: value for name, value in params.items() if name not in update}

    def moving_logits(moving: dict[str, Tensor]) -> Tensor:
        return logits_fn({**fixed, **moving})

    primals = {name: params[name] for name in names}
    tangents = {name: update[name].to(params[name].dtype) for name in names}
    with _probe_context(params.values(), math_attention=True):
        _, a = torch.func.jvp(moving_logits, (primals,), (tangents,))
    return a.detach().to(_wide(a.dtype))


def _finite_difference_slopes(
    logits_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    names: list[str],
    fd_epsilon: float,
    tau: Tensor,
) -> Tensor:
    """a = τ·(z(θ + ε·v) − z(θ − ε·v)) / (2ε) with v = p/τ: ε is a distance in parameter space."""
    fixed = {name: value for name, value in params.items() if name not in update}
    primals = [params[name] for name in names]
    # ε·v = (ε/τ)·p; a zero update (τ = 0) gives a zero step and a = 0, never 0/0
    step = torch._foreach_mul([update[name] for name in names], fd_epsilon / tau.clamp_min(1e-30))
    outputs = []
    with _probe_context(params.values(), math_attention=False):
        for sign in (1.0, -1.0):
            moved = torch._foreach_add(primals, step, alpha=sign)
            z = logits_fn({**fixed, **dict(zip(names, moved))})
            outputs.append(z.detach().to(_wide(z.dtype)))
            del moved
    return (outputs[0] - outputs[1]) * (tau.to(outputs[0].device, outputs[0].dtype) / (2 * fd_epsilon))


# --------------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _probe_context(tensors: Iterable[Tensor], math_attention: bool) -> Iterator[None]:
    devices = {t.device.type for t in tensors} or {"cpu"}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for device_type in devices:
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        if math_attention:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def _is_forward_ad_error(error: BaseException) -> bool:
    """An error that says forward-mode AD is missing (not any NotImplementedError: a model bug must surface)."""
    message = str(error).lower()
    return any(key in message for key in ("forward ad", "forward-mode", "forward mode", "jvp", "functorch"))


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r}; allowed values are {', '.join(map(repr, METHODS))}.")


def check_fd_epsilon(fd_epsilon: float) -> None:
    if isinstance(fd_epsilon, bool) or not isinstance(fd_epsilon, (int, float)) or not fd_epsilon > 0:
        raise ValueError(f"Invalid fd_epsilon: {fd_epsilon!r}; allowed range is (0, inf).")
