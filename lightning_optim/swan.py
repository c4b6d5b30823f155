"""SWAN: stateless SGD on normalised (GradNorm) and whitened (GradWhitening) gradients (docs/algorithms.md#swan)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import decoupled_decay_
from lightning_optim.matrix import MatrixOptimizer, batched_views, frobenius_norms, matrix_view, split_spec
from lightning_optim.validation import check_bool, check_int

__all__ = ["SWAN", "grad_norm", "grad_whitening", "inverse_sqrt_newton_schulz"]

_SPEC = StateSpec(
    moments={"exp_avg": True, "exp_avg_sq": False},  # the AdamW part's; the matrix rule keeps only `step`
    first_moment="exp_avg",
    second_moment="exp_avg_sq",
)
_SPEC_SWAN, _SPEC_ADAMW = split_spec(_SPEC, ())


def _nonzero(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


def grad_norm(g: Tensor) -> Tensor:
    r"""GradNorm: standardise each row of each matrix of ``g`` (..., m, n) over its n entries.

    .. math:: \tilde G_{ij} = (G_{ij} - \bar g_i)/s_i,\quad \bar g_i = \tfrac1n\textstyle\sum_j G_{ij},
        \quad s_i = \sqrt{\tfrac1n\textstyle\sum_j (G_{ij} - \bar g_i)^2}

    computed on G/max|G| (per matrix; the result is scale-invariant, and the squares stay finite for
    every finite G). A row with s_i = 0 (constant) becomes zero. Returns a new fp32 tensor.

    Args:
        g: a matrix or a batch of matrices.
    """
    x = g if g.dtype == torch.float64 else g.float()
    x = x / _nonzero(x.abs().amax(dim=(-2, -1), keepdim=True))
    centred = x - x.mean(dim=-1, keepdim=True)
    std = centred.square().mean(dim=-1, keepdim=True).sqrt()
    return centred / _nonzero(std)


def inverse_sqrt_newton_schulz(a: Tensor, steps: int) -> Tensor:
    r"""A^{-1/2} of each symmetric PSD matrix of ``a`` (..., k, k) by the coupled Newton-Schulz iteration.

    c = ‖A‖_F, Y₀ = A/c (eigenvalues in [0, 1]), Z₀ = I, then ``steps`` times

    .. math:: T = \tfrac12(3I - Z Y),\quad Y \leftarrow Y T,\quad Z \leftarrow T Z

    so Y → (A/c)^{1/2} and Z → (A/c)^{-1/2}; returns Z/√c. A zero A gives 0.

    Args:
        a: the Gram matrices (fp32).
        steps: the number of iterations.
    """
    k = a.size(-1)
    c = torch.linalg.matrix_norm(a, keepdim=True)
    zero = c == 0
    c = torch.where(zero, torch.ones_like(c), c)
    y = a / c
    eye = torch.eye(k, dtype=a.dtype, device=a.device).expand_as(a)
    z = eye
    for _ in range(steps):
        t = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ t, t @ z
    return torch.where(zero, torch.zeros_like(z), z / c.sqrt())


def grad_whitening(x: Tensor, steps: int) -> Tensor:
    r"""GradWhitening: (X Xᵀ)^{-1/2} X for each matrix of ``x`` (..., m, n), Newton-Schulz for the inverse root.

    When m > n the equal X (XᵀX)^{-1/2} is computed instead (the n × n Gram is the smaller one, and it is
    the one that is nonsingular); both are the orthogonal polar factor of a full-rank X. The input is
    normalised by ‖X‖_F first (the result is scale-invariant; no square overflows). GradNorm centres every
    row, so G̃ has rank ≤ n − 1 and a square or tall G̃ has a singular Gram: its null space is annihilated by
    G̃ itself, so the result is the partial isometry U Vᵀ on G̃'s range, but the iterate grows there by 1.5
    per step, so rounding noise grows by 1.5^steps (about 58× at 10 steps; keep ``steps`` modest).

    Args:
        x: a matrix or a batch of matrices (fp32).
        steps: Newton-Schulz iterations.
    """
    norm, _ = frobenius_norms(x)
    x = x / _nonzero(norm)
    if x.size(-2) <= x.size(-1):
        return inverse_sqrt_newton_schulz(x @ x.mT, steps) @ x
    return x @ inverse_sqrt_newton_schulz(x.mT @ x, steps)


def swan_direction(g: Tensor, ns_steps: int, rescale: bool) -> Tensor:
    """GradNorm then GradWhitening of each matrix of ``g``; with ``rescale`` the result has ‖GradNorm(G)‖_F."""
    normed = grad_norm(g)
    white = grad_whitening(normed, ns_steps)
    if rescale:
        target, _ = frobenius_norms(normed)
        current, _ = frobenius_norms(white)
        white = white * (target / _nonzero(current))
    return white


class SWAN(MatrixOptimizer):
    r"""SWAN (SGD with Whitening And Normalization) for hidden matrices, AdamW for the rest; stateless matrices.

    Ma, Gong, Scetbon & Meeds, "SWAN: SGD with Normalization and Whitening Enables Stateless LLM Training"
    (arXiv:2412.13148; ICML 2025), Algorithms 1-3 (SWAN, GradWhitening, GradNorm). No code by the authors
    was found (the paper points to microsoft/msr_optim, which we could not retrieve); this follows the
    paper. For a matrix W (m × n view) with gradient G, no optimizer state:

    .. math::
        \tilde G = \mathrm{GradNorm}(G):\quad \tilde G_{ij} = (G_{ij} - \bar g_i)/s_i
            \quad (\text{mean } \bar g_i \text{ and std } s_i \text{ of row } i) \\
        \Delta = \mathrm{GradWhitening}(\tilde G) = (\tilde G\tilde G^\top)^{-1/2}\tilde G
            \quad (\text{coupled Newton-Schulz for the inverse square root}) \\
        \Delta \leftarrow \Delta\,\|\tilde G\|_F/\|\Delta\|_F \quad (\texttt{rescale}) \\
        W \leftarrow W(1 - \eta\lambda) - \eta\,\Delta

    GradNorm standardises each row over its n entries (PyTorch's (out, in) weight: each output unit's
    gradient over the inputs), as the paper's Algorithm 3. GradWhitening maps the singular values to 1
    (Δ is the orthogonal polar factor); the rescale gives Δ entries of RMS 1 (‖G̃‖_F = √(mn)), so lr is
    on Adam's scale. Every other parameter (embeddings, the head, norms, biases) takes the AdamW rule, as
    the paper trains them with Adam.

    **The split** (shared base :class:`~lightning_optim.matrix.MatrixOptimizer`, as
    :class:`~lightning_optim.muon.Muon`): ``use_muon``/``rule: swan``/``matrix``/``adamw``; a group without
    it is split by shape; conv kernels are (out, in·kh·kw), 3-D weights per-expert matrices.

    Defaults: lr 1e-3 (Adam's lr of the GaLore LLaMA benchmark the paper uses), 10 Newton-Schulz steps,
    rescale on, weight_decay 0; AdamW lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0. We could not
    check lr, the step count and the rescale against the paper's hyper-parameter tables; treat them as
    starting points (docs/algorithms.md#swan).

    Deviations from the paper: for m > n the whitening is computed as G̃(G̃ᵀG̃)^{-1/2} (equal to the
    paper's (G̃G̃ᵀ)^{-1/2}G̃ for full rank; the m × m Gram is singular there); the Newton-Schulz input is
    normalised by its Frobenius norm (needed for convergence); GradNorm works on G/max|G| (scale-free,
    overflow-safe) and leaves constant rows at zero; optional decoupled weight decay; bf16/fp16
    parameters get fp32 math (the paper whitens in fp32 too).

    Args:
        params: parameters, named parameters or param groups (each may set ``use_muon``/``rule``,
            ``flatten`` and any argument below).
        lr: η, the learning rate of the matrix rule (default 1e-3).
        ns_steps: Newton-Schulz iterations of the inverse square root (default 10).
        rescale: scale Δ to ‖G̃‖_F (entries of RMS 1) (default True).
        weight_decay: decoupled decay λ of the matrix rule, W(1 − ηλ) (default 0).
        adamw_lr: learning rate of the AdamW rule (default 3e-4).
        adamw_betas: (β1, β2) of the AdamW rule (default (0.9, 0.95)).
        adamw_eps: ε of the AdamW rule, added to √v̂ (default 1e-8).
        adamw_weight_decay: decoupled decay of the AdamW rule (default 0).
        flatten: view 3-D tensors as (shape[0], rest) (Conv1d kernels) instead of per-expert matrices.
        foreach: multi-tensor path: GradNorm and GradWhitening batched over same-shaped matrix views, the
            update with ``torch._foreach_*`` (default: on for CUDA params).

    State per parameter: matrices only a ``step`` counter (0 bytes/param); AdamW parameters ``exp_avg``,
    ``exp_avg_sq`` (8 bytes/param) and a ``step`` (CPU float32).
    """

    state_spec = _SPEC
    matrix_spec = _SPEC_SWAN
    adamw_spec = _SPEC_ADAMW
    rule_names = ("swan", "muon")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        ns_steps: int = 10,
        rescale: bool = True,
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
                ns_steps=ns_steps,
                rescale=rescale,
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
        check_int("ns_steps", group["ns_steps"], 1)
        check_bool("rescale", group["rescale"])

    def _matrix_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], foreach: bool
    ) -> None:
        fn = _swan_foreach if foreach else _swan_single_tensor
        fn(
            params,
            grads,
            [s["step"] for s in states],
            lr=group["lr"],
            ns_steps=group["ns_steps"],
            rescale=group["rescale"],
            weight_decay=group["weight_decay"],
            flatten=group["flatten"],
        )


def _swan_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    ns_steps: int,
    rescale: bool,
    weight_decay: float,
    flatten: bool,
) -> None:
    """Reference path: one parameter at a time (a 3-D weight is its batch of per-expert matrices)."""
    for param, grad, step_t in zip(params, grads, steps):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        update = swan_direction(matrix_view(g32, flatten), ns_steps, rescale).reshape(param.shape)
        decoupled_decay_(p32, lr, weight_decay)
        p32.add_(update.to(p32.dtype), alpha=-lr)
        write_back([param], [p32])


def _swan_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    ns_steps: int,
    rescale: bool,
    weight_decay: float,
    flatten: bool,
) -> None:
    """Multi-tensor path: the direction batched over same-shaped matrix views, foreach decay and update."""
    torch._foreach_add_(steps, 1.0)
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads])
    for (dev_params, dev_grads), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        decoupled_decay_(p32, lr, weight_decay)
        for idx in batched_views(dev_params, flatten).values():
            directions = swan_direction(torch.stack([matrix_view(g32[i], flatten) for i in idx]), ns_steps, rescale)
            torch._foreach_add_(
                [p32[i] for i in idx],
                [d.reshape(dev_params[i].shape).to(p32[i].dtype) for i, d in zip(idx, directions.unbind())],
                alpha=-lr,
            )
        write_back(dev_params, p32)
