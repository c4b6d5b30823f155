"""PolarGrad: the polar factor of the momentum, scaled by its nuclear norm (docs/algorithms.md#polargrad)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import decoupled_decay_
from lightning_optim.matrix import MatrixOptimizer, batched_views, matrix_view, newton_schulz, split_spec
from lightning_optim.validation import check_bool, check_choice, check_int, check_range

__all__ = ["PolarGrad", "POLAR_NS_COEFFICIENTS", "polar_factor", "qdwh_coefficients", "qdwh_polar"]

#: the Newton-Schulz (a, b, c) of the authors' ``PolarGrad`` class (c = 2.031 there, 2.0315 in Muon)
POLAR_NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.031)
#: a QDWH iteration with c above this uses the QR form, below it the Cholesky form (as JAX's qdwh)
_CHOLESKY_CUTOFF = 100.0

_SPEC = StateSpec(
    moments={"momentum_buffer": True, "exp_avg": True, "exp_avg_sq": False},
    first_moment="momentum_buffer",
    second_moment="exp_avg_sq",
    second_moment_like_grad_sq=False,  # the AdamW part's only
)
_SPEC_POLAR, _SPEC_ADAMW = split_spec(_SPEC, ("momentum_buffer",))


@functools.lru_cache(maxsize=64)
def qdwh_coefficients(eps: float, iterations: int) -> tuple[tuple[bool, float, float, float], ...]:
    r"""The dynamically weighted Halley weights of QDWH (Nakatsukasa, Bai & Gygi 2010), host floats.

    Starting from the lower bound ℓ = ``eps`` of the smallest singular value (after the scaling), each
    iteration takes d = (4(1 − ℓ²)/ℓ⁴)^{1/3}, a = √(1+d) + ½√(8 − 4d + 8(2 − ℓ²)/(ℓ²√(1+d))),
    b = (a − 1)²/4, c = a + b − 1 and moves ℓ ← ℓ(a + bℓ²)/(1 + cℓ²), until ℓ is within 5·eps of 1 or
    ``iterations`` are used. Returns (use the QR form, a, b, c) per iteration (QR when c > 100).

    Args:
        eps: the machine epsilon of the iteration's dtype.
        iterations: the most iterations.
    """
    out = []
    low, tol = eps, 5.0 * eps
    while low + tol < 1.0 and len(out) < iterations:
        l2 = low * low
        d = (4.0 * (1.0 - l2) / (l2 * l2)) ** (1.0 / 3.0)
        root = math.sqrt(1.0 + d)
        a = root + 0.5 * math.sqrt(8.0 - 4.0 * d + 8.0 * (2.0 - l2) / (l2 * root))
        b = (a - 1.0) ** 2 / 4.0
        c = a + b - 1.0
        low = low * (a + b * l2) / (1.0 + c * l2)
        out.append((c > _CHOLESKY_CUTOFF, a, b, c))
    return tuple(out)


def qdwh_polar(x: Tensor, iterations: int = 2) -> Tensor:
    r"""The orthogonal polar factor of each matrix of ``x`` (..., m, n) by QDWH (fixed iteration count).

    Tall view (transposed when m < n). X₀ = X/√(‖X‖₁‖X‖_∞) (‖X‖₂ ≤ 1), then for the weights (a, b, c)
    of :func:`qdwh_coefficients` (and Halley's (3, 1, 3) for the iterations left after ℓ reached 1), with
    e = b/c:

    .. math::
        \text{QR form: } \begin{bmatrix}\sqrt c X\\ I\end{bmatrix} = \begin{bmatrix}Q_1\\ Q_2\end{bmatrix}R,
            \quad X \leftarrow eX + \tfrac{a-e}{\sqrt c} Q_1 Q_2^\top \\
        \text{Cholesky form: } X \leftarrow eX + (a-e)\,X(cX^\top X + I)^{-1}

    and a final Newton-Schulz refinement X ← 1.5X − 0.5X(XᵀX). Each iteration maps every singular value
    σ to σ(a + bσ²)/(1 + cσ²); a zero matrix stays zero.

    Args:
        x: a matrix or a batch of matrices (fp32 or fp64, finite).
        iterations: the number of QDWH iterations (the authors' ``inner_steps``).
    """
    transposed = x.size(-2) < x.size(-1)
    if transposed:
        x = x.mT
    n = x.size(-1)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    size = torch.linalg.matrix_norm(x, ord=1, keepdim=True) * torch.linalg.matrix_norm(x, ord=math.inf, keepdim=True)
    u = x * torch.where(size > 0, size, torch.ones_like(size)).rsqrt()
    coefs = list(qdwh_coefficients(float(torch.finfo(x.dtype).eps), iterations))
    coefs += [(False, 3.0, 1.0, 3.0)] * (iterations - len(coefs))
    for use_qr, a, b, c in coefs:
        e = b / c
        if use_qr:
            stacked = torch.cat([math.sqrt(c) * u, eye.expand(*u.shape[:-2], n, n)], dim=-2)
            q, _ = torch.linalg.qr(stacked)
            u = e * u + ((a - e) / math.sqrt(c)) * (q[..., : u.size(-2), :] @ q[..., u.size(-2) :, :].mT)
        else:
            factor, _ = torch.linalg.cholesky_ex(c * (u.mT @ u) + eye)
            u = e * u + (a - e) * torch.cholesky_solve(u.mT, factor).mT
    u = 1.5 * u - 0.5 * u @ (u.mT @ u)
    return u.mT if transposed else u


def polar_factor(
    x: Tensor,
    method: str = "qdwh",
    inner_steps: int = 2,
    ns_coefficients: tuple[float, float, float] = POLAR_NS_COEFFICIENTS,
) -> Tensor:
    """The (approximate) orthogonal polar factor of each matrix of ``x`` (fp32/fp64, returned in x's dtype).

    ``"qdwh"``: :func:`qdwh_polar` with ``inner_steps`` iterations (the authors' default); ``"ns"``: Muon's
    quintic Newton-Schulz in bf16 with ``inner_steps`` iterations and ``ns_coefficients`` (as the authors'
    ``polar(method="ns")``); ``"svd"``: U Vᵀ of the exact SVD. A matrix with a NaN/inf entry gives NaN
    (the decompositions never see it, so nothing raises).

    Args:
        x: a matrix or a batch of matrices.
        method: ``"qdwh"``, ``"ns"`` or ``"svd"``.
        inner_steps: QDWH or Newton-Schulz iterations.
        ns_coefficients: (a, b, c) of the Newton-Schulz polynomial.
    """
    if method == "ns":
        return newton_schulz(x, inner_steps, "bfloat16", ns_coefficients).to(x.dtype)
    finite = torch.isfinite(x).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    clean = torch.where(finite, x, torch.zeros_like(x))
    if method == "svd":
        left, _, right = torch.linalg.svd(clean, full_matrices=False)
        polar = left @ right
    else:
        polar = qdwh_polar(clean, inner_steps)
    return torch.where(finite, polar, torch.full_like(polar, math.nan))


def _scaled_polar(x: Tensor, method: str, inner_steps: int, ns_coefficients: tuple[float, float, float]) -> tuple[Tensor, Tensor]:
    """(polar(X), tr(polar(X)ᵀX)) per matrix, computed on X/max|X| and scaled back (no overflow)."""
    x = x if x.dtype == torch.float64 else x.float()
    peak = x.abs().amax(dim=(-2, -1), keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    scaled = x / peak
    polar = polar_factor(scaled, method, inner_steps, ns_coefficients)
    nuclear = (scaled * polar).sum(dim=(-2, -1), keepdim=True) * peak
    return polar, nuclear


class PolarGrad(MatrixOptimizer):
    r"""PolarGrad: the nuclear-norm-scaled polar factor of the momentum for hidden matrices, AdamW for the rest.

    Lau, Long & Su, "PolarGrad: A Class of Matrix-Gradient Optimizers from a Unifying Preconditioning
    Perspective" (arXiv:2505.21799, 2025); follows the authors' code timlautk/polargrad (``polar_grad.py``
    class ``PolarGrad``, ``polar.py``, ``qdwh.py``). For a matrix W (m × n view) with gradient G and
    momentum M (polar(X) = U Vᵀ for X = U Σ Vᵀ; tr(polar(X)ᵀX) = ‖X‖_*, the nuclear norm):

    .. math::
        \text{default (momentum first, PolarGradM):}\quad M \leftarrow \mu M + (1-\mu)G,\quad
            \Delta = \mathrm{tr}(\mathrm{polar}(M)^\top M)\ \mathrm{polar}(M) \\
        \text{polar\_first=True:}\quad O = \mathrm{polar}(G),\quad M \leftarrow \mu M + (1-\mu)O,\quad
            \Delta = \mathrm{tr}(O^\top G)\ M \\
        W \leftarrow W(1 - \eta\lambda) - \eta\,\Delta

    So the step is ‖M‖_*·UVᵀ: Muon's orthogonal direction with the length of the dual (nuclear) norm,
    steepest descent under the spectral norm (Muon drops the scale). The polar factor is computed by QDWH
    (the authors' default, 2 iterations from the machine-epsilon lower bound, then a Newton-Schulz
    refinement), or Newton-Schulz (bf16) or an exact SVD. Every other parameter takes the AdamW rule.

    **The split** (shared base :class:`~lightning_optim.matrix.MatrixOptimizer`, as
    :class:`~lightning_optim.muon.Muon`): ``use_muon``/``rule: polargrad``/``matrix``/``adamw``; a group
    without it is split by shape; conv kernels (out, in·kh·kw), 3-D weights per-expert matrices.

    Defaults (the authors' ``PolarGrad`` class): lr 0.02, momentum 0.95, weight_decay 0,
    polar_first False, method ``"qdwh"``, inner_steps 2, Newton-Schulz coefficients (3.4445, −4.7750,
    2.031) (used by ``method="ns"`` only); AdamW lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0
    (the authors' class has no AdamW part).

    Deviations from the authors' code: X is divided by max|X| before the polar iteration and the nuclear
    norm computed there, then multiplied back (the same numbers; finite for every finite X); QDWH runs a
    fixed number of iterations: the Halley continuation after ℓ reaches 1 (only with more than ~6
    ``inner_steps`` in fp32) runs to ``inner_steps`` without the authors' convergence test (a host sync;
    Halley's map fixes a converged factor, so only rounding differs); the Cholesky status is not checked
    (c·XᵀX + I is positive definite for every finite X; the authors raise on failure); a matrix with a
    non-finite entry gets a NaN step instead of entering the decomposition; QDWH works on the tall view
    batched over same-shaped matrices (QR and Cholesky are batched in torch); the nuclear norm of
    ``method="ns"`` is summed in fp32 (the authors sum in bf16); bf16/fp16 parameters get fp32 momentum
    and math (the authors' QDWH does not support bf16). On CPU every method runs; QDWH's QR and Cholesky
    are batched LAPACK calls, and the eps of the compute dtype (fp32: 1.19e-7) sets its weights as the
    authors'.

    Args:
        params: parameters, named parameters or param groups (each may set ``use_muon``/``rule``,
            ``flatten`` and any argument below).
        lr: η, the learning rate of the matrix rule (default 0.02).
        momentum: μ of the momentum EMA (default 0.95).
        weight_decay: decoupled decay λ of the matrix rule, W(1 − ηλ) (default 0).
        polar_first: take the polar factor of G and average those (the authors' ``polar_first``), instead
            of the polar factor of the averaged momentum (default False).
        method: the polar decomposition, ``"qdwh"`` (default), ``"ns"`` or ``"svd"``.
        inner_steps: QDWH or Newton-Schulz iterations (default 2).
        ns_coefficients: (a, b, c) of the Newton-Schulz polynomial for ``method="ns"`` (default
            (3.4445, −4.7750, 2.031)).
        adamw_lr: learning rate of the AdamW rule (default 3e-4).
        adamw_betas: (β1, β2) of the AdamW rule (default (0.9, 0.95)).
        adamw_eps: ε of the AdamW rule, added to √v̂ (default 1e-8).
        adamw_weight_decay: decoupled decay of the AdamW rule (default 0).
        flatten: view 3-D tensors as (shape[0], rest) (Conv1d kernels) instead of per-expert matrices.
        foreach: multi-tensor path: foreach momentum, the polar factors batched over same-shaped matrix
            views (default: on for CUDA params).

    State per parameter: matrices ``momentum_buffer`` (4 bytes/param, fp32 for bf16/fp16 parameters);
    AdamW parameters ``exp_avg``, ``exp_avg_sq`` (8 bytes/param); each a ``step`` (CPU float32).
    """

    state_spec = _SPEC
    matrix_spec = _SPEC_POLAR
    adamw_spec = _SPEC_ADAMW
    rule_names = ("polargrad", "muon")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        polar_first: bool = False,
        method: Literal["qdwh", "ns", "svd"] = "qdwh",
        inner_steps: int = 2,
        ns_coefficients: tuple[float, float, float] = POLAR_NS_COEFFICIENTS,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        *,
        flatten: bool = False,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                polar_first=polar_first,
                method=method,
                inner_steps=inner_steps,
                ns_coefficients=tuple(ns_coefficients) if isinstance(ns_coefficients, list) else ns_coefficients,
                adamw_lr=adamw_lr,
                adamw_betas=adamw_betas,
                adamw_eps=adamw_eps,
                adamw_weight_decay=adamw_weight_decay,
                flatten=flatten,
                foreach=foreach,
            ),
        )

    def _validate_matrix_options(self, group: dict[str, Any]) -> None:
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_bool("polar_first", group["polar_first"])
        check_choice("method", group["method"], ("qdwh", "ns", "svd"))
        check_int("inner_steps", group["inner_steps"], 1)
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"Invalid ns_coefficients: {coefficients!r}; expected a tuple of 3 floats.")
        for i, value in enumerate(coefficients):
            check_range(f"ns_coefficients[{i}]", value)

    def _matrix_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], foreach: bool
    ) -> None:
        fn = _polargrad_foreach if foreach else _polargrad_single_tensor
        fn(
            params,
            grads,
            [s["momentum_buffer"] for s in states],
            [s["step"] for s in states],
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            polar_first=group["polar_first"],
            polar=dict(
                method=group["method"], inner_steps=group["inner_steps"], ns_coefficients=tuple(group["ns_coefficients"])
            ),
            flatten=group["flatten"],
        )


def _polargrad_update(g: Tensor, buf: Tensor, *, momentum: float, polar_first: bool, polar: dict[str, Any]) -> Tensor:
    """Δ for a batch of matrix views (``buf`` a view of the momentum, written in place)."""
    if polar_first:
        ortho, nuclear = _scaled_polar(g, **polar)
        buf.lerp_(ortho.to(buf.dtype), 1 - momentum)
        return buf * nuclear
    buf.lerp_(g, 1 - momentum)
    ortho, nuclear = _scaled_polar(buf, **polar)
    return ortho * nuclear


def _polargrad_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    polar_first: bool,
    polar: dict[str, Any],
    flatten: bool,
) -> None:
    """Reference path: one parameter at a time (a 3-D weight is its batch of per-expert matrices)."""
    for param, grad, buf, step_t in zip(params, grads, bufs, steps):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        update = _polargrad_update(
            matrix_view(g32, flatten), matrix_view(buf, flatten), momentum=momentum, polar_first=polar_first, polar=polar
        )
        decoupled_decay_(p32, lr, weight_decay)
        p32.add_(update.reshape(param.shape).to(p32.dtype), alpha=-lr)
        write_back([param], [p32])


def _polargrad_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    polar_first: bool,
    polar: dict[str, Any],
    flatten: bool,
) -> None:
    """Multi-tensor path: same-shaped matrix views stacked; momentum and polar factors batched."""
    torch._foreach_add_(steps, 1.0)
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, bufs])
    for (dev_params, dev_grads, dev_bufs), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        decoupled_decay_(p32, lr, weight_decay)
        for idx in batched_views(dev_params, flatten).values():
            buf = torch.stack([matrix_view(dev_bufs[i], flatten) for i in idx])
            update = _polargrad_update(
                torch.stack([matrix_view(g32[i], flatten) for i in idx]), buf,
                momentum=momentum, polar_first=polar_first, polar=polar,
            )
            torch._foreach_copy_([dev_bufs[i] for i in idx], [b.reshape(dev_bufs[i].shape) for i, b in zip(idx, buf.unbind())])
            torch._foreach_add_(
                [p32[i] for i in idx],
                [d.reshape(dev_params[i].shape).to(p32[i].dtype) for i, d in zip(idx, update.unbind())],
                alpha=-lr,
            )
        write_back(dev_params, p32)
