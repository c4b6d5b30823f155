"""Conda: column-normalized Adam, Adam's second moment kept in a periodically refreshed SVD basis of the momentum
(docs/algorithms.md#conda)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optim._base import StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import adam_denom, decoupled_decay_
from lightning_optim.matrix import MatrixOptimizer, batched_views, matrix_shape, split_spec
from lightning_optim.projection import (
    ProjectedStateSpec,
    Side,
    project,
    project_back,
    projection_layout,
    projection_seed,
    refresh_projector,
)
from lightning_optim.validation import check_betas, check_int, check_range

__all__ = ["Conda", "conda_layout", "conda_refresh"]

_SPEC = ProjectedStateSpec(
    moments={"exp_avg": True, "exp_avg_sq": False},
    first_moment="exp_avg",  # the EMA of g in the parameter's own basis (for the matrices too)
    second_moment="exp_avg_sq",
    # the matrices' v is the EMA of the rotated gradient's squares, not of g²: not comparable to grad**2
    second_moment_like_grad_sq=False,
    buffers=("projector",),
)
_SPEC_CONDA, _SPEC_ADAMW = split_spec(_SPEC, ("exp_avg", "exp_avg_sq"))


def conda_layout(shape: tuple[int, ...] | torch.Size) -> tuple[Side, int]:
    """(side, r) of Conda's full-rank rotation of an (m, n) matrix view: right (n × n) when m >= n, else
    left (m × m), r = min(m, n) (the authors' ``proj_type="std"``)."""
    m, n = shape[-2:]
    return projection_layout((m, n), min(m, n), "std")


def conda_refresh(
    basis: Tensor, side: Side, r: int, previous: Tensor | None, *, step: int, index: int
) -> Tensor:
    """The new projector(s) from the singular vectors of ``basis`` (a matrix, or a batch (..., m, n) of
    per-expert matrices: one projector each), with :func:`~lightning_optim.projection.refresh_projector`'s
    fallbacks (previous projector, else a seeded range finder; never raises, always finite).

    Args:
        basis: the momentum M (state dtype), the matrix whose singular vectors are taken.
        side: ``"left"`` or ``"right"``.
        r: number of singular vectors (min(m, n): a full rotation).
        previous: the projector(s) in use, or None.
        step: the global step (seeds the fallback, identical on every DDP rank).
        index: the parameter's position in the optimizer (seeds the fallback).
    """
    if basis.ndim == 2:
        return refresh_projector(basis, r, side, previous=previous, seed=projection_seed(step, index), owner="Conda")
    lead = basis.shape[:-2]
    flat = basis.reshape(-1, *basis.shape[-2:])
    prev = None if previous is None else previous.reshape(-1, *previous.shape[-2:])
    out = [
        refresh_projector(
            flat[e],
            r,
            side,
            previous=None if prev is None or prev.shape[0] != flat.shape[0] else prev[e],
            seed=projection_seed(step, index, salt=e),
            owner="Conda",
        )
        for e in range(flat.shape[0])
    ]
    return torch.stack(out).reshape(*lead, *out[0].shape)


class Conda(MatrixOptimizer):
    r"""Conda: Adam whose second moment lives in the (periodically refreshed) singular basis of the momentum.

    Wang et al., "Conda: Column-Normalized Adam for Training Large Language Models Faster" (arXiv
    2509.24218, 2025); follows the authors' code jie040109/Conda (``conda_torch/conda.py``,
    ``conda_torch/projector.py``, the LLaMA/GPT-2 scripts). For a matrix W (m × n view) with gradient G,
    t its 1-based update count, T the refresh period:

    .. math::
        M \leftarrow \beta_1 M + (1-\beta_1) G \quad(\text{in the parameter's own basis}) \\
        \text{if } (t-1) \bmod T = 0:\ P \leftarrow V \ (n\times n,\ m \ge n) \text{ or } U \ (m\times m,\ m<n),
            \quad M = U S V^\top \\
        \tilde G = G P,\ \tilde M = M P \ (\text{right}) \quad\text{or}\quad \tilde G = P^\top G,\ \tilde M = P^\top M
            \ (\text{left}) \\
        V \leftarrow \beta_2 V + (1-\beta_2)\,\tilde G^{2} \\
        N = \tilde M / (\sqrt{V/(1-\beta_2^t)} + \epsilon) \\
        W \leftarrow W(1-\eta\lambda) - \eta\,\alpha\,\frac{1}{1-\beta_1^t}\,(N P^\top \text{ or } P N)

    The SVD is of the momentum (after this step's update), full rank (P is a square orthogonal matrix of
    the smaller side: the authors' ``proj_type="std"``), so every coordinate of the rotated matrix gets its
    own Adam denominator: in the rotated basis each column (right) or row (left) is a singular direction,
    normalised by the EMA of its own squared projections (the paper's column normalisation). The first
    moment stays in the original basis (only its projection is read), the second moment is never rotated
    when P is refreshed (as the authors). Every other parameter takes the AdamW rule (torch AdamW's
    equations); the authors run their Adam on those tensors in the same optimizer object.

    **The split** (shared base :class:`~lightning_optim.matrix.MatrixOptimizer`, as
    :class:`~lightning_optim.muon.Muon`): every group carries ``use_muon`` (``rule: conda``/``matrix``/
    ``adamw`` accepted); a group without it is split by shape; conv kernels are viewed as (out, in·kh·kw),
    3-D weights as per-expert matrices (one rotation each); :func:`~lightning_optim.matrix.split_params`
    detects embeddings and the head by module type (the authors apply Conda to the Linear weights of the
    attention and MLP blocks only, i.e. this split).

    **SVD failures** never crash: the refresh uses :func:`~lightning_optim.projection.refresh_projector`
    (SVD of M/max|M| in fp32, fp64 for fp64 parameters; when it raises, a ``RuntimeWarning`` and the previous
    P, or at a first refresh a randomized range finder seeded from the global step and the parameter's
    index, identical on every DDP rank; a non-finite M or SVD result keeps the fallback, decided on the
    device). On a GPU ``torch.linalg.svd`` synchronizes with the host, once per matrix every T steps.

    Defaults (the authors' LLaMA scripts ``examples/llama/scripts/llama_*_conda.sh``): lr 0.01, betas
    (0.9, 0.99), eps 1e-8 (their class default), weight_decay 0, update_proj_gap 2000, scale 0.25; the AdamW
    rule gets what the authors' single optimizer gives the other tensors: lr 0.01, betas (0.9, 0.99), eps
    1e-8, weight decay 0. (Their GPT-2 125M config: lr 0.006, weight_decay 0.01, same betas, gap, scale.)

    Deviations from the authors' code: ε is added to √V̂ (torch's form; the authors divide by √V + ε and fold
    √(1 − β2^t) into the step size, i.e. ε·√(1 − β2^t) in torch's form), in both rules; weight decay is
    applied before the update, W(1 − ηλ) (the authors decay the already-updated weight); the AdamW rule has
    its own ``adamw_*`` options (the authors' non-Conda tensors share the Conda lr/betas/decay); the
    projector and all math are fp32 for bf16/fp16 parameters (the authors cast P back to the parameter's
    dtype); P is a tensor in the optimizer state (the authors keep a Python object, which a state_dict round
    trip does not restore); conv kernels and 3-D weights are accepted (matrix views); only
    ``proj_type="std"`` (the authors' only setting; their ``reverse_std``/``left``/``right``/``full`` give a
    rotated matrix of another shape than their v for non-square weights); ``correct_bias=False`` is not
    offered; the SVD fallbacks are ours.

    Args:
        params: parameters, named parameters or param groups (each may set ``use_muon``/``rule``,
            ``flatten`` and any argument below).
        lr: η, the learning rate of the matrix rule (default 0.01).
        betas: (β1, β2) of the matrix rule (default (0.9, 0.99)).
        eps: ε added to √V̂ (default 1e-8).
        weight_decay: decoupled decay λ of the matrix rule, W(1 − ηλ) before the update (default 0).
        update_proj_gap: T, P is recomputed at a matrix's 1st, (T+1)-th, (2T+1)-th, ... update (default 2000).
        scale: α, the factor of the rotated-back update (default 0.25).
        adamw_lr: learning rate of the AdamW rule (default 0.01, the authors' shared lr).
        adamw_betas: (β1, β2) of the AdamW rule (default (0.9, 0.99)).
        adamw_eps: ε of the AdamW rule, added to √v̂ (default 1e-8).
        adamw_weight_decay: decoupled decay of the AdamW rule (default 0).
        flatten: view 3-D tensors as (shape[0], rest) (Conv1d kernels) instead of per-expert matrices.
        foreach: multi-tensor path: foreach momentum and decay, projections and updates batched over
            same-shaped matrix views (default: on for CUDA params); refreshes run per matrix on both paths.

    State per matrix (m × n view, k = min(m, n)): ``exp_avg`` and ``exp_avg_sq`` (the parameter's shape,
    8 bytes/param, fp32 for bf16/fp16 parameters), ``projector`` (k × k: 4·k² bytes), ``step`` (CPU
    float32): 8 + 4·k/max(m, n) bytes/param. AdamW parameters ``exp_avg``, ``exp_avg_sq`` (8 bytes/param)
    and ``step``. A moment reset (MomentumReset, SpikeGuard) zeroes ``exp_avg``/``exp_avg_sq`` and keeps
    ``projector``; SpikeAwareClipping refuses Conda (its v is not comparable to g²).
    """

    state_spec = _SPEC
    matrix_spec = _SPEC_CONDA
    adamw_spec = _SPEC_ADAMW
    rule_names = ("conda", "muon")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        update_proj_gap: int = 2000,
        scale: float = 0.25,
        adamw_lr: float = 1e-2,
        adamw_betas: tuple[float, float] = (0.9, 0.99),
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
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                update_proj_gap=update_proj_gap,
                scale=scale,
                adamw_lr=adamw_lr,
                adamw_betas=adamw_betas,
                adamw_eps=adamw_eps,
                adamw_weight_decay=adamw_weight_decay,
                flatten=flatten,
                foreach=foreach,
            ),
        )

    def _validate_matrix_options(self, group: dict[str, Any]) -> None:
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_int("update_proj_gap", group["update_proj_gap"], 1)
        check_range("scale", group["scale"], 0.0)

    def _positions(self) -> dict[int, int]:
        """id(parameter) → its position among all the optimizer's parameters (seeds the SVD fallback)."""
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _matrix_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], foreach: bool
    ) -> None:
        positions = self._positions()
        step = group.get("global_step", 0) + 1
        beta1, beta2 = group["betas"]
        options = dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            scale=group["scale"],
            update_proj_gap=group["update_proj_gap"],
            flatten=group["flatten"],
            step=step,
            indices=[positions[id(p)] for p in params],
        )
        (_conda_foreach if foreach else _conda_single_tensor)(params, grads, states, **options)


def _due(state: dict[str, Any], done: int, gap: int, expected: tuple[int, ...]) -> bool:
    """Whether P is recomputed now: at the 1st, (T+1)-th, ... update, or when it is missing / of another shape."""
    projector = state.get("projector")
    return projector is None or tuple(projector.shape) != expected or done % gap == 0


def _projector_shape(view: tuple[int, ...], side: Side, r: int) -> tuple[int, ...]:
    return (*view[:-2], r, r)  # full rank: (n, n) right, (m, m) left


def _conda_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    update_proj_gap: int,
    flatten: bool,
    step: int,
    indices: list[int],
) -> None:
    """Reference path: one parameter at a time (a 3-D weight is its batch of per-expert matrices)."""
    for param, grad, state, index in zip(params, grads, states, indices):
        done = int(state["step"].item())  # CPU counter: no device sync
        state["step"] += 1
        t = done + 1
        p32, g32 = as_compute([param, grad])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g32, 1 - beta1)
        view = matrix_shape(param.shape, flatten)
        side, r = conda_layout(view)
        m = exp_avg.reshape(view)
        if _due(state, done, update_proj_gap, _projector_shape(view, side, r)):
            state["projector"] = conda_refresh(m, side, r, state.get("projector"), step=step, index=index)
        projector = state["projector"]
        # the products run on a batch of one, as the foreach path's stacks (CPU mm and bmm round differently:
        # rotated coordinates at rounding-noise level would then get different O(1) Adam updates)
        one = (1, *view)
        p_one = projector.unsqueeze(0)
        g_rot = project(g32.reshape(one).to(exp_avg.dtype), p_one, side)
        m_rot = project(m.reshape(one), p_one, side)
        v = exp_avg_sq.view(one)
        v.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
        direction = m_rot / adam_denom(v, t, beta2, eps)
        update = project_back(direction, p_one, side).reshape(param.shape)
        decoupled_decay_(p32, lr, weight_decay)
        p32.add_(update.to(p32.dtype), alpha=-(lr * scale / (1 - beta1**t)))
        write_back([param], [p32])


def _conda_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    update_proj_gap: int,
    flatten: bool,
    step: int,
    indices: list[int],
) -> None:
    """Multi-tensor path: foreach momentum and decay; projections, second moments and updates of the
    matrices of one view shape and step count stacked into one batch."""
    steps = [s["step"] for s in states]
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype(
        [params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], steps], with_indices=True
    )
    for (dev_params, dev_grads, dev_m, dev_v, dev_steps), local in grouped.values():  # local: positions in states
        counts = [int(t.item()) for t in dev_steps]  # CPU counters: no device sync
        torch._foreach_add_(dev_steps, 1.0)
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        torch._foreach_lerp_(dev_m, g32, 1 - beta1)
        batches: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for view, idx in batched_views(dev_params, flatten).items():
            side, r = conda_layout(view)
            for i in idx:
                state = states[local[i]]
                if _due(state, counts[i], update_proj_gap, _projector_shape(view, side, r)):
                    state["projector"] = conda_refresh(
                        dev_m[i].reshape(view), side, r, state.get("projector"), step=step, index=indices[local[i]]
                    )
                batches.setdefault((view, counts[i]), []).append(i)
        decoupled_decay_(p32, lr, weight_decay)
        for (view, done), idx in batches.items():
            side, _ = conda_layout(view)
            t = done + 1
            stack = lambda ts: torch.stack([ts[i].reshape(view) for i in idx])  # noqa: E731
            projector = torch.stack([states[local[i]]["projector"] for i in idx])
            m = stack(dev_m)
            g_rot = project(stack(g32).to(m.dtype), projector, side)
            m_rot = project(m, projector, side)
            v = stack(dev_v)
            v.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
            torch._foreach_copy_([dev_v[i] for i in idx], [x.reshape(dev_v[i].shape) for i, x in zip(idx, v.unbind())])
            update = project_back(m_rot / adam_denom(v, t, beta2, eps), projector, side)
            torch._foreach_add_(
                [p32[i] for i in idx],
                [x.reshape(p32[i].shape).to(p32[i].dtype) for i, x in zip(idx, update.unbind())],
                alpha=-(lr * scale / (1 - beta1**t)),
            )
        write_back(dev_params, p32)
