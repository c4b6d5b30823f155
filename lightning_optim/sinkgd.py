"""SinkGD: stateless gradient descent on Sinkhorn-normalized (row/column) gradients (docs/algorithms.md#sinkgd)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import decoupled_decay_
from lightning_optim.matrix import MatrixOptimizer, batched_views, matrix_view, split_spec
from lightning_optim.validation import check_int, check_range

__all__ = ["SinkGD", "sr_sinkhorn"]

_SPEC = StateSpec(
    moments={"exp_avg": True, "exp_avg_sq": False},  # the AdamW part's; the matrix rule keeps only `step`
    first_moment="exp_avg",
    second_moment="exp_avg_sq",
)
_SPEC_SINK, _SPEC_ADAMW = split_spec(_SPEC, ())


def _safe(norms: Tensor) -> Tensor:
    """Norms with 0 replaced by 1, so a zero row/column stays zero instead of becoming 0/0."""
    return torch.where(norms > 0, norms, torch.ones_like(norms))


def sr_sinkhorn(g: Tensor, iterations: int = 5) -> Tensor:
    r"""The paper's SR-Sinkhorn: alternate row and column ℓ2 normalisation of each matrix of ``g``.

    For G of shape (..., m, n), X₀ = G/max|G| (per matrix; the scale cancels in the first row
    normalisation, and it keeps every square finite), then ``iterations`` times

    .. math:: X \leftarrow \sqrt{n}\,Q(X)^{-1} X,\qquad X \leftarrow \sqrt{m}\,X\,R(X)^{-1}

    with Q(X), R(X) the diagonal matrices of the row and column ℓ2 norms. After the last step every
    column has norm √m; the rows converge to norm √n (a Sinkhorn iteration on the squared entries), so
    ‖X‖_F → √(mn) (RMS 1). Zero rows/columns stay zero. Returns a new fp32 tensor.

    Args:
        g: a matrix or a batch of matrices.
        iterations: L, the number of (row, column) passes (5 by default).
    """
    m, n = g.shape[-2:]
    x = g.float()
    peak = x.abs().amax(dim=(-2, -1), keepdim=True)
    x = x / _safe(peak)
    root_m, root_n = math.sqrt(m), math.sqrt(n)
    for _ in range(iterations):
        x = x * (root_n / _safe(torch.linalg.vector_norm(x, dim=-1, keepdim=True)))
        x = x * (root_m / _safe(torch.linalg.vector_norm(x, dim=-2, keepdim=True)))
    return x


class SinkGD(MatrixOptimizer):
    r"""SinkGD: SGD on the SR-Sinkhorn-normalized gradient for hidden matrices, AdamW for the rest; stateless.

    Scetbon, Ma, Gong & Meeds, "Gradient Multi-Normalization for Stateless and Scalable LLM Training"
    (arXiv:2502.06742, 2025; NeurIPS 2025 as "Gradient Multi-Normalization for Efficient LLM
    Training"), Algorithm "SinkGD" with its "SR-Sinkhorn" normalisation. No code by the authors was found;
    this follows the paper's algorithm. For a matrix W (m × n view) with gradient G:

    .. math::
        X = \text{SR-Sinkhorn}_L(G):\quad X_0 = G,\quad
            X \leftarrow \sqrt{n}\,Q(X)^{-1}X,\ X \leftarrow \sqrt{m}\,X R(X)^{-1}\ (L \text{ times}) \\
        W \leftarrow W\,(1 - \eta\lambda) - \eta\,\alpha\,X

    Q, R the diagonal matrices of row and column ℓ2 norms: every row is pushed to norm √n and every
    column to √m (the fixed point normalises the gradient for both norms at once; entries have RMS ≈ 1,
    like Adam's update). No optimizer state for the matrices (SGD's memory). Every other parameter takes
    the AdamW rule (torch AdamW's equations), as the paper trains embeddings and the output layer with Adam.

    **The split** (shared base :class:`~lightning_optim.matrix.MatrixOptimizer`, as
    :class:`~lightning_optim.muon.Muon`): every group carries ``use_muon`` (``rule: sinkgd``/``matrix``/
    ``adamw`` accepted); a group without it is split by shape; conv kernels are viewed as (out, in·kh·kw),
    3-D weights as per-expert matrices; :func:`~lightning_optim.matrix.split_params` detects embeddings
    and the head by module type.

    Defaults: L = 5 iterations; lr 0.02 with the update scale α = 0.05 (an effective step of 1e-3 per
    RMS-1 entry), weight_decay 0; AdamW lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0. The lr/α
    split follows the SWAN-style setup the paper's experiments build on; we could not check it against
    the paper's hyper-parameter table (see docs/algorithms.md#sinkgd). ``scale`` (α) is a plain
    multiplier of the update, so lr·scale is what matters.

    Deviations from the paper: X₀ is G/max|G| (per matrix) instead of G (mathematically the same after the
    first row normalisation; keeps finite gradients whose squares overflow fp32 finite); a zero row or
    column is left at zero (the paper's Q⁻¹/R⁻¹ is undefined there); optional decoupled weight decay;
    bf16/fp16 parameters get fp32 math.

    Args:
        params: parameters, named parameters or param groups (each may set ``use_muon``/``rule``,
            ``flatten`` and any argument below).
        lr: η, the learning rate of the matrix rule (default 0.02).
        scale: α, the multiplier of the normalized update (default 0.05).
        iterations: L, the SR-Sinkhorn (row, column) passes (default 5).
        weight_decay: decoupled decay λ of the matrix rule, W(1 − ηλ) (default 0).
        adamw_lr: learning rate of the AdamW rule (default 3e-4).
        adamw_betas: (β1, β2) of the AdamW rule (default (0.9, 0.95)).
        adamw_eps: ε of the AdamW rule, added to √v̂ (default 1e-8).
        adamw_weight_decay: decoupled decay of the AdamW rule (default 0).
        flatten: view 3-D tensors as (shape[0], rest) (Conv1d kernels) instead of per-expert matrices.
        foreach: multi-tensor path: the normalisation batched over same-shaped matrix views, the update
            with ``torch._foreach_*`` (default: on for CUDA params).

    State per parameter: matrices only a ``step`` counter (0 bytes/param); AdamW parameters ``exp_avg``,
    ``exp_avg_sq`` (8 bytes/param) and a ``step`` (CPU float32).
    """

    state_spec = _SPEC
    matrix_spec = _SPEC_SINK
    adamw_spec = _SPEC_ADAMW
    rule_names = ("sinkgd", "muon")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        scale: float = 0.05,
        iterations: int = 5,
        weight_decay: float = 0.0,
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
                scale=scale,
                iterations=iterations,
                weight_decay=weight_decay,
                adamw_lr=adamw_lr,
                adamw_betas=adamw_betas,
                adamw_eps=adamw_eps,
                adamw_weight_decay=adamw_weight_decay,
                flatten=flatten,
                foreach=foreach,
            ),
        )

    def _validate_matrix_options(self, group: dict[str, Any]) -> None:
        check_range("scale", group["scale"], 0.0)
        check_int("iterations", group["iterations"], 1)

    def _matrix_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], foreach: bool
    ) -> None:
        fn = _sinkgd_foreach if foreach else _sinkgd_single_tensor
        fn(
            params,
            grads,
            [s["step"] for s in states],
            lr=group["lr"],
            scale=group["scale"],
            iterations=group["iterations"],
            weight_decay=group["weight_decay"],
            flatten=group["flatten"],
        )


def _sinkgd_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    scale: float,
    iterations: int,
    weight_decay: float,
    flatten: bool,
) -> None:
    """Reference path: one parameter at a time (a 3-D weight is its batch of per-expert matrices)."""
    for param, grad, step_t in zip(params, grads, steps):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        update = sr_sinkhorn(matrix_view(g32, flatten), iterations).reshape(param.shape)
        decoupled_decay_(p32, lr, weight_decay)
        p32.add_(update, alpha=-lr * scale)
        write_back([param], [p32])


def _sinkgd_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    scale: float,
    iterations: int,
    weight_decay: float,
    flatten: bool,
) -> None:
    """Multi-tensor path: SR-Sinkhorn batched over same-shaped matrix views, foreach decay and update."""
    torch._foreach_add_(steps, 1.0)
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads])
    for (dev_params, dev_grads), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        decoupled_decay_(p32, lr, weight_decay)
        for idx in batched_views(dev_params, flatten).values():
            normalized = sr_sinkhorn(torch.stack([matrix_view(g32[i], flatten) for i in idx]), iterations)
            torch._foreach_add_(
                [p32[i] for i in idx],
                [x.reshape(dev_params[i].shape) for i, x in zip(idx, normalized.unbind())],
                alpha=-lr * scale,
            )
        write_back(dev_params, p32)
