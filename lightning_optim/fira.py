"""Fira: GaLore's low-rank Adam step plus the norm-scaled full-rank residual (docs/algorithms.md#fira)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StepCountedOptimizer
from lightning_optim.galore import GaLore, _galore_update
from lightning_optim.projection import ProjectedStateSpec, Side, project_back
from lightning_optim.validation import check_range

__all__ = ["Fira", "scaled_norm"]

#: the authors' guard in φ's denominator and in the limiter's (``+ 1e-8``)
_TINY = 1e-8


def scaled_norm(x: Tensor, dim: int | None = None) -> Tensor:
    """‖x‖₂ (over ``dim``, kept as a size-1 dimension; over everything when None) without overflow:
    computed as max|x| · ‖x / max|x|‖, so entries above √(fp32 max) give the true norm, not inf.

    Args:
        x: a tensor.
        dim: the dimension to reduce, or None for the whole tensor (a 0-dim result).
    """
    peak = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    safe = torch.where((peak > 0) & torch.isfinite(peak), peak, torch.ones_like(peak))
    if dim is None:
        return torch.linalg.vector_norm(x / safe) * safe
    return torch.linalg.vector_norm(x / safe, dim=dim, keepdim=True) * safe


class Fira(GaLore):
    r"""Fira: GaLore's low-rank Adam update plus the residual G − αPR, scaled by the norm ratio of Adam's step.

    X. Chen, K. Feng, C. Li, X. Lai, X. Yue, Y. Yuan and G. Wang, "Fira: Can We Achieve Full-rank Training
    of LLMs Under Low-rank Constraint?", 2024 (arXiv 2410.01623); follows the authors' code xichen-fy/Fira
    (``optimizer_torch/fira_adamw.py``, ``optimizer_torch/gradient_projection.py``). For a 2-D parameter W
    (m × n) with gradient G, t its count of updates, r = min(rank, m, n), P, R, M, V as in :class:`GaLore`,
    and c_t = √(1 − β2^t)/(1 − β1^t):

    .. math::
        N = (M/(1-\beta_1^t)) / (\sqrt{\hat V} + \epsilon) \;/\; c_t \quad(\text{the authors' } M/(\sqrt V + \epsilon')) \\
        \varphi_j = \lVert N_{:,j} \rVert / (\lVert R_{:,j} \rVert + 10^{-8}) \ \text{(left: per column)},\quad
        \varphi_i = \lVert N_{i,:} \rVert / (\lVert R_{i,:} \rVert + 10^{-8}) \ \text{(right: per row)} \\
        S = \varphi \odot (G - \alpha\, P R \text{ or } G - \alpha\, R P^\top) \\
        \text{limiter: } \ell = \max(\lVert S\rVert / (s_{t-1} + 10^{-8}),\ \gamma) / \gamma,\quad
            S \leftarrow S/\ell,\quad s_t = \lVert S_{\text{before}}\rVert/\ell \ (= \lVert S \rVert) \\
        W \leftarrow W(1-\eta\lambda) - \eta\, c_t\,(\alpha\, P N \text{ or } \alpha\, N P^\top + S)

    The scaling factor is per column of R for the left projection and per row for the right one (the
    authors choose the axis from R's shape, which is the same except for a square R). At a parameter's
    first update s_{t−1} does not exist and S is not limited (the authors'). Every other parameter takes
    plain AdamW, as in GaLore.

    **The residual subtracts α·P R, not P R** (the authors' ``project_back`` multiplies by α, and the
    residual is ``p.grad - project_back(R)``): with α = 0.25 the residual keeps 0.75·P R of the in-subspace
    gradient. With ``scale=1`` the residual is exactly the part of G outside the subspace, (I − PPᵀ) G, and a
    full-rank projection (r = min(m, n)) gives S = 0, i.e. GaLore.

    Defaults (the authors' code): lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight_decay 0 (their ``AdamW``);
    rank 128, update_proj_gap 200, scale α 0.25 (their README and ``pre_training_c4/scripts``; the argparse
    defaults are update_proj_gap 50, alpha 1.0, and the pip package's ``divide_params`` rank 8, alpha 1.0;
    their scripts' lr is 0.01); gamma γ = 1.01 (hard-coded there, an argument here).

    Deviations from the authors' code: ε is added to √V̂ (torch's form; the authors' M/(√V + ε) is ours
    with ε·√(1 − β2^t)); N, φ and the limiter are the authors' quantities otherwise (φ and ‖S‖ are taken
    without the bias-correction factor c_t, which multiplies the whole step, as in their ``step_size``);
    weight decay before the update; norms computed overflow-free (:func:`scaled_norm`); the limiter's
    ``max`` is a device op (the authors' Python ``max`` of a tensor syncs); the previous norm is a tensor in
    the optimizer state (``residual_norm``); plus GaLore's deviations (fp32 state and math for half
    precision, projector in the state, rank clipped, SVD fallbacks).

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: ε added to √V̂ (default 1e-6).
        weight_decay: decoupled decay λ, W ← W(1 − ηλ) before the update (default 0).
        rank: r, the projection rank of 2-D parameters, clipped to min(m, n) (default 128); ``None``: the
            group takes plain AdamW.
        update_proj_gap: T, P is recomputed at a parameter's 1st, (T+1)-th, ... update (default 200).
        scale: α, the factor of the projected-back update and of the back-projection subtracted in the
            residual (default 0.25).
        proj_type: ``"std"`` (default), ``"reverse_std"``, ``"left"`` or ``"right"`` (as GaLore).
        gamma: γ >= 1, the norm-growth limit of the residual per step (default 1.01).
        foreach: multi-tensor AdamW for the unprojected tensors (default: on for CUDA params).

    State per projected parameter (m × n): GaLore's ``exp_avg``, ``exp_avg_sq`` (R's shape), ``projector``
    and ``step``, plus ``residual_norm`` (0-dim, s_t), fp32 for bf16/fp16 parameters: 4·(2·r·n + m·r + 1)
    bytes (left) or 4·(2·m·r + n·r + 1) (right), GaLore's plus 4 bytes. A moment reset (MomentumReset,
    SpikeGuard) zeroes the projected moments and keeps ``projector``, ``step`` **and ``residual_norm``**:
    right after a reset Adam's restarted moments make ‖N‖ (and so φ) jump, and the kept s_{t−1} limits the
    residual to γ times its pre-reset norm (a zeroed s would pin the residual at ~1e-8; a deleted one would
    let the jump through unlimited). SpikeAwareClipping and AdaptiveMomentum refuse it, as GaLore.
    """

    state_spec = ProjectedStateSpec(
        moments={"exp_avg": True, "exp_avg_sq": False},
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        second_moment_like_grad_sq=False,
        buffers=("projector", "residual_norm"),
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int | None = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: Literal["std", "reverse_std", "left", "right"] = "std",
        gamma: float = 1.01,
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
            proj_type=proj_type,
            gamma=gamma,
            foreach=foreach,
        )
        StepCountedOptimizer.__init__(self, params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_range("gamma", group["gamma"], 1.0)

    def _update_matrix(
        self, p: Tensor, state: dict[str, Any], side: Side, r: int, *, group: dict[str, Any], seed: int, adam: dict[str, float]
    ) -> None:
        scale, gamma = group["scale"], group["gamma"]
        beta1, beta2 = adam["beta1"], adam["beta2"]

        def residual(grad: Tensor, low_rank: Tensor, direction: Tensor, projector: Tensor, t: int) -> Tensor:
            bias2 = 1 - beta2**t
            c_t = bias2**0.5 / (1 - beta1**t)
            authors_n = direction / bias2**0.5  # = M / (√V + ε√(1 − β2^t)): the authors' norm_grad
            dim = 0 if side == "left" else 1  # left: R is r × n, per column; right: m × r, per row
            phi = scaled_norm(authors_n, dim) / (scaled_norm(low_rank, dim) + _TINY)
            rest = grad - project_back(low_rank, projector, side) * scale
            rest.mul_(phi)
            norm = scaled_norm(rest)
            previous = state.get("residual_norm")
            if previous is None:  # a parameter's first update: nothing to limit against (the authors')
                state["residual_norm"] = norm.to(grad.dtype)
            else:
                limiter = torch.clamp_min(norm / (previous + _TINY), gamma) / gamma
                rest.div_(limiter)
                previous.copy_(norm / limiter)
            return rest.mul_(c_t)

        _galore_update(
            p,
            state,
            side,
            r,
            seed=seed,
            update_proj_gap=group["update_proj_gap"],
            scale=scale,
            owner="Fira",
            residual=residual,
            **adam,
        )
