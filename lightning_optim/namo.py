"""NAMO and NAMO-D: orthogonalized momentum with Adam-type adaptive step sizes (docs/algorithms.md#namo-and-namo-d)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, state_dtype, write_back
from lightning_optim.matrix import (
    MatrixOptimizer,
    batched_views,
    frobenius_norms,
    matrix_shape,
    matrix_view,
    newton_schulz,
    split_spec,
)
from lightning_optim.validation import check_betas, check_bool, check_choice, check_int, check_range

__all__ = ["NAMO", "NAMOD", "namo_matrices_", "namo_d_matrices_"]

#: the authors' guard added to the first bias correction (``bc1 + 1e-12``)
_BC1_GUARD = 1e-12

_SPEC = StateSpec(
    moments={"momentum_buffer": True, "grad_norm_sq": False, "exp_avg": True, "exp_avg_sq": False},
    first_moment="momentum_buffer",
    second_moment="exp_avg_sq",
    second_moment_like_grad_sq=False,  # the AdamW part's only; the matrices keep the EMA of ‖G‖², not of g²
)
_SPEC_NAMO, _SPEC_ADAMW = split_spec(_SPEC, ("momentum_buffer", "grad_norm_sq"))
_SPEC_D = StateSpec(
    moments={"momentum_buffer": True, "col_norm_sq": False, "exp_avg": True, "exp_avg_sq": False},
    first_moment="momentum_buffer",
    second_moment="exp_avg_sq",
    second_moment_like_grad_sq=False,  # the matrices keep per-column EMAs of ‖G_:j‖², not of g²
)
_SPEC_NAMO_D, _ = split_spec(_SPEC_D, ("momentum_buffer", "col_norm_sq"))


def _column_norms(x: Tensor) -> Tensor:
    """‖X_:j‖ of each column of each matrix of ``x`` (..., m, n) → (..., n), overflow-safe (scaled by max|X|)."""
    peak = x.abs().amax(dim=(-2, -1), keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.linalg.vector_norm(x / peak, dim=-2) * peak.squeeze(-1)


def _bias_factor(lr: float, beta1: float, beta2: float, step: float) -> float:
    """η·√(1 − β2^t) / (1 − β1^t + 1e-12): the authors' bias-corrected base step size (host float)."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step + _BC1_GUARD)


def namo_matrices_(
    w: Tensor,
    g: Tensor,
    u: Tensor,
    v: Tensor,
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    ns_steps: int,
    ns_dtype: str,
) -> Tensor:
    r"""One NAMO step of a batch of matrices; returns the new W and updates ``v`` in place.

    v ← β2·v + (1 − β2)·‖G‖²_F; α = η·√(1−β2^t)/(1−β1^t + 1e-12) · ‖U‖_F/(√v + ε);
    W ← W·(1 − λ·min(α, 1)) − min(α·s, 1)·NS(U), with s = ``scale``·√max(m, n).

    Args:
        w: W, (..., m, n) fp32.
        g: the gradient G, same shape.
        u: the momentum direction U (the Nesterov mix or the buffer), same shape.
        v: the EMA of ‖G‖²_F, shape (...) (one per matrix), written in place.
        step: t (host number, after this step's increment).
        lr: η.
        beta1: β1 (the momentum coefficient, only in the bias correction here).
        beta2: β2 of the norm EMA.
        eps: ε added to √v.
        weight_decay: λ.
        scale: the coefficient of √max(m, n).
        ns_steps: Newton-Schulz iterations.
        ns_dtype: their dtype.
    """
    m, n = w.shape[-2:]
    g_norm, _ = frobenius_norms(g)
    u_norm, _ = frobenius_norms(u)
    g_norm, u_norm = g_norm.squeeze(-1).squeeze(-1), u_norm.squeeze(-1).squeeze(-1)
    v.mul_(beta2).add_((g_norm * (1.0 - beta2)) * g_norm)  # ((1-β2)·‖G‖)·‖G‖: finite up to ‖G‖ ≈ 1.8e20
    alpha = _bias_factor(lr, beta1, beta2, step) * (u_norm / (v.sqrt() + eps))
    decay = 1.0 - weight_decay * alpha.clamp(max=1.0)
    size = (alpha * (scale * math.sqrt(max(m, n)))).clamp(max=1.0)
    ortho = newton_schulz(u, ns_steps, ns_dtype).float()
    return w * decay[..., None, None] - ortho * size[..., None, None]


def namo_d_matrices_(
    w: Tensor,
    g: Tensor,
    u: Tensor,
    v: Tensor,
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    clamp: float,
    ns_steps: int,
    ns_dtype: str,
) -> Tensor:
    r"""One NAMO-D step of a batch of matrices; returns the new W and updates ``v`` (per column) in place.

    v_j ← β2·v_j + (1 − β2)·‖G_:j‖²; d_j = ‖U_:j‖/(√v_j + ε), clamped to [c·mean(d), mean(d)/c] when
    0 < c ≤ 1 (mean over the finite-or-inf, non-NaN d_j; no clamp when that mean is not finite and > 0);
    b = η·√(1−β2^t)/(1−β1^t + 1e-12); W_:j ← W_:j·max(0, 1 − λ·min(b·d_j, 1)) − min(d_j·b·s, 1)·NS(U)_:j.

    Args:
        w: W, (..., m, n) fp32.
        g: G.
        u: U.
        v: per-column EMA of ‖G_:j‖², shape (..., n), written in place.
        step: t.
        lr: η.
        beta1: β1.
        beta2: β2.
        eps: ε.
        weight_decay: λ.
        scale: the coefficient of √max(m, n).
        clamp: c (0 turns the clamp off).
        ns_steps: Newton-Schulz iterations.
        ns_dtype: their dtype.
    """
    m, n = w.shape[-2:]
    g_cols = _column_norms(g)
    v.mul_(beta2).add_((g_cols * (1.0 - beta2)) * g_cols)
    ortho = newton_schulz(u, ns_steps, ns_dtype).float()
    base = _bias_factor(lr, beta1, beta2, step)
    d = _column_norms(u) / (v.sqrt() + eps)
    if 0.0 < clamp <= 1.0:
        mean = torch.nanmean(d, dim=-1, keepdim=True)
        ok = torch.isfinite(mean) & (mean > 0)
        low = torch.where(ok, mean * clamp, torch.zeros_like(mean))
        high = torch.where(ok, mean / clamp, torch.full_like(mean, math.inf))
        d = torch.clamp(d, min=low, max=high)
    decay = (1.0 - weight_decay * (d * base).clamp(max=1.0)).clamp(min=0.0)
    size = (d * (base * scale * math.sqrt(max(m, n)))).clamp(max=1.0)
    return w * decay.unsqueeze(-2) - ortho * size.unsqueeze(-2)


class _NAMOBase(MatrixOptimizer):
    """The shared machinery of NAMO and NAMO-D (the same options but ``clamp``; different norm state)."""

    _norm_key = "grad_norm_sq"

    def _validate_matrix_options(self, group: dict[str, Any]) -> None:
        if group["use_muon"]:
            check_betas(group["betas"], ("momentum", "beta2"))
            check_range("eps", group["eps"], 0.0)
        check_bool("nesterov", group["nesterov"])
        check_int("ns_steps", group["ns_steps"], 1)
        check_choice("ns_dtype", group["ns_dtype"], ("bfloat16", "float32"))
        check_range("scale", group["scale"], 0.0)

    def _norm_shape(self, p: Tensor, flatten: bool) -> tuple[int, ...]:
        return tuple(matrix_shape(p.shape, flatten)[:-2])

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if group["use_muon"] and self._norm_key not in state:
            state[self._norm_key] = torch.zeros(self._norm_shape(p, group["flatten"]), dtype=state_dtype(p), device=p.device)
        return super()._init_state(p, group)

    def _rule(self, group: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        beta1, beta2 = group["betas"]
        options = dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            scale=group["scale"],
            ns_steps=group["ns_steps"],
            ns_dtype=group["ns_dtype"],
        )
        return namo_matrices_, options

    def _matrix_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], foreach: bool
    ) -> None:
        fn, options = self._rule(group)
        run = _namo_foreach if foreach else _namo_single_tensor
        run(
            fn,
            params,
            grads,
            [s["momentum_buffer"] for s in states],
            [s[self._norm_key] for s in states],
            [s["step"] for s in states],
            momentum=group["betas"][0],
            nesterov=group["nesterov"],
            flatten=group["flatten"],
            options=options,
        )


_DOC_COMMON = """
    **The split** (as :class:`~lightning_optim.muon.Muon`, shared base
    :class:`~lightning_optim.matrix.MatrixOptimizer`): one optimizer; every group carries ``use_muon``
    (``rule: namo``/``matrix``/``adamw`` accepted); a group without it is split by shape (2+ dims → the matrix
    rule, 0-/1-D and named embeddings/heads → AdamW); conv kernels are viewed as (out, in·kh·kw), 3-D
    weights as per-expert matrices (one adaptive scale per expert); use
    :func:`~lightning_optim.matrix.split_params` for module-type detection of embeddings and the head.
"""


class NAMO(_NAMOBase):
    r"""NAMO: Muon's orthogonalized momentum scaled by one Adam-type adaptive step size per matrix.

    Zhang, Liu & Schaeffer, "Adam Improves Muon: Adaptive Moment Estimation with Orthogonalized Momentum"
    (arXiv:2602.17080, 2026); follows the authors' code minxin-zhg/namo ``src/namo.py`` (class ``NAMO``).
    For a matrix W (m × n view) with gradient G, momentum M, step t:

    .. math::
        M \leftarrow \beta_1 M + (1-\beta_1) G,\quad
            U = \beta_1 M + (1-\beta_1) G \text{ (Nesterov) or } U = M \\
        v \leftarrow \beta_2 v + (1-\beta_2)\,\|G\|_F^2 \\
        \alpha = \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t + 10^{-12}}\cdot\frac{\|U\|_F}{\sqrt{v}+\epsilon} \\
        W \leftarrow W\,(1 - \lambda\min(\alpha, 1)) - \min(\alpha\, s, 1)\,\mathrm{NS}_5(U),\quad
            s = 0.2\sqrt{\max(m, n)}

    i.e. Adam's m̂/√v̂ applied to the whole matrix as one "coordinate" (‖U‖ for |m|, the EMA of ‖G‖² for
    v), times the orthogonal direction. NS is the quintic Newton-Schulz of Muon (bf16, 5 steps). The weight
    decay uses the clamped adaptive step, not η, as the authors' code. Every other parameter takes the
    AdamW rule (torch AdamW's equations).
""" + _DOC_COMMON + r"""
    Defaults (the authors' ``NAMO`` class): lr 1e-2, betas (0.95, 0.99) (their ``momentum``, ``mu2``),
    eps 1e-8 (``adamnorm_eps``), weight_decay 0.1 (``wd``), Nesterov on, 5 NS steps, scale 0.2
    (``scale_coeff``); AdamW betas (0.9, 0.95), eps 1e-8.

    Deviations from the authors' code: the AdamW rule is torch AdamW's (ε added to √v̂; the authors add ε
    to the un-corrected √v) with its own lr ``adamw_lr`` (default 3e-4; the authors' single group gives
    AdamW the matrix lr) and weight decay ``adamw_weight_decay`` (default 0, as their Hydra configs set
    ``adamw_weight_decay: 0``; their class defaults it to ``wd``); norms are computed overflow-safe (scaled
    by max|X|, and v's increment as ((1−β2)‖G‖)‖G‖); the step size multiplies the NS output in fp32 (the
    authors multiply in bf16); √max(m, n) uses the matrix view (for 4-D kernels the authors read
    ``p.shape[:2]``); 3-D weights are per-expert matrices (the authors accept 2-D and 4-D only); bf16/fp16
    parameters get fp32 state and math; the gradient is never written; ``use_exact_svd`` is not offered.

    Args:
        params: parameters, named parameters or param groups (each may set ``use_muon``/``rule``,
            ``flatten`` and any argument below).
        lr: η, the base learning rate of the matrix rule (default 1e-2).
        betas: (β1, β2): β1 the momentum EMA coefficient (and its bias correction), β2 the EMA
            coefficient of ‖G‖²_F (default (0.95, 0.99)).
        eps: ε added to √v (default 1e-8).
        weight_decay: λ, applied as W(1 − λ·min(α, 1)) (default 0.1).
        nesterov: use U = β1·M + (1 − β1)·G instead of M (default True).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_dtype: dtype of the Newton-Schulz iteration, ``"bfloat16"`` (the authors) or ``"float32"``.
        scale: the coefficient of √max(m, n) in the update size (default 0.2).
        adamw_lr: learning rate of the AdamW rule (default 3e-4).
        adamw_betas: (β1, β2) of the AdamW rule (default (0.9, 0.95)).
        adamw_eps: ε of the AdamW rule, added to √v̂ (default 1e-8).
        adamw_weight_decay: decoupled decay of the AdamW rule (default 0).
        flatten: view 3-D tensors as (shape[0], rest) (Conv1d kernels) instead of per-expert matrices.
        foreach: multi-tensor path: foreach momentum, the norms, NS and updates batched over same-shaped
            matrix views (default: on for CUDA params).

    State per parameter: matrices ``momentum_buffer`` (4 bytes/param, fp32 for bf16/fp16 parameters) and
    ``grad_norm_sq`` (one fp32 per matrix); AdamW parameters ``exp_avg``, ``exp_avg_sq`` (8 bytes/param);
    each a ``step`` (CPU float32).
    """

    state_spec = _SPEC
    matrix_spec = _SPEC_NAMO
    adamw_spec = _SPEC_ADAMW
    rule_names = ("namo", "muon")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.95, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: Literal["bfloat16", "float32"] = "bfloat16",
        scale: float = 0.2,
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
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                nesterov=nesterov,
                ns_steps=ns_steps,
                ns_dtype=ns_dtype,
                scale=scale,
                adamw_lr=adamw_lr,
                adamw_betas=adamw_betas,
                adamw_eps=adamw_eps,
                adamw_weight_decay=adamw_weight_decay,
                flatten=flatten,
                foreach=foreach,
            ),
        )


class NAMOD(_NAMOBase):
    r"""NAMO-D: orthogonalized momentum right-multiplied by a clamped diagonal of per-column adaptive steps.

    Zhang, Liu & Schaeffer, "Adam Improves Muon" (arXiv:2602.17080, 2026), the column-wise variant;
    follows the authors' code minxin-zhg/namo ``src/namo.py`` (class ``NAMO_D``). For a matrix W (m × n
    view), with M, U as in :class:`NAMO` and per-column state v ∈ ℝⁿ:

    .. math::
        v_j \leftarrow \beta_2 v_j + (1-\beta_2)\,\|G_{:j}\|^2,\quad
            d_j = \frac{\|U_{:j}\|}{\sqrt{v_j}+\epsilon} \\
        d_j \leftarrow \mathrm{clip}\big(d_j,\ c\,\bar d,\ \bar d / c\big),\quad \bar d = \mathrm{mean}_j\, d_j
            \quad (0 < c \le 1) \\
        b = \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t + 10^{-12}} \\
        W_{:j} \leftarrow W_{:j}\,\max(0, 1 - \lambda\min(b\,d_j, 1))
            - \min(b\,s\,d_j, 1)\,\mathrm{NS}_5(U)_{:j},\quad s = 0.2\sqrt{\max(m, n)}

    so the update is NS(U)·D with D = diag(min(b·s·d_j, 1)). The clamp c bounds each column's scale to
    [c, 1/c] times the mean column scale (c = 1: every column gets the mean, i.e. a single NAMO-like
    scalar; c → 0: free per-column scales); the mean ignores NaN entries, and the clamp is skipped where
    the mean is not finite and positive, as the authors' code. The weight decay of column j uses the
    unscaled b·d_j (clamped to 1).
""" + _DOC_COMMON + r"""
    Defaults (the authors' ``NAMO_D`` class): lr 1e-2, betas (0.95, 0.99), eps 1e-8, weight_decay 0.1,
    Nesterov on, 5 NS steps, scale 0.2, clamp c 0.75 (``col_state_clamp_c``; their Hydra config for the
    GPT-2 runs sets 0.01 and their sweeps try 0.12-0.90); AdamW betas (0.9, 0.95), eps 1e-8.

    Deviations from the authors' code: as :class:`NAMO` (AdamW rule with ε added to √v̂, own ``adamw_lr``
    and ``adamw_weight_decay`` defaulting to 0; overflow-safe column norms; fp32 product of the NS output
    and the scales; matrix-view shapes; per-expert 3-D weights; fp32 state for half-precision parameters;
    no ``use_exact_svd``). The momentum buffer has the parameter's shape (the authors keep it flattened).

    Args:
        params: parameters, named parameters or param groups (each may set ``use_muon``/``rule``,
            ``flatten`` and any argument below).
        lr: η, the base learning rate of the matrix rule (default 1e-2).
        betas: (β1, β2): the momentum coefficient and the EMA coefficient of the column norms² (default
            (0.95, 0.99)).
        eps: ε added to √v_j (default 1e-8).
        weight_decay: λ, per column W_:j(1 − λ·min(b·d_j, 1)) (default 0.1).
        nesterov: use U = β1·M + (1 − β1)·G instead of M (default True).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_dtype: dtype of the Newton-Schulz iteration, ``"bfloat16"`` (the authors) or ``"float32"``.
        scale: the coefficient of √max(m, n) in the update size (default 0.2).
        clamp: c in [0, 1]: column scales are clamped to [c·mean, mean/c]; 0 turns the clamp off
            (default 0.75).
        adamw_lr: learning rate of the AdamW rule (default 3e-4).
        adamw_betas: (β1, β2) of the AdamW rule (default (0.9, 0.95)).
        adamw_eps: ε of the AdamW rule, added to √v̂ (default 1e-8).
        adamw_weight_decay: decoupled decay of the AdamW rule (default 0).
        flatten: view 3-D tensors as (shape[0], rest) (Conv1d kernels) instead of per-expert matrices.
        foreach: multi-tensor path: foreach momentum, the norms, NS and updates batched over same-shaped
            matrix views (default: on for CUDA params).

    State per parameter: matrices ``momentum_buffer`` (4 bytes/param) and ``col_norm_sq`` (one fp32 per
    column of the matrix view); AdamW parameters ``exp_avg``, ``exp_avg_sq`` (8 bytes/param); each a
    ``step`` (CPU float32).
    """

    state_spec = _SPEC_D
    matrix_spec = _SPEC_NAMO_D
    adamw_spec = _SPEC_ADAMW
    rule_names = ("namo_d", "namo", "muon")
    _norm_key = "col_norm_sq"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.95, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: Literal["bfloat16", "float32"] = "bfloat16",
        scale: float = 0.2,
        clamp: float = 0.75,
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
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                nesterov=nesterov,
                ns_steps=ns_steps,
                ns_dtype=ns_dtype,
                scale=scale,
                clamp=clamp,
                adamw_lr=adamw_lr,
                adamw_betas=adamw_betas,
                adamw_eps=adamw_eps,
                adamw_weight_decay=adamw_weight_decay,
                flatten=flatten,
                foreach=foreach,
            ),
        )

    def _validate_matrix_options(self, group: dict[str, Any]) -> None:
        super()._validate_matrix_options(group)
        check_range("clamp", group["clamp"], 0.0, 1.0)

    def _norm_shape(self, p: Tensor, flatten: bool) -> tuple[int, ...]:
        shape = matrix_shape(p.shape, flatten)
        return (*shape[:-2], shape[-1])

    def _rule(self, group: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        _, options = super()._rule(group)
        return namo_d_matrices_, {**options, "clamp": group["clamp"]}


# -- the two paths (shared by NAMO and NAMO-D: ``fn`` is the per-batch rule) -------------------------------
def _namo_single_tensor(
    fn: Any,
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    norms: list[Tensor],
    steps: list[Tensor],
    *,
    momentum: float,
    nesterov: bool,
    flatten: bool,
    options: dict[str, Any],
) -> None:
    """Reference path: one parameter at a time (a 3-D weight is its batch of per-expert matrices)."""
    for param, grad, buf, norm, step_t in zip(params, grads, bufs, norms, steps):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        buf.lerp_(g32, 1 - momentum)
        update = torch.lerp(g32, buf, momentum) if nesterov else buf
        new = fn(
            matrix_view(p32, flatten), matrix_view(g32, flatten), matrix_view(update, flatten), norm, step_t.item(), **options
        )
        p32.copy_(new.reshape(p32.shape))
        write_back([param], [p32])


def _namo_foreach(
    fn: Any,
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    norms: list[Tensor],
    steps: list[Tensor],
    *,
    momentum: float,
    nesterov: bool,
    flatten: bool,
    options: dict[str, Any],
) -> None:
    """Multi-tensor path: foreach momentum; matrices of one view shape and step count stacked into one batch."""
    torch._foreach_add_(steps, 1.0)
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, bufs, norms, steps])
    for (dev_params, dev_grads, dev_bufs, dev_norms, dev_steps), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        torch._foreach_lerp_(dev_bufs, g32, 1 - momentum)
        updates = torch._foreach_lerp(g32, dev_bufs, momentum) if nesterov else dev_bufs
        counts = [t.item() for t in dev_steps]  # CPU tensors: no device sync
        batches: dict[tuple[tuple[int, ...], float], list[int]] = {}
        for shape, idx in batched_views(dev_params, flatten).items():
            for i in idx:
                batches.setdefault((shape, counts[i]), []).append(i)
        for (_, count), idx in batches.items():
            stack = lambda ts: torch.stack([matrix_view(ts[i], flatten) for i in idx])  # noqa: E731
            norm = torch.stack([dev_norms[i] for i in idx])
            new = fn(stack(p32), stack(g32), stack(updates), norm, count, **options)
            torch._foreach_copy_([p32[i] for i in idx], [x.reshape(p32[i].shape) for i, x in zip(idx, new.unbind())])
            torch._foreach_copy_([dev_norms[i] for i in idx], list(norm.unbind()))
        write_back(dev_params, p32)
