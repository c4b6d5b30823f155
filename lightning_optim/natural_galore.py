"""Natural GaLore: GaLore whose projected gradient is preconditioned by a low-rank empirical Fisher
(docs/algorithms.md#natural-galore)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StepCountedOptimizer, state_dtype
from lightning_optim.galore import GaLore, _galore_update
from lightning_optim.projection import ProjectedStateSpec, Side
from lightning_optim.state_adapters import KeyedStateAdapter, register_state_adapter
from lightning_optim.validation import check_int, check_range

__all__ = ["NaturalGaLore", "natural_gradient"]

#: relative floor of the damping, as a fraction of the largest squared history norm: below it float64
#: cannot resolve λ against GᵀG, and the Cholesky factor of λI + GᵀG could fail for repeated gradients
_RELATIVE_DAMPING_FLOOR = 1e-12


def natural_gradient(history: Tensor, current: int, damping: float) -> Tensor:
    r"""(λI + G Gᵀ)⁻¹ g for g = ``history[current]``, G the k × s matrix whose columns are the s rows of ``history``.

    Natural GaLore's empirical-Fisher solve (Woodbury: an s × s system instead of a k × k one), computed in
    the push-through form (λI + G Gᵀ)⁻¹ G = G (λI + GᵀG)⁻¹: since g is the column ``current`` of G,

    .. math:: \tilde g = G\, y,\qquad (\lambda I + G^\top G)\, y = e_{current},

    which equals the paper's g/λ − G (λI + GᵀG)⁻¹ Gᵀ g / λ exactly but involves no subtraction of two
    terms of size |g|/λ (in fp32 the authors' form loses log10(|g|²/λ) digits). The Gram matrix, its
    Cholesky factor (``cholesky_ex``: no host sync) and G y are computed in float64 (float32 on MPS, which
    has no float64), so no square of a finite fp32 entry overflows. Rows of zeros (history slots not yet
    filled, or reset) contribute nothing: the result is the same as for the shorter history. The damping
    is floored at 1e-12 · max_i |g_i|² (a guard where float64 cannot resolve λ; inactive for |g|² < 1e9·λ).
    A result that is not finite (a NaN/inf gradient in the history, or a failed factorisation) is replaced
    on the device by g/λ, the answer for an empty history.

    Args:
        history: (s, ...) the last s low-rank gradients (rows of zeros for empty slots), current one included.
        current: index of the current gradient's row.
        damping: λ > 0.
    """
    s = history.shape[0]
    compute = torch.float32 if history.device.type == "mps" else torch.float64
    g_rows = history.reshape(s, -1).to(compute)  # Gᵀ: s × k
    gram = g_rows @ g_rows.mT  # GᵀG: s × s
    lam = torch.clamp_min(gram.diagonal().amax() * _RELATIVE_DAMPING_FLOOR, damping)
    system = gram + lam * torch.eye(s, dtype=compute, device=history.device)
    factor, info = torch.linalg.cholesky_ex(system)
    unit = torch.zeros(s, 1, dtype=compute, device=history.device)
    unit[current] = 1.0
    y = torch.cholesky_solve(unit, factor)
    result = (g_rows.mT @ y).reshape(history.shape[1:]).to(history.dtype)
    fallback = history[current] / damping
    ok = torch.isfinite(result).all() & (info == 0)
    return torch.where(ok, result, fallback)


class NaturalGaLore(GaLore):
    r"""Natural GaLore: GaLore with the projected gradient preconditioned by the inverse empirical Fisher.

    Arijit Das, "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and Fine-tuning",
    2024 (arXiv 2410.16029); authors' code selfsupervised-ai/Natural-GaLore (``code/natural_galore/
    subspace_adamw.py``, ``galore_projector_tensor.py``, ``proj_type="natural_galore"``). For a 2-D
    parameter W (m × n) with gradient G, t its count of updates and r = min(rank, m, n), as :class:`GaLore`
    (same projector P, refresh schedule, sides and fallbacks) except that the Adam moments see g̃ instead
    of R:

    .. math::
        R = P^\top G \text{ or } G P,\qquad H_{(t-1) \bmod s} \leftarrow \operatorname{vec}(R) \\
        \tilde g = (\lambda I + \textstyle\sum_{i} h_i h_i^\top)^{-1} \operatorname{vec}(R)
            \quad\text{(Woodbury, an } s\times s \text{ solve; see } \texttt{natural\_gradient}) \\
        M \leftarrow \beta_1 M + (1-\beta_1)\tilde g,\quad V \leftarrow \beta_2 V + (1-\beta_2)\tilde g^2,\quad
        N = \hat M/(\sqrt{\hat V}+\epsilon) \\
        W \leftarrow W(1-\eta\lambda_{wd}) - \eta\,\alpha\, P N \text{ (left) or } \eta\,\alpha\, N P^\top \text{ (right)}

    H is a ring buffer of the last s projected gradients (the current one written first, so g̃ uses it,
    as the authors append before solving); the empirical Fisher λI + Σ h_i h_iᵀ is a sum, not a mean (the
    authors'). The correction enters **before** the moments (the authors' ``project`` returns g̃ and
    their AdamW runs on it). When P is refreshed, the history is kept (as the authors: its old rows are
    in the previous basis). Unprojected parameters take plain AdamW, as in GaLore.

    Defaults (the authors' code): lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight_decay 0 (``SubSpaceAdamW``),
    natural_history s = 20 (``SubSpaceAdamW`` and ``pytorchrun_main.py``), damping λ = 1e-3 (hard-coded
    ``lambda_damping``); rank 128, update_proj_gap 200, scale 0.25 (``scripts/benchmark_c4``; the argparse
    default of ``galore_scale`` is 1.0; their scripts' lr is 0.01 and weight decay 0.01).

    Deviations from the authors' code: the projection is GaLore's one-sided P (as the paper describes it,
    Section 3), not the authors' Tucker decomposition of every mode (tensorly), so R is r × n / m × r (the
    authors' 2-D core is r × r) and >2-D tensors take AdamW; g̃ is computed in the push-through form in
    float64 (same value; the authors' fp32 subtraction form cancels catastrophically once |g|² ≫ λ), with
    a damping floor and a finite fallback (see :func:`natural_gradient`); ``natural_history=0`` turns the
    correction off (exactly GaLore; the authors' code raises IndexError there); λ is an argument
    (``damping``); plus every deviation of :class:`GaLore` (ε added to √V̂, weight decay before the update,
    fp32 state for half-precision parameters, projector and history in the optimizer state so a resume is
    bit-exact, rank clipped, SVD fallbacks). The online variants (``online_natural_galore``) are not offered.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: ε added to √V̂ (default 1e-6).
        weight_decay: decoupled decay λ_wd, W ← W(1 − ηλ_wd) before the update (default 0).
        rank: r, the projection rank of 2-D parameters, clipped to min(m, n) (default 128); ``None``: the
            group takes plain AdamW.
        update_proj_gap: T, P is recomputed at a parameter's 1st, (T+1)-th, ... update (default 200).
        scale: α, the factor of the projected-back update (default 0.25).
        proj_type: ``"std"`` (default), ``"reverse_std"``, ``"left"`` or ``"right"`` (as GaLore).
        natural_history: s, the number of past projected gradients in the empirical Fisher (default 20;
            0: no correction, exactly GaLore).
        damping: λ > 0, the Tikhonov term of the empirical Fisher λI + G Gᵀ (default 1e-3).
        foreach: multi-tensor AdamW for the unprojected tensors (default: on for CUDA params).

    State per projected parameter (m × n): GaLore's ``exp_avg``, ``exp_avg_sq`` (R's shape), ``projector``,
    ``step``, plus ``grad_history`` (s, *R's shape), fp32 for bf16/fp16 parameters: 4·((2 + s)·r·n + m·r)
    bytes (left) or 4·((2 + s)·m·r + n·r) (right); the history is s/2 times the two moments (with s = 20,
    eleven times GaLore's moment memory). A moment reset (MomentumReset, SpikeGuard) zeroes the projected
    moments **and** the history (a zeroed history is an empty one: the spike's gradients leave the Fisher),
    and keeps ``projector`` and ``step``. SpikeAwareClipping and AdaptiveMomentum refuse it, as GaLore.
    """

    state_spec = ProjectedStateSpec(
        moments={"exp_avg": True, "exp_avg_sq": False},
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        second_moment_like_grad_sq=False,
        buffers=("projector", "grad_history"),
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
        natural_history: int = 20,
        damping: float = 1e-3,
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
            natural_history=natural_history,
            damping=damping,
            foreach=foreach,
        )
        StepCountedOptimizer.__init__(self, params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_int("natural_history", group["natural_history"], 0)
        check_range("damping", group["damping"], 0.0, low_open=True)

    def _update_matrix(
        self, p: Tensor, state: dict[str, Any], side: Side, r: int, *, group: dict[str, Any], seed: int, adam: dict[str, float]
    ) -> None:
        s, damping = group["natural_history"], group["damping"]
        transform = None
        if s > 0:
            shape = (s, *state["exp_avg"].shape)
            history = state.get("grad_history")
            if history is None or tuple(history.shape) != shape:  # first step, or natural_history changed
                state["grad_history"] = history = torch.zeros(shape, dtype=state_dtype(p), device=p.device)

            def transform(low_rank: Tensor, t: int) -> Tensor:
                slot = (t - 1) % s
                history[slot].copy_(low_rank)
                return natural_gradient(history, slot, damping)

        else:
            state.pop("grad_history", None)
        _galore_update(
            p,
            state,
            side,
            r,
            seed=seed,
            update_proj_gap=group["update_proj_gap"],
            scale=group["scale"],
            owner="NaturalGaLore",
            transform=transform,
            **adam,
        )


# the history is a statistic of the gradients: a moment reset clears it too (see the class docstring)
register_state_adapter(
    NaturalGaLore, KeyedStateAdapter("NaturalGaLore", "exp_avg", "exp_avg_sq", also_reset=("grad_history",))
)
