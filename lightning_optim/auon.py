"""AuON: momentum bounded by Frobenius normalisation and a hyperbolic-cosine RMS brake (docs/algorithms.md#auon)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import decoupled_decay_
from lightning_optim.matrix import (
    MatrixOptimizer,
    batched_views,
    frobenius_norms,
    matrix_shape,
    matrix_view,
    newton_schulz,
    split_spec,
)
from lightning_optim.validation import check_bool, check_int, check_range

__all__ = ["AuON", "auon_direction"]

#: the authors' constants: added to ‖G‖_F before dividing, and to the cosh-RMS before dividing
NORM_EPS = 1e-7
RMS_EPS = 1e-8

_SPEC = StateSpec(
    moments={"momentum_buffer": True, "exp_avg": True, "exp_avg_sq": False},
    first_moment="momentum_buffer",
    second_moment="exp_avg_sq",
    second_moment_like_grad_sq=False,  # the AdamW part's only; the matrices keep only a momentum
)
_SPEC_AUON, _SPEC_ADAMW = split_spec(_SPEC, ("momentum_buffer",))


def auon_direction(u: Tensor, gamma: float = 1.5, hybrid: bool = False, ns_steps: int = 5) -> Tensor:
    r"""The AuON direction of each matrix of ``u`` (shape (..., m, n)), fp32, before the aspect scale.

    Plain AuON: D = X = U/(‖U‖_F + 1e-7) and R = γ·X. Hybrid-AuON: D = NS(U) (the quintic Newton-Schulz
    of Muon, fp32, ``ns_steps`` iterations) and R = γ·D/(‖D‖_F + 1e-7). Then

    .. math:: r = \sqrt{\tfrac{1}{N}\textstyle\sum_i \cosh(R_i)^2},\qquad \text{direction} = D/(r + 10^{-8})

    with N = m·n. cosh ≥ 1, so r ≥ 1 and the plain direction has ‖·‖_2 ≤ ‖·‖_F ≤ 1 (the spectral-norm
    trust region); a spiky U (a few large entries of X) makes r larger and the step shorter. The norms
    are overflow-safe (:func:`~lightning_optim.matrix.frobenius_norms`); a zero U gives 0.

    Args:
        u: the (Nesterov) momentum, a matrix or a batch of matrices.
        gamma: γ, the factor inside cosh.
        hybrid: orthogonalize with Newton-Schulz first (Hybrid-AuON).
        ns_steps: Newton-Schulz iterations of the hybrid variant.
    """
    u = u if u.dtype == torch.float64 else u.float()
    if hybrid:
        d = newton_schulz(u, ns_steps, "float32")
        d_norm, _ = frobenius_norms(d)
        r_arg = d * (gamma / (d_norm + NORM_EPS))
    else:
        u_norm, _ = frobenius_norms(u)
        d = u / (u_norm + NORM_EPS)
        r_arg = d * gamma
    rms = torch.cosh(r_arg).square().mean(dim=(-2, -1), keepdim=True).sqrt()
    return d / (rms + RMS_EPS)


def _aspect(shape: tuple[int, ...], aspect_scale: bool) -> float:
    return math.sqrt(max(1.0, shape[-2] / shape[-1])) if aspect_scale else 1.0


class AuON(MatrixOptimizer):
    r"""AuON (Alternative Unit-norm momentum updates by Normalized nonlinear scaling) for hidden matrices, AdamW for the rest.

    Dipan Maity, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates" (arXiv:2509.24320,
    2025); authors' code ryyzn9/AuON (``auon/optimizer.py`` classes ``AuON``, ``HybridAuON``; the
    first training script ``Auon_Adam_train.py``). Instead of Muon's Newton-Schulz orthogonalization, the
    momentum is normalised by its Frobenius norm and divided by the RMS of its elementwise hyperbolic
    cosine, a linear-time "brake" that shrinks spiky updates. For a matrix W (m × n view) with gradient G:

    .. math::
        M \leftarrow \mu M + (1-\mu) G,\quad U = \mu M + (1-\mu) G \text{ (Nesterov) or } U = M \\
        X = U/(\|U\|_F + 10^{-7}),\quad r = \sqrt{\tfrac{1}{mn}\textstyle\sum_{ij}\cosh(\gamma X_{ij})^2} \\
        W \leftarrow W(1 - \eta\lambda) - \eta\,\sqrt{\max(1, m/n)}\; X/(r + 10^{-8})

    r ≥ 1, so ‖X/(r+ε)‖_2 ≤ 1: the step lies in a spectral-norm ball without an orthogonalization.
    ``hybrid=True`` is Hybrid-AuON: X is replaced by NS(U) (Muon's quintic Newton-Schulz, fp32) and r is
    computed from γ·NS(U)/‖NS(U)‖_F. Every other parameter takes the AdamW rule (torch AdamW's equations).

    **The split** (as :class:`~lightning_optim.muon.Muon`, shared base
    :class:`~lightning_optim.matrix.MatrixOptimizer`): every group carries ``use_muon`` (``rule: auon``/
    ``matrix``/``adamw`` accepted); a group without it is split by shape; conv kernels are viewed as
    (out, in·kh·kw), 3-D weights as per-expert matrices (one r per expert);
    :func:`~lightning_optim.matrix.split_params` detects embeddings and the head by module type.

    Defaults (the authors' code and its training configuration): lr 0.08 (``auon_lr`` of their
    ``Hyperparameters``; the class default is 0.24, the paper's runs 0.055), momentum 0.95, Nesterov,
    weight_decay 0.01 (their config), γ 1.5 (``gamma``), 5 Newton-Schulz steps for the hybrid (their
    ``HybridAuON`` default and training script; the paper's text says one iteration: pass ``ns_steps=1``);
    AdamW lr 3e-4, betas (0.9, 0.95), eps 1e-10, weight decay 0 (their script trains these tensors with
    Adam at lr 0.008, betas (0.8, 0.95), eps 1e-10, for a speed-run GPT).

    Deviations: the authors' current ``AuON`` class divides the *unnormalised* momentum U by r (so its
    step grows with the gradient, an SGD step with a brake); we divide the normalised X by r, as the
    paper's equations (update = G/(‖G‖_F + 1e-7), U = update/(rms + 1e-8)) and the authors' first script
    do, which is what bounds the step. The aspect factor √max(1, m/n) is the first script's (the current
    class has none; ``aspect_scale=False`` removes it). γ comes from the current class (the paper has
    γ = 1). The momentum is never written into ``p.grad`` (the authors' Nesterov ``grad.lerp_`` overwrites
    it); a zero U gives a zero step (the authors skip the update, after the decay, as we do in effect);
    norms are overflow-safe; bf16/fp16 parameters get fp32 momentum and math; ``wd_mul`` is not read.

    Args:
        params: parameters, named parameters or param groups (each may set ``use_muon``/``rule``,
            ``flatten`` and any argument below).
        lr: η, the learning rate of the matrix rule (default 0.08).
        momentum: μ of the momentum EMA (default 0.95).
        weight_decay: decoupled decay λ of the matrix rule, W(1 − ηλ) before the update (default 0.01).
        nesterov: use U = μM + (1 − μ)G instead of M (default True).
        gamma: γ ≥ 0, the factor inside cosh (default 1.5; 1 is the paper's equation).
        hybrid: Hybrid-AuON: Newton-Schulz orthogonalization before the cosh brake (default False).
        ns_steps: Newton-Schulz iterations of the hybrid variant (default 5).
        aspect_scale: multiply the step by √max(1, m/n) (default True).
        adamw_lr: learning rate of the AdamW rule (default 3e-4).
        adamw_betas: (β1, β2) of the AdamW rule (default (0.9, 0.95)).
        adamw_eps: ε of the AdamW rule, added to √v̂ (default 1e-10).
        adamw_weight_decay: decoupled decay of the AdamW rule (default 0).
        flatten: view 3-D tensors as (shape[0], rest) (Conv1d kernels) instead of per-expert matrices.
        foreach: multi-tensor path: foreach momentum, the direction batched over same-shaped matrix views
            (default: on for CUDA params).

    State per parameter: matrices ``momentum_buffer`` (4 bytes/param, fp32 for bf16/fp16 parameters);
    AdamW parameters ``exp_avg``, ``exp_avg_sq`` (8 bytes/param); each a ``step`` (CPU float32).
    """

    state_spec = _SPEC
    matrix_spec = _SPEC_AUON
    adamw_spec = _SPEC_ADAMW
    rule_names = ("auon", "muon")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.08,
        momentum: float = 0.95,
        weight_decay: float = 0.01,
        nesterov: bool = True,
        gamma: float = 1.5,
        hybrid: bool = False,
        ns_steps: int = 5,
        aspect_scale: bool = True,
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
                weight_decay=weight_decay,
                nesterov=nesterov,
                gamma=gamma,
                hybrid=hybrid,
                ns_steps=ns_steps,
                aspect_scale=aspect_scale,
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
        check_bool("nesterov", group["nesterov"])
        check_range("gamma", group["gamma"], 0.0)
        check_bool("hybrid", group["hybrid"])
        check_int("ns_steps", group["ns_steps"], 1)
        check_bool("aspect_scale", group["aspect_scale"])

    def _matrix_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], foreach: bool
    ) -> None:
        fn = _auon_foreach if foreach else _auon_single_tensor
        fn(
            params,
            grads,
            [s["momentum_buffer"] for s in states],
            [s["step"] for s in states],
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            gamma=group["gamma"],
            hybrid=group["hybrid"],
            ns_steps=group["ns_steps"],
            aspect_scale=group["aspect_scale"],
            flatten=group["flatten"],
        )


def _auon_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    gamma: float,
    hybrid: bool,
    ns_steps: int,
    aspect_scale: bool,
    flatten: bool,
) -> None:
    """Reference path: one parameter at a time (a 3-D weight is its batch of per-expert matrices)."""
    for param, grad, buf, step_t in zip(params, grads, bufs, steps):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        buf.lerp_(g32, 1 - momentum)
        u = torch.lerp(g32, buf, momentum) if nesterov else buf
        shape = matrix_shape(param.shape, flatten)
        direction = auon_direction(matrix_view(u, flatten), gamma, hybrid, ns_steps).reshape(param.shape)
        decoupled_decay_(p32, lr, weight_decay)
        p32.add_(direction, alpha=-lr * _aspect(shape, aspect_scale))
        write_back([param], [p32])


def _auon_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    gamma: float,
    hybrid: bool,
    ns_steps: int,
    aspect_scale: bool,
    flatten: bool,
) -> None:
    """Multi-tensor path: foreach momentum, the direction batched over same-shaped matrix views."""
    torch._foreach_add_(steps, 1.0)
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, bufs])
    for (dev_params, dev_grads, dev_bufs), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        torch._foreach_lerp_(dev_bufs, g32, 1 - momentum)
        updates = torch._foreach_lerp(g32, dev_bufs, momentum) if nesterov else dev_bufs
        decoupled_decay_(p32, lr, weight_decay)
        for shape, idx in batched_views(dev_params, flatten).items():
            stacked = torch.stack([matrix_view(updates[i], flatten) for i in idx])
            directions = auon_direction(stacked, gamma, hybrid, ns_steps)
            torch._foreach_add_(
                [p32[i] for i in idx],
                [d.reshape(dev_params[i].shape) for i, d in zip(idx, directions.unbind())],
                alpha=-lr * _aspect(shape, aspect_scale),
            )
        write_back(dev_params, p32)
