"""APOLLO and APOLLO-Mini: AdamW-like updates from a scaling factor estimated in a random low-rank space
(docs/algorithms.md#apollo-and-apollo-mini)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StepCountedOptimizer, as_compute, state_dtype, write_back
from lightning_optim.functional import adam_moments_, adam_step_, adam_step_foreach_, decoupled_decay_, safe_norms
from lightning_optim.galore import init_projected_state
from lightning_optim.projection import (
    PROJ_TYPES,
    ProjectedStateSpec,
    Side,
    gaussian_projection,
    project,
    projection_layout,
    projection_seed,
    projector_shape,
    refresh_projector,
)
from lightning_optim.validation import check_adam_group, check_bool, check_choice, check_int, check_range

__all__ = ["APOLLO", "APOLLOMini", "adamw_fallback", "channel_norms"]

#: guard of the scaling-factor denominator and of the limiter's ratio (the authors' constant)
_TINY = 1e-8


def channel_norms(x: Tensor, dim: int | None) -> Tensor:
    """Overflow-safe L2 norms of ``x`` along ``dim`` (keepdim; ``None``: one norm of the whole tensor).

    Computed as peak·‖x/peak‖ with peak = max|x| along ``dim``: exact, and finite for every finite ``x``
    (the plain fp32 norm overflows once an entry exceeds ~1.8e19). A zero slice has norm 0; NaN stays NaN.

    Args:
        x: a matrix.
        dim: the reduced dimension (0: one norm per column, 1: one norm per row), or None.
    """
    if dim is None:
        low, high = torch.aminmax(x)
        peak = torch.maximum(high, -low)
        safe = torch.where(peak > 0, peak, torch.ones_like(peak))
        return peak * torch.linalg.vector_norm(x / safe)
    peak = x.abs().amax(dim=dim, keepdim=True)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    return peak * torch.linalg.vector_norm(x / safe, dim=dim, keepdim=True)


class APOLLO(StepCountedOptimizer):
    r"""APOLLO: SGD-like memory, AdamW-level performance (channel-wise gradient scaling).

    Zhu, Zhang, Cong, Liu, Park, Chandra, Long, Pan, Wang and Lee, "APOLLO: SGD-like Memory, AdamW-level
    Performance", MLSys 2025 (arXiv 2412.05270); follows the authors' code zhuhanqing/APOLLO
    (``apollo_torch/apollo.py``, ``apollo_torch/random_projector.py``). For a 2-D parameter W (m × n) with
    gradient G, t its count of updates (1-based), r = min(rank, m, n) and the side chosen by ``proj_type``
    (``"std"``: right when m >= n, left otherwise, as the authors):

    .. math::
        \text{if } (t-1) \bmod T = 0:\ P \leftarrow \text{a fresh } n \times r \text{ (right) or }
            m \times r \text{ (left) matrix of i.i.d. } \mathcal N(0, 1/r) \text{ entries} \\
        R = G P \ (m \times r) \quad\text{or}\quad R = P^\top G \ (r \times n) \\
        M \leftarrow \beta_1 M + (1-\beta_1) R,\quad V \leftarrow \beta_2 V + (1-\beta_2) R^2,\quad
            \tilde N = M / (\sqrt V + \epsilon\sqrt{1-\beta_2^t}) \\
        s_c = \lVert \tilde N_{c} \rVert / (\lVert R_{c} \rVert + 10^{-8}) \ \text{per channel } c
            \text{ (a row of } G \text{ for right, a column for left), or one } s \text{ per tensor} \\
        S = G \odot s,\quad S \leftarrow S / \ell,\ \ \ell = \max(\lVert S\rVert / (\lVert S_{prev}\rVert
            + 10^{-8}),\ \gamma)/\gamma \ \text{(norm-growth limiter of Fira, } \gamma = 1.01) \\
        W \leftarrow W (1 - \eta\lambda) - \eta\,\sqrt{\alpha}\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, S

    where ‖S_prev‖ is the norm of the previous (limited) S. The bias correction multiplies the whole
    update, so M̂/(√V̂ + ε) = √(1−β2^t)/(1−β1^t)·Ñ: the ε is added to √V̂ as torch's Adam does, and the
    limiter compares the same quantity as the authors' code. The moments are kept across a refresh of P
    (as the authors). ``proj="svd"`` takes P as the top-r singular vectors of G instead (the authors'
    GaLore projector; SVD failures fall back as in :class:`~lightning_optim.galore.GaLore`). Every other
    parameter (0-/1-D and >2-D tensors, and all parameters of a group with ``rank: None``) takes plain
    AdamW at the same lr.

    **The random projection** is drawn from a CPU generator seeded with
    :func:`~lightning_optim.projection.projection_seed` (global step, parameter index): every DDP rank
    and device draws the same P, and P is stored in the optimizer state (resume is bit-exact).

    Defaults (the authors' code and README): lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight_decay 0; rank
    256 ("works well for 1B and 7B"; their scripts use 128 for 60M-350M models, i.e. d_model/4),
    update_proj_gap 200, scale 1, scale_type "channel", proj "random", proj_type "std", limiter on (γ 1.01).
    Their scripts use lr 0.01.

    Deviations from the authors' code: ε is added to √V̂ (the authors add it to √V, i.e. ε·√(1 − β2^t) in
    torch's form); weight decay is applied before the update (the authors decay the updated weight); the
    channel axis follows the projection side (the authors choose it from the shape alone, which matches the
    side for ``"std"``, ``"left"`` and ``"right"`` on the shapes where those project the smaller side, and
    breaks broadcasting otherwise); the seed of P comes from the global step and the parameter index (the
    authors advance a per-parameter generator seed at each refresh; both give i.i.d. Gaussian P); a
    previous limiter norm that is 0 or not finite (an all-zero or NaN gradient) restarts the limiter as at
    the first step (the authors' 1e-8 guard would shrink the next updates to ~1e-8 and let them regrow by
    only 1.01x per step, and a NaN would stick forever); P and all math are fp32 for bf16/fp16 parameters;
    P is a tensor in the optimizer state (the authors keep a Python object); the authors' ``scale_front``
    (√α before the limiter) is not offered: the limiter's ratio is the same either way.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3).
        betas: (β1, β2) of the low-rank Adam moments and of the AdamW fallback (default (0.9, 0.999)).
        eps: ε added to √V̂ (default 1e-6, the authors').
        weight_decay: decoupled decay λ, W ← W(1 − ηλ) before the update (default 0).
        rank: r of the auxiliary space, clipped to min(m, n) (default 256); ``None``: the group takes AdamW.
        update_proj_gap: T, P is redrawn at a parameter's 1st, (T+1)-th, (2T+1)-th, ... update (default 200).
        scale: α, the authors' heuristic scale; the update is multiplied by √α, as in their code (default 1).
        scale_type: ``"channel"`` (one s per row/column) or ``"tensor"`` (one s per matrix) (default "channel").
        proj: ``"random"`` (Gaussian, the authors' default) or ``"svd"`` (top-r singular vectors of G).
        proj_type: side of the projection: ``"std"`` (default), ``"reverse_std"``, ``"left"`` or ``"right"``.
        norm_growth_limit: γ of the norm-growth limiter (default 1.01, the authors'); ``None`` disables it
            (the authors' ``disable_nl``).
        foreach: multi-tensor AdamW for the unprojected tensors (default: on for CUDA params); projected
            matrices are updated one at a time on either path.

    State per projected parameter (m × n, side and r as above): ``exp_avg`` and ``exp_avg_sq`` of R's shape
    ((m, r) right, (r, n) left), ``projector`` (n, r) right or (m, r) left, ``limiter_norm`` (0-dim), all
    fp32 for bf16/fp16 parameters, and ``step`` (CPU float32): 4·(2·m·r + n·r + 1) bytes (right) or
    4·(2·r·n + m·r + 1) bytes (left), against AdamW's 4·2·m·n. Unprojected parameters keep AdamW's state.
    The moments are not in the parameter's shape and the second moment is the EMA of R², not of g²:
    SpikeAwareClipping and AdaptiveMomentum refuse APOLLO; a moment reset (MomentumReset, SpikeGuard)
    zeroes the projected moments and keeps ``projector``, ``limiter_norm`` and ``step``.
    """

    state_spec = ProjectedStateSpec(
        moments={"exp_avg": True, "exp_avg_sq": False},
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        second_moment_like_grad_sq=False,  # the EMA of the projected R², in R's shape, for projected matrices
        buffers=("projector", "limiter_norm"),
    )
    _owner = "APOLLO"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int | None = 256,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        scale_type: Literal["channel", "tensor"] = "channel",
        proj: Literal["random", "svd"] = "random",
        proj_type: Literal["std", "reverse_std", "left", "right"] = "std",
        norm_growth_limit: float | None = 1.01,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            scale_type=scale_type,
            proj=proj,
            proj_type=proj_type,
            norm_growth_limit=norm_growth_limit,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_adam_group(group)
        if group["rank"] is not None:
            check_int("rank", group["rank"], 1)
        check_int("update_proj_gap", group["update_proj_gap"], 1)
        check_range("scale", group["scale"], 0.0, low_open=True)
        check_choice("scale_type", group["scale_type"], ("channel", "tensor"))
        check_choice("proj", group["proj"], ("random", "svd"))
        check_choice("proj_type", group["proj_type"], PROJ_TYPES)
        if group["norm_growth_limit"] is not None:
            check_range("norm_growth_limit", group["norm_growth_limit"], 1.0)
        if group["foreach"] is not None:
            check_bool("foreach", group["foreach"])

    # -- state ------------------------------------------------------------------------------------------
    @staticmethod
    def _layout(p: Tensor, group: dict[str, Any]) -> tuple[Side, int] | None:
        """(side, r) for a projected parameter, None for one that takes plain AdamW."""
        if group["rank"] is None or p.ndim != 2:
            return None
        return projection_layout(p.shape, group["rank"], group["proj_type"])

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """AdamW's state for unprojected parameters (the base class); R-shaped moments for projected ones,
        as GaLore's (:func:`lightning_optim.galore.init_projected_state`), plus the limiter's last norm."""
        layout = self._layout(p, group)
        state = init_projected_state(self, p, group, layout, self._owner, super()._init_state)
        if layout is not None and "limiter_norm" not in state:
            state["limiter_norm"] = torch.zeros((), dtype=state_dtype(p), device=p.device)
        return state

    # -- stepping -----------------------------------------------------------------------------------
    def _step(self, step: int) -> None:
        index = 0  # position of a parameter among all the optimizer's parameters: seeds its projections
        for group in self.param_groups:
            first_index = index
            index += len(group["params"])
            params = self._params_with_grad(group, self._owner)
            if not params:
                continue
            position = {id(p): first_index + i for i, p in enumerate(group["params"])}
            states = [self._init_state(p, group) for p in params]
            beta1, beta2 = group["betas"]
            adam = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            dense = [i for i, p in enumerate(params) if self._layout(p, group) is None]
            if dense:
                adamw_fallback(
                    [params[i] for i in dense],
                    [states[i] for i in dense],
                    foreach=self._use_foreach(group, [params[i] for i in dense]),
                    **adam,
                )
            for p, state in zip(params, states):
                layout = self._layout(p, group)
                if layout is None:
                    continue
                _apollo_update(
                    p,
                    state,
                    *layout,
                    seed=projection_seed(step, position[id(p)]),
                    group=group,
                    owner=self._owner,
                    **adam,
                )


class APOLLOMini(APOLLO):
    r"""APOLLO-Mini: APOLLO with a rank-1 auxiliary space and one tensor-wise scaling factor.

    Same paper and code as :class:`APOLLO` (arXiv 2412.05270; the authors' ``scripts/*apollo_mini.sh`` and
    README); the same update with r = 1, ``scale_type="tensor"`` (s = ‖Ñ‖/(‖R‖ + 1e-8), one number per
    matrix) and α = 128 (the update is multiplied by √128 ≈ 11.3, compensating the rank-1 estimate's
    smaller norm ratio). Memory per projected m × n matrix: 4·(2·m + n + 1) bytes (right) or
    4·(2·n + m + 1) (left), i.e. SGD-like. Deviations: those of :class:`APOLLO`; the authors' 60M/130M
    Mini scripts also set ``scale_front`` (not offered: the limiter's ratio is the same either way).

    Args:
        params: parameters or param groups.
        lr: learning rate η (default 1e-3; the authors' scripts use 0.01).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: ε added to √V̂ (default 1e-6).
        weight_decay: decoupled decay λ (default 0).
        rank: r (default 1); ``None``: the group takes AdamW.
        update_proj_gap: T (default 200).
        scale: α; the update is multiplied by √α (default 128, the authors' for Mini).
        scale_type: ``"tensor"`` (default) or ``"channel"``.
        proj: ``"random"`` (default) or ``"svd"``.
        proj_type: ``"std"`` (default), ``"reverse_std"``, ``"left"`` or ``"right"``.
        norm_growth_limit: γ of the norm-growth limiter (default 1.01); ``None`` disables it.
        foreach: multi-tensor AdamW for the unprojected tensors.
    """

    _owner = "APOLLOMini"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int | None = 1,
        update_proj_gap: int = 200,
        scale: float = 128.0,
        scale_type: Literal["channel", "tensor"] = "tensor",
        proj: Literal["random", "svd"] = "random",
        proj_type: Literal["std", "reverse_std", "left", "right"] = "std",
        norm_growth_limit: float | None = 1.01,
        *,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            scale_type=scale_type,
            proj=proj,
            proj_type=proj_type,
            norm_growth_limit=norm_growth_limit,
            foreach=foreach,
        )


def random_projector(shape: tuple[int, int], side: Side, r: int, seed: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The authors' random projection in our stored form: i.i.d. N(0, 1/r), (n, r) right or (m, r) left."""
    rows, cols = projector_shape(shape, side, r)
    return gaussian_projection(rows, cols, seed, device=device, dtype=dtype) / math.sqrt(r)


def _apollo_update(
    param: Tensor,
    state: dict[str, Any],
    side: Side,
    r: int,
    *,
    seed: int,
    group: dict[str, Any],
    owner: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One APOLLO step of one matrix (see :class:`APOLLO` for the equations)."""
    done = int(state["step"].item())  # CPU counter: no device sync
    state["step"] += 1
    t = done + 1
    p32, g32 = as_compute([param, param.grad])
    g = g32.to(state_dtype(param))
    if "projector" not in state or done % group["update_proj_gap"] == 0:
        if group["proj"] == "svd":
            state["projector"] = refresh_projector(g, r, side, previous=state.get("projector"), seed=seed, owner=owner)
        else:
            state["projector"] = random_projector(tuple(g.shape), side, r, seed, device=g.device, dtype=g.dtype)
    projector = state["projector"]
    low_rank = project(g, projector, side)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    adam_moments_(exp_avg, exp_avg_sq, low_rank, beta1, beta2)
    bc1, bc2_sqrt = 1 - beta1**t, math.sqrt(1 - beta2**t)
    direction = exp_avg / exp_avg_sq.sqrt().add_(eps * bc2_sqrt)  # Ñ = M/(√V + ε√(1-β2^t))
    # the channel of R that G shares: a row for the right projection, a column for the left one
    dim = None if group["scale_type"] == "tensor" else (1 if side == "right" else 0)
    factor = channel_norms(direction, dim) / channel_norms(low_rank, dim).add_(_TINY)
    scaled = g * factor
    gamma = group["norm_growth_limit"]
    if gamma is not None:
        norm = safe_norms([scaled])[0]
        previous = state["limiter_norm"]
        history = torch.isfinite(previous) & (previous > 0)
        limiter = torch.where(history, (norm / (previous + _TINY)).clamp(min=gamma) / gamma, torch.ones_like(norm))
        scaled = scaled / limiter
        state["limiter_norm"] = norm / limiter
    decoupled_decay_(p32, lr, weight_decay)
    p32.add_(scaled.to(p32.dtype), alpha=-(lr * math.sqrt(group["scale"]) * bc2_sqrt / bc1))
    write_back([param], [p32])


# -- the AdamW rule of the unprojected tensors (shared with lightning_optim.frugal) ------------------------
def adamw_fallback(
    params: list[Tensor],
    states: list[dict[str, Any]],
    *,
    foreach: bool,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW on ``params`` with their ``exp_avg``/``exp_avg_sq``/``step`` (CPU counter) states.

    Per tensor (:func:`~lightning_optim.functional.adam_step_`) or multi-tensor
    (:func:`~lightning_optim.functional.adam_step_foreach_`, grouped by device and dtype); fp32 math for
    half-precision parameters.
    """
    adam = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    steps = [s["step"] for s in states]
    if not foreach:
        for param, state in zip(params, states):
            state["step"] += 1
            p32, g32 = as_compute([param, param.grad])
            adam_step_(p32, g32, state["exp_avg"], state["exp_avg_sq"], state["step"].item(), **adam)
            write_back([param], [p32])
        return
    torch._foreach_add_(steps, 1.0)
    lists = [params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], steps]
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype(lists)
    for (dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_steps), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        counts = [t.item() for t in dev_steps]  # CPU tensors: no device sync
        adam_step_foreach_(p32, g32, dev_exp_avgs, dev_exp_avg_sqs, counts, **adam)
        write_back(dev_params, p32)
