"""FISMO: Muon's orthogonalized momentum in the geometry of a Kronecker-factored Fisher (docs/algorithms.md#fismo)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, state_dtype, write_back
from lightning_optim.matrix import MatrixOptimizer, batched_views, matrix_shape, matrix_view, newton_schulz, split_spec
from lightning_optim.muon import muon_scale
from lightning_optim.validation import check_choice, check_int, check_range

__all__ = ["FISMO", "fismo_matrices_", "inverse_roots"]

#: eigenvalues of a (trace-normalised) factor below this fraction of its largest one are raised to it: a
#: condition-number cap of 1e6 per factor (fp32 eigh cannot resolve smaller ones), so P^{-1/2}, Q^{-1/2}
#: stay bounded even when the gradient is so large that the damping no longer keeps the factor definite
EIG_FLOOR = 1e-6


@dataclass(frozen=True)
class _FISMOStateSpec(StateSpec):
    """:class:`StateSpec` plus FISMO's Kronecker factors ``fisher_left`` (P, m × m) and ``fisher_right``
    (Q, n × n) of each matrix: neither moments (not parameter-shaped, never reset: a reset factor would be
    0, which the trace normalisation cannot recover from) nor scalars, but FISMO's own state."""

    matrices: tuple[str, ...] = ("fisher_left", "fisher_right")

    def stored_keys(self) -> set[str]:
        return super().stored_keys() | set(self.matrices)


_SPEC = _FISMOStateSpec(
    moments={"momentum_buffer": True, "exp_avg": True, "exp_avg_sq": False},
    first_moment="momentum_buffer",
    second_moment="exp_avg_sq",
    second_moment_like_grad_sq=False,  # the AdamW part's only; the matrices keep Kronecker factors, not g²
)
_SPEC_FISMO, _SPEC_ADAMW = split_spec(_SPEC, ("momentum_buffer",))


def _eye_like(x: Tensor, size: int) -> Tensor:
    return torch.eye(size, dtype=x.dtype, device=x.device).expand(*x.shape[:-2], size, size)


def _sym(x: Tensor) -> Tensor:
    return 0.5 * (x + x.mT)


def _eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """eigh of a batch of symmetric matrices; a failed fp32 eigh is retried in float64, then identity."""
    try:
        return torch.linalg.eigh(x)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        try:
            lam, vec = torch.linalg.eigh(x.double())
            return lam.to(x.dtype), vec.to(x.dtype)
        except RuntimeError:
            size = x.shape[-1]
            return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device), _eye_like(x, size).clone()


def inverse_roots(factor: Tensor, floor: float = EIG_FLOOR) -> tuple[Tensor, Tensor]:
    """(F⁻¹, F^{-1/2}) of a batch of symmetric positive definite factors, by one eigendecomposition.

    Eigenvalues are clamped to at least ``floor``·λ_max (and to a positive tiny value), so the result is
    finite for every finite factor.

    Args:
        factor: (..., k, k) symmetric matrices (finite).
        floor: the relative eigenvalue floor.
    """
    lam, vec = _eigh(factor)
    top = lam.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(lam.dtype).tiny)
    lam = torch.maximum(lam, top * floor)
    inv = (vec * lam.reciprocal().unsqueeze(-2)) @ vec.mT
    inv_sqrt = (vec * lam.rsqrt().unsqueeze(-2)) @ vec.mT
    return _sym(inv), _sym(inv_sqrt)


def _ema_factor(old: Tensor, gram: Tensor, scale: Tensor, gamma: float, damping: float, size: int) -> Tensor:
    r"""One factor update of the paper, overflow-safe: F = sym(k/tr(F̃)·F̃) with
    F̃ = γ F_{t-1} + (1 − γ)(a²·Ĝram + μ·tr(F_{t-1})/k·I), where Ĝram is the Gram term of G/a (a = max|G|).

    F̃ is formed divided by c = max(1, a)² (the trace normalisation cancels c), so no square of a large
    gradient is ever formed. A candidate that is not finite (a NaN/inf gradient) or has no positive trace
    keeps the previous factor (decided on the device, per matrix).

    Args:
        old: F_{t-1}, (..., k, k).
        gram: Ĝram (already divided by the other dimension), (..., k, k).
        scale: a = max|G| per matrix (0 replaced by 1), shape (..., 1, 1).
        gamma: γ.
        damping: μ.
        size: k.
    """
    big = torch.clamp(scale, min=1.0)
    inv_c = (1.0 / big) / big  # 1/c, no overflow of a²
    ratio = scale / big  # a/max(1, a) ≤ 1
    damp = damping * (torch.diagonal(old, dim1=-2, dim2=-1).sum(-1)[..., None, None] / size)
    tilde = (gamma * inv_c) * old + (1.0 - gamma) * ((ratio * ratio) * gram + (damp * inv_c) * _eye_like(old, size))
    trace = torch.diagonal(tilde, dim1=-2, dim2=-1).sum(-1)[..., None, None]
    new = _sym(tilde * (size / trace))
    ok = torch.isfinite(new).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True) & (trace > 0)
    return torch.where(ok, new, old)


def fismo_matrices_(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    left: Tensor,
    right: Tensor,
    *,
    lr: float,
    momentum: float,
    fisher_beta: float,
    damping: float,
    weight_decay: float,
    scale: float,
    ns_steps: int,
    ns_dtype: str,
) -> Tensor:
    r"""One FISMO step of a batch of matrices (..., rows, cols); returns the new W, updates M, P, Q in place.

    P ← sym(rows·P̃/tr P̃), P̃ = γP + (1−γ)((1/cols)·G Q⁻¹ Gᵀ + μ·tr(P)/rows·I) (with the old Q);
    Q ← the same with (1/rows)·Gᵀ P⁻¹ G and the new P (Gauss-Seidel); G̃ = P^{-1/2} G Q^{-1/2};
    M ← βM + (1−β)G̃; W ← W(1 − ηλ) − η·s·P^{-1/2} NS(M) Q^{-1/2}.

    Args:
        w: W (compute dtype).
        g: G (same shape and dtype).
        m: the momentum M in the whitened coordinates (same shape), written in place.
        left: P, (..., rows, rows), written in place.
        right: Q, (..., cols, cols), written in place.
        lr: η.
        momentum: β.
        fisher_beta: γ, the EMA coefficient of the factors.
        damping: μ.
        weight_decay: λ.
        scale: s, the multiplier of the update.
        ns_steps: Newton-Schulz iterations.
        ns_dtype: their dtype.
    """
    rows, cols = w.shape[-2:]
    peak = g.abs().amax(dim=(-2, -1), keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    g_hat = g / peak  # |entries| ≤ 1 for finite G (NaN/inf give NaN: the factors then keep their value)
    right_inv, _ = inverse_roots(right)
    p_new = _ema_factor(left, (g_hat @ right_inv @ g_hat.mT) / cols, peak, fisher_beta, damping, rows)
    left_inv, left_isqrt = inverse_roots(p_new)
    q_new = _ema_factor(right, (g_hat.mT @ left_inv @ g_hat) / rows, peak, fisher_beta, damping, cols)
    _, right_isqrt = inverse_roots(q_new)
    left.copy_(p_new)
    right.copy_(q_new)
    finite_max = torch.finfo(g.dtype).max
    whitened = ((left_isqrt @ g_hat @ right_isqrt) * peak).clamp(-finite_max, finite_max)  # NaN stays NaN
    m.mul_(momentum).add_(whitened * (1.0 - momentum))  # βM + (1−β)G̃: no difference of large values
    ortho = newton_schulz(m, ns_steps, ns_dtype).to(w.dtype)
    update = left_isqrt @ ortho @ right_isqrt
    return w * (1.0 - lr * weight_decay) - (lr * scale) * update


def fismo_scale(rows: int, cols: int, adjust_lr: str) -> float:
    """The update's multiplier: 1 (``"none"``, the paper) or Muon's :func:`~lightning_optim.muon.muon_scale`."""
    return 1.0 if adjust_lr == "none" else muon_scale(rows, cols, adjust_lr)


class FISMO(MatrixOptimizer):
    r"""FISMO: orthogonalized momentum inside a Kronecker-factored Fisher trust region, AdamW for the rest.

    Xu, Yan & Zhang, "FISMO: Fisher-Structured Momentum-Orthogonalized Optimizer" (arXiv:2601.21750,
    2026), Algorithm 1. No code by the authors was found; this follows the paper's algorithm. Muon's step
    solves min ⟨G, ΔW⟩ s.t. ‖ΔW‖₂ ≤ η; FISMO replaces the spectral ball by the Fisher-metric ball
    ‖P^{1/2} ΔW Q^{1/2}‖₂ ≤ η with F ≈ Q ⊗ P, whose solution is −η P^{-1/2} Polar(P^{-1/2} G Q^{-1/2}) Q^{-1/2}.
    For a matrix W (m × n view; conv kernels (out, in·kh·kw), 3-D weights per expert) with gradient G:

    .. math::
        \tilde P = \gamma P + (1-\gamma)\big(\tfrac1n G Q^{-1} G^\top + \mu\tfrac{\mathrm{tr} P}{m} I_m\big),\quad
            P \leftarrow \mathrm{sym}\big(\tfrac{m}{\mathrm{tr}\tilde P}\tilde P\big) \\
        \tilde Q = \gamma Q + (1-\gamma)\big(\tfrac1m G^\top P^{-1} G + \mu\tfrac{\mathrm{tr} Q}{n} I_n\big),\quad
            Q \leftarrow \mathrm{sym}\big(\tfrac{n}{\mathrm{tr}\tilde Q}\tilde Q\big) \\
        \tilde G = P^{-1/2} G Q^{-1/2},\qquad M \leftarrow \beta M + (1-\beta)\tilde G \\
        W \leftarrow W(1-\eta\lambda) - \eta\, s\, P^{-1/2}\,\mathrm{NS}_5(M)\, Q^{-1/2}

    P's update uses the previous Q, Q's the new P (the paper's Gauss-Seidel order); P₀ = I, Q₀ = I; the
    factors are refreshed every step (the paper's schedule); the momentum lives in the whitened
    coordinates; NS is Muon's quintic Newton-Schulz (5 steps, bf16). With γ = 1 the factors stay I and
    FISMO is Muon without Nesterov (and s = 1). Every other parameter takes the AdamW rule (torch AdamW's
    equations), as Muon does.

    **The split** (shared base :class:`~lightning_optim.matrix.MatrixOptimizer`, as
    :class:`~lightning_optim.muon.Muon`): every group carries ``use_muon`` (``rule: fismo``/``matrix``/
    ``adamw`` accepted); a group without it is split by shape;
    :func:`~lightning_optim.matrix.split_params` detects embeddings and the head by module type.

    Defaults: lr 0.02 and momentum 0.95 (Muon's: with P = Q = I the step is Muon's), fisher_beta γ = 0.95,
    damping μ = 1e-3, s = 1 (``adjust_lr="none"``, the paper's W − ηΔW), weight decay 0; AdamW lr 3e-4,
    betas (0.9, 0.95), eps 1e-10. The paper's hyper-parameter table could not be read here: γ, μ and lr are
    our choices (see docs/algorithms.md#fismo).

    Numerics and deviations from the paper: P⁻¹, P^{-1/2}, Q⁻¹, Q^{-1/2} come from one eigendecomposition
    per factor and step (fp32, float64 for float64 parameters; a failed fp32 eigh is retried in float64,
    then the identity is used), with eigenvalues raised to at least 1e-6·λ_max (a condition-number cap;
    the damping alone keeps the factors definite only while the gradient is small); the Gram terms are
    formed from G/max|G| and the EMA divided by max(1, max|G|)² (the trace normalisation cancels it), so a
    finite gradient whose squares overflow fp32 still gives finite factors; a factor whose update is not
    finite (a NaN/inf gradient) keeps its previous value; G̃ is clamped to the finite range (NaN stays
    NaN); optional decoupled weight decay and Muon's ``adjust_lr`` scales; bf16/fp16 parameters get fp32
    state and math.

    Args:
        params: parameters, named parameters or param groups (each may set ``use_muon``/``rule``,
            ``flatten`` and any argument below).
        lr: η, the learning rate of the matrix rule (default 0.02).
        momentum: β of the whitened momentum EMA (default 0.95).
        fisher_beta: γ, the EMA coefficient of the Kronecker factors P, Q (default 0.95; 1 freezes them
            at I, i.e. Muon).
        damping: μ, the identity regularisation relative to the factor's mean eigenvalue (default 1e-3).
        weight_decay: decoupled decay λ of the matrix rule, W(1 − ηλ) (default 0).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_dtype: dtype of the Newton-Schulz iteration, ``"bfloat16"`` (Muon's) or ``"float32"``.
        adjust_lr: the update scale s: ``"none"`` (1, the paper), ``"spectral"`` (√max(1, m/n), Muon) or
            ``"match_rms_adamw"`` (0.2·√max(m, n), Moonlight).
        adamw_lr: learning rate of the AdamW rule (default 3e-4).
        adamw_betas: (β1, β2) of the AdamW rule (default (0.9, 0.95)).
        adamw_eps: ε of the AdamW rule, added to √v̂ (default 1e-10).
        adamw_weight_decay: decoupled decay of the AdamW rule (default 0).
        flatten: view 3-D tensors as (shape[0], rest) (Conv1d kernels) instead of per-expert matrices.
        foreach: multi-tensor path: factors, eigendecompositions, Newton-Schulz and updates batched over
            same-shaped matrix views (default: on for CUDA params).

    State per parameter: matrices ``momentum_buffer`` (4 bytes/param) plus ``fisher_left`` (m² floats) and
    ``fisher_right`` (n² floats) per matrix (fp32 for bf16/fp16 parameters), i.e. 4·(1 + m/n + n/m)
    bytes/param; AdamW parameters ``exp_avg``, ``exp_avg_sq`` (8 bytes/param); a ``step`` each.
    """

    state_spec = _SPEC
    matrix_spec = _SPEC_FISMO
    adamw_spec = _SPEC_ADAMW
    rule_names = ("fismo", "muon")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        fisher_beta: float = 0.95,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: Literal["bfloat16", "float32"] = "bfloat16",
        adjust_lr: Literal["none", "spectral", "match_rms_adamw"] = "none",
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
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
                fisher_beta=fisher_beta,
                damping=damping,
                weight_decay=weight_decay,
                ns_steps=ns_steps,
                ns_dtype=ns_dtype,
                adjust_lr=adjust_lr,
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
        check_range("fisher_beta", group["fisher_beta"], 0.0, 1.0)
        check_range("damping", group["damping"], 0.0)
        check_int("ns_steps", group["ns_steps"], 1)
        check_choice("ns_dtype", group["ns_dtype"], ("bfloat16", "float32"))
        check_choice("adjust_lr", group["adjust_lr"], ("none", "spectral", "match_rms_adamw"))

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if group["use_muon"] and "fisher_left" not in state:
            shape = matrix_shape(p.shape, group["flatten"])
            batch, (rows, cols) = tuple(shape[:-2]), shape[-2:]
            dtype = state_dtype(p)
            state["fisher_left"] = torch.eye(rows, dtype=dtype, device=p.device).repeat(*batch, 1, 1)
            state["fisher_right"] = torch.eye(cols, dtype=dtype, device=p.device).repeat(*batch, 1, 1)
        return super()._init_state(p, group)

    def _matrix_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], foreach: bool
    ) -> None:
        run = _fismo_foreach if foreach else _fismo_single_tensor
        run(
            params,
            grads,
            [s["momentum_buffer"] for s in states],
            [s["fisher_left"] for s in states],
            [s["fisher_right"] for s in states],
            [s["step"] for s in states],
            flatten=group["flatten"],
            adjust_lr=group["adjust_lr"],
            options=dict(
                lr=group["lr"],
                momentum=group["momentum"],
                fisher_beta=group["fisher_beta"],
                damping=group["damping"],
                weight_decay=group["weight_decay"],
                ns_steps=group["ns_steps"],
                ns_dtype=group["ns_dtype"],
            ),
        )


def _fismo_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    lefts: list[Tensor],
    rights: list[Tensor],
    steps: list[Tensor],
    *,
    flatten: bool,
    adjust_lr: str,
    options: dict[str, Any],
) -> None:
    """Reference path: one parameter at a time (a 3-D weight is its batch of per-expert matrices)."""
    for param, grad, buf, left, right, step_t in zip(params, grads, bufs, lefts, rights, steps):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        rows, cols = matrix_shape(param.shape, flatten)[-2:]
        # always a batch (a 2-D weight is a batch of one), so both paths run the same batched kernels
        batch = lambda t: t.reshape(-1, *t.shape[-2:])  # noqa: E731
        buf_view = batch(matrix_view(buf, flatten))
        new = fismo_matrices_(
            batch(matrix_view(p32, flatten)),
            batch(matrix_view(g32, flatten)),
            buf_view,
            left.view(-1, rows, rows),
            right.view(-1, cols, cols),
            scale=fismo_scale(rows, cols, adjust_lr),
            **options,
        )
        p32.copy_(new.reshape(param.shape))
        write_back([param], [p32])


def _fismo_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    lefts: list[Tensor],
    rights: list[Tensor],
    steps: list[Tensor],
    *,
    flatten: bool,
    adjust_lr: str,
    options: dict[str, Any],
) -> None:
    """Multi-tensor path: every stage batched over the same-shaped matrix views (stacked)."""
    torch._foreach_add_(steps, 1.0)
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, bufs, lefts, rights])
    for (dev_params, dev_grads, dev_bufs, dev_lefts, dev_rights), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        for shape, idx in batched_views(dev_params, flatten).items():
            stack = lambda ts: torch.stack([matrix_view(ts[i], flatten) for i in idx])  # noqa: E731
            buf = stack(dev_bufs)
            left = torch.stack([dev_lefts[i] for i in idx])
            right = torch.stack([dev_rights[i] for i in idx])
            new = fismo_matrices_(
                stack(p32), stack(g32), buf, left, right, scale=fismo_scale(shape[-2], shape[-1], adjust_lr), **options
            )
            torch._foreach_copy_([p32[i] for i in idx], [x.reshape(p32[i].shape) for i, x in zip(idx, new.unbind())])
            torch._foreach_copy_([dev_bufs[i] for i in idx], [x.reshape(dev_bufs[i].shape) for i, x in zip(idx, buf.unbind())])
            torch._foreach_copy_([dev_lefts[i] for i in idx], list(left.unbind()))
            torch._foreach_copy_([dev_rights[i] for i in idx], list(right.unbind()))
        write_back(dev_params, p32)

